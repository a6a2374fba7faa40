"""Text transfer end to end over HTTP against real processes (`thaw serve`: the API, an embedded
worker, SQLite and the folder broker), on real text that nobody here wrote.

Uploads the Debian package descriptions (tests/fixtures/debian_descriptions.csv) minus a
stratified quarter, fine-tunes the pretrained all-MiniLM-L6-v2 encoder (`minilm_l6`), predicts
the held-out quarter through the predict endpoint with strings, and compares the accuracy with
a TF-IDF + logistic-regression baseline trained on the same rows."""

import csv
import io
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from tests.processes import THAW, create_key, free_port, poll, running, thaw_env, wait_ready

FIXTURE = Path(__file__).parent / "fixtures" / "debian_descriptions.csv"
JOB_TIMEOUT = 900.0  # generous: the machine running the tests may be shared
SPEC = {
    "model": "debian",
    "base_model": "minilm_l6",
    "strategy": "fine_tune",
    "epochs": 4,
    "batch_size": 16,
    "max_length": 32,  # the longest description is 79 characters
    "seed": 0,
    # One run: a small set refits by default, a second run that would double this test's
    # time; a text job's refit through the worker is in test_text_inference.py.
    "refit": False,
}


def split_fixture() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    with FIXTURE.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    train, held_out = train_test_split(
        rows, test_size=0.25, stratify=[r["label"] for r in rows], random_state=0
    )
    return list(train), list(held_out)


def baseline_accuracy(train: list[dict[str, str]], held_out: list[dict[str, str]]) -> float:
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    features = vectorizer.fit_transform([r["text"] for r in train])
    classifier = LogisticRegression(max_iter=2000, C=10.0)
    classifier.fit(features, [r["label"] for r in train])
    predicted = classifier.predict(vectorizer.transform([r["text"] for r in held_out]))
    return sum(p == r["label"] for p, r in zip(predicted, held_out, strict=True)) / len(held_out)


def as_csv(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["text", "label", "package"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def train_and_predict(
    client: httpx.Client, train: list[dict[str, str]], held_out: list[dict[str, str]]
) -> float:
    upload = client.post("/v1/datasets", files={"file": ("debian.csv", as_csv(train))})
    assert upload.status_code == 202, upload.text
    dataset = poll(client, f"/v1/datasets/{upload.json()['id']}", {"ready", "failed"}, 120)
    assert dataset["status"] == "ready", dataset
    assert dataset["modality"] == "text"
    assert dataset["num_texts"] == len(train)
    assert dataset["token_lengths"]["base_model"] == "minilm_l6"
    assert dataset["token_lengths"]["truncated"] == 0  # at the model's own maximum

    image_spec = {k: v for k, v in SPEC.items() if k != "max_length"}
    wrong = client.post(
        "/v1/jobs",
        json={**image_spec, "base_model": "efficientnet_lite0", "dataset": dataset["id"]},
    )
    assert wrong.status_code == 422, wrong.text
    assert (wrong.json()["error"]["code"], wrong.json()["error"]["param"]) == (
        "wrong_modality",
        "base_model",
    )

    job = client.post("/v1/jobs", json={**SPEC, "dataset": dataset["id"]})
    assert job.status_code == 201, job.text
    finished = poll(
        client, f"/v1/jobs/{job.json()['id']}", {"succeeded", "failed", "cancelled"}, JOB_TIMEOUT
    )
    assert finished["status"] == "succeeded", finished

    texts = [r["text"] for r in held_out]
    answer = client.post("/v1/models/debian/versions/1/predict", json={"texts": texts, "top_k": 3})
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert [p["text_index"] for p in predictions] == list(range(len(texts)))
    correct = sum(
        p["top"][0]["label"] == r["label"] for p, r in zip(predictions, held_out, strict=True)
    )
    return correct / len(held_out)


def use_the_cli(
    tmp_path: Path,
    env: dict[str, str],
    base: str,
    headers: dict[str, str],
    held_out: list[dict[str, str]],
) -> None:
    """`thaw datasets upload` of a CSV with other column names, `thaw predict` with strings
    and with --file, against the model trained above."""
    cli_env = {
        **env,
        "THAW_URL": base,
        "THAW_API_KEY": headers["Authorization"].removeprefix("Bearer "),
    }

    def thaw(*args: str) -> str:
        done = subprocess.run(
            [*THAW, *args], env=cli_env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    custom = tmp_path / "sections.csv"
    with custom.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["Description", "Section"])
        writer.writerows([r["text"], r["label"]] for r in held_out)
    arguments = ["--text-column", "Description", "--label-column", "Section", "--wait"]
    uploaded = json.loads(thaw("datasets", "upload", str(custom), *arguments, "--json"))
    assert (uploaded["status"], uploaded["modality"]) == ("ready", "text")
    assert uploaded["num_texts"] == len(held_out)
    shown = thaw("datasets", "show", uploaded["id"])
    assert "token lengths (minilm_l6" in shown

    texts = [held_out[0]["text"], held_out[1]["text"]]
    answer = json.loads(thaw("predict", "debian:1", *texts, "--top-k", "2", "--json"))
    assert [p["text_index"] for p in answer["predictions"]] == [0, 1]
    assert all(len(p["top"]) == 2 for p in answer["predictions"])
    lines = tmp_path / "texts.txt"
    lines.write_text("".join(f"{r['text']}\n" for r in held_out[:5]), encoding="utf-8")
    from_file = json.loads(thaw("predict", "debian", "--file", str(lines), "--json"))
    assert len(from_file["predictions"]) == 5
    table = thaw("predict", "debian", texts[0])
    assert "debian v1" in table


@pytest.mark.e2e
@pytest.mark.timeout(JOB_TIMEOUT + 600)
def test_text_fine_tune_beats_tfidf_baseline(tmp_path: Path) -> None:
    train, held_out = split_fixture()
    baseline = baseline_accuracy(train, held_out)
    env = thaw_env(tmp_path / "data")
    headers = create_key(env, "text")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with running([*THAW, "serve", "--port", str(port)], env, log) as server:
        wait_ready(base, server, log)
        with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
            accuracy = train_and_predict(client, train, held_out)
        use_the_cli(tmp_path, env, base, headers, held_out)
    print(f"held-out accuracy: minilm_l6 fine_tune {accuracy:.3f}, TF-IDF + LR {baseline:.3f}")
    assert accuracy > baseline
