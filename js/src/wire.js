// The wire format shared with hydra_nb/widgets/wire.py: JSON plus binary buffers.
// A packed array is {dtype, shape, data}; `data` arrives as a DataView (custom-message buffers and
// widget state alike) and becomes a typed array here. No numbers travel as JSON lists.

const TYPED = {
  uint8: Uint8Array,
  int32: Int32Array,
  float32: Float32Array,
  float64: Float64Array,
};

/** Put buffers back at their paths (inverse of Python's split_buffers). Mutates and returns obj. */
export function putBuffers(obj, paths = [], buffers = []) {
  paths.forEach((path, i) => {
    let target = obj;
    for (const key of path.slice(0, -1)) target = target[key];
    target[path[path.length - 1]] = buffers[i];
  });
  return obj;
}

function bytesOf(data) {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("packed array without binary data");
}

/** A packed array as {dtype, shape, data: TypedArray}; the bytes are copied so alignment never matters. */
export function toTyped(packed) {
  const Ctor = TYPED[packed.dtype];
  if (!Ctor) throw new TypeError(`unsupported dtype ${packed.dtype}`);
  const bytes = bytesOf(packed.data);
  const copy = new Uint8Array(bytes.byteLength);
  copy.set(bytes);
  const data = new Ctor(copy.buffer, 0, copy.byteLength / Ctor.BYTES_PER_ELEMENT);
  const expected = packed.shape.reduce((a, b) => a * b, 1);
  if (data.length !== expected) throw new RangeError(`array of ${data.length} values for shape [${packed.shape}]`);
  return { dtype: packed.dtype, shape: packed.shape, data };
}

function isPacked(v) {
  return v && typeof v === "object" && typeof v.dtype === "string" && Array.isArray(v.shape) &&
    (v.data instanceof ArrayBuffer || ArrayBuffer.isView(v.data));
}

/** Recursively replace packed arrays by typed arrays. */
export function decode(value) {
  if (isPacked(value)) return toTyped(value);
  if (Array.isArray(value)) return value.map(decode);
  if (value && typeof value === "object" && !ArrayBuffer.isView(value) && !(value instanceof ArrayBuffer)) {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = decode(v);
    return out;
  }
  return value;
}
