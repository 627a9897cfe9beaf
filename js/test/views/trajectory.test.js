import { describe, expect, it } from "vitest";
import { create } from "../../src/views/trajectory.js";
import { fakeContext, flush, hold, python } from "../fake.js";

function setup(state, opts) {
  const f = fakeContext(state, opts);
  const view = create(f.ctx);
  document.body.append(view.el);
  return { ...f, view };
}
const status = (view) => view.el.querySelector(".hydra-status");

describe("trajectory view", () => {
  it("asks for nothing until cards are compared", async () => {
    const { view, py } = setup({ selected: 4 });
    view.refresh();
    await flush();
    expect(py.calls).toEqual([]);
    expect(status(view).textContent).toContain("Click one or more cards");
  });

  it("renders one line per compared card, with the epoch ends", async () => {
    const { view, py } = setup({ selected: 4, compared: [5, 9] });
    view.refresh();
    await flush();
    expect(py.calls).toEqual([["trajectory", { test: 4, train: [5, 9] }]]);
    const chart = view.el.querySelector("[data-testid=hydra-trajectory]");
    expect(chart.dataset.series).toBe("2");
    expect(chart.dataset.points).toBe("3");
    expect(chart.querySelectorAll("line.hydra-epoch").length).toBe(2);
    expect(view.el.querySelector("[data-testid=hydra-mode]").dataset.mode).toBe("fast");
    expect(chart.querySelector(".hydra-legend").textContent).toContain("#9 (0)");
    expect(status(view).textContent).toContain("test sample #4");
  });

  it("refreshes when compared changes; compare() toggles a card and keeps the last 10", async () => {
    const { view, model, py } = setup({ selected: 4 });
    view.refresh();
    view.compare(5);
    expect(model.get("compared")).toEqual([5]);
    expect(model.saves).toBe(1);
    await flush();
    expect(py.calls.at(-1)).toEqual(["trajectory", { test: 4, train: [5] }]);
    view.compare(8);
    view.compare(5);
    expect(model.get("compared")).toEqual([8]);
    for (let i = 10; i < 20; i++) view.compare(i);
    expect(model.get("compared")).toEqual([10, 11, 12, 13, 14, 15, 16, 17, 18, 19]);
    await flush();
    expect(view.el.querySelector("[data-testid=hydra-trajectory]").dataset.series).toBe("10");
    model.set("compared", []);
    expect(view.el.querySelector("[data-testid=hydra-trajectory]")).toBe(null);
  });

  it("drops a pending answer when the comparison is cleared", async () => {
    const py = python();
    py.handlers.trajectory = hold(py.handlers.trajectory);
    const { view, model, rpc } = setup({ selected: 4, compared: [5] }, { py });
    view.refresh();
    await flush();
    model.set("compared", []);
    expect(rpc.pending.size).toBe(0);
    py.handlers.trajectory.release();
    await flush();
    expect(view.el.querySelector("[data-testid=hydra-trajectory]")).toBe(null);
  });

  it("shows Python's error", async () => {
    const py = python();
    py.handlers.trajectory = () => { throw new Error("ValueError: not tracked"); };
    const { view } = setup({ selected: 4, compared: [5] }, { py });
    view.refresh();
    await flush();
    expect(status(view).className).toBe("hydra-status hydra-error");
    expect(status(view).textContent).toBe("ValueError: not tracked");
  });

  it("dispose() removes its listeners and aborts its pending request", async () => {
    const py = python();
    py.handlers.trajectory = hold(py.handlers.trajectory);
    const { view, model, rpc } = setup({ selected: 4, compared: [5] }, { py });
    expect(model.stateListeners()).toEqual(["change:compared x1"]);
    view.refresh();
    await flush();
    expect(rpc.pending.size).toBe(1);
    view.dispose();
    expect(rpc.pending.size).toBe(0);
    expect(model.stateListeners()).toEqual([]);
    expect(view.el.isConnected).toBe(false);
    py.handlers.trajectory.release();
    model.set("compared", [5, 6]);
    await flush();
    expect(model.sent.length).toBe(1);
    expect(view.el.querySelector("[data-testid=hydra-trajectory]")).toBe(null);
  });
});
