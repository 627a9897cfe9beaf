// Training-sample cards (rankings, self-influence, live) and the training-class filter they share.
import { score } from "./format.js";
import { sampleVisual } from "./images.js";

/**
 * Card i of a card payload (indices, labels, optional scores, thumbs or texts; see Explorer._cards):
 * its picture, "#index · class" and the signed score; green border on top if it helped, red if it hurt.
 */
export function card(ctx, payload, i, kind, { testid = "hydra-card" } = {}) {
  const { E } = ctx;
  const idx = payload.indices.data[i];
  const s = payload.scores ? payload.scores.data[i] : undefined;
  const node = E("div", { className: `hydra-card hydra-card--${s === undefined ? "plain" : s >= 0 ? "helpful" : "harmful"}`,
    "data-testid": testid, "data-index": idx, "data-score": s, "data-group": kind,
    title: `training sample #${idx}` });
  node.append(sampleVisual(ctx.doc, payload, i, 56),
    E("div", { className: "hydra-card-label", text: `#${idx} \u00b7 ${ctx.name(payload.labels.data[i])}` }),
    s === undefined ? null : E("div", { className: "hydra-card-score", text: score(s) }));
  return node;
}

/** Refill a class <select>: "all" (value "") and one option per class; `current` null selects "all". */
export function fillClassSelect(ctx, sel, classes, current, allText = "all") {
  sel.textContent = "";
  sel.append(ctx.E("option", { value: "", text: allText }));
  for (const c of classes) sel.append(ctx.E("option", { value: String(c), text: ctx.name(c) }));
  sel.value = current === null || current === undefined ? "" : String(current);
}
