// Thumbnails from raw uint8 pixels (n, H, W, C), C = 1 or 3, drawn on canvases: no PNG encoding
// on either side, and only the images of the cards shown ever travel.

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

/** The visual of sample i of a card payload: a canvas for images, a text block otherwise. */
export function sampleVisual(doc, payload, i, size) {
  if (payload.thumbs) return thumbCanvas(doc, payload.thumbs, i, size);
  const div = doc.createElement("div");
  div.className = "hydra-text";
  div.textContent = payload.texts ? payload.texts[i] : "";
  return div;
}
