import { describe, expect, it } from "vitest";
import { decode, putBuffers, toTyped } from "../src/wire.js";
import { packed } from "./fake.js";

describe("wire", () => {
  it("decodes packed arrays at unaligned offsets", () => {
    const a = toTyped(packed("float64", [2, 2], [1.5, -2, 3, 4]));
    expect(a.data).toBeInstanceOf(Float64Array);
    expect(Array.from(a.data)).toEqual([1.5, -2, 3, 4]);
    expect(a.shape).toEqual([2, 2]);
  });

  it("puts buffers back at their paths, then decodes nested values", () => {
    const p = packed("int32", [3], [7, 8, 9]);
    const msg = { groups: { helpful: { indices: { dtype: "int32", shape: [3], data: null } } }, texts: ["a"] };
    const out = decode(putBuffers(msg, [["groups", "helpful", "indices", "data"]], [p.data]));
    expect(Array.from(out.groups.helpful.indices.data)).toEqual([7, 8, 9]);
    expect(out.texts).toEqual(["a"]);
  });

  it("refuses unknown dtypes and wrong sizes", () => {
    expect(() => toTyped({ dtype: "int64", shape: [1], data: new DataView(new ArrayBuffer(8)) })).toThrow(/dtype/);
    expect(() => toTyped({ dtype: "uint8", shape: [5], data: new DataView(new ArrayBuffer(4)) })).toThrow(/shape/);
  });
});
