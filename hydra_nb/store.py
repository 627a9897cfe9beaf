"""The run store: a Zarr v3 group on disk, the single source of truth of a tracked run.

Layout (schema version 1; ``docs/store.md`` describes every array and attribute):

    <run>.zarr/
      zarr.json                attrs["hydra_nb"]: schema_version, run id, mode, config, parameter
                               layout, projection, status and the committed counts
      log/sample  (row,)                 dataset index of each per-sample gradient row
      log/step    (row,)                 optimizer step the row entered
      log/grad    (row, projected)       projected gradient u of that sample at that step
      trace/<field> (step, param)        the optimizer rule's trace fields (hydra_nb.optim): SGD: lr, momentum,
                                         dampening, weight_decay, nesterov, first, active; Adam/AdamW: lr, beta1,
                                         bias_correction1, weight_decay, active, beta2, eps, amsgrad, decoupled, step
      trace/row_end (step,)              number of log rows written through each step
      checkpoints/step (checkpoint,)     completed optimizer steps at each checkpoint
      checkpoints/params (checkpoint, parameter)   flat trainable parameters θ
      checkpoints/buffers (checkpoint, buffer)     flat floating-point buffers (BatchNorm statistics…)
      projection/block<i>_h1, _s1, _h2, _s2        hashes and signs of each sketched block
      exact/indices (sample,), exact/h (checkpoint, sample, parameter)   exact mode only

Everything is a plain array or JSON: opening a store never runs code from it.
Writers append; readers trust only ``attrs["hydra_nb"]["committed"]`` (steps, rows,
checkpoints), which is rewritten atomically after the data it counts is on disk.
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import json
import os
import queue
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from .errors import StoreError, StoreOccupied, TrackingConfigError
from .optim import rule_named
from .params import ParamLayout
from .projection import Projector

SCHEMA_VERSION = 1
FORMAT = "hydra_nb.store"
_TARGET_CHUNK_BYTES = 1 << 20
_FLUSH_BYTES = 8 << 20
_HANDOVER_BYTES = _FLUSH_BYTES // 4  # rows the training thread holds before waking the writer thread
_TRACE_CHUNK = 1024
_FLOAT_CODEC = BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")
_INDEX_CODEC = ZstdCodec(level=1)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_meta(path) -> dict | None:
    """The hydra_nb attributes of the group at ``path``, or None if it is not a hydra_nb store."""
    p = Path(path)
    if not (p / "zarr.json").is_file():
        return None
    try:
        group = zarr.open_group(str(p), mode="r")
    except Exception:
        return None
    meta = group.attrs.asdict().get("hydra_nb")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return meta


LOCK_NAME = "hydra_nb.lock"


class WriterLock:
    """One writer per store: an exclusive ``flock`` on ``<store>/hydra_nb.lock``.

    The operating system releases the lock when the writing process dies (``kill -9``
    included), so a dead writer never holds a store forever. The file also says who
    holds it (pid, host, run id, since), for error messages.
    """

    def __init__(self, store_path: Path):
        self.path = Path(store_path) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, run_id: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(20):  # a reader checking liveness holds it for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.01)
        else:
            info = lock_holder(self.path.parent) or {}
            os.close(fd)
            raise TrackingConfigError(
                f"{str(self.path.parent)!r} is being written by another hydra_nb.track (process {info.get('pid')} "
                f"on {info.get('host')}, since {info.get('since')}). One writer at a time: wait for it to finish, "
                "or track into another store.")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                                 "since": _now()}).encode())
        self._fd = fd

    def try_acquire(self, run_id: str, purpose: str) -> bool:
        """Take the lock if nobody holds it, without waiting; False if someone does (or the folder is read-only).

        For short writes by a reader (the curvature cache, ``hydra_nb/sources/curvature.py``): while it is held,
        no run can start writing, resume or replace the store. ``purpose`` is noted in the lock file.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                                 "since": _now(), "purpose": purpose}).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock_holder(store_path) -> dict | None:
    """Who holds the writer lock of a local store, or None if nobody does (no writer, or it died)."""
    path = Path(store_path) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.read(fd, 4096) or b"{}")
            except ValueError:
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def same_cell(stored: dict | None, current: dict | None) -> bool:
    """Whether two runs' ``origin`` (the ``%%hydra_track`` cell that made each, see ``docs/store.md``) is one cell.

    Runs from two notebooks the kernel could name are never the same cell. Within one notebook (or where
    the kernel does not know the notebook: nbclient, plain IPython), cells with Jupyter cell ids are the
    same cell when the ids are equal (an edited cell keeps its id); otherwise when their source is equal.
    """
    if not stored or not current:
        return False
    notebooks = stored.get("notebook"), current.get("notebook")
    if all(notebooks) and notebooks[0] != notebooks[1]:
        return False
    ids = stored.get("cell_id"), current.get("cell_id")
    if all(ids):
        return ids[0] == ids[1]
    return bool(stored.get("source_sha256")) and stored.get("source_sha256") == current.get("source_sha256")


def replaceable(meta: dict, origin: dict | None) -> str | None:
    """Why the run ``meta`` describes may be replaced without ``overwrite=True``, or None: it was refused at its
    first step and holds nothing, or the same notebook cell made it (``origin``; ``same_cell``)."""
    if meta.get("status") == "failed" and int(meta.get("committed", {}).get("steps", 0)) == 0:
        return "it failed before its first step and holds nothing"
    if same_cell(meta.get("origin"), origin):
        return "this same cell made it"
    return None


def describe_run(meta: dict) -> str:
    """"fast mode, 10 steps, complete": how messages about an earlier run name it."""
    return (f"{meta.get('mode')} mode, {meta.get('committed', {}).get('steps', 0)} steps, "
            f"{meta.get('status', 'unknown')}")


def prepare_path(path, overwrite: bool, resume: bool = False, origin: dict | None = None) -> tuple[Path, str | None]:
    """Check that a run may be written at ``path``: a new one (removing an earlier run if ``overwrite``, or if
    ``replaceable`` says it may go), or, with ``resume``, the continuation of the run already there.

    Returns the path and, when an earlier run was removed without ``overwrite``, a sentence saying which and why.
    """
    p = Path(path)
    if resume and read_meta(p) is None:
        raise TrackingConfigError(
            f"Nothing to resume at {str(p)!r}: no hydra_nb store there. Drop resume=True to start a new run.")
    replaced = None
    if p.exists():
        if p.is_file():
            raise TrackingConfigError(f"The store path {str(p)!r} is a file. Give a folder path such as 'runs/a.zarr'.")
        meta = read_meta(p)
        if meta is None:
            if any(p.iterdir()):
                raise TrackingConfigError(
                    f"{str(p)!r} already exists and is not a hydra_nb store; hydra_nb will not write into or "
                    "delete it. Choose another store path.")
        elif (holder := lock_holder(p)) is not None:
            raise TrackingConfigError(
                f"{str(p)!r} is being written right now by another hydra_nb.track (process {holder.get('pid')} on "
                f"{holder.get('host')}); it can be neither overwritten nor resumed until that run ends.")
        elif resume:
            pass
        elif overwrite:
            shutil.rmtree(p)
        elif (why := replaceable(meta, origin)) is not None:
            replaced = f"replaced the earlier run in {str(p)!r} ({describe_run(meta)}): {why}."
            shutil.rmtree(p)
        else:
            raise StoreOccupied(
                f"{str(p)!r} already holds a hydra_nb run ({meta.get('mode')} mode, run {meta.get('run_id')}, "
                f"{meta.get('committed', {}).get('steps', 0)} steps). Pass overwrite=True to replace it, "
                "resume=True to continue it, or choose another store path.")
    return p, replaced


def _create(group, name: str, **kwargs):
    """Create an array whose every chunk is written, zeros included (a reader can then tell a missing
    chunk, which is damage, from one zarr skipped for holding only the fill value), and whose compressed
    chunks carry a CRC-32C checksum (a truncated or corrupted compressed chunk would otherwise decompress
    into wrong numbers without any error). Uncompressed chunks need none: a truncated one has the wrong size."""
    compressors = kwargs.pop("compressors", [_INDEX_CODEC])
    if compressors:
        kwargs["compressors"] = [*compressors, Crc32cCodec()]
    else:
        kwargs["compressors"] = None
    return group.create_array(name, config={"write_empty_chunks": True}, **kwargs)


def _rows_per_chunk(width: int, itemsize: int) -> int:
    return int(min(max(_TARGET_CHUNK_BYTES // max(width * itemsize, 1), 64), 1 << 16))


def to_host(t: torch.Tensor, copy: bool):
    """Start copying ``t`` to host memory without blocking; returns (host tensor, CUDA event or None)."""
    t = t.detach()
    if t.is_cuda:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    return (t.clone() if copy else t), None


def _numpy(item) -> np.ndarray:
    host, event = item
    if event is not None:
        event.synchronize()
    return host.numpy()


class StoreWriter:
    """Creates a run store and appends to it from a background thread through a bounded queue.

    The training thread only enqueues (device tensors are copied to pinned host memory
    asynchronously); compression and disk writes happen in the writer thread. If the
    queue is full, ``put_*`` waits. An I/O failure is kept in ``error``.

    Steps are handed to the writer thread in batches (about ``_HANDOVER_BYTES`` of rows, and always
    before a checkpoint, a commit or ``close``), not one by one: waking the writer at every step
    cost the training thread 0.5–1 ms per step on the CPU (the two threads trading the GIL), more
    than a small model's whole step. Nothing is committed between checkpoints, so what a reader
    sees is unchanged. The writer writes each array's rows as whole chunks (the last, partial chunk
    of an array is kept in memory and rewritten whole, so no chunk is ever read back), and all the
    arrays of one flush or checkpoint concurrently in one call into zarr's event loop.
    """

    def __init__(self, path: Path, group, meta: dict, log_rows: int, exact: bool, has_buffers: bool,
                 lengths: dict[str, int], lock: WriterLock | None, queue_size: int = 32,
                 part: dict | None = None, main: bool = True):
        self.path = path
        self.group = group
        self.meta = meta
        self.part = part or log_part(None)
        self.main = main  # writes the trace, checkpoints and run metadata (rank 0); other ranks their log only
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.wait_seconds = 0.0  # time the training thread waited on a full queue
        self._lock = lock
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._log_rows = log_rows
        grad = group[self.part["grad"]]
        # write in batches of whole chunks (~8 MB): fewer, larger writes
        self._flush_rows = log_rows * max(1, _FLUSH_BYTES // (log_rows * grad.shape[1] * grad.dtype.itemsize))
        self._pending_rows: list[tuple] = []  # (samples, steps, rows)
        self._pending_count = 0
        self._pending_trace: list[dict] = []
        self._trace_row_ends: list[int] = []
        # the trace arrays this store has: a resumed store written before a rule gained fields keeps its own set
        self._trace_fields = [n for n, _ in group["trace"].arrays() if n != "row_end"] if main else []
        self._arrays: dict[str, zarr.Array] = {}  # handles, so that appends skip the group lookup
        self._length: dict[str, int] = dict(lengths)  # rows written; arrays may be longer (capacity)
        self._rows_total = lengths.get(self.part["grad"], 0)
        self._steps_total = lengths.get(self.part["row_end"], 0)
        self._checkpoints = lengths.get("checkpoints/step", 0)
        self._held: list[tuple] = []  # steps not yet handed to the writer thread (training thread only)
        self._held_bytes = 0
        self._steps_put = 0  # steps given to put_step (training thread only)
        self._steps_done = 0  # steps the writer thread has taken in (writer thread only)
        self._tails: dict[str, np.ndarray] = {}  # each array's last, partial chunk as written (writer thread)
        self._staged: list[tuple] = []  # writes of the current flush or checkpoint (writer thread)
        self._groups: dict[str, zarr.Group] = {}  # groups whose attributes the writer sets, by path
        self._exact = exact
        self._has_buffers = has_buffers
        # replay's record (docs/store.md, "Replay"): what has been written, and what waits for the next flush
        self._replay = main and "replay" in group
        self._replay_total = {name: lengths.get(f"replay/{name}", 0) for name in _REPLAY_COUNTS}
        self._replay_pending: dict[str, list] = {name: [] for name in _REPLAY_PENDING}
        self._replay_pending_rows = 0  # rows queued in _replay_pending["sample"]
        self._state_fields = [n[len("state_"):] for n, _ in group["checkpoints"].arrays()
                              if n.startswith("state_") and not n.endswith("_present")] if main else []
        self._thread = threading.Thread(target=self._run, name="hydra_nb-writer", daemon=True)
        self._thread.start()

    @classmethod
    def create(cls, path: Path, meta: dict, layout: ParamLayout, projector_arrays: dict[str, np.ndarray],
               log_width: int, log_dtype, param_dtype, buffer_size: int,
               exact_indices: np.ndarray | None, world_size: int = 1,
               replay: dict | None = None) -> "StoreWriter":
        """Create a new run store at ``path`` (which ``prepare_path`` checked) and take its writer lock.

        With ``world_size`` W > 1 (distributed training, called on rank 0) the log is created as W
        parts, one per rank; the other ranks then attach with :meth:`attach_rank`. ``replay``: what
        reverse-mode replay will read (``{"meta": …, "state_fields": …}``): the ``replay/`` arrays and
        the optimizer state at each checkpoint are created and ``attrs["hydra_nb"]["replay"]`` set.
        """
        lock = WriterLock(path)
        lock.acquire(meta["run_id"])
        try:
            log_rows = _rows_per_chunk(log_width, np.dtype(log_dtype).itemsize)
            index_rows = 1 << 16
            g = zarr.open_group(str(path), mode="a")
            P, D = len(layout.slots), layout.size
            parts = [log_part(None)] if world_size == 1 else [log_part(r) for r in range(world_size)]
            for part in parts:
                _create(g, part["sample"], shape=(0,), chunks=(index_rows,), dtype="int64", dimension_names=["row"])
                _create(g, part["step"], shape=(0,), chunks=(index_rows,), dtype="int64", dimension_names=["row"])
                # projected gradients are noise-like floats: lz4/zstd saved 6-8% of their size at twice the
                # write cost (measured), so they are stored uncompressed; everything else is compressed
                _create(g, part["grad"], shape=(0, log_width), chunks=(log_rows, log_width), dtype=log_dtype,
                        dimension_names=["row", "projected"], compressors=None)
                if part["group"] is not None:
                    _create(g, part["row_end"], shape=(0,), chunks=(_TRACE_CHUNK,), dtype="int64",
                            dimension_names=["step"])
                    g[part["group"]].attrs["committed"] = {"steps": 0, "rows": 0}
            rule = rule_named(meta.get("optimizer", "SGD"))
            for f in rule.trace_fields:
                _create(g, f"trace/{f}", shape=(0, P), chunks=(_TRACE_CHUNK, P), dtype=rule.field_dtype(f),
                        dimension_names=["step", "param"])
            if world_size == 1:
                _create(g, "trace/row_end", shape=(0,), chunks=(_TRACE_CHUNK,), dtype="int64",
                        dimension_names=["step"])
            _create(g, "checkpoints/step", shape=(0,), chunks=(1024,), dtype="int64",
                           dimension_names=["checkpoint"])
            d_chunk = min(D, 1 << 20)
            _create(g, "checkpoints/params", shape=(0, D), chunks=(1, d_chunk), dtype=param_dtype,
                           dimension_names=["checkpoint", "parameter"], compressors=[_FLOAT_CODEC])
            if buffer_size:
                _create(g, "checkpoints/buffers", shape=(0, buffer_size), chunks=(1, min(buffer_size, 1 << 20)),
                               dtype="float64", dimension_names=["checkpoint", "buffer"])
            for name, arr in projector_arrays.items():  # block{i}_h1/s1 run over rows, _h2/s2 over cols
                _create(g, f"projection/{name}", data=arr, dimension_names=["row" if name[-1] == "1" else "col"])
            if exact_indices is not None:
                m = len(exact_indices)
                _create(g, "exact/indices", data=np.asarray(exact_indices, dtype=np.int64),
                               dimension_names=["sample"])
                rows = max(1, min(m, _TARGET_CHUNK_BYTES // max(D * np.dtype(param_dtype).itemsize, 1)))
                for name in ("h", "b"):  # h = dθ/dw and its momentum twin (b is what a resumed run needs)
                    _create(g, f"exact/{name}", shape=(0, m, D), chunks=(1, rows, d_chunk), dtype=param_dtype,
                                   dimension_names=["checkpoint", "sample", "parameter"], compressors=[_FLOAT_CODEC])
            if replay is not None:
                _create_replay_arrays(g, P, D, d_chunk, param_dtype, replay["state_fields"])
                meta["replay"] = replay["meta"]
            meta.update({"committed": {"steps": 0, "rows": 0, "checkpoints": 0}, "status": "running",
                         "status_detail": "", "updated": _now(), "world_size": int(world_size)})
            g.attrs["hydra_nb"] = meta
        except BaseException:
            lock.release()
            raise
        return cls(path, g, meta, log_rows, exact_indices is not None, bool(buffer_size), {}, lock,
                   part=parts[0])

    @classmethod
    def attach_rank(cls, path: Path, rank: int) -> "StoreWriter":
        """The writer of rank ``rank`` > 0 of a distributed run whose store rank 0 created: its log part only."""
        g = zarr.open_group(str(path), mode="r+")
        meta = g.attrs.asdict()["hydra_nb"]
        part = log_part(rank)
        return cls(path, g, meta, g[part["grad"]].chunks[0], False, False, {}, None, part=part, main=False)

    @classmethod
    def reopen(cls, path: Path) -> "StoreWriter":
        """Continue an existing run: take its writer lock and cut it back to its last checkpoint.

        Whatever was written after the last committed checkpoint (steps without parameters to query
        them at) is overwritten by the resumed run.
        """
        meta = read_meta(path)
        if meta is None:
            raise TrackingConfigError(f"Nothing to resume: {str(path)!r} is not a hydra_nb store.")
        lock = WriterLock(path)
        lock.acquire(meta["run_id"])
        try:
            g = zarr.open_group(str(path), mode="r+")
            n_ckpt = int(meta["committed"]["checkpoints"])
            if n_ckpt == 0:
                raise TrackingConfigError(f"Nothing to resume: {str(path)!r} has no committed checkpoint.")
            step = int(g["checkpoints/step"][n_ckpt - 1])
            rows = int(g["trace/row_end"][step - 1]) if step else 0
            lengths = {}
            for name in _array_names(g):
                axis0 = {"log": rows, "trace": step, "checkpoints": n_ckpt, "exact": n_ckpt}.get(name.split("/")[0])
                if axis0 is not None and name != "exact/indices":
                    lengths[name] = axis0
            meta["committed"] = {"steps": step, "rows": rows, "checkpoints": n_ckpt}
            if "replay" in g:
                replay_lengths = _replay_lengths(g, meta, step)
                lengths.update({f"replay/{name}": n for name, n in replay_lengths.items()})
                meta["committed"].update({f"replay_{name}": n for name, n in replay_lengths.items()})
            meta["status"], meta["status_detail"] = "running", ""
            meta.setdefault("resumed", []).append({"at_step": step, "time": _now()})
            g.attrs["hydra_nb"] = meta
            log_rows = g["log/grad"].chunks[0]
        except BaseException:
            lock.release()
            raise
        return cls(path, g, meta, log_rows, "exact" in g, "buffers" in g["checkpoints"], lengths, lock)

    # -- producer side (training thread) ------------------------------------------------------
    def put_step(self, trace_row: dict[str, np.ndarray], samples: torch.Tensor, rows: torch.Tensor | None,
                 calls: list | None = None) -> None:
        """One optimizer step: its trace row, its per-sample rows (dataset indices, projected gradients) and, for
        replay, its backward calls (``hydra_nb.replay.RecordedCall``; None once the run is known not to replay).

        The rows must not be modified afterwards (on the CPU they are kept, not copied)."""
        rows_item = None if rows is None else to_host(rows, copy=False)
        self._held.append((trace_row, samples.detach().cpu().to(torch.int64).numpy(), rows_item, calls))
        self._held_bytes += 0 if rows is None else rows.nelement() * rows.element_size()
        self._steps_put += 1
        if self._held_bytes >= _HANDOVER_BYTES:
            self._hand_over()

    def put_checkpoint(self, step: int, params: torch.Tensor, buffers: torch.Tensor | None,
                       h: torch.Tensor | None = None, b: torch.Tensor | None = None,
                       state: dict | None = None) -> None:
        """Parameters (and exact-mode h, b; the optimizer's state, field → (flat values, present per parameter))
        after ``step`` completed steps; commits everything before it."""
        self._hand_over()
        state_items = None if state is None else {
            f: (to_host(values, copy=True), np.asarray(present, dtype=bool)) for f, (values, present) in state.items()}
        self._put(("checkpoint", step, to_host(params, copy=True),
                   None if buffers is None else to_host(buffers, copy=True),
                   None if h is None else to_host(h, copy=True), None if b is None else to_host(b, copy=True),
                   state_items))

    def put_commit(self, step: int) -> None:
        """A log-only writer (rank > 0): everything through ``step`` is written; commit this rank's part."""
        self._hand_over()
        self._put(("checkpoint", step, None, None, None, None, None))

    def put_replay_meta(self, replay_meta: dict) -> None:
        """What the store says about replay (``attrs["hydra_nb"]["replay"]``), written with the next commit."""
        self._hand_over()
        self._put(("replay_meta", dict(replay_meta)))

    def close(self, status: str, detail: str = "") -> None:
        """Flush, commit and record the run's final status; waits for the writer thread."""
        self._hand_over()
        self._put(("close", status, detail))
        self._thread.join()
        if self._lock is not None:
            self._lock.release()

    @property
    def backlog(self) -> int:
        """Steps given to ``put_step`` that the writer thread has not taken in yet."""
        return self._steps_put - self._steps_done

    def _hand_over(self) -> None:
        if self._held:
            held, self._held, self._held_bytes = self._held, [], 0
            self._put(("steps", held))

    def _put(self, item) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:  # the writer is the bottleneck right now: wait, and count it
            start = time.perf_counter()
            self._queue.put(item)
            self.wait_seconds += time.perf_counter() - start

    # -- consumer side (writer thread) --------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item[0] == "steps":
                self._steps_done += len(item[1])
            if self.error is not None and item[0] != "close":
                continue  # keep draining so that the training thread never blocks on a dead writer
            try:
                if item[0] == "steps":
                    for step in item[1]:
                        self._on_step(*step)
                elif item[0] == "checkpoint":
                    self._on_checkpoint(*item[1:])
                elif item[0] == "replay_meta":
                    self.meta["replay"] = item[1]
                elif item[0] == "close":
                    if self.error is None:
                        self._flush(all_rows=True)
                        self._write_staged()
                        self._trim()
                        self._commit(status=item[1], detail=item[2])
                    return
            except BaseException as exc:  # disk full, permissions...: keep what was committed
                self.error = exc

    def _on_step(self, trace_row, samples, rows_item, calls) -> None:
        if self._replay and calls is not None:
            self._record_calls(calls)
        self._pending_trace.append(trace_row)
        if rows_item is not None and len(samples):
            rows = _numpy(rows_item)
            steps = np.full(len(samples), self._steps_total + len(self._pending_trace) - 1, dtype=np.int64)
            self._pending_rows.append((samples, steps, rows))
            self._pending_count += len(samples)
        self._trace_row_ends.append(self._rows_total + self._pending_count)
        if self._pending_count >= self._flush_rows:
            self._flush(all_rows=False)
            self._write_staged()

    def _flush(self, all_rows: bool) -> None:
        """Stage the pending rows (whole chunks of them, or all with ``all_rows``) and, with ``all_rows``, the
        pending trace; ``_write_staged`` writes them."""
        if self._pending_count and (all_rows or self._pending_count >= self._flush_rows):
            samples = np.concatenate([s for s, _, _ in self._pending_rows])
            steps = np.concatenate([t for _, t, _ in self._pending_rows])
            rows = np.concatenate([r for _, _, r in self._pending_rows])
            n = len(samples) if all_rows else (len(samples) // self._log_rows) * self._log_rows
            self._append(self.part["sample"], samples[:n])
            self._append(self.part["step"], steps[:n])
            self._append(self.part["grad"], rows[:n])
            self.bytes_written += rows[:n].nbytes + 16 * n
            self._rows_total += n
            rest = (samples[n:], steps[n:], rows[n:])
            self._pending_rows = [rest] if len(rest[0]) else []
            self._pending_count = len(rest[0])
        if all_rows and self._replay:
            self._flush_replay()
        if all_rows and self._pending_trace:
            for f in self._trace_fields:
                self._append(f"trace/{f}", np.stack([r[f] for r in self._pending_trace]))
            self._append(self.part["row_end"], np.asarray(self._trace_row_ends, dtype=np.int64))
            self._steps_total += len(self._pending_trace)
            self._pending_trace = []
            self._trace_row_ends = []

    def _record_calls(self, calls) -> None:
        """Queue one step's backward calls: rows (sample, weight), each call's row end and generator states."""
        pending, total = self._replay_pending, self._replay_total
        for call in calls:
            pending["sample"].append(np.asarray(call.samples, dtype=np.int64))
            weights = call.weights
            pending["weight"].append(_numpy(weights).astype(np.float64) if isinstance(weights, tuple)
                                     else np.asarray(weights, dtype=np.float64))
            self._replay_pending_rows += len(call.samples)
            pending["call_end"].append(total["sample"] + self._replay_pending_rows)
            for kind, state in (("rng_cpu", call.rng), ("rng_cuda", call.cuda_rng)):
                index = -1
                if state is not None:
                    index = total[kind] + len(pending[kind])
                    pending[kind].append(state.detach().cpu().to(torch.uint8).numpy())
                pending["call_rng" if kind == "rng_cpu" else "call_cuda_rng"].append(index)
        pending["step_end"].append(total["call_end"] + len(pending["call_end"]))

    def _flush_replay(self) -> None:
        pending = self._replay_pending
        for name in _REPLAY_PENDING:
            values = pending[name]
            if not values:
                continue
            if name in ("sample", "weight"):
                data = np.concatenate(values)
            elif name.startswith("rng_"):
                data = np.stack(values)
            else:
                data = np.asarray(values, dtype=np.int64)
            self._append(f"replay/{name}", data)
            self._replay_total[name] = self._replay_total.get(name, 0) + len(data)
            self.bytes_written += data.nbytes
            pending[name] = []
        self._replay_pending_rows = 0

    def _on_checkpoint(self, step, params_item, buffers_item, h_item, b_item, state_items=None) -> None:
        self._flush(all_rows=True)
        if step != self._steps_total:  # pragma: no cover - a tracker bug, never silently accepted
            raise StoreError(f"checkpoint at step {step} but {self._steps_total} steps were written")
        if not self.main:
            self._commit()
            return
        params = _numpy(params_item)
        self._append("checkpoints/params", params[None])
        if self._has_buffers:
            self._append("checkpoints/buffers", _numpy(buffers_item).astype(np.float64)[None])
        if self._exact:
            self._append("exact/h", _numpy(h_item)[None])
            self._append("exact/b", _numpy(b_item)[None])
        for f in self._state_fields:  # the optimizer's state (replay starts an interval from it)
            values, present = state_items[f]
            self._append(f"checkpoints/state_{f}", _numpy(values)[None])
            self._append(f"checkpoints/state_{f}_present", present[None])
        self._append("checkpoints/step", np.asarray([step], dtype=np.int64))
        self.bytes_written += params.nbytes
        self._commit(checkpoints=self._checkpoints + 1)  # everything it counts is on disk before the markers say so
        self._checkpoints += 1  # only now: a checkpoint counts once written and committed

    def _append(self, name: str, data: np.ndarray) -> None:
        """Stage rows after the last written one, as whole chunks, growing the array's capacity geometrically.

        Readers never look past ``committed``, so capacity beyond it is invisible to them; growing
        by doubling keeps metadata rewrites (one per resize) rare. ``close`` trims to the exact size.
        A partial last chunk is padded with zeros and written whole (its rows are kept in ``_tails``
        and written again, with what follows, by the next append): zarr then never reads a chunk
        back to merge into it.
        """
        if not len(data):
            return
        arr = self._array(name)
        if any(a is arr for a, *_ in self._staged):
            self._write_staged()  # one write per array in flight: consecutive appends share a chunk
        start = self._length[name]
        stop = start + len(data)
        size = arr.chunks[0]
        first = start - start % size  # the chunk holding row ``start``
        end = -(-stop // size) * size
        resize = None
        if end > arr.shape[0]:
            resize = (max(end, 2 * arr.shape[0]), *arr.shape[1:])
        if first < start:  # complete the partial chunk written last
            head = self._tails.get(name)
            if head is None or len(head) != start - first:  # a resumed run: read it back once
                head = np.asarray(arr[first:start])
            lead = min(len(data), first + size - start)
            block = np.zeros((size, *data.shape[1:]), dtype=arr.dtype)
            block[: start - first] = head
            block[start - first : start - first + lead] = data[:lead]
            self._staged.append((arr, resize, first, block))
            resize = None
            data, start = data[lead:], start + lead
        whole = (len(data) // size) * size
        if whole:
            self._staged.append((arr, resize, start, data[:whole]))
            resize = None
        rest = data[whole:]
        if len(rest):
            block = np.zeros((size, *data.shape[1:]), dtype=arr.dtype)
            block[: len(rest)] = rest
            self._staged.append((arr, resize, start + whole, block))
            self._tails[name] = block[: len(rest)]
        elif stop % size == 0:
            self._tails.pop(name, None)
        else:  # this append completed no chunk: the partial one grew (the branch above)
            self._tails[name] = self._staged[-1][3][: stop % size]
        self._length[name] = stop

    def _write_staged(self, markers: list[tuple[str, dict]] = ()) -> None:
        """Write the staged chunks of all arrays concurrently, then the groups' attributes in ``markers``
        ((group path, attributes to set) pairs), in one call into zarr's event loop."""
        staged, self._staged = self._staged, []
        if not staged and not markers:
            return
        groups = []
        for path, attrs in markers:
            group = self._groups.get(path)
            if group is None:
                group = self._groups[path] = self.group[path] if path else self.group
            groups.append((path, group, {**group.attrs.asdict(), **attrs}))
        updated = sync(_write_chunks(staged, [(g, a) for _, g, a in groups]))
        for (path, _, _), group in zip(groups, updated):
            self._groups[path] = group  # holds the attributes just written

    def _array(self, name: str) -> zarr.Array:
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name].with_config({"write_empty_chunks": True})
            self._length.setdefault(name, arr.shape[0])
        return arr

    def _trim(self) -> None:
        for name in list(self._length):
            arr = self._array(name)
            if arr.shape[0] != self._length[name]:
                arr.resize((self._length[name], *arr.shape[1:]))

    def _commit(self, status: str | None = None, detail: str = "", checkpoints: int | None = None) -> None:
        """Write what is staged, then (in the same call into zarr) the commit markers that count it (with
        ``checkpoints`` checkpoints, by default those written so far)."""
        markers = []
        if self.part["group"] is not None:  # this rank's log part: its own marker, written by this rank only
            markers.append((self.part["group"], {"committed": {"steps": self._steps_total, "rows": self._rows_total}}))
        if self.main:
            self.meta["committed"] = {"steps": self._steps_total, "rows": self._rows_total,
                                      "checkpoints": self._checkpoints if checkpoints is None else checkpoints}
            if self._replay:
                self.meta["committed"].update({f"replay_{name}": int(n) for name, n in self._replay_total.items()})
            if status is not None:
                self.meta["status"] = status
                self.meta["status_detail"] = detail
            self.meta["updated"] = _now()
            markers.append(("", {"hydra_nb": self.meta}))
        self._write_staged(markers)


class _CheckedArray:
    """A zarr array whose reads turn a damaged chunk into a StoreError naming the store."""

    def __init__(self, arr, name: str, where: str):
        self._arr, self._name, self._where = arr, name, where

    def __getitem__(self, selection) -> np.ndarray:
        try:
            return np.asarray(self._arr[selection])
        except Exception as exc:
            raise StoreError(f"The store at {self._where!r} is damaged: {self._name} could not be read "
                             f"({type(exc).__name__}: {exc}).") from exc

    def __getattr__(self, name):
        return getattr(self._arr, name)


async def _write_chunks(staged: list[tuple], markers: list[tuple]) -> list:
    """Each (array, new shape or None, first row, rows): resize if asked, then write; the arrays concurrently,
    an array's writes in order (a resize before the writes that need it). Then, once all of that is
    written, each (group, attributes) of ``markers``; returns the groups as updated."""
    by_array: dict[int, list[tuple]] = {}
    for item in staged:
        by_array.setdefault(id(item[0]), []).append(item)

    async def write(items) -> None:
        for arr, shape, start, rows in items:
            if shape is not None:
                await arr.async_array.resize(shape)
            await arr.async_array.setitem(slice(start, start + len(rows)), rows)

    await asyncio.gather(*(write(items) for items in by_array.values()))
    return list(await asyncio.gather(*(group.update_attributes_async(attrs) for group, attrs in markers)))


def log_part(rank: int | None) -> dict[str, str | None]:
    """Array names of one rank's per-sample log; ``rank=None`` is a single-process run's log.

    A distributed run (world size W > 1) has one part per rank, ``log/rank{r}/{sample,step,grad,row_end}``,
    each written by its own rank only; its commit marker is that part's group attribute ``committed``.
    """
    if rank is None:
        return {"sample": "log/sample", "step": "log/step", "grad": "log/grad", "row_end": "trace/row_end",
                "group": None}
    prefix = f"log/rank{rank}"
    return {"sample": f"{prefix}/sample", "step": f"{prefix}/step", "grad": f"{prefix}/grad",
            "row_end": f"{prefix}/row_end", "group": prefix}


_REQUIRED = ["log/sample", "log/step", "log/grad", "trace/row_end", "checkpoints/step", "checkpoints/params"]

# replay's record: per row (sample, weight), per call (call_end, call_rng, call_cuda_rng), per step (step_end),
# per random forward (rng_cpu, rng_cuda); the committed count of each is attrs committed["replay_<name>"]
_REPLAY_PENDING = ("sample", "weight", "call_end", "call_rng", "call_cuda_rng", "step_end", "rng_cpu", "rng_cuda")
_REPLAY_COUNTS = _REPLAY_PENDING
_RNG_CUDA_BYTES = 16  # torch.cuda.get_rng_state(): Philox seed and offset


def _create_replay_arrays(g, P: int, D: int, d_chunk: int, param_dtype, state_fields) -> None:
    index_rows = 1 << 16
    for name, dtype in (("sample", "int64"), ("weight", "float64")):
        _create(g, f"replay/{name}", shape=(0,), chunks=(index_rows,), dtype=dtype, dimension_names=["row"])
    for name in ("call_end", "call_rng", "call_cuda_rng"):
        _create(g, f"replay/{name}", shape=(0,), chunks=(index_rows,), dtype="int64", dimension_names=["call"])
    _create(g, "replay/step_end", shape=(0,), chunks=(_TRACE_CHUNK,), dtype="int64", dimension_names=["step"])
    for name, width in (("rng_cpu", torch.get_rng_state().numel()), ("rng_cuda", _RNG_CUDA_BYTES)):
        _create(g, f"replay/{name}", shape=(0, width), chunks=(max(1, _TARGET_CHUNK_BYTES // width), width),
                dtype="uint8", dimension_names=["state", "byte"])
    for f in state_fields:
        _create(g, f"checkpoints/state_{f}", shape=(0, D), chunks=(1, d_chunk), dtype=param_dtype,
                dimension_names=["checkpoint", "parameter"], compressors=[_FLOAT_CODEC])
        _create(g, f"checkpoints/state_{f}_present", shape=(0, P), chunks=(1024, P), dtype="bool",
                dimension_names=["checkpoint", "param"])


def _replay_lengths(g, meta: dict, step: int) -> dict[str, int]:
    """How much of replay's record belongs to the first ``step`` steps (what a resumed run keeps)."""
    committed = meta.get("committed", {})
    steps = min(step, int(committed.get("replay_step_end", 0)))
    calls = int(g["replay/step_end"][steps - 1]) if steps else 0
    rows = int(g["replay/call_end"][calls - 1]) if calls else 0
    out = {"step_end": steps, "call_end": calls, "call_rng": calls, "call_cuda_rng": calls, "sample": rows,
           "weight": rows}
    for kind, index in (("rng_cpu", "call_rng"), ("rng_cuda", "call_cuda_rng")):
        used = np.asarray(g[f"replay/{index}"][:calls]) if calls else np.zeros(0, dtype=np.int64)
        out[kind] = int(used.max()) + 1 if used.size and used.max() >= 0 else 0
    return out


async def _collect_keys(store, prefix: str) -> list[str]:
    return [key async for key in store.list_prefix(prefix)]


def missing_chunk(arr, length: int) -> str | None:
    """The key of the first chunk of ``arr``'s first ``length`` rows that is not in its store, or None.

    (Zarr returns fill values for a missing chunk; every hydra_nb array writes all of its chunks.)
    """
    if not arr.ndim or not length:
        return None
    grid = [(length + arr.chunks[0] - 1) // arr.chunks[0]]
    grid += [(n + c - 1) // c for n, c in zip(arr.shape[1:], arr.chunks[1:])]
    prefix = f"{arr.path}/c/" if arr.path else "c/"
    present = set(sync(_collect_keys(arr.store, prefix)))
    for index in np.ndindex(*grid):
        key = prefix + "/".join(str(i) for i in index)
        if key not in present:
            return key
    return None


def _array_names(group) -> list[str]:
    names = []
    for sub in ("log", "trace", "checkpoints", "exact", "replay"):
        if sub in group:
            names += [f"{sub}/{name}" for name, _ in group[sub].arrays()]
    return names


def new_run_meta(mode: str, n_train: int, layout: ParamLayout, projector_json: dict, config: dict,
                 buffers: list[dict], optimizer: str = "SGD", origin: dict | None = None) -> dict:
    from . import __version__

    meta = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "hydra_nb_version": __version__,
        "run_id": uuid.uuid4().hex,
        "created": _now(),
        "mode": mode,
        "n_train": int(n_train),
        "optimizer": optimizer,
        "config": config,
        "params": layout.to_json(),
        "buffers": buffers,
        "projection": projector_json,
    }
    if origin is not None:
        meta["origin"] = dict(origin)
    return meta


class StoreReader:
    """A run store opened read-only: its metadata and raw arrays, up to what was committed.

    Queries live in :class:`hydra_nb.query.Store`, which holds one of these and its hypergradient sources.
    """

    def __init__(self, path):
        text = str(path)
        self.is_local = "://" not in text or text.startswith("file://")
        self.path = Path(text[len("file://"):]) if text.startswith("file://") else (Path(text) if self.is_local else text)
        where = text
        if self.is_local and not self.path.exists():
            raise StoreError(f"No hydra_nb store at {where!r}: the path does not exist.")
        try:
            self.group = zarr.open_group(str(self.path) if self.is_local else text, mode="r")
            meta = self.group.attrs.asdict().get("hydra_nb")
        except Exception as exc:
            if self.is_local:
                raise StoreError(f"{where!r} is not a hydra_nb store (no readable zarr.json).") from None
            raise StoreError(f"Could not open {where!r} as a Zarr group: {exc!r}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(f"{where!r} is not a hydra_nb store (no hydra_nb attributes in its zarr.json).")
        if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
            raise StoreError(
                f"The store at {where!r} has schema version {meta['schema_version']}; this hydra_nb reads "
                f"up to {SCHEMA_VERSION}. Upgrade hydra_nb to read it.")
        self.meta = meta
        self.where = where
        self.world_size = int(meta.get("world_size", 1))
        self.log_parts = [log_part(None)] if self.world_size == 1 else [log_part(r) for r in range(self.world_size)]
        self.optimizer = meta.get("optimizer", "SGD")
        try:
            self.optimizer_rule = rule_named(self.optimizer)
        except KeyError:
            raise StoreError(f"The store at {where!r} was tracked with optimizer {self.optimizer!r}, which this "
                             "hydra_nb does not know. Upgrade hydra_nb to read it.") from None
        required = _REQUIRED if self.world_size == 1 else [
            n for n in _REQUIRED if not n.startswith("log/") and n != "trace/row_end"
        ] + [part[key] for part in self.log_parts for key in ("sample", "step", "grad", "row_end")]
        # the fast recursion's fields; stores written before a rule gained more fields hold only these
        required = required + [f"trace/{f}" for f in self.optimizer_rule.fast_fields]
        missing = [n for n in required if n not in self.group]
        if missing:
            raise StoreError(f"The store at {where!r} is damaged: missing array(s) {', '.join(missing)}.")
        self.trace_fields = tuple(f for f in self.optimizer_rule.trace_fields if f"trace/{f}" in self.group)
        self.layout = ParamLayout.from_json(meta["params"])
        committed = meta["committed"]
        # a distributed run's steps count once every rank has committed its log up to them
        self._part_committed = [
            {"steps": int(committed["steps"]), "rows": int(committed["rows"])} if part["group"] is None
            else {k: int(v) for k, v in self.group[part["group"]].attrs.asdict().get("committed", {}).items()}
            for part in self.log_parts
        ]
        usable = min([int(committed["steps"])] + [c.get("steps", 0) for c in self._part_committed])
        self._verified: set[str] = set()
        n_ckpt = int(committed["checkpoints"])
        steps = self._read("checkpoints/step", slice(0, n_ckpt)) if n_ckpt else np.zeros(0, dtype=np.int64)
        self._n_checkpoints = int((steps <= usable).sum())
        if self._n_checkpoints == 0:
            raise StoreError(f"The store at {where!r} has no committed checkpoint yet.")
        self.checkpoint_steps = steps[: self._n_checkpoints]
        self.steps = int(self.checkpoint_steps[-1])
        self._projector: Projector | None = None

    # -- reading, with damage detected --------------------------------------------------------
    def _read(self, name: str, selection) -> np.ndarray:
        """``array[selection]`` within the committed region; a missing or unreadable chunk is a StoreError.

        (Zarr silently returns fill values for missing chunks, so their keys are checked first.)
        """
        return self.array(name)[selection]

    def array(self, name: str) -> "_CheckedArray":
        """A store array for direct slicing: its committed chunks verified present, read errors as StoreError."""
        arr = self.group[name]
        self._verify(name, arr)
        return _CheckedArray(arr, name, self.where)

    def _committed_length(self, name: str) -> int:
        for part, committed in zip(self.log_parts, self._part_committed):
            if name in (part["sample"], part["step"], part["grad"]):
                return committed.get("rows", 0)
            if name == part["row_end"]:
                return committed.get("steps", 0)
        head = name.split("/")[0]
        c = self.meta["committed"]
        if head == "log":
            return int(c["rows"])
        if head == "trace":
            return int(c["steps"])
        if head in ("checkpoints", "exact") and name != "exact/indices":
            return int(c["checkpoints"])
        if head == "replay":
            return int(c.get(f"replay_{name.split('/', 1)[1]}", 0))
        return self.group[name].shape[0] if self.group[name].ndim else 1

    def _verify(self, name: str, arr) -> None:
        if name in self._verified:
            return
        length = min(self._committed_length(name), arr.shape[0]) if arr.ndim else 0
        key = missing_chunk(arr, length)
        if key is not None:
            raise StoreError(f"The store at {self.where!r} is damaged: chunk {key} is missing "
                             f"(committed data of {name}).")
        self._verified.add(name)

    # -- description ------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def n_train(self) -> int:
        return int(self.meta["n_train"])

    @property
    def writer(self) -> dict | None:
        """Who is writing this store right now (pid, host, since), or None (local stores only)."""
        return lock_holder(self.path) if self.is_local else None

    @property
    def status(self) -> str:
        """``complete``, or why and where the run stopped (queries answer for the committed steps)."""
        s = self.meta.get("status", "running")
        if s == "complete":
            return "complete"
        detail = self.meta.get("status_detail") or ""
        if s == "running":
            if self.is_local and self.writer is None:
                s, detail = "interrupted", "the writing process ended without closing the store (killed or crashed)"
            else:
                return f"running: {self.steps} steps committed"
        return f"{s} at step {self.steps}" + (f" ({detail})" if detail else "")

    @property
    def tracked_indices(self) -> np.ndarray:
        """Dataset indices of the tracked training samples (all of them in fast mode)."""
        if self.mode == "exact":
            return self._read("exact/indices", slice(None))
        return np.arange(self.n_train, dtype=np.int64)

    @property
    def projector(self) -> Projector:
        if self._projector is None:
            names = [name for name, _ in self.group["projection"].arrays()] if "projection" in self.group else []
            arrays = {name: self._read(f"projection/{name}", slice(None)) for name in names}
            dtype = torch.float64 if self.group["checkpoints/params"].dtype == np.float64 else torch.float32
            self._projector = Projector.from_json(self.layout, self.meta["projection"], arrays, dtype)
        return self._projector

    # -- raw data ---------------------------------------------------------------------------
    def trace(self, steps: int | None = None) -> dict[str, np.ndarray]:
        """The optimizer trace: arrays (steps, parameters) of ``self.trace_fields``.

        The fields of ``self.optimizer_rule`` this store holds (docs/store.md): all of
        ``optimizer_rule.trace_fields``, or only its ``fast_fields`` in a store written before the
        others existed.
        """
        n = self.steps if steps is None else steps
        return {f: self._read(f"trace/{f}", slice(0, n)) for f in self.trace_fields}

    def trace_arrays(self, fields=None) -> dict[str, "_CheckedArray"]:
        """The trace arrays themselves, by field (default: the fast recursion's fields), for reading a window of
        steps at a time."""
        return {f: self.array(f"trace/{f}") for f in (self.optimizer_rule.fast_fields if fields is None else fields)}

    def params_at(self, checkpoint: int = -1) -> np.ndarray:
        """Flat trainable parameters θ at a checkpoint (index into ``checkpoint_steps``)."""
        c = self.checkpoint_index(checkpoint)
        return self._read("checkpoints/params", c)

    def load_params(self, model, checkpoint: int = -1) -> None:
        """Copy the parameters (and floating-point buffers) of a checkpoint into ``model``, in place."""
        if (why := self.layout.matches(model)) is not None:
            raise ValueError(f"The model does not match the store's parameters: {why}.")
        c = self.checkpoint_index(checkpoint)
        named = dict(model.named_parameters())
        flat = torch.from_numpy(self.params_at(c))
        buffers = self.buffers_at(c)
        with torch.no_grad():
            for name, value in self.layout.unflatten(flat).items():
                named[name].copy_(value)
            if buffers is not None:
                named_buffers = dict(model.named_buffers())
                for b in self.meta["buffers"]:
                    n = int(np.prod(b["shape"], dtype=np.int64))
                    named_buffers[b["name"]].copy_(torch.from_numpy(buffers[b["offset"]:b["offset"] + n])
                                                   .reshape(b["shape"]))

    def buffers_at(self, c: int) -> np.ndarray | None:
        """Flat floating-point buffers at checkpoint index ``c`` (BatchNorm statistics…), or None if the model has none."""
        return self._read("checkpoints/buffers", c) if "buffers" in self.group["checkpoints"] else None

    def optimizer_state_at(self, c: int) -> dict[str, list[torch.Tensor | None]]:
        """The optimizer's state at checkpoint index ``c``, as ``OptimizerRule.functional_step`` takes it: per field
        of ``optimizer_rule.state_fields``, one tensor per parameter (None where torch had none yet)."""
        c = self.checkpoint_index(c)
        out = {}
        for f in self.optimizer_rule.state_fields:
            if f"state_{f}" not in self.group["checkpoints"]:
                raise StoreError(f"The store at {self.where!r} holds no optimizer state ({f}) at its checkpoints: it "
                                 "was recorded before hydra_nb recorded what replay needs.")
            values = torch.from_numpy(np.array(self._read(f"checkpoints/state_{f}", c)))
            present = self._read(f"checkpoints/state_{f}_present", c)
            parts = self.layout.unflatten(values)
            out[f] = [parts[slot.name].clone() if present[k] else None for k, slot in enumerate(self.layout.slots)]
        return out

    def checkpoint_index(self, checkpoint: int) -> int:
        """The index into ``checkpoint_steps`` of ``checkpoint`` (negative counts from the last); IndexError if none."""
        c = int(checkpoint)
        if c < 0:
            c += self._n_checkpoints
        if not 0 <= c < self._n_checkpoints:
            raise IndexError(f"checkpoint {checkpoint} out of range: the store has {self._n_checkpoints} checkpoints.")
        return c

    def log_chunks(self, before_step: int):
        """Yield (samples, steps, rows) of the per-sample log for steps < ``before_step``, block by block
        (~16 MB of whole chunks), rank by rank for a distributed run (each rank's rows in step order)."""
        if before_step <= 0:
            return
        for part in self.log_parts:
            end = int(self._read(part["row_end"], before_step - 1))
            grad = self.group[part["grad"]]
            row_bytes = grad.shape[1] * grad.dtype.itemsize
            size = grad.chunks[0] * max(1, (16 << 20) // (grad.chunks[0] * row_bytes))
            for start in range(0, end, size):
                stop = min(start + size, end)
                yield (self._read(part["sample"], slice(start, stop)), self._read(part["step"], slice(start, stop)),
                       self._read(part["grad"], slice(start, stop)))