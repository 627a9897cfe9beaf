// The ranking cards of the selected test sample ↔ Explorer._handle_rankings: its most helpful and
// most harmful training samples (or the largest |contribution|), k of each, optionally of one
// training class. Sort, k and the class filter are model state (`sort`, `k`, `train_class`), so
// Python can set them too. A click on a card puts it on the trajectory chart (links.compare).
import { card, fillClassSelect } from "../cards.js";
import { PALETTE } from "../chart.js";
import { sampleVisual } from "../images.js";
import { showMode } from "../mode.js";
import { busy, done, fail, progress } from "../status.js";

const SORT_LABELS = { both: "helpful & harmful", helpful: "most helpful", harmful: "most harmful",
  absolute: "largest |contribution|" };
const GROUP_TITLES = { helpful: "Most helpful (lowered this sample's loss)",
  harmful: "Most harmful (raised this sample's loss)", absolute: "Largest |contribution|" };

export function create(ctx) {
  const { E } = ctx;
  const selectedBox = E("div", { className: "hydra-selected", "data-testid": "hydra-selected" });
  const sortSel = E("select", { className: "hydra-select", "data-testid": "hydra-sort" });
  for (const [v, label] of Object.entries(SORT_LABELS)) sortSel.append(E("option", { value: v, text: label }));
  const kInput = E("input", { className: "hydra-k", type: "number", min: 1, max: 200, "data-testid": "hydra-k" });
  const classSel = E("select", { className: "hydra-select", "data-testid": "hydra-class-filter" });
  const pinBtn = E("button", { className: "hydra-button", "data-testid": "hydra-pin", text: "Pin for live" });
  const status = E("div", { className: "hydra-status", "data-testid": "hydra-cards-status" });
  const modeBox = E("div", { className: "hydra-mode-box" });
  const cards = E("div", { className: "hydra-cards", "data-testid": "hydra-cards" });
  // display: contents; the detail panel lays these out next to the trajectory view's parts
  const el = E("div", { className: "hydra-rankings-view" }, [
    selectedBox,
    E("div", { className: "hydra-controls" }, [
      E("label", {}, ["Show ", sortSel]), E("label", {}, ["k ", kInput]),
      E("label", {}, ["training class ", classSel]), pinBtn]),
    status, modeBox, cards]);

  const slot = ctx.slot();

  function load() {
    const test = ctx.get("selected");
    const trainClass = ctx.get("train_class");
    sortSel.value = ctx.get("sort");
    kInput.value = String(ctx.get("k"));
    classSel.value = trainClass === null ? "" : String(trainClass);
    if (test === null || test < 0) {
      slot.abort();
      selectedBox.textContent = "Pick a test sample on the left.";
      cards.textContent = "";
      modeBox.textContent = "";
      return;
    }
    busy(status, "Computing contributions\u2026");
    slot.request("rankings", { test, k: ctx.get("k"), sort: ctx.get("sort"), train_class: trainClass }, {
      onProgress: progress(status, "Computing contributions"),
      onResult: (r) => {
        renderSelected(r);
        cards.textContent = "";
        for (const [group, payload] of Object.entries(r.groups)) {
          const row = E("div", { className: "hydra-card-row" });
          for (let i = 0; i < payload.indices.data.length; i++) {
            const c = card(ctx, payload, i, group);
            c.addEventListener("click", () => ctx.links.compare(payload.indices.data[i]));
            row.append(c);
          }
          cards.append(E("div", { className: "hydra-group", "data-group": group }, [
            E("div", { className: "hydra-group-title", text: GROUP_TITLES[group] }), row]));
        }
        done(status, `top ${ctx.get("k")} of ${r.candidates.toLocaleString()} training samples` +
          (ctx.get("train_class") !== null ? ` of class ${ctx.name(ctx.get("train_class"))}` : "") +
          ` at step ${r.step}`);
        showMode(ctx, modeBox, r.mode);
        markCompared();
      },
      onError: fail(status),
    });
  }

  function renderSelected(r) {
    selectedBox.textContent = "";
    const wrong = r.predicted >= 0 && r.predicted !== r.label;
    const visual = E("div", { className: "hydra-selected-visual" });
    selectedBox.append(visual, E("div", {}, [
      E("div", { className: "hydra-selected-title", text: `Test sample #${r.test}` }),
      E("div", { className: wrong ? "hydra-wrong" : "",
        text: `true ${ctx.name(r.label)} \u00b7 predicted ${r.predicted >= 0 ? ctx.name(r.predicted) : "n/a"}` })]));
    // a feature row or a text comes with the answer; a picture from the gallery page already on screen, if there
    if (r.test_view) {
      visual.append(sampleVisual(ctx.doc, r.test_view, 0, 88, { names: ctx.info().feature_names }));
      pinBtn.textContent = (ctx.get("pinned") || []).includes(r.test) ? "Unpin" : "Pin for live";
      return;
    }
    const item = ctx.links.testVisual(r.test);
    if (item) {
      const copy = item.cloneNode(true);
      if (item.tagName === "CANVAS" && copy.getContext) {
        copy.getContext("2d")?.drawImage?.(item, 0, 0);
        copy.style.width = "88px"; copy.style.height = "auto";
      }
      visual.append(copy);
    }
    pinBtn.textContent = (ctx.get("pinned") || []).includes(r.test) ? "Unpin" : "Pin for live";
  }

  /** Outline the cards on the trajectory chart in their line's colour. */
  function markCompared() {
    const cur = ctx.get("compared") || [];
    cards.querySelectorAll(".hydra-card").forEach((node) => {
      const k = cur.indexOf(Number(node.dataset.index));
      node.classList.toggle("is-compared", k >= 0);
      node.style.outlineColor = k >= 0 ? PALETTE[k % PALETTE.length] : "";
    });
  }

  sortSel.addEventListener("change", () => ctx.set({ sort: sortSel.value }));
  const applyK = () => {
    const k = Math.max(1, Math.min(200, Math.round(Number(kInput.value) || 10)));
    kInput.value = String(k);
    if (k !== ctx.get("k")) ctx.set({ k });
  };
  kInput.addEventListener("change", applyK);
  kInput.addEventListener("keydown", (ev) => { if (ev.key === "Enter") applyK(); });
  classSel.addEventListener("change", () => ctx.set({ train_class: classSel.value === "" ? null : Number(classSel.value) }));
  pinBtn.addEventListener("click", () => {
    const test = ctx.get("selected");
    if (test < 0) return;
    const cur = ctx.get("pinned") || [];
    ctx.set({ pinned: cur.includes(test) ? cur.filter((x) => x !== test) : [...cur, test] });
    pinBtn.textContent = cur.includes(test) ? "Pin for live" : "Unpin";
  });

  const fillClasses = () => fillClassSelect(ctx, classSel, ctx.info().train_classes || [], ctx.get("train_class"));
  fillClasses();
  ctx.on("change:info", fillClasses);
  for (const key of ["selected", "k", "sort", "train_class"]) ctx.on(`change:${key}`, load);
  ctx.on("change:compared", markCompared);

  return {
    el,
    refresh: load,
    dispose() { ctx.dispose(); el.remove(); },
  };
}
