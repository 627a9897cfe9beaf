import { describe, expect, it } from "vitest";
import { createExplorer } from "../src/explorer.js";
import { Client } from "../src/rpc.js";
import { FakeModel, INFO, cards, flush, hold, python, thumbs } from "./fake.js";

function setup(state = {}) {
  const py = python();
  const model = new FakeModel({ info: INFO, k: 3, ...state }, py.handlers);
  const host = document.createElement("div");
  document.body.append(host);
  const dispose = createExplorer({ model, el: host });
  return { model, host, py, dispose };
}

describe("explorer view", () => {
  it("shows one page of the gallery, not the whole test set", async () => {
    const { host, py } = setup();
    await flush();
    expect(py.calls[0]).toEqual(["gallery", { offset: 0, limit: 48, filter: "all" }]);
    const items = host.querySelectorAll("[data-testid=hydra-gallery-item]");
    expect(items.length).toBe(48);
    expect(items[7].classList.contains("is-wrong")).toBe(true);
    expect(items[7].textContent).toBe("1\u21922");
    host.querySelector(".hydra-gallery-panel .hydra-button").click();  // More
    await flush();
    expect(host.querySelectorAll("[data-testid=hydra-gallery-item]").length).toBe(96);
  });

  it("click a sample: cards; click cards: trajectories on one chart", async () => {
    const { model, host, py } = setup();
    await flush();
    host.querySelectorAll("[data-testid=hydra-gallery-item]")[4].click();
    expect(model.get("selected")).toBe(4);
    await flush();
    expect(py.calls.at(-1)).toEqual(["rankings", { test: 4, k: 3, sort: "both", train_class: null }]);
    const cardsEl = host.querySelectorAll("[data-testid=hydra-card]");
    expect(cardsEl.length).toBe(6);
    expect(cardsEl[0].dataset.group).toBe("helpful");
    expect(cardsEl[3].querySelector(".hydra-card-score").textContent).toBe("\u22123.00");
    expect(host.querySelector("[data-testid=hydra-selected]").textContent).toContain("Test sample #4");
    cardsEl[0].click();
    await flush();
    cardsEl[4].click();
    await flush();
    expect(model.get("compared")).toEqual([5, 9]);
    expect(py.calls.at(-1)).toEqual(["trajectory", { test: 4, train: [5, 9] }]);
    const chart = host.querySelector("[data-testid=hydra-trajectory]");
    expect(chart.dataset.series).toBe("2");
    expect(chart.querySelectorAll("line.hydra-epoch").length).toBe(2);
    expect(host.querySelector("[data-testid=hydra-card][data-index='5']").classList.contains("is-compared")).toBe(true);
  });

  it("sort, k and the class filter are model state and re-query", async () => {
    const { model, host, py } = setup({ selected: 2 });
    await flush();
    const sort = host.querySelector("[data-testid=hydra-sort]");
    sort.value = "absolute";
    sort.dispatchEvent(new Event("change"));
    await flush();
    expect(model.get("sort")).toBe("absolute");
    expect(host.querySelectorAll("[data-testid=hydra-card][data-group=absolute]").length).toBe(2);
    const k = host.querySelector("[data-testid=hydra-k]");
    k.value = "1";
    k.dispatchEvent(new KeyboardEvent("keydown", { key: "Enter" }));
    await flush();
    expect(model.get("k")).toBe(1);
    expect(host.querySelectorAll("[data-testid=hydra-card][data-group=absolute]").length).toBe(1);
    const cls = host.querySelector("[data-testid=hydra-class-filter]");
    cls.value = "2";
    cls.dispatchEvent(new Event("change"));
    await flush();
    expect(py.calls.at(-1)).toEqual(["rankings", { test: 2, k: 1, sort: "absolute", train_class: 2 }]);
  });

  it("training tab: ranked self-influence and a clickable heatmap", async () => {
    const { host, py } = setup();
    await flush();
    host.querySelector("[data-testid=hydra-tab-training]").click();
    await flush();
    expect(host.querySelectorAll("[data-testid=hydra-self-card]").length).toBe(3);
    expect(host.querySelector("[data-testid=hydra-self-card] .hydra-rank").textContent).toBe("1.");
    const cells = host.querySelectorAll("[data-testid=hydra-heatmap-cell]");
    expect(cells.length).toBe(9);
    cells[5].dispatchEvent(new Event("click"));
    await flush();
    expect(py.calls.at(-1)).toEqual(["self_influence", { offset: 0, limit: 40, order: "desc", train_class: 1 }]);
  });

  it("renders pushed live rankings without asking Python", async () => {
    const { model, host, py } = setup();
    await flush();
    const before = py.calls.length;
    model.set("live_state", { active: true, step: 300, checkpoint_step: 270, updates: 2, note: null,
      items: [{ test: 0, label: 1, predicted: 2, thumbs: thumbs(1), helpful: cards([1, 2], [2, 1]), harmful: cards([3, 4], [-1, -2]) }] });
    const live = host.querySelector("[data-testid=hydra-live]");
    expect(live.hidden).toBe(false);
    expect(live.textContent).toContain("Live: step 300");
    expect(live.querySelectorAll("[data-testid=hydra-live-card]").length).toBe(4);
    expect(py.calls.length).toBe(before);
  });

  it("shows errors from Python and cleans up", async () => {
    const py = python();
    py.handlers.rankings = () => { throw new Error("StoreError: No run in 'x' yet"); };
    const model = new FakeModel({ info: INFO, selected: 1 }, py.handlers);
    const host = document.createElement("div");
    const dispose = createExplorer({ model, el: host });
    await flush();
    expect(host.querySelector("[data-testid=hydra-cards-status]").textContent).toContain("No run");
    dispose();
    expect(host.children.length).toBe(0);
    expect(model.listeners["change:selected"].length).toBe(0);
  });

  it("routes info to the views: the explain views answer again, the training views when shown", async () => {
    const { model, host, py } = setup({ selected: 2 });
    await flush();
    expect(py.calls.map(([m]) => m)).toEqual(["gallery", "rankings"]);
    model.set("info", { ...INFO, store: { ...INFO.store, steps: 120, checkpoints: 4 } });
    await flush();
    expect(py.calls.map(([m]) => m)).toEqual(["gallery", "rankings", "gallery", "rankings"]);
    expect(host.querySelector("[data-testid=hydra-summary]").textContent).toContain("120 steps, 4 checkpoints");
    host.querySelector("[data-testid=hydra-tab-training]").click();
    await flush();
    expect(py.calls.slice(4).map(([m]) => m)).toEqual(["self_influence", "class_matrix"]);
    host.querySelector("[data-testid=hydra-tab-explain]").click();
    host.querySelector("[data-testid=hydra-tab-training]").click();
    await flush();
    expect(py.calls.length).toBe(6);  // shown again, nothing changed: no new request
    model.set("info", { ...INFO });
    await flush();
    expect(py.calls.slice(6).map(([m]) => m)).toEqual(["gallery", "rankings", "self_influence", "class_matrix"]);
  });

  it("when the live training cell finishes, the training views answer again", async () => {
    const { model, host, py } = setup({ tab: "training" });
    await flush();
    const before = py.calls.filter(([m]) => m === "self_influence" || m === "class_matrix").length;
    expect(before).toBe(2);
    model.set("live_state", { active: false, step: 300, checkpoint_step: 300, updates: 3, note: null, items: [] });
    await flush();
    expect(py.calls.filter(([m]) => m === "self_influence" || m === "class_matrix").length).toBe(4);
  });

  it("links the views: a card goes on the chart, the gallery's picture shows the selected sample", async () => {
    const { model, host } = setup();
    await flush();
    host.querySelectorAll("[data-testid=hydra-gallery-item]")[4].click();
    await flush();
    expect(host.querySelector("[data-testid=hydra-selected] canvas")).not.toBe(null);
    host.querySelector("[data-testid=hydra-card][data-index='9']").click();
    await flush();
    expect(model.get("compared")).toEqual([9]);
    expect(host.querySelector("[data-testid=hydra-trajectory]").dataset.series).toBe("1");
  });

  it("disposing disposes every view: no listener of model state and no pending request is left", async () => {
    const py = python();
    for (const m of ["gallery", "rankings", "trajectory", "self_influence", "class_matrix"]) py.handlers[m] = hold(py.handlers[m]);
    const model = new FakeModel({ info: INFO, selected: 1, compared: [5], tab: "training" }, py.handlers);
    const host = document.createElement("div");
    const client = new Client(model);  // the caller's: the explorer leaves it open, so its pending map shows the views' requests
    const dispose = createExplorer({ model, el: host, client });
    await flush();
    expect(model.sent.map((m) => m.method).sort()).toEqual(["class_matrix", "gallery", "rankings", "self_influence", "trajectory"]);
    expect(client.pending.size).toBe(5);
    dispose();
    expect(client.pending.size).toBe(0);
    expect(model.stateListeners()).toEqual([]);
    expect(host.children.length).toBe(0);
    for (const m of ["gallery", "rankings", "trajectory", "self_influence", "class_matrix"]) py.handlers[m].release();
    await flush();
    expect(py.calls.length).toBe(5);  // Python answered; nothing was drawn, nothing failed
  });
});
