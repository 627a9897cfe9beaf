import { describe, expect, it } from "vitest";
import { createExplorer } from "../src/explorer.js";
import { FakeModel, flush, packed } from "./fake.js";

const INFO = { test_kind: "image", train_kind: "image", n_test: 100, n_train: 500, train_classes: [0, 1, 2],
  test_classes: [0, 1, 2], class_names: null, path: "runs/a.zarr",
  store: { path: "runs/a.zarr", status: "complete", mode: "fast", steps: 90, checkpoints: 3, n_tracked: 500, n_train: 500 } };

const thumbs = (n) => packed("uint8", [n, 2, 2, 1], new Array(4 * n).fill(0).map((_, i) => i % 255));
const cards = (ids, scores) => ({ indices: packed("int32", [ids.length], ids), labels: packed("int32", [ids.length], ids.map((i) => i % 3)),
  scores: packed("float64", [ids.length], scores), thumbs: thumbs(ids.length) });

function python() {
  const calls = [];
  const handlers = {
    gallery: (p) => {
      calls.push(["gallery", p]);
      const ids = Array.from({ length: Math.min(p.limit, 100 - p.offset) }, (_, i) => p.offset + i);
      return { total: 100, offset: p.offset, indices: packed("int32", [ids.length], ids),
        labels: packed("int32", [ids.length], ids.map((i) => i % 3)),
        predicted: packed("int32", [ids.length], ids.map((i) => (i % 7 === 0 ? (i + 1) % 3 : i % 3))),
        thumbs: thumbs(ids.length) };
    },
    rankings: (p) => {
      calls.push(["rankings", p]);
      const groups = p.sort === "both"
        ? { helpful: cards([5, 6, 7].slice(0, p.k), [3, 2, 1]), harmful: cards([8, 9, 10].slice(0, p.k), [-3, -2, -1]) }
        : { [p.sort]: cards([5, 8].slice(0, p.k), [3, -2.5]) };
      return { test: p.test, label: 1, predicted: 2, candidates: 500, step: 90, groups };
    },
    trajectory: (p) => {
      calls.push(["trajectory", p]);
      const m = p.train.length;
      return { test: p.test, steps: packed("float64", [3], [0, 45, 90]),
        values: packed("float64", [3, m], new Array(3 * m).fill(0).map((_, i) => i)), epochs: packed("float64", [2], [45, 90]),
        epoch_exact: true, train: packed("int32", [m], p.train), labels: packed("int32", [m], p.train.map((i) => i % 3)) };
    },
    self_influence: (p) => { calls.push(["self_influence", p]); return { total: 500, offset: p.offset, order: p.order,
      range: packed("float64", [2], [-1, 9]), ...cards([3, 1, 4], [9, 5, 1]) }; },
    class_matrix: () => { calls.push(["class_matrix"]); return { train_classes: packed("int32", [3], [0, 1, 2]),
      test_classes: packed("int32", [3], [0, 1, 2]), mean: packed("float64", [3, 3], [1, -1, 0, 0, 2, -2, 0.5, 0, 1]),
      counts: packed("float64", [3, 3], new Array(9).fill(10)) }; },
  };
  return { calls, handlers };
}

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
});
