"""The explorer in a real JupyterLab and Chromium: it renders real content and answers clicks, lays its labels out
without overlaps and colours each group as specified.

One notebook (``notebooks/explorer.ipynb``) trains a small CNN on the digits under
``hydra_nb.track`` (a few seconds) and displays ``hydra_nb.explore(...)``; the live notebook shows an
explorer created before a ``%%hydra_track`` cell and checks that rankings arrive while it runs.
"""

from __future__ import annotations

import pytest

from .conftest import border_colours, cut_texts, open_notebook, publish_screenshot, text_overlaps
from .test_tabular_browser import BAD, GOOD, LABELS, SUSPECT


def _shot(page, screenshots, name, locator=None):
    path = screenshots / f"{name}.png"
    (locator or page).screenshot(path=str(path))
    return path


def _canvas_has_ink(page, selector: str) -> bool:
    """True if the first canvas under ``selector`` holds pixels that are not all one colour."""
    return page.evaluate("""(sel) => {
        const c = document.querySelector(sel);
        if (!c) return false;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 4; i < d.length; i += 4) if (d[i] !== d[0]) return true;
        return false;
    }""", selector)


@pytest.fixture(scope="module")
def explorer_page(browser, lab):
    page = open_notebook(browser, lab, "explorer.ipynb")
    page.wait_for_selector("[data-testid=hydra-gallery-item]", timeout=180_000)
    yield page
    page.close()


def test_gallery_cards_trajectory(explorer_page, screenshots):
    page = explorer_page
    items = page.locator("[data-testid=hydra-gallery-item]")
    assert items.count() >= 40  # one page of the 359 test digits, not all of them
    assert _canvas_has_ink(page, "[data-testid=hydra-gallery-item] canvas")
    label = items.first.inner_text()
    assert "\u2192" in label  # true → predicted
    assert cut_texts(page, ".hydra-gallery-label") == []
    _shot(page, screenshots, "01-gallery")

    # pick a misclassified digit if there is one: the interesting case
    wrong = page.locator("[data-testid=hydra-gallery-item].is-wrong")
    target = wrong.first if wrong.count() else items.nth(3)
    index = target.get_attribute("data-index")
    target.click()
    page.wait_for_selector("[data-testid=hydra-card]", timeout=120_000)
    cards = page.locator("[data-testid=hydra-card]")
    assert cards.count() == 16  # k=8 helpful + 8 harmful
    helpful = page.locator("[data-testid=hydra-card][data-group=helpful]")
    harmful = page.locator("[data-testid=hydra-card][data-group=harmful]")
    assert helpful.count() == 8 and harmful.count() == 8
    scores = [float(helpful.nth(i).get_attribute("data-score")) for i in range(8)]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert float(harmful.first.get_attribute("data-score")) < 0
    assert _canvas_has_ink(page, "[data-testid=hydra-card] canvas")
    assert page.locator("[data-testid=hydra-selected]").inner_text().startswith(f"Test sample #{index}")
    assert border_colours(page, "[data-testid=hydra-card][data-group=helpful]") == {GOOD}
    assert border_colours(page, "[data-testid=hydra-card][data-group=harmful]") == {BAD}
    count, bad = text_overlaps(page, LABELS)
    assert count > 80 and bad == [], bad[:5]
    assert page.locator(".hydra-rankings-view [data-testid=hydra-mode]").get_attribute("data-mode") == "fast"

    # click two cards: their trajectories on one chart
    helpful.first.click()
    page.wait_for_selector("[data-testid=hydra-trajectory][data-series='1']", timeout=120_000)
    harmful.first.click()
    chart = page.wait_for_selector("[data-testid=hydra-trajectory][data-series='2']", timeout=120_000)
    assert page.locator("[data-testid=hydra-trajectory] polyline.hydra-series").count() == 2
    assert page.locator("[data-testid=hydra-trajectory] line.hydra-epoch").count() >= 3  # 4 epochs
    points = int(chart.get_attribute("data-points"))
    assert points >= 5  # checkpoint 0 + one per epoch
    # hover: the read-out shows the values at a checkpoint
    overlay = page.locator("[data-testid=hydra-trajectory] rect.hydra-overlay")
    overlay.scroll_into_view_if_needed()
    box = overlay.bounding_box()
    overlay.hover(position={"x": box["width"] * 0.98, "y": box["height"] / 2})
    page.wait_for_function("() => document.querySelector('[data-testid=hydra-readout]').textContent.startsWith('step ')")
    readout = page.locator("[data-testid=hydra-readout]").inner_text()
    assert readout.count("#") == 2
    shot = _shot(page, screenshots, "02-cards-trajectory", page.locator("[data-testid=hydra-explorer]"))
    publish_screenshot(shot, "explorer.png")

    # sorting and k: absolute ranking, k = 5
    page.select_option("[data-testid=hydra-sort]", "absolute")
    page.wait_for_function("() => document.querySelectorAll('[data-testid=hydra-card][data-group=absolute]').length === 8")
    page.fill("[data-testid=hydra-k]", "5")
    page.press("[data-testid=hydra-k]", "Enter")
    page.wait_for_function("() => document.querySelectorAll('[data-testid=hydra-card][data-group=absolute]').length === 5")
    mags = [abs(float(page.locator("[data-testid=hydra-card]").nth(i).get_attribute("data-score"))) for i in range(5)]
    assert mags == sorted(mags, reverse=True)
    # filter by training class
    page.select_option("[data-testid=hydra-class-filter]", "3")
    page.wait_for_function("""() => {
        const c = [...document.querySelectorAll('[data-testid=hydra-card]')];
        return c.length === 5 && c.every(x => x.querySelector('.hydra-card-label').textContent.endsWith('\u00b7 3'));
    }""")
    _shot(page, screenshots, "03-absolute-class3")


def test_self_influence_and_heatmap(explorer_page, screenshots):
    page = explorer_page
    page.click("[data-testid=hydra-tab-training]")
    page.wait_for_selector("[data-testid=hydra-self-card]", timeout=120_000)
    cards = page.locator("[data-testid=hydra-self-card]")
    assert cards.count() == 40  # the first page of 1,438, ranked
    vals = [float(cards.nth(i).get_attribute("data-score")) for i in range(10)]
    assert vals == sorted(vals, reverse=True)
    assert border_colours(page, "[data-testid=hydra-self-card]:not(.hydra-card--plain)") == {SUSPECT}
    assert _canvas_has_ink(page, "[data-testid=hydra-self-card] canvas")

    heat = page.wait_for_selector("[data-testid=hydra-heatmap]", timeout=120_000)
    assert heat.get_attribute("data-rows") == "10" and heat.get_attribute("data-cols") == "10"
    cells = page.locator("[data-testid=hydra-heatmap-cell]")
    assert cells.count() == 100
    fills = {cells.nth(i).get_attribute("fill") for i in range(0, 100, 11)}
    assert len(fills) > 1  # real values, not one colour
    # the diagonal (same class) should mostly help
    diag = [float(cells.nth(i * 11).get_attribute("data-value")) for i in range(10)]
    assert sum(v > 0 for v in diag) >= 8
    # click a cell: detail text, and the self-influence list filtered to that training class
    count, bad = text_overlaps(page, LABELS)
    assert count > 60 and bad == [], bad[:5]
    cells.nth(2 * 10 + 7).click()
    detail = page.locator("[data-testid=hydra-heatmap-detail]").inner_text()
    assert "training class 2" in detail and "test class 7" in detail
    page.wait_for_function("""() => {
        const c = [...document.querySelectorAll('[data-testid=hydra-self-card]')];
        return c.length > 0 && c.every(x => x.querySelector('.hydra-card-label').textContent.endsWith('\u00b7 2'));
    }""", timeout=120_000)
    _shot(page, screenshots, "04-self-influence-heatmap", page.locator("[data-testid=hydra-explorer]"))


def test_live_rankings_while_the_cell_runs(browser, lab, screenshots):
    page = open_notebook(browser, lab, "live.ipynb")
    try:
        # while %%hydra_track runs, the kernel answers no requests: whatever shows came from Python's pushes
        page.wait_for_selector("[data-testid=hydra-live-card]", timeout=180_000)
        header = page.locator("[data-testid=hydra-live] .hydra-panel-title").inner_text()
        running = header.startswith("Live: step")
        step_seen = int(page.locator("[data-testid=hydra-live]").get_attribute("data-step"))
        assert page.locator("[data-testid=hydra-live-item]").count() == 2  # pinned test samples 0 and 1
        _shot(page, screenshots, "05-live-during-training", page.locator("[data-testid=hydra-explorer]"))
        assert running, f"live rankings only appeared after the cell ended: {header!r}"
        # updates keep coming, then the final one when the cell ends
        page.wait_for_function(f"""() => {{
            const l = document.querySelector('[data-testid=hydra-live]');
            return l && Number(l.dataset.step) > {step_seen};
        }}""", timeout=120_000)
        page.wait_for_function("""() => {
            const t = document.querySelector('[data-testid=hydra-live] .hydra-panel-title');
            return t && t.textContent.startsWith('Training cell finished');
        }""", timeout=180_000)
        assert page.locator("[data-testid=hydra-live-card]").count() == 2 * 2 * 5
        # the magic's progress bar (it appears once the cell has run a second): in a narrow window too, all its
        # text stays inside the output area (it wraps), none of it cut off
        page.set_viewport_size({"width": 640, "height": 1400})
        page.wait_for_timeout(500)  # JupyterLab lays itself out again
        bar = page.evaluate("""() => {
            const box = [...document.querySelectorAll('.jp-OutputArea-output .widget-hbox')]
                .find((b) => b.textContent.includes('hydra_track'));
            if (!box) return null;
            const text = box.lastElementChild, area = box.closest('.jp-OutputArea-output');
            const t = text.getBoundingClientRect(), a = area.getBoundingClientRect();
            return { text: text.textContent, right: t.right, areaRight: a.right, sh: text.scrollHeight,
                     ch: text.clientHeight, sw: text.scrollWidth, cw: text.clientWidth };
        }""")
        page.set_viewport_size({"width": 1700, "height": 1400})
        assert bar is not None, "no progress bar for a cell of several seconds"
        assert "samples/s" in bar["text"] and "written" in bar["text"], bar
        assert bar["right"] <= bar["areaRight"] + 1, f"the progress text runs past the output area: {bar}"
        assert bar["sh"] <= bar["ch"] + 1 and bar["sw"] <= bar["cw"] + 1, f"the progress text is cut: {bar}"
        # after the cell the explorer answers requests again
        page.locator("[data-testid=hydra-gallery-item]").nth(2).click()
        page.wait_for_selector("[data-testid=hydra-card]", timeout=120_000)
        _shot(page, screenshots, "06-live-after-training", page.locator("[data-testid=hydra-explorer]"))
    finally:
        page.close()
