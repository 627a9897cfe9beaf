// Small formatting helpers shared by the views.

/** A contribution as a signed short number: +1.23e-3, −4.5, +12.3 */
export function score(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "n/a";
  const a = Math.abs(x);
  let s;
  if (a === 0) s = "0";
  else if (a >= 1000 || a < 0.01) s = a.toExponential(2);
  else s = a.toPrecision(3);
  return (x < 0 ? "\u2212" : "+") + s;
}

/** A feature value in a few characters, as Python's data.short_number: 17.99 → 18, 0.1184 → 0.118,
 * 1001.5 → 1002, 3 → 3, 123456 → 1.2e+5. */
export function num(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "n/a";
  if (!Number.isFinite(x)) return String(x);
  const a = Math.abs(x);
  if (Number.isInteger(x) && a < 1e5) return String(x);
  if (a >= 1e5 || a < 1e-3) return x.toExponential(1);
  if (a >= 100) return String(Math.round(x));
  return String(Number(x.toPrecision(3)));
}

/** `text` in at most `max` characters: cut with an ellipsis (the caller puts the whole text in a tooltip). */
export function abbreviate(text, max) {
  const s = String(text);
  return s.length <= max ? s : `${s.slice(0, Math.max(1, max - 1))}\u2026`;
}

/** The name of class c: class_names[c] if given, else the number. */
export function className(info, c) {
  if (c === null || c === undefined || c < 0) return "?";
  const names = info && info.class_names;
  return names && names[c] !== undefined ? names[c] : String(c);
}

/** "Nice" tick values covering [lo, hi]: steps of 1, 2 or 5 × 10^k, about `count` of them. */
export function niceTicks(lo, hi, count = 5) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (lo === hi) return [lo];
  if (lo > hi) [lo, hi] = [hi, lo];
  const raw = (hi - lo) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
    ticks.push(Math.abs(t) < step * 1e-9 ? 0 : Number(t.toPrecision(12)));
  }
  return ticks;
}

export function el(doc, tag, attrs = {}, children = []) {
  const node = doc.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "className") node.className = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of [].concat(children)) if (child) node.append(child);
  return node;
}
