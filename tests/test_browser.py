"""The dashboard in a real browser (Debian's chromium driven by Playwright): sign in, upload a
dataset, start a job, watch its curves update live, classify an image on the predict page; and
classify strings typed into the predict page's text box with a text model.

Screenshots go to test-artifacts/. Without Playwright or a browser the test skips, or fails
under THAW_REQUIRE_SERVICES=1 (CI installs chromium in .ci/run)."""

import csv
import io
import re
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import digits_split, service_absent, zip_of_classes
from tests.processes import poll
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


def load_playwright() -> Any:
    try:
        import playwright.sync_api as api
    except ImportError as exc:
        service_absent(f"Playwright cannot be imported: {exc}")
    if not CHROMIUM.exists():
        service_absent(f"no browser at {CHROMIUM} (apt-get install chromium)")
    return api


def test_dashboard_end_to_end(server: Server, tmp_path: Path) -> None:
    playwright_api = load_playwright()
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
        # freeze_unfreeze: its solved head takes one epoch, the unfreeze stage the other (a
        # solved feature_extraction would take one epoch whatever `epochs` says).
        page.select_option("#new-job select[name=strategy]", "freeze_unfreeze")
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


TEXT_ROWS_PER_CLASS = 12
FIXTURE = Path(__file__).parent / "fixtures" / "debian_descriptions.csv"


def train_text_model(server: Server, model: str) -> None:
    """A small text model made over the API (the dataset and job pages are the image test's):
    minilm_l6's frozen features and a head, on a few Debian descriptions per section."""
    with FIXTURE.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept: dict[str, int] = {}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    for row in rows:
        if kept.get(row["label"], 0) < TEXT_ROWS_PER_CLASS:
            kept[row["label"]] = kept.get(row["label"], 0) + 1
            writer.writerow([row["text"], row["label"]])
    headers = {"Authorization": f"Bearer {server.key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        upload = client.post("/v1/datasets", files={"file": ("debian.csv", out.getvalue())})
        assert upload.status_code == 202, upload.text
        dataset = poll(client, f"/v1/datasets/{upload.json()['id']}", {"ready", "failed"}, 300)
        assert dataset["status"] == "ready", dataset
        spec = {
            "dataset": dataset["id"],
            "model": model,
            "base_model": "minilm_l6",
            "strategy": "feature_extraction",
            "epochs": 2,
            "max_length": 16,
        }
        job = client.post("/v1/jobs", json=spec)
        assert job.status_code == 201, job.text
        done = poll(client, f"/v1/jobs/{job.json()['id']}", {"succeeded", "failed"}, 600)
        assert done["status"] == "succeeded", done


def test_predict_page_classifies_typed_text(server: Server) -> None:
    api = load_playwright()
    train_text_model(server, "browser-text")
    ARTIFACTS.mkdir(exist_ok=True)
    texts = ["multiplayer space shooter game", "IMAP mail server with spam filtering"]

    with api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.set_default_timeout(120_000)
        expect = api.expect
        expect.set_options(timeout=120_000)
        page.goto(f"{server.url}/ui/login")
        page.fill("input[name=api_key]", server.key)
        page.click("button[type=submit]")
        expect(page).to_have_url(re.compile(r"/ui/jobs$"))

        page.goto(f"{server.url}/ui/predict")
        page.select_option("#predict select[name=version]", label="browser-text v1")
        # A text model shows the text box in place of the image input.
        expect(page.locator("#texts-box")).to_be_visible()
        expect(page.locator("#drop")).to_be_hidden()
        page.fill("#predict textarea[name=texts]", "\n".join(texts))
        page.click("#predict button[type=submit]")
        result = page.locator("#result")
        # One title and one table per string, in the order typed: header + top 3 each.
        expect(result.locator("h3")).to_have_text([f"{t} → browser-text v1" for t in texts])
        expect(result.locator("tr")).to_have_count(2 * 4)
        expect(page.locator("#predict-error")).to_have_text("")
        page.screenshot(path=str(ARTIFACTS / "predict-text.png"), full_page=True)
        browser.close()
