import { describe, expect, it } from "vitest";
import { create } from "../../src/views/gallery.js";
import { FEATURES, INFO, fakeContext, flush, hold, packed, python, rows } from "../fake.js";

function setup(state, opts) {
  const f = fakeContext(state, opts);
  const view = create(f.ctx);
  document.body.append(view.el);
  return { ...f, view };
}
const items = (view) => view.el.querySelectorAll("[data-testid=hydra-gallery-item]");

describe("gallery view", () => {
  it("renders a page of test samples, true→predicted, and the next page on More", async () => {
    const { view, py } = setup();
    const filter = view.el.querySelector("[data-testid=hydra-gallery-filter]");
    expect([...filter.options].map((o) => o.value)).toEqual(["all", "misclassified", "class:0", "class:1", "class:2"]);
    view.refresh();
    await flush();
    expect(py.calls).toEqual([["gallery", { offset: 0, limit: 48, filter: "all" }]]);
    expect(items(view).length).toBe(48);
    expect(items(view)[7].classList.contains("is-wrong")).toBe(true);
    expect(items(view)[7].textContent).toBe("1\u21922");
    const more = view.el.querySelector(".hydra-button");
    more.click();
    await flush();
    more.click();
    await flush();
    expect(items(view).length).toBe(100);
    expect(more.disabled).toBe(true);
    expect(view.el.querySelector(".hydra-muted").textContent).toBe("100 of 100 (true\u2192predicted)");
  });

  it("a click selects the sample with an empty comparison, in one save", async () => {
    const { view, model } = setup({ compared: [5, 9] });
    view.refresh();
    await flush();
    items(view)[4].click();
    expect(model.get("selected")).toBe(4);
    expect(model.get("compared")).toEqual([]);
    expect(model.saves).toBe(1);
    expect(items(view)[4].classList.contains("is-selected")).toBe(true);
    expect(view.visualOf(4).tagName).toBe("CANVAS");
    expect(view.visualOf(99)).toBe(null);  // not on the first page
  });

  it("refreshes on model changes: selected marks the item, info refills the filter", async () => {
    const { view, model, py } = setup();
    view.refresh();
    await flush();
    model.set("selected", 6);
    expect(view.el.querySelector(".hydra-gallery-item.is-selected").dataset.index).toBe("6");
    const filter = view.el.querySelector("[data-testid=hydra-gallery-filter]");
    filter.value = "class:1";
    filter.dispatchEvent(new Event("change"));
    await flush();
    expect(py.calls.at(-1)).toEqual(["gallery", { offset: 0, limit: 48, filter: "class:1" }]);
    model.set("info", { ...INFO, test_classes: [1, 4], class_names: ["a", "b", "c", "d", "e"] });
    expect([...filter.options].map((o) => o.textContent)).toEqual(["all", "misclassified", "class b", "class e"]);
    expect(filter.value).toBe("class:1");  // the chosen filter stays
  });

  it("tiles without pictures show the index and true\u2192predicted on one line, the whole of it on hover", async () => {
    const py = python();
    py.handlers.gallery = (p) => ({ total: 2, offset: 0, indices: packed("int32", [2], [12, 13]),
      labels: packed("int32", [2], [0, 1]), predicted: packed("int32", [2], [1, 1]), ...rows([12, 13]) });
    const info = { ...INFO, test_kind: "tabular", feature_names: FEATURES, class_names: ["malignant", "benign"] };
    const { view, model } = setup({ info }, { py });
    view.refresh();
    await flush();
    const tile = items(view)[0];
    expect(tile.classList.contains("is-textual")).toBe(true);
    expect(tile.querySelector(".hydra-gallery-index").textContent).toBe("#12");
    expect(tile.querySelector(".hydra-gallery-label").textContent).toBe("malignant\u2192benign");  // fits: whole
    expect(tile.querySelector("[data-testid=hydra-features]")).toBe(null);  // no table squeezed into a tile
    expect(tile.title).toBe("test sample #12: true malignant, predicted benign\nmean radius = 12\nmean texture = 18\n" +
      "mean smoothness = 0.118\nworst area = 1001\na very long feature name = -3");
    expect(view.visualOf(12)).toBe(null);  // no picture to borrow: the rankings answer carries the row
    py.handlers.gallery = (p) => ({ total: 1, offset: 0, indices: packed("int32", [1], [3]),
      labels: packed("int32", [1], [0]), predicted: packed("int32", [1], [-1]), texts: ["a long review ".repeat(9)] });
    view.refresh();
    await flush();
    expect(items(view)[0].querySelector(".hydra-gallery-snippet").textContent).toContain("a long review");
    expect(items(view)[0].querySelector(".hydra-gallery-label").textContent).toBe("malignant");  // no prediction
    const long = { ...info, class_names: ["malignant tumour", "benign tumour"] };
    model.set("info", long);
    view.refresh();
    await flush();
    // too long for the line: each name cut to half of it, so that both stay in sight
    expect(items(view)[0].title).toBe("test sample #3: true malignant tumour");
    py.handlers.gallery = (p) => ({ total: 1, offset: 0, indices: packed("int32", [1], [4]),
      labels: packed("int32", [1], [0]), predicted: packed("int32", [1], [1]), ...rows([4]) });
    view.refresh();
    await flush();
    expect(items(view)[0].querySelector(".hydra-gallery-label").textContent).toBe("maligna\u2026\u2192benign \u2026");
  });

  it("shows Python's error", async () => {
    const py = python();
    py.handlers.gallery = () => { throw new Error("StoreError: broken"); };
    const { view } = setup({}, { py });
    view.refresh();
    await flush();
    expect(view.el.querySelector(".hydra-error").textContent).toBe("StoreError: broken");
  });

  it("dispose() removes its listeners and aborts its pending request", async () => {
    const py = python();
    py.handlers.gallery = hold(py.handlers.gallery);
    const { view, model, rpc } = setup({}, { py });
    expect(model.stateListeners()).toEqual(["change:info x1", "change:selected x1"]);
    view.refresh();
    await flush();
    expect(rpc.pending.size).toBe(1);
    view.dispose();
    expect(rpc.pending.size).toBe(0);
    expect(model.stateListeners()).toEqual([]);
    expect(view.el.isConnected).toBe(false);
    py.handlers.gallery.release();  // Python answers after all: nobody draws it
    await flush();
    expect(items(view).length).toBe(0);
  });
});
