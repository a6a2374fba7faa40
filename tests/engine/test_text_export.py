"""A trained text model as an exported folder: weights, config.json with its tokenization,
the tokenizer files, and model.onnx (input_ids, attention_mask) that ONNX Runtime computes as
PyTorch does; the predictor reads texts exactly as training did and reports truncation."""

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from tests.engine.test_text_train import debian_texts
from worker.engine import Predictor, TextSample, TrainingResult, TransferConfig, compile_plan, run
from worker.engine.artifacts import ONNX_OUTPUT, ONNX_TEXT_INPUTS, read_model_config
from worker.engine.export import export_model
from worker.engine.modalities.text.exported import ExportedTextPreprocessing
from worker.engine.modalities.text.tokens import pad
from worker.engine.onnx_export import PARITY_TOLERANCE, export_text_onnx

LONG = "a free software implementation of the classic game " * 20


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainingResult]:
    train, classes = debian_texts(6)
    val, _ = debian_texts(2, skip=6)
    plan = compile_plan(
        TransferConfig(
            base_model="minilm_l6",
            strategy="feature_extraction",
            num_classes=len(classes),
            max_length=24,
            truncation="head_tail",
            epochs=3,
            lr=0.01,
        )
    )
    result = run(plan, train=train, val=val, classes=classes)
    folder = tmp_path_factory.mktemp("text-model")
    export_model(result, plan, folder)
    return folder, result


def test_the_folder_holds_weights_config_and_tokenizer(
    exported: tuple[Path, TrainingResult],
) -> None:
    folder, _ = exported
    names = {path.name for path in folder.iterdir()}
    assert {"weights.safetensors", "config.json", "tokenizer.json"} <= names
    config = read_model_config(folder)
    assert config.modality == "text"
    text = ExportedTextPreprocessing.of(config)
    assert (text.max_length, text.truncation, text.pooling) == (
        24,
        "head_tail",
        "mean",
    )
    assert text.encoder["num_hidden_layers"] == 6
    assert config.labels[0] == "database"


def test_predictor_reads_texts_as_training_did_and_reports_truncation(
    exported: tuple[Path, TrainingResult],
) -> None:
    folder, result = exported
    predictor = Predictor.load(folder)
    texts = ["PostgreSQL extension for full text search", LONG]
    answers = predictor.predict(texts, top_k=2)
    ids_read, notes = predictor.served.read(texts)
    assert [note["truncated"] for note in notes] == [False, True]
    top = answers[0]
    # The same weights in memory give the same probabilities as the loaded folder.
    ids, mask = pad(ids_read, 0)
    batch = torch.stack([torch.from_numpy(ids), torch.from_numpy(mask)], dim=1)
    result.model.eval()
    with torch.no_grad():
        # Predict answers probabilities calibrated by the temperature fitted at the end of training.
        assert result.calibration is not None
        expected = (result.model(batch) / result.calibration.temperature).softmax(dim=1)
    assert answers[1][0][1] == pytest.approx(float(expected[1].max()), abs=1e-6)
    # Each text's top label is the in-memory model's (the solved head, chosen on two texts a
    # class of validation, need not call this one `database`).
    labels = read_model_config(folder).labels
    assert top[0][0] == labels[int(expected[0].argmax())]
    with pytest.raises(ValueError, match="takes texts, not Image"):
        predictor.predict([Image.new("RGB", (8, 8))], top_k=1)


def test_onnx_matches_pytorch_on_real_padded_texts(
    exported: tuple[Path, TrainingResult], tmp_path: Path
) -> None:
    folder, result = exported
    onnx_path = tmp_path / "model.onnx"

    report = export_text_onnx(result.model, vocab_size=30522, max_length=24, out_path=onnx_path)

    assert report.exported, report.reason
    assert report.max_abs_diff is not None
    assert report.max_abs_diff < PARITY_TOLERANCE
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(ONNX_TEXT_INPUTS)
    predictor = Predictor.load(folder)
    samples: list[TextSample] = debian_texts(3, skip=40)[0]
    texts = [sample.text for sample in samples] + [LONG]
    ids, mask = pad(predictor.served.read(texts)[0], 0)
    (logits,) = session.run([ONNX_OUTPUT], {"input_ids": ids, "attention_mask": mask})
    onnx_probabilities = torch.from_numpy(np.asarray(logits)).softmax(dim=1)
    batch = torch.stack([torch.from_numpy(ids), torch.from_numpy(mask)], dim=1)
    with torch.no_grad():
        torch_probabilities = predictor.model(batch).softmax(dim=1)
    assert ids.shape == (len(texts), 24)  # padded to the longest, the truncated one
    assert float((onnx_probabilities - torch_probabilities).abs().max()) < PARITY_TOLERANCE
