// Request/response over anywidget custom messages: an id -> pending promise map.
// The kernel answers one request at a time and a query on a large store can take minutes, so the
// timeout is ours (default 120 s, the widget's `timeout_s`), not anywidget's 3 s `invoke` default.
import { decode, putBuffers } from "./wire.js";

export class RequestError extends Error {}

export class Client {
  constructor(model, { timeoutMs = 120000 } = {}) {
    this.model = model;
    this.timeoutMs = timeoutMs;
    this.pending = new Map();
    this.nextId = 1;
    this._onMessage = (msg, buffers) => this.receive(msg, buffers);
    model.on("msg:custom", this._onMessage);
  }

  /** Ask Python; resolves with the decoded result. Options: signal, timeoutMs, onProgress(done, total). */
  request(method, params = {}, { signal, timeoutMs, onProgress } = {}) {
    const id = this.nextId++;
    const limit = timeoutMs ?? this.timeoutMs;
    return new Promise((resolve, reject) => {
      const finish = () => {
        clearTimeout(entry.timer);
        if (signal) signal.removeEventListener("abort", entry.abort);
        this.pending.delete(id);
      };
      const entry = {
        onProgress,
        resolve: (v) => { finish(); resolve(v); },
        reject: (e) => { finish(); reject(e); },
        abort: () => entry.reject(new RequestError(`${method}: cancelled`)),
        timer: setTimeout(() => entry.reject(new RequestError(
          `${method}: no answer after ${Math.round(limit / 1000)} s (is a cell still running?)`)), limit),
      };
      if (signal) {
        if (signal.aborted) { entry.abort(); return; }
        signal.addEventListener("abort", entry.abort);
      }
      this.pending.set(id, entry);
      this.model.send({ type: "request", id, method, params });
    });
  }

  receive(msg, buffers = []) {
    if (!msg || typeof msg !== "object") return;
    const entry = this.pending.get(msg.id);
    if (!entry) return;
    if (msg.type === "progress") {
      if (entry.onProgress) entry.onProgress(msg.done, msg.total);
    } else if (msg.type === "response") {
      if (msg.ok) entry.resolve(decode(putBuffers(msg.result, msg.buffer_paths || [], buffers)));
      else entry.reject(new RequestError(msg.error || "request failed"));
    }
  }

  dispose() {
    this.model.off("msg:custom", this._onMessage);
    for (const entry of [...this.pending.values()]) entry.reject(new RequestError("widget closed"));
  }
}
