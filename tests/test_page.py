"""The live web page in a real browser (Debian's chromium driven by Playwright): type a prompt, see the
image refine, change the step count."""

import shutil

import pytest

from .helpers import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (Debian package 'chromium'; `make test` installs it as root)",
                allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tiny_sd_dir):
    srv = ServerProcess("--model", tiny_sd_dir, "--device", "cpu")
    srv.wait_ready("/readyz")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(server.url + "/")
        yield page
        browser.close()


def test_typing_a_prompt_shows_the_image_refining(page, tmp_path):
    img = page.locator("#image")
    expect(page.locator("#state")).to_have_text("connected", timeout=30_000)
    page.select_option("#steps", "2")
    page.fill("#seed", "7")
    page.locator("#prompt").press_sequentially("a red circle", delay=20)
    expect(img).to_have_attribute("data-steps", "2", timeout=30_000)
    expect(img).to_have_attribute("data-step", "2", timeout=30_000)
    expect(page.locator("#state")).to_contain_text("done (seed 7)", timeout=30_000)
    expect(page.locator("#latency")).to_contain_text("ms")
    assert img.evaluate("el => el.naturalWidth") == 32  # the tiny model's native size
    # shown many times its size: nearest-neighbour scaling, not a blurred blow-up
    assert img.evaluate("el => getComputedStyle(el).imageRendering") == "pixelated"
    first_src = img.get_attribute("src")

    page.select_option("#steps", "4")
    expect(img).to_have_attribute("data-steps", "4", timeout=30_000)
    expect(img).to_have_attribute("data-step", "4", timeout=30_000)
    assert img.get_attribute("src") != first_src
    page.select_option("#steps", "auto")  # no latency target on this server: auto means the most steps
    expect(page.locator("#state")).to_contain_text("done (seed 7)", timeout=30_000)
    expect(img).to_have_attribute("data-steps", "4", timeout=30_000)
    page.screenshot(path=str(tmp_path / "page.png"))


def test_errors_are_shown_not_swallowed(page):
    page.fill("#prompt", "a red circle " * 40)  # too many tokens for the text encoder
    expect(page.locator("#state")).to_contain_text("tokens", timeout=30_000)
    expect(page.locator("#state")).to_have_class("error")
