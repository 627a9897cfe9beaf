import { describe, expect, it } from "vitest";
import { create } from "../../src/views/rankings.js";
import { FEATURES, INFO, fakeContext, flush, hold, python, rows } from "../fake.js";

function setup(state, opts) {
  const f = fakeContext(state, opts);
  const view = create(f.ctx);
  document.body.append(view.el);
  return { ...f, view };
}
const cards = (view) => view.el.querySelectorAll("[data-testid=hydra-card]");
const change = (node, value) => { node.value = value; node.dispatchEvent(new Event("change")); };

describe("rankings view", () => {
  it("asks for nothing until a test sample is selected", async () => {
    const { view, py } = setup();
    view.refresh();
    await flush();
    expect(py.calls).toEqual([]);
    expect(view.el.querySelector("[data-testid=hydra-selected]").textContent).toBe("Pick a test sample on the left.");
  });

  it("renders the helpful and harmful cards of the selected sample", async () => {
    const canvas = document.createElement("canvas");
    const { view, py, linked } = setup({ selected: 4 }, { visual: canvas });
    view.refresh();
    await flush();
    expect(py.calls).toEqual([["rankings", { test: 4, k: 3, sort: "both", train_class: null }]]);
    expect(cards(view).length).toBe(6);
    expect([...view.el.querySelectorAll(".hydra-group")].map((g) => g.dataset.group)).toEqual(["helpful", "harmful"]);
    expect(cards(view)[0].classList.contains("hydra-card--helpful")).toBe(true);
    expect(cards(view)[3].querySelector(".hydra-card-score").textContent).toBe("\u22123.00");
    const selected = view.el.querySelector("[data-testid=hydra-selected]");
    expect(selected.textContent).toContain("Test sample #4");
    expect(selected.querySelector(".hydra-wrong").textContent).toBe("true 1 \u00b7 predicted 2");
    expect(linked).toEqual([["testVisual", 4]]);  // its picture comes from the gallery
    expect(selected.querySelector("canvas")).not.toBe(null);
    expect(view.el.querySelector("[data-testid=hydra-cards-status]").textContent)
      .toBe("top 3 of 500 training samples at step 90");
  });

  it("says which mode its numbers come from, with the measured figure one click away", async () => {
    const { view } = setup({ selected: 4 });
    view.refresh();
    await flush();
    const mode = view.el.querySelector("[data-testid=hydra-mode]");
    expect(mode.dataset.mode).toBe("fast");
    expect(mode.querySelector(".hydra-mode-note").textContent)
      .toBe("fast estimate: may disagree with exact at large learning rates");
    const figure = mode.querySelector("[data-testid=hydra-mode-figure]");
    expect(figure.hidden).toBe(true);
    mode.querySelector("[data-testid=hydra-mode-link]").click();
    expect(figure.hidden).toBe(false);
    expect(figure.textContent).toContain("Source: benchmarks/RESULTS.md");
  });

  it("feature rows: the cards and the selected sample are named feature tables", async () => {
    const py = python();
    const answer = py.handlers.rankings;
    py.handlers.rankings = (p) => {
      const r = answer(p);
      for (const g of Object.values(r.groups)) { delete g.thumbs; Object.assign(g, rows(Array.from(g.indices.data))); }
      return { ...r, test_view: rows([p.test]) };
    };
    const { view, linked } = setup({ selected: 4, info: { ...INFO, test_kind: "tabular", train_kind: "tabular",
      feature_names: FEATURES } }, { py });
    view.refresh();
    await flush();
    expect(linked).toEqual([]);  // nothing borrowed from the gallery
    const selected = view.el.querySelector("[data-testid=hydra-selected] [data-testid=hydra-features]");
    expect(selected.querySelector(".hydra-feature-name").textContent).toBe("worst area");
    expect(cards(view)[0].classList.contains("hydra-card--row")).toBe(true);
    expect(cards(view)[0].querySelectorAll(".hydra-feature-name").length).toBe(4);
  });

  it("refreshes on selected, k, sort and train_class, which its controls set", async () => {
    const { view, model, py } = setup({ selected: 2 });
    view.refresh();
    await flush();
    model.set("selected", 7);
    await flush();
    expect(py.calls.at(-1)).toEqual(["rankings", { test: 7, k: 3, sort: "both", train_class: null }]);
    change(view.el.querySelector("[data-testid=hydra-sort]"), "absolute");
    await flush();
    expect(model.get("sort")).toBe("absolute");
    expect(view.el.querySelectorAll("[data-testid=hydra-card][data-group=absolute]").length).toBe(2);
    const k = view.el.querySelector("[data-testid=hydra-k]");
    k.value = "500";
    k.dispatchEvent(new KeyboardEvent("keydown", { key: "Enter" }));
    expect(k.value).toBe("200");  // clamped
    change(view.el.querySelector("[data-testid=hydra-class-filter]"), "1");
    await flush();
    expect(py.calls.at(-1)).toEqual(["rankings", { test: 7, k: 200, sort: "absolute", train_class: 1 }]);
    expect(model.saves).toBe(3);
    model.set("k", 1);  // from Python
    await flush();
    expect(view.el.querySelector("[data-testid=hydra-k]").value).toBe("1");
    expect(cards(view).length).toBe(1);
  });

  it("a card click asks the trajectory to compare it; compared cards are outlined", async () => {
    const { view, model, linked } = setup({ selected: 2 });
    view.refresh();
    await flush();
    cards(view)[1].click();
    expect(linked.at(-1)).toEqual(["compare", 6]);
    model.set("compared", [9, 6]);
    const six = view.el.querySelector("[data-testid=hydra-card][data-index='6']");
    expect(six.classList.contains("is-compared")).toBe(true);
    expect(six.style.outlineColor).not.toBe("");
    expect(view.el.querySelectorAll(".hydra-card.is-compared").length).toBe(2);
  });

  it("pins the selected sample for live mode", async () => {
    const { view, model } = setup({ selected: 2 });
    view.refresh();
    await flush();
    const pin = view.el.querySelector("[data-testid=hydra-pin]");
    pin.click();
    expect(model.get("pinned")).toEqual([2]);
    expect(pin.textContent).toBe("Unpin");
    pin.click();
    expect(model.get("pinned")).toEqual([]);
    expect(pin.textContent).toBe("Pin for live");
  });

  it("shows Python's error", async () => {
    const py = python();
    py.handlers.rankings = () => { throw new Error("StoreError: No run in 'x' yet"); };
    const { view } = setup({ selected: 1 }, { py });
    view.refresh();
    await flush();
    const status = view.el.querySelector("[data-testid=hydra-cards-status]");
    expect(status.className).toBe("hydra-status hydra-error");
    expect(status.textContent).toContain("No run");
  });

  it("drops a pending answer when the selection is cleared", async () => {
    const py = python();
    py.handlers.rankings = hold(py.handlers.rankings);
    const { view, model, rpc } = setup({ selected: 3 }, { py });
    view.refresh();
    await flush();
    model.set("selected", -1);
    expect(rpc.pending.size).toBe(0);
    py.handlers.rankings.release();
    await flush();
    expect(cards(view).length).toBe(0);
    expect(view.el.querySelector("[data-testid=hydra-selected]").textContent).toBe("Pick a test sample on the left.");
  });

  it("dispose() removes its listeners and aborts its pending request", async () => {
    const py = python();
    py.handlers.rankings = hold(py.handlers.rankings);
    const { view, model, rpc } = setup({ selected: 3 }, { py });
    expect(model.stateListeners().length).toBe(6);  // info, selected, k, sort, train_class, compared
    view.refresh();
    await flush();
    expect(rpc.pending.size).toBe(1);
    view.dispose();
    expect(rpc.pending.size).toBe(0);
    expect(model.stateListeners()).toEqual([]);
    expect(view.el.isConnected).toBe(false);
    py.handlers.rankings.release();
    model.set("k", 4);
    await flush();
    expect(model.sent.length).toBe(1);  // no new request after dispose
    expect(cards(view).length).toBe(0);
  });
});
