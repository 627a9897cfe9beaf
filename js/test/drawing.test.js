import { describe, expect, it } from "vitest";
import { nearest, trajectoryChart } from "../src/chart.js";
import { niceTicks, score } from "../src/format.js";
import { divergingColor, heatmap } from "../src/heatmap.js";
import { rgba, sampleVisual } from "../src/images.js";
import { toTyped } from "../src/wire.js";
import { packed } from "./fake.js";

describe("format", () => {
  it("formats signed scores", () => {
    expect(score(1.234)).toBe("+1.23");
    expect(score(-0.00012)).toBe("\u22121.20e-4");
    expect(score(0)).toBe("+0");
    expect(score(NaN)).toBe("n/a");
  });
  it("makes nice ticks", () => {
    expect(niceTicks(0, 10, 5)).toEqual([0, 2, 4, 6, 8, 10]);
    expect(niceTicks(-0.3, 0.3, 3)).toEqual([-0.2, 0, 0.2]);
    expect(niceTicks(5, 5)).toEqual([5]);
  });
});

describe("images", () => {
  it("expands grey and RGB pixels to RGBA", () => {
    const grey = toTyped(packed("uint8", [2, 1, 2, 1], [10, 20, 30, 40]));
    expect(Array.from(rgba(grey, 1))).toEqual([30, 30, 30, 255, 40, 40, 40, 255]);
    const rgb = toTyped(packed("uint8", [1, 1, 1, 3], [1, 2, 3]));
    expect(Array.from(rgba(rgb, 0))).toEqual([1, 2, 3, 255]);
  });
  it("shows texts for text samples", () => {
    const node = sampleVisual(document, { texts: ["a fine film"] }, 0);
    expect(node.textContent).toBe("a fine film");
    const canvas = sampleVisual(document, { thumbs: toTyped(packed("uint8", [1, 8, 8, 1], new Array(64).fill(3))) }, 0, 40);
    expect(canvas.tagName).toBe("CANVAS");
    expect(canvas.width).toBe(8);
  });
});

describe("trajectory chart", () => {
  const chart = () => trajectoryChart(document, {
    steps: [0, 45, 90, 135], epochs: [45, 90, 135],
    series: [{ label: "#1 (3)", values: [0, 1, 2, 4] }, { label: "#2 (1)", values: [0, -1, -2, -3] }],
  });
  it("draws one line per series, the epoch ends, and points with values", () => {
    const c = chart();
    expect(c.dataset.testid).toBe("hydra-trajectory");
    expect(c.querySelectorAll("polyline.hydra-series").length).toBe(2);
    expect(c.querySelectorAll("line.hydra-epoch").length).toBe(3);
    expect(c.querySelectorAll("circle.hydra-point").length).toBe(8);
    expect(c.querySelector("circle.hydra-point[data-step='90']").getAttribute("data-value")).toBe("2");
    expect(c.querySelector(".hydra-legend").textContent).toContain("#2 (1)");
  });
  it("reads every series at the hovered checkpoint", () => {
    const c = chart();
    c._show(2);
    expect(c.querySelector("[data-testid=hydra-readout]").textContent).toBe("step 90: #1 (3) +2.00 \u00b7 #2 (1) \u22122.00");
    expect(nearest([0, 10, 20], 14)).toBe(1);
  });
});

describe("heatmap", () => {
  it("colours by sign, and reports clicks", () => {
    expect(divergingColor(1, 1)).toBe("rgb(26,150,65)");
    expect(divergingColor(-1, 1)).toBe("rgb(215,48,39)");
    expect(divergingColor(0, 1)).toBe("rgb(255,255,255)");
    expect(divergingColor(NaN, 1)).toBe("rgb(200,200,200)");
    const clicks = [];
    const h = heatmap(document, { rows: ["0", "1"], cols: ["0", "1", "2"], values: Float64Array.from([1, -1, 0, 0.5, NaN, 2]),
      counts: Float64Array.from([1, 1, 1, 1, 0, 1]), onCell: (i, j, v) => clicks.push([i, j, v]) });
    const cells = h.querySelectorAll("[data-testid=hydra-heatmap-cell]");
    expect(cells.length).toBe(6);
    cells[5].dispatchEvent(new Event("click"));
    expect(clicks).toEqual([[1, 2, 2]]);
    expect(h.querySelector("[data-testid=hydra-heatmap-detail]").textContent).toContain("training class 1 \u2192 test class 2");
  });
});
