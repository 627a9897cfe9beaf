"""The run store: a Zarr v3 group on disk, the single source of truth of a tracked run.

Layout (schema version 1; ``docs/store.md`` describes every array and attribute):

    <run>.zarr/
      zarr.json                attrs["hydra_nb"]: schema_version, run id, mode, config, parameter
                               layout, projection, status and the committed counts
      log/sample  (row,)                 dataset index of each per-sample gradient row
      log/step    (row,)                 optimizer step the row entered
      log/grad    (row, projected)       projected gradient u of that sample at that step
      trace/<field> (step, param)        lr, momentum, dampening, weight_decay, nesterov, first, active
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

import datetime
import queue
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from .errors import StoreError, TrackingConfigError
from .hypergrad import TRACE_FIELDS
from .params import ParamLayout
from .projection import Projector

SCHEMA_VERSION = 1
FORMAT = "hydra_nb.store"
_TARGET_CHUNK_BYTES = 1 << 20
_FLUSH_BYTES = 8 << 20
_TRACE_CHUNK = 1024
_FLOAT_CODEC = BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")


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


def prepare_path(path, overwrite: bool) -> Path:
    """Check that a new run may be written at ``path`` (removing an earlier run if ``overwrite``)."""
    p = Path(path)
    if p.exists():
        if p.is_file():
            raise TrackingConfigError(f"The store path {str(p)!r} is a file. Give a folder path such as 'runs/a.zarr'.")
        meta = read_meta(p)
        if meta is None:
            if any(p.iterdir()):
                raise TrackingConfigError(
                    f"{str(p)!r} already exists and is not a hydra_nb store; hydra_nb will not write into or "
                    "delete it. Choose another store path.")
        elif not overwrite:
            raise TrackingConfigError(
                f"{str(p)!r} already holds a hydra_nb run ({meta.get('mode')} mode, run {meta.get('run_id')}, "
                f"{meta.get('committed', {}).get('steps', 0)} steps). Pass overwrite=True to replace it, or "
                "choose another store path.")
        else:
            shutil.rmtree(p)
    return p


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
    """

    def __init__(self, path: Path, meta: dict, layout: ParamLayout, projector_arrays: dict[str, np.ndarray],
                 log_width: int, log_dtype: np.dtype, param_dtype: np.dtype, buffer_size: int,
                 exact_indices: np.ndarray | None, queue_size: int = 32):
        self.path = path
        self.meta = meta
        self.error: BaseException | None = None
        self.bytes_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._log_rows = _rows_per_chunk(log_width, np.dtype(log_dtype).itemsize)
        # write in batches of whole chunks (~8 MB): fewer, larger writes
        self._flush_rows = self._log_rows * max(1, _FLUSH_BYTES // (self._log_rows * log_width * np.dtype(log_dtype).itemsize))
        index_rows = 1 << 16
        self._pending_rows: list[tuple] = []  # (samples, steps, rows)
        self._pending_count = 0
        self._pending_trace: list[dict] = []
        self._trace_row_ends: list[int] = []
        self._rows_total = 0
        self._steps_total = 0
        self._checkpoints = 0

        g = zarr.open_group(str(path), mode="w")
        self.group = g
        self._arrays: dict[str, zarr.Array] = {}  # handles, so that appends skip the group lookup
        self._length: dict[str, int] = {}  # rows written; arrays may be longer (capacity)
        P, D = len(layout.slots), layout.size
        g.create_array("log/sample", shape=(0,), chunks=(index_rows,), dtype="int64", dimension_names=["row"])
        g.create_array("log/step", shape=(0,), chunks=(index_rows,), dtype="int64", dimension_names=["row"])
        # projected gradients are noise-like floats: lz4/zstd saved 6-8% of their size at twice the write
        # cost (measured), so they are stored uncompressed; everything else is compressed
        g.create_array("log/grad", shape=(0, log_width), chunks=(self._log_rows, log_width), dtype=log_dtype,
                       dimension_names=["row", "projected"], compressors=None)
        for f in ("lr", "momentum", "dampening", "weight_decay"):
            g.create_array(f"trace/{f}", shape=(0, P), chunks=(_TRACE_CHUNK, P), dtype="float64",
                           dimension_names=["step", "param"])
        for f in ("nesterov", "first", "active"):
            g.create_array(f"trace/{f}", shape=(0, P), chunks=(_TRACE_CHUNK, P), dtype="bool",
                           dimension_names=["step", "param"])
        g.create_array("trace/row_end", shape=(0,), chunks=(_TRACE_CHUNK,), dtype="int64", dimension_names=["step"])
        g.create_array("checkpoints/step", shape=(0,), chunks=(1024,), dtype="int64", dimension_names=["checkpoint"])
        d_chunk = min(D, 1 << 20)
        g.create_array("checkpoints/params", shape=(0, D), chunks=(1, d_chunk), dtype=param_dtype,
                       dimension_names=["checkpoint", "parameter"], compressors=[_FLOAT_CODEC])
        if buffer_size:
            g.create_array("checkpoints/buffers", shape=(0, buffer_size), chunks=(1, min(buffer_size, 1 << 20)),
                           dtype="float64", dimension_names=["checkpoint", "buffer"])
        for name, arr in projector_arrays.items():  # block{i}_h1/s1 run over rows, _h2/s2 over cols
            g.create_array(f"projection/{name}", data=arr, dimension_names=["row" if name[-1] == "1" else "col"])
        if exact_indices is not None:
            m = len(exact_indices)
            g.create_array("exact/indices", data=np.asarray(exact_indices, dtype=np.int64), dimension_names=["sample"])
            rows = max(1, min(m, _TARGET_CHUNK_BYTES // max(D * np.dtype(param_dtype).itemsize, 1)))
            g.create_array("exact/h", shape=(0, m, D), chunks=(1, rows, d_chunk), dtype=param_dtype,
                           dimension_names=["checkpoint", "sample", "parameter"], compressors=[_FLOAT_CODEC])
        self._exact = exact_indices is not None
        self._has_buffers = bool(buffer_size)
        meta.update({"committed": {"steps": 0, "rows": 0, "checkpoints": 0}, "status": "running",
                     "status_detail": "", "updated": _now()})
        g.attrs["hydra_nb"] = meta
        self._thread = threading.Thread(target=self._run, name="hydra_nb-writer", daemon=True)
        self._thread.start()

    # -- producer side (training thread) ------------------------------------------------------
    def put_step(self, trace_row: dict[str, np.ndarray], samples: torch.Tensor, rows: torch.Tensor | None) -> None:
        """One optimizer step: its trace row and its per-sample rows (dataset indices, projected gradients)."""
        rows_item = None if rows is None else to_host(rows, copy=False)
        self._put(("step", trace_row, samples.detach().cpu().to(torch.int64).numpy(), rows_item))

    def put_checkpoint(self, step: int, params: torch.Tensor, buffers: torch.Tensor | None,
                       h: torch.Tensor | None) -> None:
        """Parameters (and exact-mode h) after ``step`` completed steps; commits everything before it."""
        self._put(("checkpoint", step, to_host(params, copy=True),
                   None if buffers is None else to_host(buffers, copy=True),
                   None if h is None else to_host(h, copy=True)))

    def close(self, status: str, detail: str = "") -> None:
        """Flush, commit and record the run's final status; waits for the writer thread."""
        self._put(("close", status, detail))
        self._thread.join()

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def _put(self, item) -> None:
        if not self._thread.is_alive():
            return
        self._queue.put(item)

    # -- consumer side (writer thread) --------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if self.error is not None and item[0] != "close":
                continue  # keep draining so that the training thread never blocks on a dead writer
            try:
                if item[0] == "step":
                    self._on_step(*item[1:])
                elif item[0] == "checkpoint":
                    self._on_checkpoint(*item[1:])
                elif item[0] == "close":
                    if self.error is None:
                        self._flush(all_rows=True)
                        self._trim()
                        self._commit(status=item[1], detail=item[2])
                    return
            except BaseException as exc:  # disk full, permissions...: keep what was committed
                self.error = exc

    def _on_step(self, trace_row, samples, rows_item) -> None:
        self._pending_trace.append(trace_row)
        if rows_item is not None and len(samples):
            rows = _numpy(rows_item)
            steps = np.full(len(samples), self._steps_total + len(self._pending_trace) - 1, dtype=np.int64)
            self._pending_rows.append((samples, steps, rows))
            self._pending_count += len(samples)
        self._trace_row_ends.append(self._rows_total + self._pending_count)
        if self._pending_count >= self._flush_rows:
            self._flush(all_rows=False)

    def _flush(self, all_rows: bool) -> None:
        if self._pending_count and (all_rows or self._pending_count >= self._flush_rows):
            samples = np.concatenate([s for s, _, _ in self._pending_rows])
            steps = np.concatenate([t for _, t, _ in self._pending_rows])
            rows = np.concatenate([r for _, _, r in self._pending_rows])
            n = len(samples) if all_rows else (len(samples) // self._log_rows) * self._log_rows
            self._append("log/sample", samples[:n])
            self._append("log/step", steps[:n])
            self._append("log/grad", rows[:n])
            self.bytes_written += rows[:n].nbytes + 16 * n
            self._rows_total += n
            rest = (samples[n:], steps[n:], rows[n:])
            self._pending_rows = [rest] if len(rest[0]) else []
            self._pending_count = len(rest[0])
        if all_rows and self._pending_trace:
            for f in self._pending_trace[0]:
                self._append(f"trace/{f}", np.stack([r[f] for r in self._pending_trace]))
            self._append("trace/row_end", np.asarray(self._trace_row_ends, dtype=np.int64))
            self._steps_total += len(self._pending_trace)
            self._pending_trace = []
            self._trace_row_ends = []

    def _on_checkpoint(self, step, params_item, buffers_item, h_item) -> None:
        self._flush(all_rows=True)
        if step != self._steps_total:  # pragma: no cover - a tracker bug, never silently accepted
            raise StoreError(f"checkpoint at step {step} but {self._steps_total} steps were written")
        params = _numpy(params_item)
        self._append("checkpoints/params", params[None])
        if self._has_buffers:
            self._append("checkpoints/buffers", _numpy(buffers_item).astype(np.float64)[None])
        if self._exact:
            self._append("exact/h", _numpy(h_item)[None])
        self._append("checkpoints/step", np.asarray([step], dtype=np.int64))
        self.bytes_written += params.nbytes
        self._checkpoints += 1
        self._commit()

    def _append(self, name: str, data: np.ndarray) -> None:
        """Write rows after the last written one, growing the array's capacity geometrically.

        Readers never look past ``committed``, so capacity beyond it is invisible to them; growing
        by doubling keeps metadata rewrites (one per resize) rare. ``close`` trims to the exact size.
        """
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name]
            self._length[name] = arr.shape[0]
        start = self._length[name]
        stop = start + len(data)
        if stop > arr.shape[0]:
            arr.resize((max(stop, 2 * arr.shape[0], arr.chunks[0]), *arr.shape[1:]))
        arr[start:stop] = data
        self._length[name] = stop

    def _trim(self) -> None:
        for name, arr in self._arrays.items():
            if arr.shape[0] != self._length[name]:
                arr.resize((self._length[name], *arr.shape[1:]))

    def _commit(self, status: str | None = None, detail: str = "") -> None:
        self.meta["committed"] = {"steps": self._steps_total, "rows": self._rows_total,
                                  "checkpoints": self._checkpoints}
        if status is not None:
            self.meta["status"] = status
            self.meta["status_detail"] = detail
        self.meta["updated"] = _now()
        self.group.attrs["hydra_nb"] = self.meta


def new_run_meta(mode: str, n_train: int, layout: ParamLayout, projector_json: dict, config: dict,
                 buffers: list[dict]) -> dict:
    from . import __version__

    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "hydra_nb_version": __version__,
        "run_id": uuid.uuid4().hex,
        "created": _now(),
        "mode": mode,
        "n_train": int(n_train),
        "optimizer": "SGD",
        "config": config,
        "params": layout.to_json(),
        "buffers": buffers,
        "projection": projector_json,
    }


class StoreReader:
    """A run store opened read-only: its metadata and raw arrays, up to what was committed.

    Queries live in :class:`hydra_nb.query.Store`, which extends this.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"No hydra_nb store at {str(self.path)!r}: the path does not exist.")
        meta = read_meta(self.path)
        if meta is None:
            raise StoreError(f"{str(self.path)!r} is not a hydra_nb store (no hydra_nb attributes in its zarr.json).")
        if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
            raise StoreError(
                f"The store at {str(self.path)!r} has schema version {meta['schema_version']}; this hydra_nb reads "
                f"up to {SCHEMA_VERSION}. Upgrade hydra_nb to read it.")
        self.meta = meta
        self.group = zarr.open_group(str(self.path), mode="r")
        self.layout = ParamLayout.from_json(meta["params"])
        committed = meta["committed"]
        self._n_checkpoints = int(committed["checkpoints"])
        if self._n_checkpoints == 0:
            raise StoreError(f"The store at {str(self.path)!r} has no committed checkpoint yet.")
        self.checkpoint_steps = np.asarray(self.group["checkpoints/step"][: self._n_checkpoints])
        self.steps = int(self.checkpoint_steps[-1])
        self._projector: Projector | None = None

    # -- description ------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def n_train(self) -> int:
        return int(self.meta["n_train"])

    @property
    def status(self) -> str:
        """``complete``, or why and where the run stopped (queries answer for the committed steps)."""
        s = self.meta.get("status", "running")
        if s == "complete":
            return "complete"
        detail = self.meta.get("status_detail") or ""
        return f"{s} at step {self.steps}" + (f" ({detail})" if detail else "")

    @property
    def tracked_indices(self) -> np.ndarray:
        """Dataset indices of the tracked training samples (all of them in fast mode)."""
        if self.mode == "exact":
            return np.asarray(self.group["exact/indices"][:])
        return np.arange(self.n_train, dtype=np.int64)

    @property
    def projector(self) -> Projector:
        if self._projector is None:
            arrays = {name: arr for name, arr in self.group["projection"].arrays()} if "projection" in self.group else {}
            dtype = torch.float64 if self.group["checkpoints/params"].dtype == np.float64 else torch.float32
            self._projector = Projector.from_json(self.layout, self.meta["projection"], arrays, dtype)
        return self._projector

    def __repr__(self) -> str:
        return (f"<hydra_nb.Store {str(self.path)!r}: {self.mode} mode, {len(self.tracked_indices)} tracked of "
                f"{self.n_train} samples, {self.steps} steps, {len(self.checkpoint_steps)} checkpoints, "
                f"{self.status}>")

    # -- raw data ---------------------------------------------------------------------------
    def trace(self, steps: int | None = None) -> dict[str, np.ndarray]:
        """The SGD trace: arrays (steps, parameters) of lr, momentum, dampening, weight_decay, nesterov, first, active."""
        n = self.steps if steps is None else steps
        return {f: np.asarray(self.group[f"trace/{f}"][:n]) for f in TRACE_FIELDS}

    def params_at(self, checkpoint: int = -1) -> np.ndarray:
        """Flat trainable parameters θ at a checkpoint (index into ``checkpoint_steps``)."""
        c = self._checkpoint_index(checkpoint)
        return np.asarray(self.group["checkpoints/params"][c])

    def _buffers_at(self, c: int) -> np.ndarray | None:
        return np.asarray(self.group["checkpoints/buffers"][c]) if "buffers" in self.group["checkpoints"] else None

    def _checkpoint_index(self, checkpoint: int) -> int:
        c = int(checkpoint)
        if c < 0:
            c += self._n_checkpoints
        if not 0 <= c < self._n_checkpoints:
            raise IndexError(f"checkpoint {checkpoint} out of range: the store has {self._n_checkpoints} checkpoints.")
        return c

    def log_chunks(self, before_step: int):
        """Yield (samples, steps, rows) of the per-sample log for steps < ``before_step``, chunk by chunk."""
        if before_step <= 0:
            return
        end = int(self.group["trace/row_end"][before_step - 1])
        grad = self.group["log/grad"]
        row_bytes = grad.shape[1] * grad.dtype.itemsize
        size = grad.chunks[0] * max(1, (16 << 20) // (grad.chunks[0] * row_bytes))  # ~16 MB of whole chunks
        for start in range(0, end, size):
            stop = min(start + size, end)
            yield (np.asarray(self.group["log/sample"][start:stop]), np.asarray(self.group["log/step"][start:stop]),
                   np.asarray(grad[start:stop]))
