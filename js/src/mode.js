// Which mode a view's numbers come from: each answer that holds contributions carries its `mode` (the
// hypergradient source Python asked, Explorer.mode_for), and the view shows info.modes[mode]: a short note
// ("fast estimate: may disagree with exact at large learning rates"), and for an estimate a "measured figure" link that
// opens, in place, the measured figure behind the note and where it was measured (benchmarks/RESULTS.md).

/** Fill `box` with the note of `mode` (nothing for none). */
export function showMode(ctx, box, mode) {
  box.textContent = "";
  if (!mode) return;
  const { E } = ctx;
  const m = (ctx.info().modes || {})[mode] || { label: mode, note: mode };
  const note = E("div", { className: `hydra-mode hydra-mode--${mode}`, "data-testid": "hydra-mode", "data-mode": mode,
    title: m.label }, [E("span", { className: "hydra-mode-note", text: m.note })]);
  if (m.figure) {
    const figure = E("div", { className: "hydra-mode-figure", "data-testid": "hydra-mode-figure",
      text: `${m.figure} Source: ${m.source}.` });
    figure.hidden = true;
    const link = E("a", { href: "#", className: "hydra-mode-link", "data-testid": "hydra-mode-link", text: "measured figure",
      title: m.source, role: "button" });
    link.addEventListener("click", (ev) => {
      ev.preventDefault();
      figure.hidden = !figure.hidden;
    });
    note.append(" \u00b7 ", link, figure);
  }
  box.append(note);
}
