import { describe, expect, it } from "vitest";
import { create } from "../../src/views/selfInfluence.js";
import { INFO, cards as payload, fakeContext, flush, hold, packed, python } from "../fake.js";

function setup(state, opts) {
  const f = fakeContext(state, opts);
  const view = create(f.ctx);
  document.body.append(view.el);
  return { ...f, view };
}
const cards = (view) => view.el.querySelectorAll("[data-testid=hydra-self-card]");

describe("self-influence view", () => {
  it("renders a ranked page of training samples, and the next on More", async () => {
    const { view, py } = setup();
    view.refresh();
    await flush();
    expect(py.calls).toEqual([["self_influence", { offset: 0, limit: 40, order: "desc", train_class: null }]]);
    expect(cards(view).length).toBe(3);
    expect([...cards(view)].map((c) => c.querySelector(".hydra-rank").textContent)).toEqual(["1.", "2.", "3."]);
    expect(cards(view)[0].dataset.score).toBe("9");
    expect(view.el.querySelector(".hydra-status").textContent).toBe("range \u22121.00 \u2026 +9.00");
    view.el.querySelector(".hydra-button").click();
    await flush();
    expect(py.calls.at(-1)).toEqual(["self_influence", { offset: 3, limit: 40, order: "desc", train_class: null }]);
    expect(cards(view)[3].querySelector(".hydra-rank").textContent).toBe("4.");
    expect(view.el.querySelector(".hydra-muted").textContent).toBe("6 of 500");
  });

  it("colours suspects (positive self-influence) amber, never helpful green; says its mode", async () => {
    const py = python();
    py.handlers.self_influence = (p) => ({ total: 3, offset: 0, order: p.order, mode: "fast",
      range: packed("float64", [2], [-1, 9]), ...payload([3, 1, 4], [9, 0.5, -1]) });
    const { view } = setup({}, { py });
    view.refresh();
    await flush();
    expect([...cards(view)].map((c) => c.className.split(" ")[1])).toEqual(
      ["hydra-card--suspect", "hydra-card--suspect", "hydra-card--plain"]);
    expect(view.el.querySelector("[data-testid=hydra-mode]").dataset.mode).toBe("fast");
  });

  it("order, class and showClass() start again from the first page", async () => {
    const { view, py } = setup();
    view.refresh();
    await flush();
    const order = view.el.querySelector("[data-testid=hydra-si-order]");
    order.value = "abs";
    order.dispatchEvent(new Event("change"));
    await flush();
    expect(py.calls.at(-1)).toEqual(["self_influence", { offset: 0, limit: 40, order: "abs", train_class: null }]);
    view.showClass(2);
    await flush();
    expect(view.el.querySelector("[data-testid=hydra-si-class]").value).toBe("2");
    expect(py.calls.at(-1)).toEqual(["self_influence", { offset: 0, limit: 40, order: "abs", train_class: 2 }]);
    expect(cards(view).length).toBe(3);
  });

  it("refreshes its class filter when info changes, keeping the chosen class", async () => {
    const { view, model } = setup();
    const cls = view.el.querySelector("[data-testid=hydra-si-class]");
    expect([...cls.options].map((o) => o.value)).toEqual(["", "0", "1", "2"]);
    cls.value = "1";
    model.set("info", { ...INFO, train_classes: [1, 2], class_names: ["zero", "one", "two"] });
    expect([...cls.options].map((o) => o.textContent)).toEqual(["all", "one", "two"]);
    expect(cls.value).toBe("1");
  });

  it("dispose() removes its listeners and aborts its pending request", async () => {
    const py = python();
    py.handlers.self_influence = hold(py.handlers.self_influence);
    const { view, model, rpc } = setup({}, { py });
    expect(model.stateListeners()).toEqual(["change:info x1"]);
    view.refresh();
    await flush();
    expect(rpc.pending.size).toBe(1);
    view.dispose();
    expect(rpc.pending.size).toBe(0);
    expect(model.stateListeners()).toEqual([]);
    expect(view.el.isConnected).toBe(false);
    py.handlers.self_influence.release();
    await flush();
    expect(cards(view).length).toBe(0);
  });
});
