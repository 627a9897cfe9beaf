// The class-by-class heatmap: mean contribution of training class (rows) to test class (columns).
// Green: that training class lowered the test class's loss on average; red: raised it.
import { abbreviate, el, score } from "./format.js";

const CHAR = 6.2;       // px per character of a 10px tick label (estimated: text is laid out only once on screen)
const MAX_LABEL = 14;   // characters of a class label before it is cut with an ellipsis (its tooltip has it whole)

const SVG = "http://www.w3.org/2000/svg";

function svg(doc, tag, attrs = {}) {
  const node = doc.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

/** Diverging colour of v in [-max, max]: red (negative) – white – green (positive); grey for NaN. */
export function divergingColor(v, max) {
  if (!Number.isFinite(v)) return "rgb(200,200,200)";
  const t = max > 0 ? Math.max(-1, Math.min(1, v / max)) : 0;
  const to = t >= 0 ? [26, 150, 65] : [215, 48, 39];
  const a = Math.abs(t);
  const mix = (c) => Math.round(255 + (c - 255) * a);
  return `rgb(${mix(to[0])},${mix(to[1])},${mix(to[2])})`;
}

/**
 * rows/cols: class labels (strings), values: Float64Array rows*cols (row-major), counts likewise.
 * onCell(r, c, value) is called on click. Returns <div data-testid="hydra-heatmap">.
 * Labels never collide: cells shrink to fit 2 to 100 classes (at least 12 px), long labels are cut
 * (the whole label in a tooltip), and column labels turn when they are wider than their cell: slanted, or
 * upright once cells are narrow; the margins grow to hold them.
 */
export function heatmap(doc, { rows, cols, values, counts, onCell, cell }) {
  cell = cell ?? Math.max(12, Math.min(30, Math.floor(640 / Math.max(1, cols.length, rows.length))));
  const widthOf = (labels) => Math.max(0, ...labels.map((t) => abbreviate(t, MAX_LABEL).length)) * CHAR;
  const colWidth = widthOf(cols);
  const turn = colWidth <= cell - 4 ? 0 : cell >= 20 ? -45 : -90;
  const colHeight = turn === 0 ? 12 : turn === -45 ? colWidth * Math.SQRT1_2 + 8 : colWidth;
  const m = { left: 26 + widthOf(rows) + 8, top: 22 + colHeight + 6, right: 90, bottom: 10 };
  const width = m.left + cols.length * cell + m.right;
  const height = m.top + rows.length * cell + m.bottom;
  let max = 0;
  for (const v of values) if (Number.isFinite(v)) max = Math.max(max, Math.abs(v));
  const root = el(doc, "div", { className: "hydra-heatmap", "data-testid": "hydra-heatmap",
    "data-rows": rows.length, "data-cols": cols.length, "data-turn": turn });
  const s = svg(doc, "svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "mean contribution of each training class to each test class" });
  const detail = el(doc, "div", { className: "hydra-heatmap-detail", "data-testid": "hydra-heatmap-detail",
    text: "Click a cell: which training class helped or hurt which test class." });
  const head = svg(doc, "text", { x: m.left + (cols.length * cell) / 2, y: 12, "text-anchor": "middle",
    class: "hydra-axis-label" });
  head.textContent = "test class \u2192";
  s.append(head);
  const side = svg(doc, "text", { x: 12, y: m.top + (rows.length * cell) / 2, "text-anchor": "middle",
    class: "hydra-axis-label", transform: `rotate(-90 12 ${m.top + (rows.length * cell) / 2})` });
  side.textContent = "training class \u2192";
  s.append(side);
  const label = (text, attrs) => {  // <g><title>whole label</title><text>cut label</text></g>
    const g = svg(doc, "g", { class: "hydra-label" });
    const tip = svg(doc, "title", {});
    tip.textContent = text;
    const t = svg(doc, "text", { class: "hydra-tick", "data-testid": "hydra-heatmap-label", ...attrs });
    t.textContent = abbreviate(text, MAX_LABEL);
    g.append(tip, t);
    s.append(g);
  };
  cols.forEach((c, j) => {
    const x = m.left + j * cell + cell / 2;
    const y = m.top - 6;
    if (turn === 0) label(c, { x, y, "text-anchor": "middle" });
    else label(c, { x: x + 3, y, "text-anchor": "start", transform: `rotate(${turn} ${x + 3} ${y})` });
  });
  rows.forEach((r, i) => {
    label(r, { x: m.left - 6, y: m.top + i * cell + cell / 2 + 4, "text-anchor": "end" });
    cols.forEach((c, j) => {
      const v = values[i * cols.length + j];
      const rect = svg(doc, "rect", { x: m.left + j * cell, y: m.top + i * cell, width: cell - 1,
        height: cell - 1, fill: divergingColor(v, max), class: "hydra-cell", "data-row": i, "data-col": j,
        "data-value": v, "data-testid": "hydra-heatmap-cell" });
      const tt = svg(doc, "title", {});
      const n = counts ? counts[i * cols.length + j] : undefined;
      const text = `training class ${r} \u2192 test class ${c}: mean ${score(v)}` +
        (n !== undefined ? ` over ${n} pairs` : "");
      tt.textContent = text;
      rect.append(tt);
      rect.addEventListener("mouseenter", () => { detail.textContent = text; });
      rect.addEventListener("click", () => {
        root.querySelectorAll(".hydra-cell.is-active").forEach((x) => x.classList.remove("is-active"));
        rect.classList.add("is-active");
        detail.textContent = text;
        if (onCell) onCell(i, j, v);
      });
      s.append(rect);
    });
  });
  // colour legend
  const lx = m.left + cols.length * cell + 24;
  const steps = 20;
  for (let k = 0; k < steps; k++) {
    const v = max * (1 - (2 * k) / (steps - 1));
    s.append(svg(doc, "rect", { x: lx, y: m.top + (k * rows.length * cell) / steps, width: 14,
      height: (rows.length * cell) / steps + 0.5, fill: divergingColor(v, max) }));
  }
  const top = svg(doc, "text", { x: lx + 18, y: m.top + 8, class: "hydra-tick" });
  top.textContent = score(max);
  const bottom = svg(doc, "text", { x: lx + 18, y: m.top + rows.length * cell, class: "hydra-tick" });
  bottom.textContent = score(-max);
  s.append(top, bottom);
  root.append(s, detail);
  return root;
}
