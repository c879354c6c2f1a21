"""The draw page in a real headless Chromium (Debian's, driven by Playwright), as a person uses it:
draw a digit with the mouse, see the prediction and what the model saw, clear, and read the API docs,
all without a single request leaving the server.

`bash scripts/dev.sh test` installs chromium with apt-get when it is missing; Playwright's own
browser download is never used. Set MNISTLAB_SCREENSHOT_DIR to also keep the screenshot there.
"""
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found:
        return found
    reason = "no chromium on this machine; `bash scripts/dev.sh test` installs it (apt-get install chromium, as root)"
    if os.environ.get("CI"):
        pytest.fail(reason)  # CI must run this test, never skip it
    pytest.skip(reason)


@pytest.fixture
def browser_page(live_server, tmp_path):
    """A page in a fresh Chromium profile that may talk to the live server only: every other
    request is refused and recorded, so a page that needs the internet fails the test."""
    from playwright.sync_api import sync_playwright
    executable = chromium_path()
    outside = []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1000, "height": 640})

        def only_the_server(route):
            if route.request.url.startswith(live_server + "/"):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", only_the_server)
        page = context.pages[0] if context.pages else context.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        yield page, outside, errors
        context.close()


def draw(page, points, steps=8):
    """A mouse stroke through `points`, given as fractions of the canvas's width and height."""
    box = page.locator("#pad").bounding_box()
    at = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for point in at[1:]:
        page.mouse.move(*point, steps=steps)
    page.mouse.up()


def wait_for_label(page, label: str):
    """The prediction shows `label`, with its bar on top and the 28x28 image shown."""
    page.wait_for_function(f"document.getElementById('label').textContent === {label!r}", timeout=15000)
    assert page.locator("#seen").get_attribute("src").startswith("data:image/png;base64,")
    assert page.locator("#bars .cls.top").inner_text() == label


def test_draw_a_digit_and_see_the_prediction(browser_page, live_server, tmp_path):
    page, outside, errors = browser_page
    page.goto(live_server + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('seed003')")
    assert page.locator("#bars .cls").all_inner_texts() == list("0123456789")
    assert page.locator("#label").inner_text() == "?"

    draw(page, [(0.52, 0.18), (0.5, 0.5), (0.48, 0.84)])  # a "1", top to bottom
    wait_for_label(page, "1")
    percent = float(page.locator("#confidence").inner_text().split("%")[0])
    assert 50 < percent <= 100
    page.wait_for_function("document.getAnimations().length === 0")  # the bars have grown to their values
    shot = tmp_path / "draw-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MNISTLAB_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["MNISTLAB_SCREENSHOT_DIR"]) / "screenshot.png")

    page.click("#clear")
    assert page.locator("#label").inner_text() == "?"
    assert page.locator("#seen").get_attribute("src") == ""
    assert page.locator("#bars .top").count() == 0

    draw(page, [(0.25, 0.22), (0.75, 0.22), (0.45, 0.85)], steps=12)  # a "7": the bar, then the diagonal
    wait_for_label(page, "7")
    assert outside == [] and errors == []


def test_api_docs_render_offline(browser_page, live_server):
    page, outside, errors = browser_page
    page.goto(live_server + "/docs")
    page.wait_for_selector("#operations-default-predict_predict_post", timeout=15000)
    assert page.locator(".opblock-summary-path").all_inner_texts() == ["/health", "/model", "/predict"]
    assert outside == [] and errors == []
    assert urlsplit(page.url).path == "/docs"
