import { describe, expect, it } from "vitest";
import { nearest, trajectoryChart } from "../src/chart.js";
import { abbreviate, niceTicks, num, score } from "../src/format.js";
import { divergingColor, heatmap } from "../src/heatmap.js";
import { featureTable, rgba, sampleVisual } from "../src/images.js";
import { decode, toTyped } from "../src/wire.js";
import { FEATURES, packed, rows } from "./fake.js";

describe("format", () => {
  it("formats signed scores", () => {
    expect(score(1.234)).toBe("+1.23");
    expect(score(-0.00012)).toBe("\u22121.20e-4");
    expect(score(0)).toBe("+0");
    expect(score(NaN)).toBe("n/a");
  });
  it("writes feature values short, as Python's short_number, and cuts long names", () => {
    expect([17.99, 0.1184, 1001.5, 3, -2.5e-5, 123456].map(num)).toEqual(["18", "0.118", "1002", "3", "-2.5e-5", "1.2e+5"]);
    expect(abbreviate("malignant", 6)).toBe("malig\u2026");
    expect(abbreviate("benign", 6)).toBe("benign");
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

describe("feature rows", () => {
  it("lists the most unusual features first, named, aligned, with the whole row on hover", () => {
    const payload = decode(rows([7, 8]));
    const table = featureTable(document, payload, 1, FEATURES);
    expect(table.dataset.testid).toBe("hydra-features");
    const cells = [...table.children].map((c) => c.textContent);
    // salient order [3, 1, 4, 2]: name · value · z, one row of three cells each
    expect(cells).toEqual(["worst area", "1001", "+2.5\u03c3", "mean texture", "18", "\u22121.3\u03c3",
      "a very long feature name", "-3", "+0.5\u03c3", "mean smoothness", "0.118", "+0.0\u03c3"]);
    expect(table.children[6].title).toBe("a very long feature name");  // cut by CSS, whole in its tooltip
    expect(table.title).toBe("mean radius = 8\nmean texture = 18\nmean smoothness = 0.118\nworst area = 1001\n" +
      "a very long feature name = -3");
    expect(sampleVisual(document, payload, 0, 56, { names: FEATURES }).dataset.testid).toBe("hydra-features");
    expect(featureTable(document, payload, 0).children[0].textContent).toBe("x3");  // unnamed columns
  });
});

describe("heatmap labels", () => {
  const draw = (names) => heatmap(document, { rows: names, cols: names,
    values: new Float64Array(names.length ** 2).fill(1), counts: null });
  const labels = (h) => [...h.querySelectorAll("[data-testid=hydra-heatmap-label]")];
  it("keeps short labels level; turns and cuts long ones, whole in a tooltip", () => {
    const two = draw(["0", "1"]);
    expect(two.dataset.turn).toBe("0");
    const long = draw(["malignant tumour of the breast", "benign"]);
    expect(long.dataset.turn).toBe("-45");
    const first = labels(long)[0];
    expect(first.textContent).toBe("malignant tum\u2026");
    expect(first.parentNode.querySelector("title").textContent).toBe("malignant tumour of the breast");
    expect(first.getAttribute("transform")).toMatch(/^rotate\(-45 /);
  });
  it("fits many classes: cells of 12 px, upright column labels a cell apart", () => {
    const names = Array.from({ length: 50 }, (_, i) => `class ${i}`);
    const h = draw(names);
    expect(h.dataset.turn).toBe("-90");
    const cells = h.querySelectorAll("[data-testid=hydra-heatmap-cell]");
    expect(cells.length).toBe(2500);
    expect(Number(cells[1].getAttribute("x")) - Number(cells[0].getAttribute("x"))).toBe(12);  // > a 10 px line
    const xs = labels(h).slice(0, 50).map((t) => Number(t.getAttribute("x")));
    expect(xs[1] - xs[0]).toBe(12);
    const svgEl = h.querySelector("svg");
    const top = Number(cells[0].getAttribute("y"));
    expect(top).toBeGreaterThanOrEqual(22 + 8 * 6.2);  // room above the cells for "class 49" upright
    expect(Number(svgEl.getAttribute("width"))).toBeGreaterThan(50 * 12);
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
