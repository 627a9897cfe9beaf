// The explorer view. State lives in the widget model (selected, k, sort, train_class, compared,
// pinned, tab) so Python can drive it too; every change of it leads to one request, and answers
// that arrive after a newer request was made are dropped.
import { PALETTE, trajectoryChart } from "./chart.js";
import { className, el, score } from "./format.js";
import { heatmap } from "./heatmap.js";
import { sampleVisual } from "./images.js";
import { Client } from "./rpc.js";
import { decode } from "./wire.js";

const PAGE = 48;
const SORT_LABELS = { both: "helpful & harmful", helpful: "most helpful", harmful: "most harmful",
  absolute: "largest |contribution|" };
const GROUP_TITLES = { helpful: "Most helpful (lowered this sample's loss)",
  harmful: "Most harmful (raised this sample's loss)", absolute: "Largest |contribution|" };

/** A latest-wins request slot: `run(fn)` drops answers of earlier calls. */
function slot() {
  let gen = 0;
  return (fn) => {
    const mine = ++gen;
    return fn((cb) => (...args) => { if (mine === gen) cb(...args); });
  };
}

export function createExplorer({ model, el: host, doc = host.ownerDocument, client }) {
  const rpc = client || new Client(model, { timeoutMs: 1000 * (model.get("timeout_s") || 120) });
  const E = (tag, attrs, children) => el(doc, tag, attrs, children);
  const info = () => model.get("info") || {};
  const name = (c) => className(info(), c);
  const listeners = [];
  const on = (event, fn) => { model.on(event, fn); listeners.push([event, fn]); };
  const set = (key, value) => { model.set(key, value); model.save_changes(); };

  const root = E("div", { className: "hydra-explorer", "data-testid": "hydra-explorer" });
  host.append(root);

  // -- header, tabs, live panel ---------------------------------------------------------------
  const summary = E("div", { className: "hydra-summary", "data-testid": "hydra-summary" });
  const tabExplain = E("button", { className: "hydra-tab", "data-testid": "hydra-tab-explain",
    text: "Explain a test sample" });
  const tabTraining = E("button", { className: "hydra-tab", "data-testid": "hydra-tab-training",
    text: "Training set: self-influence & classes" });
  tabExplain.addEventListener("click", () => set("tab", "explain"));
  tabTraining.addEventListener("click", () => set("tab", "training"));
  const live = E("div", { className: "hydra-live", "data-testid": "hydra-live" });
  root.append(E("div", { className: "hydra-header" }, [E("b", { text: "hydra_nb explorer" }), summary]),
    E("div", { className: "hydra-tabs" }, [tabExplain, tabTraining]), live);

  // -- explain view: gallery | selected sample, controls, cards, trajectory -------------------
  const galleryFilter = E("select", { className: "hydra-select", "data-testid": "hydra-gallery-filter" });
  const galleryGrid = E("div", { className: "hydra-gallery", "data-testid": "hydra-gallery" });
  const galleryCount = E("div", { className: "hydra-muted" });
  const galleryMore = E("button", { className: "hydra-button", text: "More" });
  const galleryPanel = E("div", { className: "hydra-panel hydra-gallery-panel" }, [
    E("div", { className: "hydra-panel-title" }, [E("span", { text: "Test samples" }), galleryFilter]),
    galleryGrid, E("div", { className: "hydra-row" }, [galleryCount, galleryMore])]);

  const selectedBox = E("div", { className: "hydra-selected", "data-testid": "hydra-selected" });
  const sortSel = E("select", { className: "hydra-select", "data-testid": "hydra-sort" });
  for (const [v, label] of Object.entries(SORT_LABELS)) sortSel.append(E("option", { value: v, text: label }));
  const kInput = E("input", { className: "hydra-k", type: "number", min: 1, max: 200, "data-testid": "hydra-k" });
  const classSel = E("select", { className: "hydra-select", "data-testid": "hydra-class-filter" });
  const pinBtn = E("button", { className: "hydra-button", "data-testid": "hydra-pin", text: "Pin for live" });
  const cardsStatus = E("div", { className: "hydra-status", "data-testid": "hydra-cards-status" });
  const cards = E("div", { className: "hydra-cards", "data-testid": "hydra-cards" });
  const trajBox = E("div", { className: "hydra-trajectory-box", "data-testid": "hydra-trajectory-box" });
  const trajStatus = E("div", { className: "hydra-status" });
  const detailPanel = E("div", { className: "hydra-panel hydra-detail" }, [
    selectedBox,
    E("div", { className: "hydra-controls" }, [
      E("label", {}, ["Show ", sortSel]), E("label", {}, ["k ", kInput]),
      E("label", {}, ["training class ", classSel]), pinBtn]),
    cardsStatus, cards,
    E("div", { className: "hydra-panel-title" }, [E("span", {
      text: "Contribution over training (click cards to compare)" })]),
    trajStatus, trajBox]);
  const explainView = E("div", { className: "hydra-view hydra-explain" }, [galleryPanel, detailPanel]);

  // -- training view: self-influence list | class heatmap -------------------------------------
  const siOrder = E("select", { className: "hydra-select", "data-testid": "hydra-si-order" });
  for (const [v, label] of [["desc", "highest first (suspects)"], ["asc", "lowest first"], ["abs", "largest |value|"]]) {
    siOrder.append(E("option", { value: v, text: label }));
  }
  const siClass = E("select", { className: "hydra-select", "data-testid": "hydra-si-class" });
  const siStatus = E("div", { className: "hydra-status" });
  const siList = E("div", { className: "hydra-cards hydra-si-list", "data-testid": "hydra-self-influence" });
  const siMore = E("button", { className: "hydra-button", text: "More" });
  const siCount = E("div", { className: "hydra-muted" });
  const hmStatus = E("div", { className: "hydra-status" });
  const hmBox = E("div", { className: "hydra-heatmap-box" });
  const trainingView = E("div", { className: "hydra-view hydra-training" }, [
    E("div", { className: "hydra-panel" }, [
      E("div", { className: "hydra-panel-title" }, [E("span", {
        text: "Self-influence: each sample's contribution to its own loss (high = memorised, often mislabelled)" })]),
      E("div", { className: "hydra-controls" }, [E("label", {}, ["order ", siOrder]), E("label", {}, ["class ", siClass])]),
      siStatus, siList, E("div", { className: "hydra-row" }, [siCount, siMore])]),
    E("div", { className: "hydra-panel" }, [
      E("div", { className: "hydra-panel-title" }, [E("span", {
        text: "Mean contribution of each training class to each test class" })]),
      hmStatus, hmBox])]);
  root.append(explainView, trainingView);

  // -- helpers --------------------------------------------------------------------------------
  const progressText = (target, what) => (done, total) => {
    target.textContent = `${what}\u2026 ${done}/${total} chunks`;
  };
  const fail = (target) => (err) => {
    target.className = "hydra-status hydra-error";
    target.textContent = String(err && err.message ? err.message : err);
  };
  const busy = (target, text) => { target.className = "hydra-status is-busy"; target.textContent = text; };
  const done = (target, text = "") => { target.className = "hydra-status"; target.textContent = text; };

  function fillClassSelect(sel, classes, current, allText = "all") {
    sel.textContent = "";
    sel.append(E("option", { value: "", text: allText }));
    for (const c of classes) sel.append(E("option", { value: String(c), text: name(c) }));
    sel.value = current === null || current === undefined ? "" : String(current);
  }

  function card(payload, i, kind, extra = {}) {
    const idx = payload.indices.data[i];
    const s = payload.scores ? payload.scores.data[i] : undefined;
    const node = E("div", { className: `hydra-card hydra-card--${s === undefined ? "plain" : s >= 0 ? "helpful" : "harmful"}`,
      "data-testid": extra.testid || "hydra-card", "data-index": idx, "data-score": s, "data-group": kind,
      title: `training sample #${idx}` });
    node.append(sampleVisual(doc, payload, i, 56),
      E("div", { className: "hydra-card-label", text: `#${idx} \u00b7 ${name(payload.labels.data[i])}` }),
      s === undefined ? null : E("div", { className: "hydra-card-score", text: score(s) }));
    return node;
  }

  // -- header ---------------------------------------------------------------------------------
  function renderSummary() {
    const i = info();
    const st = i.store;
    summary.textContent = st
      ? `${st.path} \u00b7 ${st.mode} mode \u00b7 ${st.n_tracked.toLocaleString()} of ${st.n_train.toLocaleString()} training samples \u00b7 ${st.steps} steps, ${st.checkpoints} checkpoints \u00b7 ${st.status}`
      : `waiting for a run in ${i.path || "?"}`;
    fillClassSelect(classSel, i.train_classes || [], model.get("train_class"));
    fillClassSelect(siClass, i.train_classes || [], siClassValue());
    const f = galleryFilter.value || "all";
    galleryFilter.textContent = "";
    galleryFilter.append(E("option", { value: "all", text: "all" }),
      E("option", { value: "misclassified", text: "misclassified" }));
    for (const c of i.test_classes || []) galleryFilter.append(E("option", { value: `class:${c}`, text: `class ${name(c)}` }));
    galleryFilter.value = f;
  }
  const siClassValue = () => (siClass.value === "" ? null : Number(siClass.value));

  function renderTab() {
    const tab = model.get("tab");
    explainView.hidden = tab !== "explain";
    trainingView.hidden = tab === "explain";
    tabExplain.classList.toggle("is-active", tab === "explain");
    tabTraining.classList.toggle("is-active", tab !== "explain");
    if (tab !== "explain") ensureTraining();
  }

  // -- gallery --------------------------------------------------------------------------------
  const gallerySlot = slot();
  let galleryOffset = 0;
  function loadGallery(reset = true) {
    if (reset) { galleryOffset = 0; galleryGrid.textContent = ""; }
    galleryMore.disabled = true;
    if (reset) galleryCount.textContent = "Loading\u2026 (the kernel answers once a running cell ends)";
    gallerySlot((fresh) => rpc.request("gallery", { offset: galleryOffset, limit: PAGE, filter: galleryFilter.value || "all" })
      .then(fresh((page) => {
        const n = page.indices.data.length;
        for (let i = 0; i < n; i++) {
          const idx = page.indices.data[i];
          const label = page.labels.data[i];
          const pred = page.predicted.data[i];
          const wrong = pred >= 0 && pred !== label;
          const item = E("button", { className: `hydra-gallery-item${wrong ? " is-wrong" : ""}`,
            "data-testid": "hydra-gallery-item", "data-index": idx, title: `test sample #${idx}` });
          item.append(sampleVisual(doc, page, i, 44),
            E("div", { className: "hydra-gallery-label", text: pred >= 0 ? `${name(label)}\u2192${name(pred)}` : name(label) }));
          item.addEventListener("click", () => select(idx));
          galleryGrid.append(item);
        }
        galleryOffset += n;
        galleryCount.textContent = `${galleryOffset} of ${page.total} (true\u2192predicted)`;
        galleryMore.disabled = galleryOffset >= page.total;
        markSelected();
      }), fresh(fail(galleryCount))));
  }
  galleryMore.addEventListener("click", () => loadGallery(false));
  galleryFilter.addEventListener("change", () => loadGallery(true));
  function markSelected() {
    const sel = model.get("selected");
    galleryGrid.querySelectorAll(".hydra-gallery-item").forEach((node) =>
      node.classList.toggle("is-selected", Number(node.dataset.index) === sel));
  }
  function select(idx) {
    model.set("compared", []);
    set("selected", idx);
  }

  // -- rankings -------------------------------------------------------------------------------
  const rankSlot = slot();
  let ranking = null;
  function loadRankings() {
    const test = model.get("selected");
    markSelected();
    sortSel.value = model.get("sort");
    kInput.value = String(model.get("k"));
    classSel.value = model.get("train_class") === null ? "" : String(model.get("train_class"));
    if (test === null || test < 0) {
      selectedBox.textContent = "Pick a test sample on the left.";
      cards.textContent = "";
      return;
    }
    busy(cardsStatus, "Computing contributions\u2026");
    rankSlot((fresh) => rpc.request("rankings", { test, k: model.get("k"), sort: model.get("sort"),
      train_class: model.get("train_class") }, { onProgress: fresh(progressText(cardsStatus, "Computing contributions")) })
      .then(fresh((r) => {
        ranking = r;
        renderSelected(r);
        cards.textContent = "";
        for (const [group, payload] of Object.entries(r.groups)) {
          const row = E("div", { className: "hydra-card-row" });
          for (let i = 0; i < payload.indices.data.length; i++) {
            const c = card(payload, i, group);
            c.addEventListener("click", () => toggleCompare(payload.indices.data[i]));
            row.append(c);
          }
          cards.append(E("div", { className: "hydra-group", "data-group": group }, [
            E("div", { className: "hydra-group-title", text: GROUP_TITLES[group] }), row]));
        }
        done(cardsStatus, `top ${model.get("k")} of ${r.candidates.toLocaleString()} training samples` +
          (model.get("train_class") !== null ? ` of class ${name(model.get("train_class"))}` : "") +
          ` at step ${r.step}`);
        markCompared();
      }), fresh(fail(cardsStatus))));
  }
  function renderSelected(r) {
    selectedBox.textContent = "";
    const wrong = r.predicted >= 0 && r.predicted !== r.label;
    const visual = E("div", { className: "hydra-selected-visual" });
    selectedBox.append(visual, E("div", {}, [
      E("div", { className: "hydra-selected-title", text: `Test sample #${r.test}` }),
      E("div", { className: wrong ? "hydra-wrong" : "", text: `true ${name(r.label)} \u00b7 predicted ${r.predicted >= 0 ? name(r.predicted) : "n/a"}` })]));
    // the test sample's own picture comes from the gallery page already on screen, if there
    const item = galleryGrid.querySelector(`[data-index="${r.test}"] canvas, [data-index="${r.test}"] .hydra-text`);
    if (item) {
      const copy = item.cloneNode(true);
      if (item.tagName === "CANVAS" && copy.getContext) {
        copy.getContext("2d")?.drawImage?.(item, 0, 0);
        copy.style.width = "88px"; copy.style.height = "auto";
      }
      visual.append(copy);
    }
    pinBtn.textContent = (model.get("pinned") || []).includes(r.test) ? "Unpin" : "Pin for live";
  }
  function toggleCompare(idx) {
    const cur = model.get("compared") || [];
    set("compared", cur.includes(idx) ? cur.filter((x) => x !== idx) : [...cur, idx].slice(-10));
  }
  function markCompared() {
    const cur = model.get("compared") || [];
    cards.querySelectorAll(".hydra-card").forEach((node) => {
      const k = cur.indexOf(Number(node.dataset.index));
      node.classList.toggle("is-compared", k >= 0);
      node.style.outlineColor = k >= 0 ? PALETTE[k % PALETTE.length] : "";
    });
  }
  sortSel.addEventListener("change", () => set("sort", sortSel.value));
  const applyK = () => {
    const k = Math.max(1, Math.min(200, Math.round(Number(kInput.value) || 10)));
    kInput.value = String(k);
    if (k !== model.get("k")) set("k", k);
  };
  kInput.addEventListener("change", applyK);
  kInput.addEventListener("keydown", (ev) => { if (ev.key === "Enter") applyK(); });
  classSel.addEventListener("change", () => set("train_class", classSel.value === "" ? null : Number(classSel.value)));
  pinBtn.addEventListener("click", () => {
    const test = model.get("selected");
    if (test < 0) return;
    const cur = model.get("pinned") || [];
    set("pinned", cur.includes(test) ? cur.filter((x) => x !== test) : [...cur, test]);
    pinBtn.textContent = cur.includes(test) ? "Pin for live" : "Unpin";
  });

  // -- trajectory -----------------------------------------------------------------------------
  const trajSlot = slot();
  function loadTrajectory() {
    markCompared();
    const test = model.get("selected");
    const train = model.get("compared") || [];
    if (test < 0 || !train.length) {
      trajBox.textContent = "";
      done(trajStatus, "Click one or more cards to see how their contribution built up over training.");
      return;
    }
    busy(trajStatus, "Computing trajectories\u2026");
    trajSlot((fresh) => rpc.request("trajectory", { test, train }, {
      onProgress: fresh(progressText(trajStatus, "Computing trajectories")) })
      .then(fresh((t) => {
        const steps = Array.from(t.steps.data);
        const m = t.train.data.length;
        const series = Array.from(t.train.data).map((idx, j) => ({
          label: `#${idx} (${name(t.labels.data[j])})`,
          color: PALETTE[j % PALETTE.length],
          values: steps.map((_, c) => t.values.data[c * m + j]),
        }));
        trajBox.textContent = "";
        trajBox.append(trajectoryChart(doc, { steps, series, epochs: Array.from(t.epochs.data),
          epochExact: t.epoch_exact, title: `contributions to test sample #${t.test}` }));
        done(trajStatus, `test sample #${t.test}: contribution if training had stopped at each checkpoint; dashed lines: epoch ends`);
      }), fresh(fail(trajStatus))));
  }

  // -- training view --------------------------------------------------------------------------
  let trainingLoaded = false;
  const siSlot = slot();
  let siOffset = 0;
  function ensureTraining() {
    if (trainingLoaded) return;
    trainingLoaded = true;
    loadSelfInfluence(true);
    loadHeatmap();
  }
  function loadSelfInfluence(reset) {
    if (reset) { siOffset = 0; siList.textContent = ""; }
    siMore.disabled = true;
    busy(siStatus, "Computing self-influence\u2026");
    siSlot((fresh) => rpc.request("self_influence", { offset: siOffset, limit: 40, order: siOrder.value || "desc",
      train_class: siClassValue() }, { onProgress: fresh(progressText(siStatus, "Computing self-influence")) })
      .then(fresh((page) => {
        const n = page.indices.data.length;
        for (let i = 0; i < n; i++) {
          const c = card(page, i, "self", { testid: "hydra-self-card" });
          c.prepend(E("div", { className: "hydra-rank", text: `${siOffset + i + 1}.` }));
          siList.append(c);
        }
        siOffset += n;
        siCount.textContent = `${siOffset} of ${page.total.toLocaleString()}`;
        siMore.disabled = siOffset >= page.total;
        done(siStatus, `range ${score(page.range.data[0])} \u2026 ${score(page.range.data[1])}`);
      }), fresh(fail(siStatus))));
  }
  siMore.addEventListener("click", () => loadSelfInfluence(false));
  siOrder.addEventListener("change", () => loadSelfInfluence(true));
  siClass.addEventListener("change", () => loadSelfInfluence(true));
  function loadHeatmap() {
    busy(hmStatus, "Computing the class matrix\u2026");
    rpc.request("class_matrix", {}, { onProgress: progressText(hmStatus, "Computing the class matrix") })
      .then((cm) => {
        const rows = Array.from(cm.train_classes.data).map(name);
        const cols = Array.from(cm.test_classes.data).map(name);
        hmBox.textContent = "";
        hmBox.append(heatmap(doc, { rows, cols, values: cm.mean.data, counts: cm.counts.data,
          onCell: (i, j) => {
            siClass.value = String(cm.train_classes.data[i]);
            loadSelfInfluence(true);
          } }));
        done(hmStatus, "green: the training class lowered the test class's loss on average; red: raised it");
      }, fail(hmStatus));
  }

  // -- live -----------------------------------------------------------------------------------
  function renderLive() {
    const st = decode(model.get("live_state") || {});
    live.textContent = "";
    if (!st.step && !st.note && !(st.items || []).length) { live.hidden = true; return; }
    live.hidden = false;
    live.dataset.step = st.step;
    live.dataset.updates = st.updates;
    const head = st.active
      ? `Live: step ${st.step}` + (st.checkpoint_step !== null && st.checkpoint_step !== undefined ? ` \u00b7 rankings at checkpoint step ${st.checkpoint_step}` : "")
      : `Training cell finished at step ${st.step}: rankings below are final; the views above answer again.`;
    live.append(E("div", { className: "hydra-panel-title" }, [E("span", { text: head + (st.note ? ` \u00b7 ${st.note}` : "") })]));
    for (const item of st.items || []) {
      const block = E("div", { className: "hydra-live-item", "data-testid": "hydra-live-item", "data-test": item.test });
      block.append(E("div", { className: "hydra-live-test" }, [sampleVisual(doc, item, 0, 44),
        E("div", { text: `#${item.test}: ${name(item.label)}\u2192${name(item.predicted)}` })]));
      for (const group of ["helpful", "harmful"]) {
        const payload = item[group];
        const row = E("div", { className: "hydra-card-row hydra-live-row", "data-group": group });
        for (let i = 0; i < payload.indices.data.length; i++) row.append(card(payload, i, group, { testid: "hydra-live-card" }));
        block.append(row);
      }
      live.append(block);
    }
    if (!st.active && trainingLoaded) { trainingLoaded = false; if (model.get("tab") !== "explain") ensureTraining(); }
  }

  // -- wiring ---------------------------------------------------------------------------------
  on("change:info", () => { renderSummary(); loadGallery(true); loadRankings(); trainingLoaded = false;
    if (model.get("tab") !== "explain") ensureTraining(); });
  on("change:tab", renderTab);
  on("change:selected", loadRankings);
  on("change:k", loadRankings);
  on("change:sort", loadRankings);
  on("change:train_class", loadRankings);
  on("change:compared", loadTrajectory);
  on("change:live_state", renderLive);
  on("change:timeout_s", () => { rpc.timeoutMs = 1000 * model.get("timeout_s"); });

  renderSummary();
  renderTab();
  renderLive();
  loadGallery(true);
  loadRankings();
  loadTrajectory();

  return () => {
    for (const [event, fn] of listeners) model.off(event, fn);
    if (!client) rpc.dispose();
    root.remove();
  };
}
