// The explorer: header, tabs and layout around the views of views/, one module per Python request
// handler (gallery ↔ Explorer._handle_gallery, …; live ↔ the `live_state` trait). Each view gets its
// own ctx (context.js) and subscribes to the model state it shows; this module routes what
// concerns several views (`info`: a new run or checkpoint, everything answers again; `tab`: the
// training-set views load when first shown), wires the views' links to one another, and disposes
// every view with its listeners and pending requests when the widget goes.
import { createContext } from "./context.js";
import { Client } from "./rpc.js";
import * as classMatrix from "./views/classMatrix.js";
import * as gallery from "./views/gallery.js";
import * as live from "./views/live.js";
import * as rankings from "./views/rankings.js";
import * as selfInfluence from "./views/selfInfluence.js";
import * as trajectory from "./views/trajectory.js";
import * as verify from "./views/verify.js";

export function createExplorer({ model, el: host, doc = host.ownerDocument, client }) {
  const rpc = client || new Client(model, { timeoutMs: 1000 * (model.get("timeout_s") || 120) });
  const links = {};
  const context = () => createContext({ model, rpc, doc, links });
  const ctx = context();  // the composition's own listeners
  const { E } = ctx;

  const views = {
    live: live.create(context()),
    gallery: gallery.create(context()),
    rankings: rankings.create(context()),
    trajectory: trajectory.create(context()),
    verify: verify.create(context()),
    selfInfluence: selfInfluence.create(context()),
    classMatrix: classMatrix.create(context()),
  };

  // -- layout: header, tabs, live panel; explain tab | training tab ---------------------------
  const root = E("div", { className: "hydra-explorer", "data-testid": "hydra-explorer" });
  host.append(root);
  const summary = E("div", { className: "hydra-summary", "data-testid": "hydra-summary" });
  const tabExplain = E("button", { className: "hydra-tab", "data-testid": "hydra-tab-explain",
    text: "Explain a test sample" });
  const tabTraining = E("button", { className: "hydra-tab", "data-testid": "hydra-tab-training",
    text: "Training set: self-influence & classes" });
  tabExplain.addEventListener("click", () => ctx.set({ tab: "explain" }));
  tabTraining.addEventListener("click", () => ctx.set({ tab: "training" }));
  const explainView = E("div", { className: "hydra-view hydra-explain" }, [views.gallery.el,
    E("div", { className: "hydra-panel hydra-detail" }, [views.rankings.el, views.trajectory.el, views.verify.el])]);
  const trainingView = E("div", { className: "hydra-view hydra-training" }, [views.selfInfluence.el,
    views.classMatrix.el]);
  root.append(E("div", { className: "hydra-header" }, [E("b", { text: "hydra_nb explorer" }), summary]),
    E("div", { className: "hydra-tabs" }, [tabExplain, tabTraining]), views.live.el, explainView, trainingView);

  function renderSummary() {
    const st = ctx.info().store;
    summary.textContent = st
      ? `${st.path} \u00b7 ${st.mode} mode \u00b7 ${st.n_tracked.toLocaleString()} of ${st.n_train.toLocaleString()} training samples \u00b7 ${st.steps} steps, ${st.checkpoints} checkpoints \u00b7 ${st.status}`
      : `waiting for a run in ${ctx.info().path || "?"}`;
  }

  // the training-set views are costly to answer: they load when their tab is first shown, and again
  // when shown after the store changed
  let trainingLoaded = false;
  function ensureTraining() {
    if (trainingLoaded) return;
    trainingLoaded = true;
    views.selfInfluence.refresh();
    views.classMatrix.refresh();
  }
  function trainingStale() {
    trainingLoaded = false;
    if (ctx.get("tab") !== "explain") ensureTraining();
  }

  function renderTab() {
    const tab = ctx.get("tab");
    explainView.hidden = tab !== "explain";
    trainingView.hidden = tab === "explain";
    tabExplain.classList.toggle("is-active", tab === "explain");
    tabTraining.classList.toggle("is-active", tab !== "explain");
    if (tab !== "explain") ensureTraining();
  }

  Object.assign(links, {
    testVisual: (test) => views.gallery.visualOf(test),            // rankings: the selected sample's picture
    compare: (train) => views.trajectory.compare(train),          // rankings: a card clicked
    showSelfInfluence: (c) => views.selfInfluence.showClass(c),   // class matrix: a cell clicked
    liveEnded: () => { if (trainingLoaded) trainingStale(); },    // live: the training cell finished
  });

  ctx.on("change:info", () => {
    renderSummary();
    views.gallery.refresh();
    views.rankings.refresh();
    trainingStale();
  });
  ctx.on("change:tab", renderTab);
  ctx.on("change:timeout_s", () => { rpc.timeoutMs = 1000 * ctx.get("timeout_s"); });

  renderSummary();
  renderTab();
  views.live.refresh();
  views.gallery.refresh();
  views.rankings.refresh();
  views.trajectory.refresh();
  views.verify.refresh();

  return () => {
    for (const view of Object.values(views)) view.dispose();
    ctx.dispose();
    if (!client) rpc.dispose();
    root.remove();
  };
}
