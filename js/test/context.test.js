import { describe, expect, it } from "vitest";
import { createContext, requestSlot } from "../src/context.js";
import { Client } from "../src/rpc.js";
import { FakeModel, flush, hold } from "./fake.js";

const echo = (p) => ({ n: p.n });

describe("requestSlot", () => {
  it("keeps only the latest request's answer, and aborts the one it replaces", async () => {
    const ask = hold(echo);
    const model = new FakeModel({}, { ask });
    const client = new Client(model);
    const slot = requestSlot(client);
    const seen = [];
    const errors = [];
    const req = (n) => slot.request("ask", { n }, { onResult: (r) => seen.push(r.n), onError: (e) => errors.push(e) });
    req(1);
    req(2);
    await flush();
    expect(client.pending.size).toBe(1);  // the first was aborted, not left to time out
    expect(slot.pending).toBe(true);
    ask.release();
    await flush();
    expect(seen).toEqual([2]);
    expect(errors).toEqual([]);  // the abort of the first is nobody's error
    expect(slot.pending).toBe(false);
  });

  it("drops progress and errors of requests that are no longer the latest", async () => {
    const model = new FakeModel();
    const client = new Client(model);
    const slot = requestSlot(client);
    const progress = [];
    const errors = [];
    slot.request("slow", {}, { onProgress: (d, t) => progress.push([1, d, t]), onError: (e) => errors.push(e.message) });
    model.emit("msg:custom", { type: "progress", id: 1, done: 1, total: 4 });
    slot.request("slow", {}, { onProgress: (d, t) => progress.push([2, d, t]), onError: (e) => errors.push(e.message) });
    model.emit("msg:custom", { type: "progress", id: 1, done: 2, total: 4 });  // the replaced one: dropped
    model.emit("msg:custom", { type: "progress", id: 2, done: 1, total: 4 });
    model.emit("msg:custom", { type: "response", id: 2, ok: false, error: "ValueError: nope" });
    await flush();
    expect(progress).toEqual([[1, 1, 4], [2, 1, 4]]);
    expect(errors).toEqual(["ValueError: nope"]);
  });

  it("abort() drops the pending answer", async () => {
    const ask = hold(echo);
    const client = new Client(new FakeModel({}, { ask }));
    const slot = requestSlot(client);
    const seen = [];
    slot.request("ask", { n: 1 }, { onResult: (r) => seen.push(r.n) });
    slot.abort();
    expect(client.pending.size).toBe(0);
    ask.release();
    await flush();
    expect(seen).toEqual([]);
  });
});

describe("createContext", () => {
  it("sets model state in order with one save, and names classes from info", () => {
    const model = new FakeModel({ info: { class_names: ["cat", "dog"] } });
    const ctx = createContext({ model, rpc: new Client(model), doc: document });
    const order = [];
    model.on("change:compared", () => order.push(["compared", model.saves]));
    model.on("change:selected", () => order.push(["selected", model.saves]));
    ctx.set({ compared: [1], selected: 4 });
    expect(order).toEqual([["compared", 0], ["selected", 0]]);  // both set, then saved together
    expect(model.saves).toBe(1);
    expect(ctx.get("selected")).toBe(4);
    expect(ctx.name(1)).toBe("dog");
    expect(ctx.name(-1)).toBe("?");
    expect(ctx.E("span", { className: "x", text: "hi" }).outerHTML).toBe('<span class="x">hi</span>');
  });

  it("dispose() takes off its own listeners and aborts its own slots, no one else's", async () => {
    const ask = hold(echo);
    const model = new FakeModel({}, { ask });
    const rpc = new Client(model);
    const a = createContext({ model, rpc, doc: document });
    const b = createContext({ model, rpc, doc: document });
    const heard = [];
    a.on("change:k", () => heard.push("a"));
    b.on("change:k", () => heard.push("b"));
    const seen = [];
    a.slot().request("ask", { n: 1 }, { onResult: (r) => seen.push(["a", r.n]) });
    b.slot().request("ask", { n: 2 }, { onResult: (r) => seen.push(["b", r.n]) });
    a.dispose();
    model.set("k", 5);
    expect(heard).toEqual(["b"]);
    expect(model.stateListeners()).toEqual(["change:k x1"]);
    expect(rpc.pending.size).toBe(1);
    await flush();  // both requests reach Python, which answers when released
    expect(ask.waiting.length).toBe(2);
    ask.release();
    await flush();
    expect(seen).toEqual([["b", 2]]);
  });
});
