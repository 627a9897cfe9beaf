// "What if?" ↔ Explorer._handle_verify: retrain the run by replay without the compared cards' training
// samples (their loss terms weighted 0 in every batch they were in, the same batches in the same order) and
// show the selected test sample's loss and prediction before and after, beside the change its contributions
// predicted (Σ of the removed samples' contributions). Needs a run that replays (info.store.replays).
import { num, score } from "../format.js";
import { busy, done, fail, progress } from "../status.js";

export function create(ctx) {
  const { E } = ctx;
  const button = E("button", { className: "hydra-button", "data-testid": "hydra-verify-button",
    text: "What if? Retrain without the compared cards" });
  const status = E("div", { className: "hydra-status" });
  const result = E("div", { className: "hydra-verify-result", "data-testid": "hydra-verify" });
  const el = E("div", { className: "hydra-verify-view" }, [button, status, result]);
  const slot = ctx.slot();

  function refresh() {
    const st = ctx.info().store;
    const compared = ctx.get("compared") || [];
    const test = ctx.get("selected");
    slot.abort();
    result.textContent = "";
    done(status, "");
    button.disabled = !(st && st.replays && compared.length && test !== null && test >= 0);
    button.title = !st || !st.replays ? "needs a run that replays (see the store's summary)"
      : compared.length ? `retrain by replay without ${compared.length} training sample(s)`
        : "click cards first: they are the training samples to leave out";
  }

  function render(r) {
    const removed = r.removed.map((i) => `#${i}`).join(", ");
    const mode = ((ctx.info().modes || {})[r.mode] || {}).label || r.mode;
    const agree = Math.sign(r.actual_change) === Math.sign(r.predicted_change);
    result.textContent = "";
    result.append(
      E("div", { text: `Retrained by replay without ${removed} (their loss weighted 0 in every batch, same batches):` }),
      E("div", { className: "hydra-verify-loss", "data-testid": "hydra-verify-loss",
        text: `test loss ${num(r.loss_before)} \u2192 ${num(r.loss_after)}: change ${score(r.actual_change)}` }),
      E("div", { className: agree ? "hydra-verify-predicted" : "hydra-verify-predicted hydra-wrong",
        "data-testid": "hydra-verify-predicted",
        text: `the contributions predicted ${score(r.predicted_change)} (${mode}, to first order)` }),
      E("div", { text: `prediction ${ctx.name(r.predicted_before)} \u2192 ${ctx.name(r.predicted_after)}` +
        ` (true ${ctx.name(r.label)})` }));
    done(status, "");
  }

  button.addEventListener("click", () => {
    const test = ctx.get("selected");
    const train = ctx.get("compared") || [];
    if (button.disabled) return;
    result.textContent = "";
    busy(status, "Retraining by replay\u2026");
    slot.request("verify", { test, train }, {
      onProgress: progress(status, "Retraining by replay"),
      onResult: render,
      onError: fail(status),
    });
  });

  for (const key of ["selected", "compared", "info"]) ctx.on(`change:${key}`, refresh);

  return {
    el,
    refresh,
    dispose() { ctx.dispose(); el.remove(); },
  };
}
