import { afterEach, describe, expect, it, vi } from "vitest";
import { Client, RequestError } from "../src/rpc.js";
import { FakeModel, packed } from "./fake.js";

afterEach(() => vi.useRealTimers());

describe("Client", () => {
  it("resolves a request with the decoded answer of the same id", async () => {
    const model = new FakeModel({}, { rankings: (p) => ({ test: p.test, scores: packed("float64", [2], [0.5, -1]) }) });
    const r = await new Client(model).request("rankings", { test: 4 });
    expect(model.sent[0]).toMatchObject({ type: "request", id: 1, method: "rankings", params: { test: 4 } });
    expect(r.test).toBe(4);
    expect(Array.from(r.scores.data)).toEqual([0.5, -1]);
  });

  it("reports progress and rejects errors", async () => {
    const model = new FakeModel();
    const client = new Client(model);
    const seen = [];
    const p = client.request("slow", {}, { onProgress: (d, t) => seen.push([d, t]) });
    model.emit("msg:custom", { type: "progress", id: 99, done: 1, total: 1 });  // someone else's
    model.emit("msg:custom", { type: "progress", id: 1, done: 2, total: 5 });
    model.emit("msg:custom", { type: "response", id: 1, ok: false, error: "ValueError: nope" });
    await expect(p).rejects.toThrow("ValueError: nope");
    expect(seen).toEqual([[2, 5]]);
    expect(client.pending.size).toBe(0);
  });

  it("times out with its own limit, not anywidget's 3 s", async () => {
    vi.useFakeTimers();
    const client = new Client(new FakeModel(), { timeoutMs: 120000 });
    const p = client.request("class_matrix");
    let settled = false;
    p.catch(() => { settled = true; });
    await vi.advanceTimersByTimeAsync(60000);
    expect(settled).toBe(false);  // a slow store is fine at a minute
    await vi.advanceTimersByTimeAsync(61000);
    await expect(p).rejects.toBeInstanceOf(RequestError);
    await expect(p).rejects.toThrow(/120 s/);
  });

  it("can be cancelled with an AbortSignal and disposed", async () => {
    const client = new Client(new FakeModel());
    const ctl = new AbortController();
    const p = client.request("x", {}, { signal: ctl.signal });
    ctl.abort();
    await expect(p).rejects.toThrow(/cancelled/);
    const q = client.request("y");
    client.dispose();
    await expect(q).rejects.toThrow(/closed/);
  });
});
