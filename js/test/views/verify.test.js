import { describe, expect, it } from "vitest";
import { create } from "../../src/views/verify.js";
import { INFO, fakeContext, flush } from "../fake.js";

const REPLAYS = { ...INFO, store: { ...INFO.store, replays: true } };

function setup(state, opts) {
  const f = fakeContext(state, opts);
  const view = create(f.ctx);
  document.body.append(view.el);
  view.refresh();
  return { ...f, view };
}
const button = (view) => view.el.querySelector("[data-testid=hydra-verify-button]");

describe("verify view", () => {
  it("is off until a replayable run, a selected sample and compared cards are there", async () => {
    expect(button(setup({ selected: 4, compared: [5] }).view).disabled).toBe(true);  // the run does not replay
    const { view, model } = setup({ selected: 4, compared: [], info: REPLAYS });
    expect(button(view).disabled).toBe(true);
    expect(button(view).title).toContain("click cards first");
    model.set("compared", [5, 9]);
    expect(button(view).disabled).toBe(false);
  });

  it("retrains without the compared cards and shows before, after and the predicted change", async () => {
    const { view, py } = setup({ selected: 4, compared: [9, 5], info: REPLAYS });
    button(view).click();
    await flush();
    expect(py.calls).toEqual([["verify", { test: 4, train: [9, 5] }]]);
    const text = view.el.querySelector("[data-testid=hydra-verify]").textContent;
    expect(text).toContain("without #5, #9");
    expect(view.el.querySelector("[data-testid=hydra-verify-loss]").textContent)
      .toBe("test loss 1.25 \u2192 1.5: change +0.250");
    expect(view.el.querySelector("[data-testid=hydra-verify-predicted]").textContent)
      .toBe("the contributions predicted +0.200 (replay, to first order)");
    expect(text).toContain("prediction 2 \u2192 1 (true 1)");
  });

  it("a new selection clears the answer; dispose leaves no listener", async () => {
    const { view, model, py } = setup({ selected: 4, compared: [5], info: REPLAYS });
    button(view).click();
    await flush();
    model.set("selected", 7);
    expect(view.el.querySelector("[data-testid=hydra-verify]").textContent).toBe("");
    view.dispose();
    model.set("compared", [1]);
    expect(py.calls.length).toBe(1);
  });
});
