"""The web page in a real headless Chromium (Debian's `chromium`, driven by Playwright): the image the
page shows is the image the API returns for the same prompt, settings and seed."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import httpx
import pytest

from nextstep import NextStepPipeline

from .serving import STEPS, serve
from .test_serve import source_png

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed CI machine with no network and no display.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 # a name of an attacker's that resolves to this machine: DNS rebinding, with no DNS server
                 "--host-resolver-rules=MAP rebind.test 127.0.0.1"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def served():
    with serve(NextStepPipeline.from_pretrained(), api_key=None) as s:
        yield s


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page()
        browser.close()


def submit(page, url: str, prompt: str, n: int, seed: int | None = None, size: str = "",
           source: Path | None = None) -> None:
    """Open the page, fill the form like a user and press the button."""
    page.goto(url + "/")
    if source is not None:
        page.select_option("#mode", "edit")
        page.set_input_files("#source", str(source))
    page.fill("#prompt", prompt)
    page.fill("#n", str(n))
    page.fill("#seed", "" if seed is None else str(seed))
    page.fill("#size", size)
    page.fill("#steps", str(STEPS))
    page.click("#generate")


def shown_images(page) -> list[str]:
    return [src.removeprefix("data:image/png;base64,")
            for src in page.eval_on_selector_all("img.result", "els => els.map(e => e.src)")]


def test_the_page_generates_the_image_the_api_returns_for_that_seed(served, page):
    submit(page, served.url, "a blue square to the left of a red circle", n=2, seed=21)
    page.wait_for_function("document.querySelectorAll('img.result').length === 2", timeout=60_000)
    assert "2 of 2 images" in page.inner_text("#status")
    api = httpx.post(served.url + "/v1/images/generations", timeout=60,
                     json={"prompt": "a blue square to the left of a red circle", "n": 2, "seed": 21,
                           "steps": STEPS}).json()
    by_seed = {int(s): b for s, b in zip(page.eval_on_selector_all("img.result", "els => els.map(e => e.dataset.seed)"),
                                         shown_images(page))}
    assert by_seed == {d["seed"]: d["b64_json"] for d in api["data"]}
    assert base64.b64decode(by_seed[21])[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_edits_an_uploaded_image(served, page, tmp_path: Path):
    source = tmp_path / "source.png"
    source.write_bytes(source_png())
    submit(page, served.url, "make the red circle blue", n=1, seed=5, source=source)
    page.wait_for_selector("img.result", timeout=60_000)
    api = httpx.post(served.url + "/v1/images/edits", timeout=60,
                     data={"prompt": "make the red circle blue", "n": "1", "seed": "5", "steps": str(STEPS)},
                     files={"image": ("source.png", source.read_bytes(), "image/png")}).json()
    assert shown_images(page) == [api["data"][0]["b64_json"]]


def test_the_page_reports_errors(served, page):
    submit(page, served.url, "a circle", n=1, size="60x60")
    page.wait_for_function("document.querySelector('#status').classList.contains('error')", timeout=30_000)
    assert "multiple of" in page.inner_text("#status")


def test_a_rebound_name_gets_nothing(served, page):
    """A page at http://rebind.test:PORT reaches our socket, but its Host names the attacker's domain."""
    response = page.goto(served.url.replace("127.0.0.1", "rebind.test") + "/")
    assert response.status == 421 and "<form" not in page.content()


def test_a_form_from_another_origin_is_refused(served, page):
    """http://localhost:PORT is another origin than http://127.0.0.1:PORT: its "simple" form POST to
    the edits route (no preflight) is refused, and no image is made."""
    images = served.engine.images
    page.goto(served.url.replace("127.0.0.1", "localhost") + "/")
    with page.expect_navigation() as navigation:
        page.evaluate("""url => {
            const form = Object.assign(document.createElement("form"),
                                       {method: "POST", action: url, enctype: "multipart/form-data"});
            const prompt = Object.assign(document.createElement("input"), {name: "prompt", value: "a circle"});
            form.appendChild(prompt);
            document.body.appendChild(form);
            form.submit();
        }""", served.url + "/v1/images/edits")
    assert navigation.value.status == 403 and "origin_refused" in page.content()
    assert served.engine.images == images
