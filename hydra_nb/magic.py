"""``%%hydra_track``: track the training loop of one notebook cell, unchanged.

::

    %load_ext hydra_nb

    %%hydra_track --store runs/digits.zarr --dim 1024
    for epoch in range(5):
        for x, y in train_loader:
            ...

Contract:

- The cell body runs exactly as it would without the magic: it is compiled with the shell's
  compiler and executed in the user's namespace (as ``%%time`` does), inside
  ``with hydra_nb.track(...)``. Its variables land in the namespace; a trailing expression is
  displayed as a cell's would be.
- Its errors are the cell's errors: they propagate with the user's line in the traceback, the cell
  fails (``nbclient``/"run all" stop), and the engine leaves the store consistent. A
  ``KeyboardInterrupt`` stops training and tracking and says where the store stands.
- ``model``, ``loader`` and ``optimizer`` come from the namespace: named with ``--model`` /
  ``--loader`` / ``--optimizer``, or found when exactly one candidate exists among the names the
  cell itself uses (its AST), else in the whole namespace.
- Re-running a cell replaces its own run: the store records the cell that made it (its Jupyter cell
  id and the notebook's path where the kernel knows them, and a hash of its source; see
  ``hydra_nb.store.same_cell``), so the same cell run again (in this kernel, or the whole notebook
  in a new one: Run All, nbconvert, nbclient) replaces that run and prints a line saying so. A run
  that failed before its first step is replaced too. Any other run is refused (``--overwrite``
  replaces it, ``--resume`` continues it).
- Configuration problems (an ambiguous or missing name, a misspelled flag, another run in ``--store``,
  options the engine refuses) are ``UsageError``s raised before the cell body runs: the cell fails,
  untouched.
- When the cell ends (even by an error) the store is opened, its summary printed and bound to
  ``--as NAME`` (default ``hydra_store``). ``%hydra_status`` prints the current or last store.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import re
import time
from dataclasses import fields
from pathlib import Path

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .errors import HydraError, StoreOccupied, TrackingConfigError
from .options import OptionError, TrackOptions
from .projection import FULL_FRACTION
from .query import open_store
from .sources import PROGRESS_DELAY_S
from .store import describe_run, read_meta
from .tracker import Tracker, track
from .units import format_bytes

DEFAULT_NAME = "hydra_store"
_REFRESH_SECONDS = 0.2
_TEXT_REFRESH_SECONDS = 2.0


# -- option values ------------------------------------------------------------------------------
def _unquote(text: str | None) -> str | None:
    """IPython splits magic lines keeping quotes: ``--store "my runs/a.zarr"`` arrives quoted."""
    if text is not None and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _identifier(text: str) -> str:
    text = _unquote(text)
    if not text.isidentifier():
        raise argparse.ArgumentTypeError(f"--as takes a Python variable name, got {text!r}")
    return text


# the TrackOptions fields with a flag of their own (hydra_nb/options.py), and the magic-only flags that give an
# option its value from the namespace
_OPTION_FLAGS = {f.name: f.metadata["flag"] for f in fields(TrackOptions) if "flag" in f.metadata}
_NAMESPACE_FLAGS = {"loss_fn": "--loss", "exact_indices": "--exact-indices"}


def _flag_of(option: str) -> str:
    """How the magic's messages name an option of track: by its flag."""
    return _OPTION_FLAGS.get(option) or _NAMESPACE_FLAGS.get(option, option)


def _parser_of(flag: str, parse):
    """argparse's ``type=``: the option's own text → value (quotes IPython kept removed), errors naming the flag."""
    def convert(text: str):
        try:
            return parse(_unquote(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{flag} {exc}") from None

    convert.__name__ = flag.lstrip("-")  # argparse names the type in some messages
    return convert


def _track_option_flags(func):
    """One magic flag per ``TrackOptions`` field that declares one: name, default, help, choices, parser."""
    for f in reversed(fields(TrackOptions)):
        meta = f.metadata
        if "flag" not in meta:
            continue
        kwargs = {"dest": f.name, "default": f.default, "help": meta["help"]}
        if meta.get("action"):
            kwargs["action"] = meta["action"]
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if "parse" in meta:
            kwargs["type"] = _parser_of(meta["flag"], meta["parse"])
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        func = magic_arguments.argument(meta["flag"], **kwargs)(func)
    return func


# role, class, its usual name, flag, which instances are candidates (the trained model has trainable
# parameters: a loss module such as nn.CrossEntropyLoss() is no candidate), and how candidates are called
_ROLES = (
    ("model", nn.Module, "torch.nn.Module", "--model", lambda m: any(p.requires_grad for p in m.parameters()),
     "torch.nn.Module with trainable parameters"),
    ("loader", DataLoader, "torch.utils.data.DataLoader", "--loader", lambda _: True, "torch.utils.data.DataLoader"),
    ("optimizer", Optimizer, "torch.optim.Optimizer", "--optimizer", lambda _: True, "torch.optim.Optimizer"),
)


@magics_class
class HydraMagics(Magics):
    """``%%hydra_track`` (cell) and ``%hydra_status`` (line)."""

    def __init__(self, shell=None):
        super().__init__(shell)
        self._tracker: Tracker | None = None   # the run in progress
        self._last: tuple[Path, object] | None = None   # (path, loss_fn) of the last run
        self._cell_id: str | None = None   # the Jupyter cell id of the cell running now, where the front end sent one
        if shell is not None:
            shell.events.register("pre_run_cell", self._remember_cell)

    def _remember_cell(self, info) -> None:
        self._cell_id = getattr(info, "cell_id", None) or None

    # -- %%hydra_track ------------------------------------------------------------------------
    @magic_arguments.magic_arguments()
    @magic_arguments.argument("--store", required=True, metavar="PATH",
                              help="Folder of the run's Zarr store, e.g. runs/a.zarr.")
    @magic_arguments.argument("--model", metavar="NAME", help="The torch.nn.Module being trained.")
    @magic_arguments.argument("--loader", metavar="NAME", help="The DataLoader the loop iterates.")
    @magic_arguments.argument("--optimizer", metavar="NAME", help="The optimizer (torch.optim.SGD; Adam/AdamW in fast mode).")
    @magic_arguments.argument("--exact-indices", metavar="EXPR",
                              help="Exact mode: training samples to track, a Python expression such as "
                                   "\"range(10)\" or a variable name.")
    @magic_arguments.argument("--loss", metavar="NAME",
                              help="Per-sample loss (outputs, targets) -> losses, a name in the namespace; "
                                   "default cross-entropy.")
    @_track_option_flags
    @magic_arguments.argument("--as", dest="as_name", type=_identifier, default=DEFAULT_NAME, metavar="NAME",
                              help=f"Variable the opened store is bound to (default {DEFAULT_NAME}).")
    @cell_magic
    def hydra_track(self, line, cell):
        """Run the cell's training loop under ``hydra_nb.track``."""
        __tracebackhide__ = True  # noqa: F841  (IPython hides this frame; the user's lines remain)
        args = _parse(self.hydra_track, line)
        for option in ("store", "model", "loader", "optimizer", "exact_indices", "loss"):
            setattr(args, option, _unquote(getattr(args, option)))
        # compile first: a syntax error must not create or touch a store
        codes, used = self._compile(line, cell)
        found = self._resolve_roles(args, used)
        loss_fn = self._lookup(args.loss, "--loss") if args.loss else None
        exact_indices = self._evaluate(args.exact_indices, "--exact-indices") if args.exact_indices else None

        progress = _Progress()
        options = {name: getattr(args, name) for name in _OPTION_FLAGS}
        try:  # every option's value is checked by TrackOptions, inside track
            tracker = track(found["model"], found["loader"], Path(args.store).expanduser(), found["optimizer"],
                            exact_indices=exact_indices, loss_fn=loss_fn, on_step=progress.on_step,
                            origin=self._origin(line, cell), **options)
        except OptionError as exc:
            raise UsageError(exc.spelled(_flag_of)) from None
        except TrackingConfigError as exc:
            raise UsageError(str(exc)) from None

        entered, outcome = False, None
        try:
            with tracker:
                entered = True
                self._tracker = tracker
                self._last = (tracker.path, loss_fn)
                if tracker.replaced:
                    print(f"hydra_nb: {tracker.replaced}", flush=True)
                if args.projection_dim is not None and tracker.log_projector.is_identity:
                    print(f"hydra_nb: --dim {args.projection_dim} is at least {FULL_FRACTION:.0%} of the model's "
                          f"{tracker.layout.size:,} parameters: storing full-dimensional rows instead (no projection "
                          "noise; a sketch would save at most a quarter of the store).", flush=True)
                progress.start(tracker)
                self._execute(codes)
        except TrackingConfigError as exc:
            if not entered:
                message = self._explain_refusal(exc, tracker.path) if isinstance(exc, StoreOccupied) else str(exc)
                raise UsageError(message) from None
            outcome = exc
            raise
        except BaseException as exc:
            outcome = exc
            raise
        finally:
            self._tracker = None
            progress.close()
            if entered:
                self._report(tracker, args, loss_fn, outcome)

    def _compile(self, line: str, cell: str) -> tuple[list, list[str]]:
        """Code objects of the cell body (the statements, then, as a cell would, the displayed expression(s)),
        and the names the body reads, in order of first use (where auto-detection looks first).

        The text cached for tracebacks starts with the magic line, so line numbers are the cell's.
        """
        shell = self.shell
        source = shell.transform_cell(cell)
        text = f"%%hydra_track {line}".rstrip() + "\n" + source
        filename = shell.compile.cache(text, shell.execution_count, raw_code=text)
        tree = shell.compile.ast_parse("\n" + source, filename=filename)
        tree = shell.transform_ast(tree)
        if tree is None:
            return [], []
        used = list(dict.fromkeys(node.id for node in ast.walk(tree)
                                  if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)))
        body = list(tree.body)
        interactivity = shell.ast_node_interactivity
        if interactivity == "none" or not body:
            split = len(body)
        elif interactivity == "all":
            split = 0
        elif interactivity == "last":
            split = len(body) - 1
        else:  # "last_expr", "last_expr_or_assign"
            split = len(body) - 1 if isinstance(body[-1], ast.Expr) else len(body)
        codes = []
        if split:
            codes.append(shell.compile(ast.Module(body[:split], type_ignores=[]), filename, "exec"))
        for node in body[split:]:
            mode = "single" if isinstance(node, ast.Expr) else "exec"
            mod = ast.Interactive([node]) if mode == "single" else ast.Module([node], type_ignores=[])
            codes.append(shell.compile(mod, filename, mode))
        return codes, used

    def _origin(self, line: str, cell: str) -> dict:
        """The cell this run comes from, as the store keeps it (``hydra_nb.store.same_cell`` compares two)."""
        ns = self.shell.user_ns
        notebook = ns.get("__session__") or ns.get("__vsc_ipynb_file__")  # ipykernel under Jupyter; VS Code
        source = f"%%hydra_track {line.strip()}\n{cell.rstrip()}"
        return {"notebook": str(notebook) if notebook else None, "cell_id": self._cell_id,
                "source_sha256": hashlib.sha256(source.encode()).hexdigest()}

    def _execute(self, codes: list) -> None:
        __tracebackhide__ = True  # noqa: F841
        for code in codes:
            exec(code, self.shell.user_global_ns, self.shell.user_ns)

    # -- names in the user's namespace --------------------------------------------------------
    def _public_names(self):
        ns, hidden = self.shell.user_ns, self.shell.user_ns_hidden
        missing = object()
        for name, value in list(ns.items()):
            if name.startswith("_") or value is hidden.get(name, missing):
                continue
            yield name, value

    def _resolve_roles(self, args, used: list[str]) -> dict:
        """model, loader and optimizer: the named ones, else the only candidate among the names the cell uses,
        else the only candidate in the namespace."""
        found, problems = {}, []
        for role, cls, type_name, flag, keep, what in _ROLES:
            name = getattr(args, role)
            try:
                if name is not None:
                    value = self._lookup(name, flag)
                    if not isinstance(value, cls):
                        raise UsageError(f"{flag} {name}: {name} is a {type(value).__name__}, not a {type_name}.")
                    found[role] = value
                else:
                    found[role] = self._detect(cls, what, flag, keep, used)
            except UsageError as exc:
                problems.append(str(exc))
        if problems:
            raise UsageError("\n".join(problems))
        return found

    def _detect(self, cls, what: str, flag: str, keep, used: list[str]):
        def candidates(names):
            groups: dict[int, tuple[object, list[str]]] = {}
            for name, value in names:
                if isinstance(value, cls) and keep(value):
                    groups.setdefault(id(value), (value, []))[1].append(name)
            return groups

        public = dict(self._public_names())
        in_cell = candidates((name, public[name]) for name in used if name in public)
        if len(in_cell) == 1:
            return next(iter(in_cell.values()))[0]
        where = "the names this cell uses" if in_cell else "the namespace"
        groups = in_cell or candidates(public.items())
        if len(groups) == 1:
            return next(iter(groups.values()))[0]
        if not groups:
            raise UsageError(f"No {what} in the namespace. Define it in an earlier cell (the magic needs it before "
                             f"the cell runs), or name it with {flag} NAME.")
        labels = [names[0] + (f" (also {', '.join(names[1:])})" if len(names) > 1 else "")
                  for _, names in groups.values()]
        first = next(iter(groups.values()))[1][0]
        raise UsageError(f"{len(groups)} candidates for the {what} in {where}: {', '.join(labels)}. "
                         f"Pick one with {flag} NAME, e.g. {flag} {first}.")

    def _lookup(self, expr: str, flag: str):
        """A variable (or a dotted attribute of one, ``trainer.model``) in the user's namespace."""
        parts = expr.split(".")
        if not all(p.isidentifier() for p in parts):
            raise UsageError(f"{flag} takes a variable name, got {expr!r}.")
        ns = self.shell.user_ns
        if parts[0] not in ns:
            close = difflib.get_close_matches(parts[0], [n for n, _ in self._public_names()], n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise UsageError(f"{flag} {expr}: there is no variable named {parts[0]!r} in the namespace.{hint}")
        value = ns[parts[0]]
        for i, attr in enumerate(parts[1:], 1):
            try:
                value = getattr(value, attr)
            except AttributeError:
                raise UsageError(f"{flag} {expr}: {'.'.join(parts[:i])} has no attribute {attr!r}.") from None
        return value

    def _evaluate(self, expr: str, flag: str):
        try:
            return eval(expr, self.shell.user_global_ns, self.shell.user_ns)  # noqa: S307 - the user's own input
        except Exception as exc:
            raise UsageError(f"{flag} {expr!r} could not be evaluated in the namespace: "
                             f"{type(exc).__name__}: {exc}") from None

    # -- messages -----------------------------------------------------------------------------
    def _explain_refusal(self, exc: StoreOccupied, path: Path) -> str:
        """Say how to choose when the engine refuses to clobber an earlier run (magic flag spelling)."""
        meta = read_meta(path) if path.is_dir() else None
        if meta is None:
            return str(exc)
        made = _made_by(meta.get("origin"))
        return (f"{str(path)!r} already holds a hydra_nb run ({describe_run(meta)}){made}; the cell did not run. "
                "Rerun it with --overwrite to replace that run, --resume to continue it, or choose another --store.")

    def _report(self, tracker: Tracker, args, loss_fn, exc: BaseException | None) -> None:
        """After the cell: print the store's summary and bind it; on an error, say where the store stands."""
        try:
            store = open_store(tracker.path, loss_fn=loss_fn)
        except HydraError as err:
            print(f"hydra_nb: {err} Nothing was bound to {args.as_name}.")
            return
        except Exception as err:  # never replace the cell's own error with one of ours
            print(f"hydra_nb: could not open the store {str(tracker.path)!r}: {err!r}")
            return
        self.shell.user_ns[args.as_name] = store
        stats = tracker.stats
        elapsed = time.perf_counter() - stats["started"] if stats["started"] else 0.0
        if isinstance(exc, KeyboardInterrupt):
            print(f"hydra_nb: training interrupted at step {tracker.step}. The store is consistent: "
                  f"{store.status}; it answers queries for training stopped at step {store.steps} "
                  f"(checkpoints at steps {', '.join(map(str, store.checkpoint_steps))}).")
        elif exc is not None:
            print(f"hydra_nb: the cell raised {type(exc).__name__} at step {tracker.step}. The store is consistent: "
                  f"{store.status}; it answers queries for training stopped at step {store.steps}.")
        print(repr(store))
        overhead = f" ({100 * stats['tracking_seconds'] / elapsed:.0f}% of {elapsed:.1f} s)" if elapsed > 0 else ""
        print(f"Bound to {args.as_name}. Tracking took {stats['tracking_seconds']:.2f} s{overhead}, "
              f"{format_bytes(stats['bytes_written'], binary=False)} written.")

    # -- %hydra_status ------------------------------------------------------------------------
    @line_magic
    def hydra_status(self, line=""):
        """Print the summary of the run in progress, or of the last store of this session."""
        tracker = self._tracker
        if tracker is not None:
            print(f"hydra_nb: tracking into {str(tracker.path)!r}: {_describe(tracker)}")
            return
        if self._last is None:
            print("hydra_nb: no store yet in this session. Run a %%hydra_track cell first.")
            return
        path, loss_fn = self._last
        try:
            store = open_store(path, loss_fn=loss_fn)
        except HydraError as err:
            print(f"hydra_nb: {err}")
            return
        print(repr(store))  # "replays": store.contributions(..., mode='exact', train_data=...) is exact for every sample
        if not store.replays:
            print(f"hydra_nb: no exact answers by replay: this run {store.replay_status}.")


def _made_by(origin: dict | None) -> str:
    """", made by another cell of notebook.ipynb": where an earlier run came from, for the refusal."""
    if not origin:
        return ", made outside %%hydra_track"
    notebook = origin.get("notebook")
    return ", made by another cell" + (f" of {notebook}" if notebook else "")


def _parse(magic, line: str):
    """The magic's arguments; an unknown flag gets the closest known ones ("did you mean --dim?")."""
    try:
        return magic_arguments.parse_argstring(magic, line)
    except UsageError as exc:
        message = str(exc)
        if "unrecognized arguments" not in message:
            raise
        known = [s for s in magic.parser._option_string_actions if s.startswith("--")]
        hints = []
        for flag in re.findall(r"(?<!\S)(--?[\w-]+)", message.split("unrecognized arguments:", 1)[1]):
            close = difflib.get_close_matches(flag if flag.startswith("--") else "-" + flag, known, n=2, cutoff=0.6)
            if close:
                hints.append(f"{flag}: did you mean {' or '.join(close)}?")
        raise UsageError(message + ("\n" + "\n".join(hints) if hints else "") +
                         "\nSee %%hydra_track? for every flag.") from None


def _describe(tracker: Tracker, samples: int | None = None, steps: bool = True) -> str:
    """Steps, samples/s, tracking overhead so far and bytes written."""
    stats = tracker.stats
    elapsed = time.perf_counter() - stats["started"] if stats["started"] else 0.0
    parts = [f"{stats['steps']} steps"] if steps else []
    if elapsed > 0:
        if samples is not None:
            parts.append(f"{samples / elapsed:,.0f} samples/s")
        parts.append(f"overhead {100 * stats['tracking_seconds'] / elapsed:.0f}%")
    parts.append(f"{format_bytes(stats['bytes_written'], binary=False)} written")
    if stats.get("writer_wait_seconds", 0.0) > 0.05:
        parts.append(f"waited {stats['writer_wait_seconds']:.1f} s for the store writer (disk-bound)")
    return ", ".join(parts)


class _Progress:
    """A progress display fed by the tracker's ``on_step``: tqdm's notebook bar where it can, else text.

    Updates are throttled (at most every 0.2 s) so the display costs the loop nothing noticeable.
    """

    def __init__(self):
        self.tracker: Tracker | None = None
        self.bar = None
        self.shown = 0
        self.last = 0.0
        self.samples = 0
        self._generation = None

    def start(self, tracker: Tracker) -> None:
        self.tracker = tracker
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency; keep a display anyway
            self.bar = _TextBar(str(tracker.path))
        else:
            # the bar waits about a second (a quick cell shows none); in a notebook its text wraps (_notebook_bar)
            self.bar = _notebook_bar(tqdm)(desc=f"hydra_track {tracker.path.name}", unit="step", leave=True,
                                           delay=PROGRESS_DELAY_S)
        self.last = time.perf_counter()

    def on_step(self, tracker: Tracker) -> None:
        current = tracker.tap.current
        if current is not None and current.generation != self._generation:
            self._generation = current.generation
            self.samples += len(current.indices)
        now = time.perf_counter()
        if self.bar is not None and now - self.last >= _REFRESH_SECONDS:
            self.last = now
            self._show()

    def _sample_count(self) -> int:
        # fast mode logs one row per sample of every batch (gradient accumulation included)
        return self.tracker.stats["rows"] if self.tracker.mode == "fast" else self.samples

    def _show(self) -> None:
        steps = self.tracker.stats["steps"]
        self.bar.set_postfix_str(_describe(self.tracker, self._sample_count(), steps=False), refresh=False)
        self.bar.update(steps - self.shown)
        self.shown = steps

    def close(self) -> None:
        if self.bar is None:
            return
        try:
            self._show()
        finally:
            self.bar.close()
            self.bar = None


def _notebook_bar(tqdm):
    """``tqdm`` itself in a terminal; in a notebook, its widget bar with a text that wraps instead of being cut.

    tqdm's notebook bar is an HBox (description, bar, text) of one widget line: its text is written with
    non-breaking spaces, so a long postfix (samples/s, overhead, bytes written) ran past the output area's
    edge and was lost in narrow JupyterLab cells. Here the text keeps ordinary spaces, may take a line of its
    own below the bar, and wraps there.
    """
    try:
        from tqdm.notebook import tqdm as notebook_tqdm
    except ImportError:  # pragma: no cover - no ipywidgets: tqdm.auto gave the terminal bar
        return tqdm
    if not issubclass(tqdm, notebook_tqdm):
        return tqdm

    class WrappingBar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            container = getattr(self, "container", None)
            if container is not None:
                container.layout.flex_flow = "row wrap"
                text = container.children[-1]
                text.layout.width, text.layout.max_width, text.layout.height = "auto", "100%", "auto"

        def display(self, *args, **kwargs):
            shown = super().display(*args, **kwargs)
            container = getattr(self, "container", None)
            if container is not None:
                text = container.children[-1]
                text.value = text.value.replace("\u2007", " ")
            return shown

    return WrappingBar


class _TextBar:
    """The fallback display: one printed line every few seconds, and one at the end."""

    def __init__(self, name: str):
        self.name, self.n, self.postfix, self.last = name, 0, "", time.perf_counter()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def update(self, n: int) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= _TEXT_REFRESH_SECONDS:
            self.last = now
            print(f"hydra_track {self.name}: step {self.n}, {self.postfix}", flush=True)

    def close(self) -> None:
        print(f"hydra_track {self.name}: {self.n} steps, {self.postfix}", flush=True)


def load_ipython_extension(ipython) -> None:
    """Register ``%%hydra_track`` and ``%hydra_status`` (``%load_ext hydra_nb``)."""
    ipython.register_magics(HydraMagics)
