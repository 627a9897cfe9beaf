"""The wire format between the explorer's Python side and its front end.

Every message is a JSON object plus a list of binary buffers. Numeric arrays never travel as JSON
lists: :func:`pack` turns an array into ``{"dtype": ..., "shape": [...], "data": <bytes>}`` and
:func:`split_buffers` moves every ``bytes``/``memoryview`` out of a message into the buffer list,
recording where it was (``buffer_paths``, as ipywidgets does for widget state). The front end
(``js/src/wire.js``) puts the buffers back and turns each packed array into a typed array.

Dtypes are those JavaScript has typed arrays for: uint8, int32, float32, float64. Dataset indices
travel as int32 (datasets of more than 2³¹ samples are out of scope for a notebook view).
"""

from __future__ import annotations

import numpy as np

DTYPES = ("uint8", "int32", "float32", "float64")
_CAST = {"int64": "int32", "uint32": "int32", "int16": "int32", "int8": "int32", "uint16": "int32",
         "bool": "uint8", "float16": "float32"}


def pack(array, dtype: str | None = None) -> dict:
    """An array as ``{"dtype", "shape", "data"}`` with ``data`` its C-ordered little-endian bytes."""
    a = np.asarray(array)
    name = dtype or _CAST.get(a.dtype.name, a.dtype.name)
    if name not in DTYPES:
        raise TypeError(f"cannot send dtype {a.dtype} to the front end (one of {DTYPES}).")
    if name == "int32" and a.size and a.dtype.kind in "iu" and (a.max() > 2**31 - 1 or a.min() < -2**31):
        raise OverflowError("index values do not fit in int32.")
    a = np.ascontiguousarray(a, dtype=np.dtype(name).newbyteorder("<"))
    return {"dtype": name, "shape": [int(n) for n in a.shape], "data": memoryview(a.tobytes())}


def unpack(packed: dict, buffer=None) -> np.ndarray:
    """The inverse of :func:`pack` (``buffer`` overrides ``packed["data"]``)."""
    data = packed["data"] if buffer is None else buffer
    return np.frombuffer(bytes(data), dtype=np.dtype(packed["dtype"]).newbyteorder("<")).reshape(packed["shape"])


def split_buffers(value, path=()) -> tuple[object, list[list], list[memoryview]]:
    """(value without binary leaves, paths of the removed leaves, the leaves as memoryviews)."""
    paths: list[list] = []
    buffers: list[memoryview] = []

    def walk(v, here):
        if isinstance(v, (bytes, bytearray, memoryview)):
            paths.append(list(here))
            buffers.append(memoryview(v))
            return None
        if isinstance(v, dict):
            return {k: walk(x, here + (k,)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, here + (i,)) for i, x in enumerate(v)]
        if isinstance(v, np.generic):
            return v.item()
        return v

    return walk(value, tuple(path)), paths, buffers


def put_buffers(value, paths, buffers):
    """Put buffers back where :func:`split_buffers` took them (in place; returns ``value``)."""
    for path, buf in zip(paths, buffers):
        target = value
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = buf
    return value
