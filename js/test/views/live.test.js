import { describe, expect, it } from "vitest";
import { create } from "../../src/views/live.js";
import { cards, fakeContext, thumbs } from "../fake.js";

function setup(state) {
  const f = fakeContext(state);
  const view = create(f.ctx);
  document.body.append(view.el);
  return { ...f, view };
}
const pushed = (active, step) => ({ active, step, checkpoint_step: step - 30, updates: 2, note: null,
  items: [{ test: 0, label: 1, predicted: 2, thumbs: thumbs(1), helpful: cards([1, 2], [2, 1]), harmful: cards([3, 4], [-1, -2]) }] });

describe("live view", () => {
  it("is hidden until Python pushes a live state", () => {
    const { view } = setup();
    view.refresh();
    expect(view.el.hidden).toBe(true);
    expect(view.el.textContent).toBe("");
  });

  it("refreshes on live_state, renders the pushed rankings, and asks Python nothing", () => {
    const { view, model, linked } = setup();
    view.refresh();
    model.set("live_state", pushed(true, 300));
    expect(view.el.hidden).toBe(false);
    expect(view.el.dataset.step).toBe("300");
    expect(view.el.querySelector(".hydra-panel-title").textContent).toBe("Live: step 300 \u00b7 rankings at checkpoint step 270");
    expect(view.el.querySelectorAll("[data-testid=hydra-live-item]").length).toBe(1);
    expect(view.el.querySelectorAll("[data-testid=hydra-live-card]").length).toBe(4);
    expect(view.el.querySelector("[data-testid=hydra-live-card][data-group=harmful]").dataset.score).toBe("-1");
    expect(model.sent).toEqual([]);
    expect(linked).toEqual([]);
    expect(view.el.querySelector("[data-testid=hydra-mode]")).toBe(null);  // the push named no mode
    model.set("live_state", { ...pushed(true, 330), mode: "fast" });
    expect(view.el.querySelector("[data-testid=hydra-mode]").dataset.mode).toBe("fast");
  });

  it("tells the other views when the training cell finished", () => {
    const { view, model, linked } = setup();
    model.set("live_state", pushed(false, 420));
    expect(view.el.querySelector(".hydra-panel-title").textContent).toMatch(/^Training cell finished at step 420/);
    expect(linked).toEqual([["liveEnded"]]);
  });

  it("dispose() removes its listener", () => {
    const { view, model } = setup();
    expect(model.stateListeners()).toEqual(["change:live_state x1"]);
    view.dispose();
    expect(model.stateListeners()).toEqual([]);
    expect(view.el.isConnected).toBe(false);
    model.set("live_state", pushed(true, 300));
    expect(view.el.textContent).toBe("");
  });
});
