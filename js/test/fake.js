// A stand-in for the anywidget model and for the Python side, for unit tests without a kernel.

/** Packs a typed array the way hydra_nb/widgets/wire.py does (data as a DataView, like a real buffer). */
export function packed(dtype, shape, values) {
  const Ctor = { uint8: Uint8Array, int32: Int32Array, float32: Float32Array, float64: Float64Array }[dtype];
  const arr = Ctor.from(values);
  // put it at an odd offset of a bigger buffer: decoding must not depend on alignment
  const bytes = new Uint8Array(arr.byteLength + 3);
  bytes.set(new Uint8Array(arr.buffer), 3);
  return { dtype, shape, data: new DataView(bytes.buffer, 3, arr.byteLength) };
}

/** Split packed arrays' data out of a result, as Python's split_buffers does. */
export function split(value, path = [], paths = [], buffers = []) {
  if (value && typeof value === "object" && value.data instanceof DataView) {
    paths.push([...path, "data"]);
    buffers.push(value.data);
    return [{ ...value, data: null }, paths, buffers];
  }
  if (Array.isArray(value)) return [value.map((v, i) => split(v, [...path, i], paths, buffers)[0]), paths, buffers];
  if (value && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = split(v, [...path, k], paths, buffers)[0];
    return [out, paths, buffers];
  }
  return [value, paths, buffers];
}

export class FakeModel {
  constructor(state = {}, handlers = {}) {
    this.state = { selected: -1, k: 10, sort: "both", train_class: null, compared: [], pinned: [], tab: "explain",
      live_state: {}, timeout_s: 120, info: {}, ...state };
    this.handlers = handlers;
    this.listeners = {};
    this.sent = [];
    this.saves = 0;
  }
  get(key) { return this.state[key]; }
  set(key, value) {
    const old = this.state[key];
    this.state[key] = value;
    if (old !== value) this.emit(`change:${key}`);
  }
  save_changes() { this.saves++; }
  on(event, fn) { (this.listeners[event] ||= []).push(fn); }
  off(event, fn) { this.listeners[event] = (this.listeners[event] || []).filter((f) => f !== fn); }
  emit(event, ...args) { for (const fn of [...(this.listeners[event] || [])]) fn(...args); }
  send(content) {
    this.sent.push(content);
    const handler = this.handlers[content.method];
    if (!handler) return;
    Promise.resolve().then(() => {
      try {
        const [result, paths, buffers] = split(handler(content.params));
        this.emit("msg:custom", { type: "response", id: content.id, ok: true, result, buffer_paths: paths }, buffers);
      } catch (err) {
        this.emit("msg:custom", { type: "response", id: content.id, ok: false, error: String(err.message) });
      }
    });
  }
}

export const flush = async (n = 5) => { for (let i = 0; i < n; i++) await new Promise((r) => setTimeout(r, 0)); };
