// Thumbnails from raw uint8 pixels (n, H, W, C), C = 1 or 3, drawn on canvases: no PNG encoding
// on either side, and only the images of the cards shown ever travel. Feature rows as small tables.
import { el, num } from "./format.js";

/** RGBA bytes of image i of a uint8 array shaped (n, H, W, C). */
export function rgba(thumbs, i) {
  const [, h, w, c] = thumbs.shape;
  const px = h * w;
  const src = thumbs.data.subarray(i * px * c, (i + 1) * px * c);
  const out = new Uint8ClampedArray(px * 4);
  for (let p = 0; p < px; p++) {
    const r = src[p * c];
    out[p * 4] = r;
    out[p * 4 + 1] = c === 3 ? src[p * c + 1] : r;
    out[p * 4 + 2] = c === 3 ? src[p * c + 2] : r;
    out[p * 4 + 3] = 255;
  }
  return out;
}

/** A <canvas> showing image i, displayed `size` CSS pixels wide (pixelated). Grey images are shown
 * dark-on-light (ink on paper), as digits are usually drawn. */
export function thumbCanvas(doc, thumbs, i, size = 56) {
  const [, h, w, c] = thumbs.shape;
  const canvas = doc.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  canvas.className = "hydra-thumb";
  canvas.style.width = `${size}px`;
  canvas.style.height = `${Math.round((size * h) / w)}px`;
  const ctx = canvas.getContext ? canvas.getContext("2d") : null;
  if (ctx && typeof ctx.createImageData === "function") {
    const img = ctx.createImageData(w, h);
    const px = rgba(thumbs, i);
    if (c === 1) for (let p = 0; p < px.length; p += 4) { px[p] = px[p + 1] = px[p + 2] = 255 - px[p]; }
    img.data.set(px);
    ctx.putImageData(img, 0, 0);
  }
  return canvas;
}

/**
 * A feature row as a compact aligned table: the row's most unusual features first (payload.salient: column
 * order, payload.z: their z-scores against the training data), name · value · z, one line each; the whole row
 * on hover (the table's title). `names`: the feature names (the explorer's info.feature_names).
 */
export function featureTable(doc, payload, i, names = []) {
  const [, width] = payload.features.shape;
  const row = payload.features.data.subarray(i * width, (i + 1) * width);
  const name = (c) => (names && names[c] !== undefined ? String(names[c]) : `x${c}`);
  const table = el(doc, "div", { className: "hydra-features", "data-testid": "hydra-features" });
  const [, k] = payload.salient.shape;
  for (let r = 0; r < k; r++) {
    const c = payload.salient.data[i * k + r];
    const z = payload.z.data[i * k + r];
    table.append(
      el(doc, "span", { className: "hydra-feature-name", text: name(c), title: name(c) }),
      el(doc, "span", { className: "hydra-feature-value", text: num(row[c]) }),
      el(doc, "span", { className: "hydra-feature-z", text: `${z >= 0 ? "+" : "\u2212"}${Math.abs(z).toFixed(1)}\u03c3`,
        title: "how unusual: standard deviations from the training data's mean" }));
  }
  const shown = Math.min(width, FULL_ROW_MAX);
  const lines = [];
  for (let c = 0; c < shown; c++) lines.push(`${name(c)} = ${num(row[c])}`);
  if (width > shown) lines.push(`\u2026 ${width - shown} more features`);
  table.title = lines.join("\n");
  return table;
}

const FULL_ROW_MAX = 60;  // features listed in a row's tooltip

/** The visual of sample i of a card payload: a canvas for images, a feature table for rows, else a text block. */
export function sampleVisual(doc, payload, i, size, { names } = {}) {
  if (payload.thumbs) return thumbCanvas(doc, payload.thumbs, i, size);
  if (payload.features) return featureTable(doc, payload, i, names);
  const div = doc.createElement("div");
  div.className = "hydra-text";
  div.textContent = payload.texts ? payload.texts[i] : "";
  if (payload.texts) div.title = payload.texts[i];
  return div;
}
