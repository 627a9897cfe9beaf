// The class heatmap ↔ Explorer._handle_class_matrix: mean contribution of each training class
// (rows) to each test class (columns). A click on a row's cell lists that training class's
// self-influence (links.showSelfInfluence).
import { heatmap } from "../heatmap.js";
import { showMode } from "../mode.js";
import { busy, done, fail, progress } from "../status.js";

export function create(ctx) {
  const { E } = ctx;
  const status = E("div", { className: "hydra-status" });
  const modeBox = E("div", { className: "hydra-mode-box" });
  const box = E("div", { className: "hydra-heatmap-box" });
  const el = E("div", { className: "hydra-panel" }, [
    E("div", { className: "hydra-panel-title" }, [E("span", {
      text: "Mean contribution of each training class to each test class" })]),
    status, modeBox, box]);

  const slot = ctx.slot();

  function load() {
    busy(status, "Computing the class matrix\u2026");
    slot.request("class_matrix", {}, {
      onProgress: progress(status, "Computing the class matrix"),
      onResult: (cm) => {
        const rows = Array.from(cm.train_classes.data).map(ctx.name);
        const cols = Array.from(cm.test_classes.data).map(ctx.name);
        box.textContent = "";
        box.append(heatmap(ctx.doc, { rows, cols, values: cm.mean.data, counts: cm.counts.data,
          onCell: (i) => ctx.links.showSelfInfluence(cm.train_classes.data[i]) }));
        done(status, "green: the training class lowered the test class's loss on average; red: raised it");
        showMode(ctx, modeBox, cm.mode);
      },
      onError: fail(status),
    });
  }

  return {
    el,
    refresh: load,
    dispose() { ctx.dispose(); el.remove(); },
  };
}
