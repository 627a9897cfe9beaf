// The trajectory chart ↔ Explorer._handle_trajectory: how the contribution of each compared training
// sample (`compared`, up to 10) to the selected test sample built up, checkpoint by checkpoint.
import { PALETTE, trajectoryChart } from "../chart.js";
import { showMode } from "../mode.js";
import { busy, done, fail, progress } from "../status.js";

const MAX_COMPARED = 10;

export function create(ctx) {
  const { E } = ctx;
  const status = E("div", { className: "hydra-status" });
  const modeBox = E("div", { className: "hydra-mode-box" });
  const box = E("div", { className: "hydra-trajectory-box", "data-testid": "hydra-trajectory-box" });
  // display: contents; the detail panel lays these out below the ranking cards
  const el = E("div", { className: "hydra-trajectory-view" }, [
    E("div", { className: "hydra-panel-title" }, [E("span", {
      text: "Contribution over training (click cards to compare)" })]),
    status, modeBox, box]);

  const slot = ctx.slot();

  function load() {
    const test = ctx.get("selected");
    const train = ctx.get("compared") || [];
    if (test < 0 || !train.length) {
      slot.abort();
      box.textContent = "";
      modeBox.textContent = "";
      done(status, "Click one or more cards to see how their contribution built up over training.");
      return;
    }
    busy(status, "Computing trajectories\u2026");
    slot.request("trajectory", { test, train }, {
      onProgress: progress(status, "Computing trajectories"),
      onResult: (t) => {
        const steps = Array.from(t.steps.data);
        const m = t.train.data.length;
        const series = Array.from(t.train.data).map((idx, j) => ({
          label: `#${idx} (${ctx.name(t.labels.data[j])})`,
          color: PALETTE[j % PALETTE.length],
          values: steps.map((_, c) => t.values.data[c * m + j]),
        }));
        box.textContent = "";
        box.append(trajectoryChart(ctx.doc, { steps, series, epochs: Array.from(t.epochs.data),
          epochExact: t.epoch_exact, title: `contributions to test sample #${t.test}` }));
        done(status, `test sample #${t.test}: contribution if training had stopped at each checkpoint; dashed lines: epoch ends`);
        showMode(ctx, modeBox, t.mode);
      },
      onError: fail(status),
    });
  }

  ctx.on("change:compared", load);

  return {
    el,
    refresh: load,
    /** Add training sample `idx` to the chart, or take it off if it is there (the last 10 stay). */
    compare(idx) {
      const cur = ctx.get("compared") || [];
      ctx.set({ compared: cur.includes(idx) ? cur.filter((x) => x !== idx) : [...cur, idx].slice(-MAX_COMPARED) });
    },
    dispose() { ctx.dispose(); el.remove(); },
  };
}
