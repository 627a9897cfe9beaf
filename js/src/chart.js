// The trajectory chart: contribution of each compared training sample to the selected test sample,
// for training stopped at each checkpoint. Step on x, epoch boundaries as dashed lines, a hover
// guide that reads every series at the nearest checkpoint. Plain SVG (no chart library).
import { el, niceTicks, score } from "./format.js";

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf"];

function svg(doc, tag, attrs = {}) {
  const node = doc.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

/** Linear map from [d0, d1] to [r0, r1]. */
export function scale(d0, d1, r0, r1) {
  const span = d1 - d0 || 1;
  return (v) => r0 + ((v - d0) / span) * (r1 - r0);
}

/** Index of the value of sorted `xs` nearest to x. */
export function nearest(xs, x) {
  let best = 0;
  for (let i = 1; i < xs.length; i++) if (Math.abs(xs[i] - x) < Math.abs(xs[best] - x)) best = i;
  return best;
}

/**
 * steps: number[] (C), series: [{label, values: number[] (C), color}], epochs: number[] of steps.
 * Returns a <div data-testid="hydra-trajectory"> holding the SVG, a legend and a hover read-out.
 */
export function trajectoryChart(doc, { steps, series, epochs = [], epochExact = true, width = 620, height = 250,
  title = "" }) {
  const m = { left: 64, right: 16, top: 14, bottom: 40 };
  const root = el(doc, "div", { className: "hydra-chart", "data-testid": "hydra-trajectory",
    "data-series": series.length, "data-points": steps.length });
  const all = series.flatMap((s) => Array.from(s.values)).filter(Number.isFinite);
  let lo = Math.min(0, ...all);
  let hi = Math.max(0, ...all);
  if (lo === hi) hi = lo + 1;
  const pad = (hi - lo) * 0.06;
  lo -= pad; hi += pad;
  const x0 = steps.length ? steps[0] : 0;
  const x1 = steps.length ? steps[steps.length - 1] : 1;
  const x = scale(x0, x1 === x0 ? x0 + 1 : x1, m.left, width - m.right);
  const y = scale(lo, hi, height - m.bottom, m.top);
  const s = svg(doc, "svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": title || "contribution trajectory" });

  // axes and grid
  const yTicks = niceTicks(lo, hi, 5);
  for (const t of yTicks) {
    s.append(svg(doc, "line", { x1: m.left, x2: width - m.right, y1: y(t), y2: y(t), class: "hydra-grid" }));
    const label = svg(doc, "text", { x: m.left - 6, y: y(t) + 4, "text-anchor": "end", class: "hydra-tick" });
    label.textContent = score(t).replace("+", "");
    s.append(label);
  }
  s.append(svg(doc, "line", { x1: m.left, x2: width - m.right, y1: y(0), y2: y(0), class: "hydra-zero" }));
  for (const t of niceTicks(x0, x1, 6)) {
    const label = svg(doc, "text", { x: x(t), y: height - m.bottom + 16, "text-anchor": "middle",
      class: "hydra-tick" });
    label.textContent = String(t);
    s.append(label);
  }
  const xl = svg(doc, "text", { x: (m.left + width - m.right) / 2, y: height - 4, "text-anchor": "middle",
    class: "hydra-axis-label" });
  xl.textContent = "optimizer step (checkpoints)";
  s.append(xl);
  const yl = svg(doc, "text", { x: 12, y: (m.top + height - m.bottom) / 2, "text-anchor": "middle",
    class: "hydra-axis-label", transform: `rotate(-90 12 ${(m.top + height - m.bottom) / 2})` });
  yl.textContent = "contribution (\u2212\u2202L/\u2202w)";
  s.append(yl);

  // epoch boundaries
  const every = Math.max(1, Math.ceil(epochs.length / 12));
  epochs.forEach((e, i) => {
    if (e < x0 || e > x1) return;
    s.append(svg(doc, "line", { x1: x(e), x2: x(e), y1: m.top, y2: height - m.bottom, class: "hydra-epoch",
      "data-step": e }));
    if ((i + 1) % every === 0) {
      const t = svg(doc, "text", { x: x(e) - 3, y: m.top + 9, "text-anchor": "end", class: "hydra-epoch-label" });
      t.textContent = `${epochExact ? "" : "\u2248"}ep ${i + 1}`;
      s.append(t);
    }
  });

  // series
  series.forEach((ser, k) => {
    const color = ser.color || PALETTE[k % PALETTE.length];
    const pts = steps.map((st, i) => `${x(st).toFixed(1)},${y(ser.values[i]).toFixed(1)}`).join(" ");
    s.append(svg(doc, "polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 2,
      class: "hydra-series", "data-label": ser.label }));
    steps.forEach((st, i) => {
      const c = svg(doc, "circle", { cx: x(st), cy: y(ser.values[i]), r: 3, fill: color, class: "hydra-point",
        "data-step": st, "data-value": ser.values[i] });
      const tt = svg(doc, "title", {});
      tt.textContent = `${ser.label} \u2014 step ${st}: ${score(ser.values[i])}`;
      c.append(tt);
      s.append(c);
    });
  });

  // hover: a guide at the nearest checkpoint and a read-out of every series there
  const guide = svg(doc, "line", { x1: 0, x2: 0, y1: m.top, y2: height - m.bottom, class: "hydra-guide",
    visibility: "hidden" });
  s.append(guide);
  const readout = el(doc, "div", { className: "hydra-readout", "data-testid": "hydra-readout" });
  readout.textContent = "Hover the chart for values.";
  const overlay = svg(doc, "rect", { x: m.left, y: m.top, width: width - m.left - m.right,
    height: height - m.top - m.bottom, fill: "transparent", class: "hydra-overlay" });
  const show = (i) => {
    if (!steps.length) return;
    guide.setAttribute("x1", x(steps[i]));
    guide.setAttribute("x2", x(steps[i]));
    guide.setAttribute("visibility", "visible");
    readout.textContent = `step ${steps[i]}: ` +
      series.map((ser) => `${ser.label} ${score(ser.values[i])}`).join(" \u00b7 ");
  };
  overlay.addEventListener("mousemove", (ev) => {
    const box = s.getBoundingClientRect ? s.getBoundingClientRect() : { left: 0, width };
    const px = ((ev.clientX - box.left) / (box.width || width)) * width;
    show(nearest(steps.map(x), px));
  });
  overlay.addEventListener("mouseleave", () => guide.setAttribute("visibility", "hidden"));
  s.append(overlay);
  root._show = show;

  const legend = el(doc, "div", { className: "hydra-legend" });
  series.forEach((ser, k) => {
    const item = el(doc, "span", { className: "hydra-legend-item" });
    const swatch = el(doc, "span", { className: "hydra-swatch" });
    swatch.style.background = ser.color || PALETTE[k % PALETTE.length];
    item.append(swatch, doc.createTextNode(ser.label));
    legend.append(item);
  });
  root.append(s, legend, readout);
  return root;
}
