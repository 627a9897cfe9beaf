// The gallery of test samples ↔ Explorer._handle_gallery: one page at a time ("More" for the next),
// filtered to all / misclassified / one class, each labelled true→predicted (on one line, cut with an ellipsis;
// the whole of it in the tile's tooltip). Images show their picture; texts and feature rows their index (and a
// text its first words). A click selects a sample.
import { abbreviate } from "../format.js";
import { featureTable, sampleVisual } from "../images.js";
import { fail } from "../status.js";

const PAGE = 48;
const IMAGE_CHARS = 9;   // characters a tile's label line holds: under a 44 px picture,
const TEXT_CHARS = 17;   // in a tile without one (the panel is wider then: style.css)

/** "true→predicted" in at most `chars` characters: each class name cut to its half, so that both stay in sight
 * (the tile's tooltip has them whole); "true" alone where there is no prediction. */
function trueToPredicted(ctx, label, pred, chars) {
  const [a, b] = [ctx.name(label), pred >= 0 ? ctx.name(pred) : null];
  if (b === null) return abbreviate(a, chars);
  if (a.length + 1 + b.length <= chars) return `${a}\u2192${b}`;
  const half = Math.max(2, Math.floor((chars - 1) / 2));
  return `${abbreviate(a, half)}\u2192${abbreviate(b, half)}`;
}

/** Once on screen, shorten a label line that still overflows its tile (fonts differ from the estimate) until it
 * fits; without a layout (a hidden output, a test DOM) the estimate stays. */
function fit(ctx, node, label, pred, chars) {
  for (let n = chars - 1; n >= 3 && node.clientWidth > 0 && node.scrollWidth > node.clientWidth; n--) {
    node.textContent = trueToPredicted(ctx, label, pred, n);
  }
}

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
          const text = trueToPredicted(ctx, label, pred, page.thumbs ? IMAGE_CHARS : TEXT_CHARS);
          const item = E("button", { className: `hydra-gallery-item${wrong ? " is-wrong" : ""}${page.thumbs ? "" : " is-textual"}`,
            "data-testid": "hydra-gallery-item", "data-index": idx,
            title: `test sample #${idx}: true ${ctx.name(label)}` + (pred >= 0 ? `, predicted ${ctx.name(pred)}` : "") });
          if (page.thumbs) item.append(sampleVisual(ctx.doc, page, i, 44));
          else {
            // no picture: the index, and a text's first words; a feature row's values are in the tooltip
            item.append(E("div", { className: "hydra-gallery-index", text: `#${idx}` }));
            if (page.texts) item.append(E("div", { className: "hydra-gallery-snippet", text: page.texts[i] }));
            if (page.features) item.title += `\n${featureTable(ctx.doc, page, i, ctx.info().feature_names).title}`;
          }
          const line = E("div", { className: "hydra-gallery-label", text });
          item.append(line);
          item.addEventListener("click", () => select(idx));
          grid.append(item);
          fit(ctx, line, label, pred, page.thumbs ? IMAGE_CHARS : TEXT_CHARS);
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
    /** The picture (canvas) of test sample `test` if its item is on screen, else null. */
    visualOf(test) {
      return grid.querySelector(`[data-index="${test}"] canvas`);
    },
    dispose() { ctx.dispose(); el.remove(); },
  };
}
