// Training-sample cards (rankings, self-influence, live) and the training-class filter they share.
import { score } from "./format.js";
import { sampleVisual } from "./images.js";

/**
 * Card i of a card payload (indices, labels, optional scores, thumbs, feature rows or texts; see Explorer._cards):
 * its picture (or feature table), "#index · class" and the signed score. Colour says the group, the same
 * everywhere: green top border if it helped, red if it hurt, amber for a suspect (group "self": a positive
 * self-influence, the mislabel hunt's candidates), grey otherwise.
 */
export function card(ctx, payload, i, kind, { testid = "hydra-card" } = {}) {
  const { E } = ctx;
  const idx = payload.indices.data[i];
  const s = payload.scores ? payload.scores.data[i] : undefined;
  const tone = s === undefined ? "plain" : kind === "self" ? (s > 0 ? "suspect" : "plain") : s >= 0 ? "helpful" : "harmful";
  const label = ctx.name(payload.labels.data[i]);
  const node = E("div", { className: `hydra-card hydra-card--${tone}${payload.features ? " hydra-card--row" : ""}`,
    "data-testid": testid, "data-index": idx, "data-score": s, "data-group": kind,
    title: `training sample #${idx} \u00b7 ${label}` });
  node.append(sampleVisual(ctx.doc, payload, i, 56, { names: ctx.info().feature_names }),
    E("div", { className: "hydra-card-label", text: `#${idx} \u00b7 ${label}` }),
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
