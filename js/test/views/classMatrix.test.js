import { describe, expect, it } from "vitest";
import { create } from "../../src/views/classMatrix.js";
import { INFO, fakeContext, flush, hold, python } from "../fake.js";

function setup(state, opts) {
  const f = fakeContext(state, opts);
  const view = create(f.ctx);
  document.body.append(view.el);
  return { ...f, view };
}

describe("class matrix view", () => {
  it("renders the heatmap with class names; a cell lists its training class's self-influence", async () => {
    const { view, py, linked } = setup({ info: { ...INFO, class_names: ["cat", "dog", "eel"] } });
    expect(view.el.querySelector("[data-testid=hydra-heatmap]")).toBe(null);  // nothing before refresh
    view.refresh();
    await flush();
    expect(py.calls).toEqual([["class_matrix"]]);
    const heat = view.el.querySelector("[data-testid=hydra-heatmap]");
    expect(heat.dataset.rows).toBe("3");
    const cells = view.el.querySelectorAll("[data-testid=hydra-heatmap-cell]");
    expect(cells.length).toBe(9);
    expect([...heat.querySelectorAll("text.hydra-tick")].map((t) => t.textContent)).toContain("dog");
    cells[5].dispatchEvent(new Event("click"));  // row 1, column 2
    expect(linked).toEqual([["showSelfInfluence", 1]]);
    expect(view.el.querySelector(".hydra-status").textContent).toContain("green");
    const mode = view.el.querySelector("[data-testid=hydra-mode]");
    expect(mode.dataset.mode).toBe("exact");
    expect(mode.querySelector("[data-testid=hydra-mode-link]")).toBe(null);  // nothing estimated, no caveat
  });

  it("refresh() asks again, and only the latest answer is drawn", async () => {
    const { view, py } = setup();
    view.refresh();
    view.refresh();
    await flush();
    expect(py.calls).toEqual([["class_matrix"], ["class_matrix"]]);
    expect(view.el.querySelectorAll("[data-testid=hydra-heatmap]").length).toBe(1);
  });

  it("shows Python's error", async () => {
    const py = python();
    py.handlers.class_matrix = () => { throw new Error("ValueError: labels are not classes"); };
    const { view } = setup({}, { py });
    view.refresh();
    await flush();
    expect(view.el.querySelector(".hydra-error").textContent).toBe("ValueError: labels are not classes");
  });

  it("dispose() aborts its pending request (it listens to no model state)", async () => {
    const py = python();
    py.handlers.class_matrix = hold(py.handlers.class_matrix);
    const { view, model, rpc } = setup({}, { py });
    expect(model.stateListeners()).toEqual([]);
    view.refresh();
    await flush();
    expect(rpc.pending.size).toBe(1);
    view.dispose();
    expect(rpc.pending.size).toBe(0);
    expect(view.el.isConnected).toBe(false);
    py.handlers.class_matrix.release();
    await flush();
    expect(view.el.querySelector("[data-testid=hydra-heatmap]")).toBe(null);
  });
});
