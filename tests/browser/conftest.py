"""End-to-end fixtures: a Jupyter server on 127.0.0.1 in a throw-away HOME that serves JupyterLab and Notebook 7,
Debian's Chromium driven by Playwright.

Nothing is downloaded: Chromium is ``/usr/bin/chromium`` (``apt-get install chromium``; override
with ``HYDRA_CHROMIUM``) and Playwright only provides its driver. A missing browser, Playwright or
JupyterLab is a test failure, not a skip: CI must install them (``scripts/test.sh`` does).

Screenshots go to ``HYDRA_SCREENSHOTS`` (default ``build/browser-screenshots``); the folder is
printed at the end of the run. ``HYDRA_UPDATE_DOCS=1`` also refreshes the README's screenshots
(``docs/explorer.png``, ``docs/explorer-tabular.png``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = Path(__file__).parent / "notebooks"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SCREENSHOTS = Path(os.environ.get("HYDRA_SCREENSHOTS", REPO / "build" / "browser-screenshots")).resolve()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.browser)


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: end-to-end test in JupyterLab and Chromium (deselect with -m 'not browser')")


def pytest_terminal_summary(terminalreporter):
    if SCREENSHOTS.exists() and any(SCREENSHOTS.iterdir()):
        terminalreporter.write_sep("-", "browser screenshots")
        terminalreporter.write_line(f"screenshots saved in {SCREENSHOTS}")


def publish_screenshot(shot: Path, name: str) -> None:
    """With ``HYDRA_UPDATE_DOCS=1``, copy a screenshot to ``docs/<name>`` as a small PNG (64 colours, no dithering:
    a UI's flat colours survive, and the file is a third of the size)."""
    if os.environ.get("HYDRA_UPDATE_DOCS") != "1":
        return
    from PIL import Image  # a dependency of matplotlib

    image = Image.open(shot).convert("RGB")
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        REPO / "docs" / name, optimize=True)


def _chromium() -> str:
    path = os.environ.get("HYDRA_CHROMIUM", "/usr/bin/chromium")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"Chromium not found at {path}: install it with `apt-get update && apt-get install -y chromium` "
                    "(scripts/test.sh does), or set HYDRA_CHROMIUM. Browser tests never download a browser.")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """A JupyterLab server: yields (base URL, root folder holding copies of the test notebooks)."""
    try:
        import jupyterlab  # noqa: F401  (only whether it is installed)
    except ImportError:
        pytest.fail("JupyterLab is not installed: pip install -e '.[browser]'.")
    try:
        import notebook  # noqa: F401  (Notebook 7 is served by the same server, at /notebooks/)
    except ImportError:
        pytest.fail("Jupyter Notebook 7 is not installed: pip install -e '.[browser]'.")
    home = tmp_path_factory.mktemp("jupyter_home")
    root = tmp_path_factory.mktemp("notebooks")
    for nb in NOTEBOOKS.glob("*.ipynb"):
        shutil.copy(nb, root / nb.name)
    env = dict(os.environ, HOME=str(home), JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_DATA_DIR=str(home / "data"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               IPYTHONDIR=str(home / "ipython"), MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    # no "get notified about Jupyter news?" toast over the widgets
    settings = home / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port = _free_port()
    log = open(home / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
         "--ServerApp.password=", "--LabApp.expose_app_in_browser=True",
         "--JupyterNotebookApp.expose_app_in_browser=True", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status", timeout=2).read()
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log.close()
                pytest.fail("JupyterLab did not start:\n" + (home / "lab.log").read_text()[-4000:])
            time.sleep(0.5)
    try:
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def browser():
    path = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: pip install -e '.[browser]' (its driver only; no browser download).")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def open_notebook(browser, lab, name: str, timeout_s: float = 180, ui: str = "lab"):
    """Open a notebook in a fresh page and start running all its cells; returns the page at once.

    ``ui``: "lab" (JupyterLab, ``/lab/tree/NAME``) or "notebook" (Notebook 7, ``/notebooks/NAME``); both expose
    their application as ``window.jupyterapp`` and run cells with the same commands.
    """
    url, _root = lab
    page = browser.new_page(viewport={"width": 1700, "height": 1400})
    page.set_default_timeout(60_000)
    page.goto(f"{url}/lab/tree/{name}?reset" if ui == "lab" else f"{url}/notebooks/{name}")
    page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')",
                           timeout=120_000)
    page.wait_for_function("""() => {
        const w = window.jupyterapp.shell.currentWidget;
        return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
            && w.sessionContext.session.kernel.status === 'idle';
    }""", timeout=120_000)
    # the notebook's sticky toolbar would cover the top of element screenshots
    page.add_style_tag(content=".jp-NotebookPanel-toolbar { display: none !important; }")
    # not awaited: the command's promise resolves only when every cell has finished
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    return page


# -- layout checks ------------------------------------------------------------------------------------
# Every element matching the selectors, as the quadrilateral it covers on screen: an HTML element's box (its text is
# clipped to it: ellipsis), an SVG text's own box carried through its transform (a turned label is a turned box, not
# its axis-aligned hull). Two quads overlap when no separating axis exists (more than half a pixel deep).
_QUADS = """(selectors) => {
    const quads = [];
    for (const sel of selectors) for (const el of document.querySelectorAll(sel)) {
        if (!el.getClientRects().length) continue;                      // not displayed (hidden tab, display: none)
        let pts;
        if (el instanceof SVGGraphicsElement) {
            const b = el.getBBox(), m = el.getScreenCTM();
            if (!b.width || !b.height) continue;
            pts = [[b.x, b.y], [b.x + b.width, b.y], [b.x + b.width, b.y + b.height], [b.x, b.y + b.height]]
                .map(([x, y]) => [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f]);
        } else {
            const r = el.getBoundingClientRect();
            if (!r.width || !r.height) continue;
            pts = [[r.left, r.top], [r.right, r.top], [r.right, r.bottom], [r.left, r.bottom]];
        }
        quads.push({ text: el.textContent, sel, pts });
    }
    const normals = (p) => [0, 1].map((i) => {
        const dx = p[i + 1][0] - p[i][0], dy = p[i + 1][1] - p[i][1], n = Math.hypot(dx, dy) || 1;
        return [-dy / n, dx / n];
    });
    const span = (p, n) => { const v = p.map((q) => q[0] * n[0] + q[1] * n[1]); return [Math.min(...v), Math.max(...v)]; };
    const overlap = (p, q) => [...normals(p), ...normals(q)].every((n) => {
        const [a0, a1] = span(p, n), [b0, b1] = span(q, n);
        return Math.min(a1, b1) - Math.max(a0, b0) > 0.5;
    });
    const bad = [];
    for (let i = 0; i < quads.length; i++) for (let j = i + 1; j < quads.length; j++)
        if (overlap(quads[i].pts, quads[j].pts)) bad.push(`${quads[i].sel} ${JSON.stringify(quads[i].text)} x ` +
                                                           `${quads[j].sel} ${JSON.stringify(quads[j].text)}`);
    return { count: quads.length, bad };
}"""

# Elements of `selector` whose box leaves the box of their closest `container` (text spilling into a neighbour).
_SPILLS = """([selector, container]) => {
    const out = [];
    for (const el of document.querySelectorAll(selector)) {
        const box = el.closest(container);
        if (!box || !el.getClientRects().length) continue;
        const a = el.getBoundingClientRect(), b = box.getBoundingClientRect();
        if (a.left < b.left - 0.5 || a.right > b.right + 0.5 || a.top < b.top - 0.5 || a.bottom > b.bottom + 0.5)
            out.push(el.textContent);
    }
    return out;
}"""


def text_overlaps(page, selectors) -> tuple[int, list[str]]:
    """(how many text boxes were checked, the pairs of them that overlap on screen)."""
    result = page.evaluate(_QUADS, list(selectors))
    return result["count"], result["bad"]


def spills(page, selector: str, container: str) -> list[str]:
    """Texts of ``selector`` elements that reach outside their closest ``container``."""
    return page.evaluate(_SPILLS, [selector, container])


def border_colours(page, selector: str) -> set[str]:
    """The computed top border colours of the elements of ``selector``."""
    return set(page.evaluate("(sel) => [...document.querySelectorAll(sel)].map((e) => getComputedStyle(e).borderTopColor)",
                             selector))


def cut_texts(page, selector: str) -> list[str]:
    """Texts of ``selector`` elements that do not fit their box (an ellipsis hides part of them)."""
    return page.evaluate("(sel) => [...document.querySelectorAll(sel)].filter((e) => e.clientWidth > 0 && "
                         "e.scrollWidth > e.clientWidth + 1).map((e) => e.textContent)", selector)
