// A stand-in for the anywidget model and for the Python side, for unit tests without a kernel.
import { createContext } from "../src/context.js";
import { Client } from "../src/rpc.js";

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
    // a handler may return a promise (see `hold`): Python answers when it settles
    Promise.resolve().then(() => handler(content.params)).then((value) => {
      const [result, paths, buffers] = split(value);
      this.emit("msg:custom", { type: "response", id: content.id, ok: true, result, buffer_paths: paths }, buffers);
    }, (err) => {
      this.emit("msg:custom", { type: "response", id: content.id, ok: false, error: String(err.message) });
    });
  }

  /** Listeners of model state (change:*), the ones a view or the explorer adds. */
  stateListeners() {
    return Object.entries(this.listeners).filter(([e, fns]) => e.startsWith("change:") && fns.length)
      .map(([e, fns]) => `${e} x${fns.length}`);
  }
}

export const flush = async (n = 5) => { for (let i = 0; i < n; i++) await new Promise((r) => setTimeout(r, 0)); };

// -- the Python side: Explorer._handle_* answers on a 100-sample test set, 500 training samples ----
export const MODES = {
  fast: { label: "fast estimate", note: "fast estimate: may disagree with exact at large learning rates",
    figure: "Measured: rankings decorrelate at lr 0.05.", source: "benchmarks/RESULTS.md, \u201cApproximation error\u201d" },
  exact: { label: "exact", note: "exact: the derivative of this training run" },
};
export const INFO = { test_kind: "image", train_kind: "image", n_test: 100, n_train: 500, train_classes: [0, 1, 2],
  test_classes: [0, 1, 2], class_names: null, path: "runs/a.zarr", feature_names: null, modes: MODES,
  store: { path: "runs/a.zarr", status: "complete", mode: "fast", steps: 90, checkpoints: 3, n_tracked: 500, n_train: 500 } };

/** A feature-row payload (as Explorer._cards sends for tabular data): rows of 5 features, 4 salient each. */
export const rows = (ids) => ({
  features: packed("float64", [ids.length, 5], ids.flatMap((i) => [i, 17.99, 0.1184, 1001, -3])),
  salient: packed("int32", [ids.length, 4], ids.flatMap(() => [3, 1, 4, 2])),
  z: packed("float32", [ids.length, 4], ids.flatMap(() => [2.5, -1.25, 0.5, 0])),
});
export const FEATURES = ["mean radius", "mean texture", "mean smoothness", "worst area", "a very long feature name"];

export const thumbs = (n) => packed("uint8", [n, 2, 2, 1], new Array(4 * n).fill(0).map((_, i) => i % 255));
export const cards = (ids, scores) => ({ indices: packed("int32", [ids.length], ids),
  labels: packed("int32", [ids.length], ids.map((i) => i % 3)), scores: packed("float64", [ids.length], scores),
  thumbs: thumbs(ids.length) });

/** {calls, handlers}: handlers answer like the Python side; calls records [method, params] in order. */
export function python() {
  const calls = [];
  const handlers = {
    gallery: (p) => {
      calls.push(["gallery", p]);
      const ids = Array.from({ length: Math.min(p.limit, 100 - p.offset) }, (_, i) => p.offset + i);
      return { total: 100, offset: p.offset, indices: packed("int32", [ids.length], ids),
        labels: packed("int32", [ids.length], ids.map((i) => i % 3)),
        predicted: packed("int32", [ids.length], ids.map((i) => (i % 7 === 0 ? (i + 1) % 3 : i % 3))),
        thumbs: thumbs(ids.length) };
    },
    rankings: (p) => {
      calls.push(["rankings", p]);
      const top = (ids, scores) => cards(ids.slice(0, p.k), scores.slice(0, p.k));
      const groups = p.sort === "both"
        ? { helpful: top([5, 6, 7], [3, 2, 1]), harmful: top([8, 9, 10], [-3, -2, -1]) }
        : { [p.sort]: top([5, 8], [3, -2.5]) };
      return { test: p.test, label: 1, predicted: 2, candidates: 500, step: 90, mode: "fast", groups };
    },
    trajectory: (p) => {
      calls.push(["trajectory", p]);
      const m = p.train.length;
      return { test: p.test, mode: "fast", steps: packed("float64", [3], [0, 45, 90]),
        values: packed("float64", [3, m], new Array(3 * m).fill(0).map((_, i) => i)), epochs: packed("float64", [2], [45, 90]),
        epoch_exact: true, train: packed("int32", [m], p.train), labels: packed("int32", [m], p.train.map((i) => i % 3)) };
    },
    self_influence: (p) => { calls.push(["self_influence", p]); return { total: 500, offset: p.offset, order: p.order, mode: "fast",
      range: packed("float64", [2], [-1, 9]), ...cards([3, 1, 4], [9, 5, 1]) }; },
    class_matrix: () => { calls.push(["class_matrix"]); return { mode: "exact", train_classes: packed("int32", [3], [0, 1, 2]),
      test_classes: packed("int32", [3], [0, 1, 2]), mean: packed("float64", [3, 3], [1, -1, 0, 0, 2, -2, 0.5, 0, 1]),
      counts: packed("float64", [3, 3], new Array(9).fill(10)) }; },
  };
  return { calls, handlers };
}

/** A handler whose answers wait until `release()`: a slow query, still running. */
export function hold(handler) {
  const waiting = [];
  const held = (params) => new Promise((resolve, reject) => waiting.push(() => {
    try { resolve(handler(params)); } catch (err) { reject(err); }
  }));
  held.waiting = waiting;
  held.release = () => { for (const answer of waiting.splice(0)) answer(); };
  return held;
}

/**
 * A view's ctx over a FakeModel and the fake Python side, as explorer.js makes one (context.js),
 * with links to other views that record their calls in `linked` (testVisual answers `visual`).
 */
export function fakeContext(state = {}, { py = python(), visual = null } = {}) {
  const model = new FakeModel({ info: INFO, k: 3, ...state }, py.handlers);
  const rpc = new Client(model);
  const linked = [];
  const links = {
    testVisual: (test) => { linked.push(["testVisual", test]); return visual; },
    compare: (train) => linked.push(["compare", train]),
    showSelfInfluence: (c) => linked.push(["showSelfInfluence", c]),
    liveEnded: () => linked.push(["liveEnded"]),
  };
  const ctx = createContext({ model, rpc, doc: document, links });
  return { ctx, model, rpc, py, linked };
}
