"""The dashboard in a real browser (Debian's chromium driven by Playwright): sign in, upload a
dataset, start a job, watch its curves update live, classify an image on the predict page.

Screenshots go to test-artifacts/. Without Playwright or a browser the test skips, or fails
under THAW_REQUIRE_SERVICES=1 (CI installs chromium in .ci/run)."""

import re
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_SERVICES, digits_split, zip_of_classes
from tests.test_cli import Server, server

__all__ = ["server"]  # the live-server fixture, one per module

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def browser_missing(message: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (THAW_REQUIRE_SERVICES=1)")
    pytest.skip(message)


def test_dashboard_end_to_end(server: Server, tmp_path: Path) -> None:
    try:
        import playwright.sync_api as playwright_api
    except ImportError as exc:
        browser_missing(f"Playwright cannot be imported: {exc}")
    if not CHROMIUM.exists():
        browser_missing(f"no browser at {CHROMIUM} (apt-get install chromium)")
    pool, _ = digits_split()
    archive = tmp_path / "browser-digits.zip"
    archive.write_bytes(zip_of_classes([item for item in pool if item[1] < 3][:45]))
    image = next(server.folder.rglob("*.png"))
    ARTIFACTS.mkdir(exist_ok=True)

    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.set_default_timeout(120_000)
        expect = playwright_api.expect
        expect.set_options(timeout=120_000)

        page.goto(f"{server.url}/ui/jobs")
        expect(page).to_have_url(re.compile(r"/ui/login$"))
        page.fill("input[name=api_key]", "thaw_not-a-key")
        page.click("button[type=submit]")
        expect(page.locator("#login-error")).to_be_visible()
        page.fill("input[name=api_key]", server.key)
        page.click("button[type=submit]")
        expect(page).to_have_url(re.compile(r"/ui/jobs$"))

        page.goto(f"{server.url}/ui/datasets")
        page.set_input_files("#upload input[type=file]", str(archive))
        page.fill("#upload input[name=name]", "browser-digits")
        page.click("#upload button[type=submit]")
        section = page.locator("section", has_text="browser-digits")
        expect(section.locator(".status-ready")).to_be_visible()
        expect(section.locator("tr", has_text="digit_2")).to_be_visible()

        page.goto(f"{server.url}/ui/jobs")
        page.select_option("#new-job select[name=dataset]", label="browser-digits (45 images)")
        page.fill("#new-job input[name=model]", "browser-digits")
        page.fill("#new-job input[name=epochs]", "2")
        page.click("#new-job button[type=submit]")
        expect(page).to_have_url(re.compile(r"/ui/jobs/job_"))
        # The curves image is re-fetched on each epoch event from the live stream.
        expect(page.locator("#curves")).to_have_attribute("data-epochs", "2", timeout=240_000)
        expect(page.locator("#status")).to_have_text("succeeded")
        expect(page.locator("#log")).to_contain_text("epoch")
        expect(page.locator("#confusion-box img")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "job.png"), full_page=True)

        page.goto(f"{server.url}/ui/models")
        expect(page.locator("h1", has_text="browser-digits")).to_be_visible()

        page.goto(f"{server.url}/ui/predict")
        page.select_option("#predict select[name=version]", label="browser-digits v1")
        page.set_input_files("#predict input[type=file]", str(image))
        page.click("#predict button[type=submit]")
        expect(page.locator("#prediction tr")).to_have_count(4)  # header + top 3
        page.screenshot(path=str(ARTIFACTS / "predict.png"), full_page=True)

        page.click("text=Sign out")
        expect(page).to_have_url(re.compile(r"/ui/login$"))
        page.goto(f"{server.url}/ui/jobs")
        expect(page).to_have_url(re.compile(r"/ui/login$"))
        browser.close()
