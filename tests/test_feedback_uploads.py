"""An update's training items become an upload of the model's modality (`Modality.upload`):
read back by the real ingester with every item under its label, whether it came as captured
bytes or as a dataset's item."""

import io
from pathlib import Path

from PIL import Image

from service.datasets.ingest import ingest_upload, iter_text_rows
from worker.engine.modalities import modality_for


def _png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (shade, shade, shade)).save(buffer, "PNG")
    return buffer.getvalue()


def test_image_items_captured_or_from_a_dataset_ingest_under_their_labels(tmp_path: Path) -> None:
    dataset_item = tmp_path / "dark.png"
    dataset_item.write_bytes(_png(10))
    items = [("light", _png(250)), ("light", _png(240)), ("dark", dataset_item), ("dark", _png(5))]

    data, filename = modality_for("image").upload(items)
    (tmp_path / filename).write_bytes(data)
    result = ingest_upload(tmp_path / filename, tmp_path / "files", val_fraction=0.25)

    assert result.modality == "image"
    assert result.skipped == []
    assert {label: counts["total"] for label, counts in result.class_counts.items()} == {
        "dark": 2,
        "light": 2,
    }


def test_text_items_captured_or_from_a_dataset_ingest_under_their_labels(tmp_path: Path) -> None:
    items = [
        ("spam", b'win "big", now'),
        ("spam", "free money,\non a second line"),
        ("ham", b"see you at noon"),
        ("ham", "the minutes, attached"),
    ]

    data, filename = modality_for("text").upload(items)
    (tmp_path / filename).write_bytes(data)
    result = ingest_upload(tmp_path / filename, tmp_path / "files", val_fraction=0.25)

    assert result.modality == "text"
    rows = list(iter_text_rows(tmp_path / "files", result.shards))
    read = {(row.text, result.classes[row.label or 0]) for row in rows}
    assert read == {
        ('win "big", now', "spam"),
        ("free money,\non a second line", "spam"),
        ("see you at noon", "ham"),
        ("the minutes, attached", "ham"),
    }
