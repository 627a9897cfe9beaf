// What the explorer's views share: the ctx each view is created with (`create(ctx)` in views/).
// One ctx per view, so each view owns its model listeners and its requests, and its dispose()
// drops exactly those. State lives in the widget model (so Python can drive it too); answers from
// Python arrive through the rpc client; a view talks to another one only through `links`.
import { className, el } from "./format.js";

/**
 * A latest-wins request slot. `request()` aborts the slot's previous request; progress, result and
 * error of a request that is no longer the latest (or was aborted) are dropped.
 */
export function requestSlot(rpc) {
  let latest = null;  // AbortController of the request whose answer still counts
  const abort = () => {
    const ctl = latest;
    latest = null;
    if (ctl) ctl.abort();
  };
  const request = (method, params = {}, { onProgress, onResult, onError } = {}) => {
    abort();
    const mine = new AbortController();
    latest = mine;
    const fresh = (fn) => (...args) => { if (latest === mine && fn) fn(...args); };
    return rpc.request(method, params, { signal: mine.signal, onProgress: onProgress && fresh(onProgress) })
      .then(fresh(onResult), fresh(onError))
      .finally(() => { if (latest === mine) latest = null; });
  };
  return { request, abort, get pending() { return latest !== null; } };
}

/**
 * The ctx of one view:
 *   doc, E(tag, attrs, children)   the document and its element factory (format.js `el`)
 *   get(key)                       widget model state
 *   set({key: value, ...})         sets each key in order, then one save_changes (the change reaches Python)
 *   on(event, fn)                  model.on, remembered: dispose() takes it off again
 *   rpc                            the request client (rpc.js), shared by every view
 *   slot()                         a new latest-wins request slot (requestSlot); dispose() aborts it
 *   info(), name(c)                the widget's `info` and the display name of class c
 *   links                          callbacks into other views, filled in by the composition (explorer.js)
 *   dispose()                      removes this ctx's listeners and aborts its slots' pending requests
 */
export function createContext({ model, rpc, doc, links = {} }) {
  const listeners = [];
  const slots = [];
  const info = () => model.get("info") || {};
  return {
    doc,
    E: (tag, attrs, children) => el(doc, tag, attrs, children),
    get: (key) => model.get(key),
    set(changes) {
      for (const [key, value] of Object.entries(changes)) model.set(key, value);
      model.save_changes();
    },
    on(event, fn) {
      model.on(event, fn);
      listeners.push([event, fn]);
    },
    rpc,
    slot() {
      const s = requestSlot(rpc);
      slots.push(s);
      return s;
    },
    info,
    name: (c) => className(info(), c),
    links,
    dispose() {
      for (const [event, fn] of listeners.splice(0)) model.off(event, fn);
      for (const s of slots) s.abort();
    },
  };
}
