"""Every kind of data reads well, in JupyterLab and in Notebook 7.

``notebooks/tabular.ipynb`` tracks an MLP on scikit-learn's breast-cancer table (30 named features, classes
"malignant"/"benign") with ``%%hydra_track`` and explores it with the data as pandas objects. Checked on screen:
no two labels overlap (boxes measured in the browser, turned SVG labels as turned boxes), no label spills out
of its tile or card, the cards name their features, colours mean one thing each (helpful green, harmful red,
suspects amber), and each view says which mode its numbers come from. The digits notebook opens in
Notebook 7 too: the explorer renders there and answers a click.
"""

from __future__ import annotations

import pytest

from .conftest import border_colours, cut_texts, open_notebook, publish_screenshot, spills, text_overlaps

LABELS = (".hydra-gallery-label", ".hydra-gallery-index", ".hydra-card-label", ".hydra-card-score",
          ".hydra-feature-name", ".hydra-feature-value", ".hydra-feature-z", ".hydra-selected-title",
          ".hydra-rank", "[data-testid=hydra-heatmap-label]", ".hydra-axis-label")
GOOD, BAD, SUSPECT = "rgb(26, 150, 65)", "rgb(215, 48, 31)", "rgb(224, 142, 11)"  # js/src/style.css


def _feature_names() -> set[str]:
    from sklearn.datasets import load_breast_cancer

    return {str(n) for n in load_breast_cancer().feature_names}


@pytest.fixture(scope="module")
def tabular_page(browser, lab):
    page = open_notebook(browser, lab, "tabular.ipynb")
    page.wait_for_selector("[data-testid=hydra-gallery-item]", timeout=240_000)
    yield page
    page.close()


def test_tabular_rows_read_as_named_features(tabular_page, screenshots):
    page = tabular_page
    items = page.locator("[data-testid=hydra-gallery-item]")
    assert items.count() >= 40
    first = items.first
    assert first.locator(".hydra-gallery-index").inner_text().startswith("#")
    assert "\u2192" in first.locator(".hydra-gallery-label").inner_text()  # true → predicted
    assert "mean radius = " in first.get_attribute("title")  # the whole row on hover
    assert spills(page, ".hydra-gallery-label, .hydra-gallery-index", ".hydra-gallery-item") == []
    assert cut_texts(page, ".hydra-gallery-label") == []  # "malignant→benign" whole, or both names shortened to fit

    wrong = page.locator("[data-testid=hydra-gallery-item].is-wrong")
    target = wrong.first if wrong.count() else items.nth(3)
    target.click()
    page.wait_for_selector("[data-testid=hydra-card]", timeout=120_000)
    page.wait_for_function("() => document.querySelectorAll('[data-testid=hydra-card]').length === 12")

    # named features: the cards' and the selected row's tables name real columns, most unusual first
    names = page.eval_on_selector_all(".hydra-card .hydra-feature-name", "els => els.map(e => e.textContent)")
    assert len(names) == 12 * 4 and set(names) <= _feature_names()
    visible = page.eval_on_selector_all(".hydra-card .hydra-feature-name",
                                        "els => els.every(e => e.getBoundingClientRect().width > 20)")
    assert visible
    z = page.eval_on_selector_all("[data-testid=hydra-card]:first-child .hydra-feature-z",
                                  "els => els.map(e => Math.abs(parseFloat(e.textContent.replace('\u2212', '-'))))")
    assert z == sorted(z, reverse=True)
    selected = page.locator("[data-testid=hydra-selected] [data-testid=hydra-features]")
    assert selected.count() == 1 and selected.locator(".hydra-feature-name").first.inner_text() in _feature_names()
    assert "mean radius = " in page.locator("[data-testid=hydra-card] [data-testid=hydra-features]").first \
        .get_attribute("title")

    # colour per group
    assert border_colours(page, "[data-testid=hydra-card][data-group=helpful]") == {GOOD}
    assert border_colours(page, "[data-testid=hydra-card][data-group=harmful]") == {BAD}

    shot = screenshots / "07-tabular-cards.png"
    page.locator("[data-testid=hydra-explorer]").screenshot(path=str(shot))
    publish_screenshot(shot, "explorer-tabular.png")

    # the mode its numbers come from, and the measured figure behind the caveat
    mode = page.locator(".hydra-rankings-view [data-testid=hydra-mode]")
    assert mode.get_attribute("data-mode") == "fast"
    assert "fast estimate: may disagree with exact at large learning rates" in mode.inner_text()
    mode.locator("[data-testid=hydra-mode-link]").click()
    assert "benchmarks/RESULTS.md" in mode.locator("[data-testid=hydra-mode-figure]").inner_text()

    count, bad = text_overlaps(page, LABELS)
    assert count > 150 and bad == [], bad[:5]
    assert spills(page, ".hydra-card-label, .hydra-card-score, .hydra-feature-name, .hydra-feature-value, "
                        ".hydra-feature-z", ".hydra-card") == []


def test_tabular_training_tab_labels_and_suspects(tabular_page, screenshots):
    page = tabular_page
    page.click("[data-testid=hydra-tab-training]")
    page.wait_for_selector("[data-testid=hydra-self-card]", timeout=120_000)
    heat = page.wait_for_selector("[data-testid=hydra-heatmap]", timeout=120_000)
    labels = page.eval_on_selector_all("[data-testid=hydra-heatmap-label]", "els => els.map(e => e.textContent)")
    assert labels.count("malignant") == 2 and labels.count("benign") == 2  # rows and columns, named
    assert heat.get_attribute("data-turn") == "-45"  # "malignant" is wider than its cell: turned, not run together
    scores = page.eval_on_selector_all("[data-testid=hydra-self-card]", "els => els.map(e => Number(e.dataset.score))")
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert border_colours(page, "[data-testid=hydra-self-card]:not(.hydra-card--plain)") == {SUSPECT}
    assert page.locator("[data-testid=hydra-self-card].hydra-card--helpful").count() == 0  # a suspect is no help
    count, bad = text_overlaps(page, LABELS)
    assert count > 100 and bad == [], bad[:5]
    page.locator("[data-testid=hydra-explorer]").screenshot(path=str(screenshots / "08-tabular-training.png"))


def test_notebook7_renders_the_explorer_and_answers_a_click(browser, lab, screenshots):
    """The digits notebook in Notebook 7 (a copy with its own store, so that it runs beside the JupyterLab tests)."""
    _url, root = lab
    text = (root / "explorer.ipynb").read_text().replace("runs/digits.zarr", "runs/digits_nb7.zarr")
    (root / "explorer_nb7.ipynb").write_text(text)
    page = open_notebook(browser, lab, "explorer_nb7.ipynb", ui="notebook")
    try:
        assert page.evaluate("() => window.jupyterapp.name") == "Jupyter Notebook"
        assert "/notebooks/explorer_nb7.ipynb" in page.url
        page.wait_for_selector("[data-testid=hydra-gallery-item]", timeout=240_000)
        items = page.locator("[data-testid=hydra-gallery-item]")
        assert items.count() >= 40 and "\u2192" in items.first.inner_text()
        items.nth(5).click()
        page.wait_for_function("() => document.querySelectorAll('[data-testid=hydra-card]').length === 16",
                               timeout=120_000)
        assert page.locator("[data-testid=hydra-selected]").inner_text().startswith("Test sample #5")
        assert border_colours(page, "[data-testid=hydra-card][data-group=helpful]") == {GOOD}
        count, bad = text_overlaps(page, LABELS)
        assert count > 50 and bad == [], bad[:5]
        page.locator("[data-testid=hydra-explorer]").screenshot(path=str(screenshots / "09-notebook7.png"))
    finally:
        page.close()
