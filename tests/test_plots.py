"""Training curves as SVG and the confusion matrix as PNG."""

import io
import xml.etree.ElementTree as ET

from fastapi.testclient import TestClient
from PIL import Image

from service.context import AppContext
from service.experiments.plots import trial_curves_svg
from service.jobs.history import epoch_rows
from service.jobs.plots import confusion_png, curves_svg, lr_find_svg
from tests.conftest import new_key
from tests.test_api import assert_error, ready_dataset, small_spec
from worker import jobs

SVG = "{http://www.w3.org/2000/svg}"


def svg_texts(svg: bytes) -> list[str]:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return ["".join(node.itertext()) for node in root.iter(f"{SVG}text")]


def epoch(global_epoch: int, stage: str, stage_index: int, loss: float) -> dict[str, object]:
    return {
        "stage": stage,
        "stage_index": stage_index,
        "epoch": global_epoch,
        "global_epoch": global_epoch,
        "train_loss": loss,
        "val_loss": loss + 0.1,
        "val_accuracy": 0.5,
        "learning_rates": {"head": 0.01},
        "seconds": 1.0,
    }


def test_curves_mark_stages_and_keep_the_latest_attempt_of_an_epoch() -> None:
    events = [
        epoch(1, "head", 0, 1.0),
        epoch(2, "head", 0, 0.9),
        epoch(2, "head", 0, 0.8),  # a resumed attempt ran epoch 2 again
        epoch(3, "all", 1, 0.5),
    ]
    assert [row["train_loss"] for row in epoch_rows(events)] == [1.0, 0.8, 0.5]
    texts = svg_texts(curves_svg(events, title="t"))
    assert "stage: head" in texts
    assert "stage: all" in texts
    assert {"train loss", "val loss", "val accuracy"} <= set(texts)
    assert "no epochs yet" in svg_texts(curves_svg([], title="t"))


HOSTILE_TEXTS = [
    "$\\undefinedmacro$",
    "$\\nope{$",
    "\u200f\u05e9\u05dc\u05d5\u05dd e\u0301 {} \\ $x^$",
    "$a{$" + "x\u0301" * 98,  # 200 characters, combining accents throughout
]
"""What matplotlib would read as (broken) math, right-to-left and combining characters."""

CLASS_NAMES = ["$a{$", "$^_$", "\u200f\u05e9\u05dc\u05d5\u05dd e\u0301 {} $" + "x" * 180]
"""Hostile class names an archive's folders may carry (a folder name holds no backslash)."""


def test_every_plot_draws_its_text_literally() -> None:
    svg = curves_svg(
        [epoch(1, HOSTILE_TEXTS[0], 0, 1.0), epoch(2, HOSTILE_TEXTS[1], 1, 0.5)],
        title=HOSTILE_TEXTS[2],
    )
    texts = svg_texts(svg)
    assert {f"stage: {HOSTILE_TEXTS[0]}", f"stage: {HOSTILE_TEXTS[1]}", HOSTILE_TEXTS[2]} <= set(
        texts
    )
    rows = [epoch(1, "head", 0, 1.0)]
    trials = svg_texts(
        trial_curves_svg([(text, "fine_tune", rows) for text in HOSTILE_TEXTS], title="t")
    )
    assert set(HOSTILE_TEXTS) <= set(trials)
    finding = {"stage": HOSTILE_TEXTS[1], "lrs": [1e-4, 1e-3], "losses": [1.0, 0.5]}
    finding |= {"suggestion_index": 1, "suggestion": 1e-3}
    assert HOSTILE_TEXTS[3] in svg_texts(lr_find_svg(finding, title=HOSTILE_TEXTS[3]))
    size = len(HOSTILE_TEXTS)
    matrix = [[int(row == column) for column in range(size)] for row in range(size)]
    png = confusion_png(matrix, HOSTILE_TEXTS, title=HOSTILE_TEXTS[0])
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_job_plots_over_http(client: TestClient, context: AppContext, auth: dict[str, str]) -> None:
    # Class names matplotlib would take for math: the confusion matrix draws them as written.
    dataset_id = ready_dataset(client, context, auth, classes=3, per_class=8, names=CLASS_NAMES)
    job = client.post("/v1/jobs", headers=auth, json=small_spec(dataset_id)).json()
    base = f"/v1/jobs/{job['id']}/plots"

    early = client.get(f"{base}/curves.svg", headers=auth)
    assert early.status_code == 200
    assert "no epochs yet" in svg_texts(early.content)
    assert_error(client.get(f"{base}/confusion.png", headers=auth), 409, "no_model_yet")

    jobs.execute(context, job_id=job["id"])
    curves = client.get(f"{base}/curves.svg", headers=auth)
    assert curves.headers["content-type"] == "image/svg+xml"
    texts = svg_texts(curves.content)
    assert "stage: head" in texts
    assert job["id"] in " ".join(texts)

    confusion = client.get(f"{base}/confusion.png", headers=auth)
    assert confusion.status_code == 200, confusion.text
    assert confusion.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(confusion.content))
    assert image.format == "PNG"
    assert image.size[0] >= 300
    assert image.size[1] >= 300

    other = new_key(context, "team-b")
    assert_error(client.get(f"{base}/curves.svg", headers=other), 404, "job_not_found")
    assert_error(client.get(f"{base}/confusion.png", headers=other), 404, "job_not_found")
