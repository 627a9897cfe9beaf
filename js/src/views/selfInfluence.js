// The self-influence list ↔ Explorer._handle_self_influence: training samples ranked by their
// contribution to their own loss (high = memorised, often mislabelled), 40 a page, in one order
// and optionally of one training class. The class matrix picks the class too (showClass).
import { card, fillClassSelect } from "../cards.js";
import { score } from "../format.js";
import { showMode } from "../mode.js";
import { busy, done, fail, progress } from "../status.js";

const PAGE = 40;
const ORDERS = [["desc", "highest first (suspects)"], ["asc", "lowest first"], ["abs", "largest |value|"]];

export function create(ctx) {
  const { E } = ctx;
  const order = E("select", { className: "hydra-select", "data-testid": "hydra-si-order" });
  for (const [v, label] of ORDERS) order.append(E("option", { value: v, text: label }));
  const classSel = E("select", { className: "hydra-select", "data-testid": "hydra-si-class" });
  const status = E("div", { className: "hydra-status" });
  const modeBox = E("div", { className: "hydra-mode-box" });
  const list = E("div", { className: "hydra-cards hydra-si-list", "data-testid": "hydra-self-influence" });
  const more = E("button", { className: "hydra-button", text: "More" });
  const count = E("div", { className: "hydra-muted" });
  const el = E("div", { className: "hydra-panel" }, [
    E("div", { className: "hydra-panel-title" }, [E("span", {
      text: "Self-influence: each sample's contribution to its own loss (high = memorised, often mislabelled; amber: suspects)" })]),
    E("div", { className: "hydra-controls" }, [E("label", {}, ["order ", order]), E("label", {}, ["class ", classSel])]),
    status, modeBox, list, E("div", { className: "hydra-row" }, [count, more])]);

  const slot = ctx.slot();
  let offset = 0;
  const trainClass = () => (classSel.value === "" ? null : Number(classSel.value));

  function load(reset) {
    if (reset) { offset = 0; list.textContent = ""; }
    more.disabled = true;
    busy(status, "Computing self-influence\u2026");
    slot.request("self_influence", { offset, limit: PAGE, order: order.value || "desc", train_class: trainClass() }, {
      onProgress: progress(status, "Computing self-influence"),
      onResult: (page) => {
        const n = page.indices.data.length;
        for (let i = 0; i < n; i++) {
          const c = card(ctx, page, i, "self", { testid: "hydra-self-card" });
          c.prepend(E("div", { className: "hydra-rank", text: `${offset + i + 1}.` }));
          list.append(c);
        }
        offset += n;
        count.textContent = `${offset} of ${page.total.toLocaleString()}`;
        more.disabled = offset >= page.total;
        done(status, `range ${score(page.range.data[0])} \u2026 ${score(page.range.data[1])}`);
        showMode(ctx, modeBox, page.mode);
      },
      onError: fail(status),
    });
  }

  more.addEventListener("click", () => load(false));
  order.addEventListener("change", () => load(true));
  classSel.addEventListener("change", () => load(true));
  const fillClasses = () => fillClassSelect(ctx, classSel, ctx.info().train_classes || [], trainClass());
  fillClasses();
  ctx.on("change:info", fillClasses);

  return {
    el,
    /** The first page again. */
    refresh: () => load(true),
    /** The list of training class c only, from its first page. */
    showClass(c) {
      classSel.value = String(c);
      load(true);
    },
    dispose() { ctx.dispose(); el.remove(); },
  };
}
