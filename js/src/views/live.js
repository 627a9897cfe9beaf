// The live panel ↔ the `live_state` trait (hydra_nb/widgets/live.py): while a training cell runs the
// kernel answers no requests, so Python pushes the rankings of the pinned test samples instead.
// Nothing here asks Python. When the pushed state says training stopped, links.liveEnded() lets
// the views that answer from the store load again.
import { card } from "../cards.js";
import { sampleVisual } from "../images.js";
import { showMode } from "../mode.js";
import { decode } from "../wire.js";

export function create(ctx) {
  const { E } = ctx;
  const el = E("div", { className: "hydra-live", "data-testid": "hydra-live" });

  function render() {
    const st = decode(ctx.get("live_state") || {});
    el.textContent = "";
    if (!st.step && !st.note && !(st.items || []).length) { el.hidden = true; return; }
    el.hidden = false;
    el.dataset.step = st.step;
    el.dataset.updates = st.updates;
    const head = st.active
      ? `Live: step ${st.step}` + (st.checkpoint_step !== null && st.checkpoint_step !== undefined ? ` \u00b7 rankings at checkpoint step ${st.checkpoint_step}` : "")
      : `Training cell finished at step ${st.step}: rankings below are final; the views above answer again.`;
    el.append(E("div", { className: "hydra-panel-title" }, [E("span", { text: head + (st.note ? ` \u00b7 ${st.note}` : "") })]));
    if (st.mode) {
      const modeBox = E("div", { className: "hydra-mode-box" });
      showMode(ctx, modeBox, st.mode);
      el.append(modeBox);
    }
    for (const item of st.items || []) {
      const block = E("div", { className: "hydra-live-item", "data-testid": "hydra-live-item", "data-test": item.test });
      block.append(E("div", { className: "hydra-live-test" }, [sampleVisual(ctx.doc, item, 0, 44, { names: ctx.info().feature_names }),
        E("div", { className: "hydra-live-label", text: `#${item.test}: ${ctx.name(item.label)}\u2192${ctx.name(item.predicted)}` })]));
      for (const group of ["helpful", "harmful"]) {
        const payload = item[group];
        const row = E("div", { className: "hydra-card-row hydra-live-row", "data-group": group });
        for (let i = 0; i < payload.indices.data.length; i++) row.append(card(ctx, payload, i, group, { testid: "hydra-live-card" }));
        block.append(row);
      }
      el.append(block);
    }
    if (!st.active) ctx.links.liveEnded();
  }

  ctx.on("change:live_state", render);

  return {
    el,
    refresh: render,
    dispose() { ctx.dispose(); el.remove(); },
  };
}
