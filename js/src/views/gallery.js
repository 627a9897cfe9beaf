// The gallery of test samples ↔ Explorer._handle_gallery: one page at a time ("More" for the next),
// filtered to all / misclassified / one class, each labelled true→predicted. A click selects a sample.
import { sampleVisual } from "../images.js";
import { fail } from "../status.js";

const PAGE = 48;

export function create(ctx) {
  const { E } = ctx;
  const filter = E("select", { className: "hydra-select", "data-testid": "hydra-gallery-filter" });
  const grid = E("div", { className: "hydra-gallery", "data-testid": "hydra-gallery" });
  const count = E("div", { className: "hydra-muted" });
  const more = E("button", { className: "hydra-button", text: "More" });
  const el = E("div", { className: "hydra-panel hydra-gallery-panel" }, [
    E("div", { className: "hydra-panel-title" }, [E("span", { text: "Test samples" }), filter]),
    grid, E("div", { className: "hydra-row" }, [count, more])]);

  const slot = ctx.slot();
  let offset = 0;

  function fillFilter() {
    const kept = filter.value || "all";
    filter.textContent = "";
    filter.append(E("option", { value: "all", text: "all" }), E("option", { value: "misclassified", text: "misclassified" }));
    for (const c of ctx.info().test_classes || []) filter.append(E("option", { value: `class:${c}`, text: `class ${ctx.name(c)}` }));
    filter.value = kept;
  }

  function load(reset) {
    if (reset) { offset = 0; grid.textContent = ""; }
    more.disabled = true;
    if (reset) count.textContent = "Loading\u2026 (the kernel answers once a running cell ends)";
    slot.request("gallery", { offset, limit: PAGE, filter: filter.value || "all" }, {
      onResult: (page) => {
        const n = page.indices.data.length;
        for (let i = 0; i < n; i++) {
          const idx = page.indices.data[i];
          const label = page.labels.data[i];
          const pred = page.predicted.data[i];
          const wrong = pred >= 0 && pred !== label;
          const item = E("button", { className: `hydra-gallery-item${wrong ? " is-wrong" : ""}`,
            "data-testid": "hydra-gallery-item", "data-index": idx, title: `test sample #${idx}` });
          item.append(sampleVisual(ctx.doc, page, i, 44),
            E("div", { className: "hydra-gallery-label", text: pred >= 0 ? `${ctx.name(label)}\u2192${ctx.name(pred)}` : ctx.name(label) }));
          item.addEventListener("click", () => select(idx));
          grid.append(item);
        }
        offset += n;
        count.textContent = `${offset} of ${page.total} (true\u2192predicted)`;
        more.disabled = offset >= page.total;
        markSelected();
      },
      onError: fail(count),
    });
  }

  function markSelected() {
    const sel = ctx.get("selected");
    grid.querySelectorAll(".hydra-gallery-item").forEach((node) =>
      node.classList.toggle("is-selected", Number(node.dataset.index) === sel));
  }

  // a new test sample starts with an empty comparison
  const select = (idx) => ctx.set({ compared: [], selected: idx });

  more.addEventListener("click", () => load(false));
  filter.addEventListener("change", () => load(true));
  fillFilter();
  ctx.on("change:info", fillFilter);
  ctx.on("change:selected", markSelected);

  return {
    el,
    /** The first page again. */
    refresh: () => load(true),
    /** The picture (canvas or text block) of test sample `test` if its item is on screen, else null. */
    visualOf(test) {
      return grid.querySelector(`[data-index="${test}"] canvas, [data-index="${test}"] .hydra-text`);
    },
    dispose() { ctx.dispose(); el.remove(); },
  };
}
