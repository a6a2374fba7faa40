"""Predict: multipart and base64 JSON, per-image errors, tasks, dynamic batching, the bounded
queue, the memory-budgeted model cache, the ONNX backend and the Prometheus metrics."""

import base64
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.cli import migrate_database
from service.inference.metrics import InferenceMetrics
from service.inference.service import Batcher, LoadedModel, ModelCache, QueueFullError
from service.main import create_app
from service.tables import ModelVersion
from tests.conftest import digits_split, make_settings, new_key, png_bytes, version_folder
from tests.test_api import assert_error, ready_dataset
from tests.test_registry import Registry, publish
from worker.engine import Predictor
from worker.engine.artifacts import Preprocessing


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Two one-epoch versions of `digits`."""
    settings = make_settings(tmp_path_factory.mktemp("inference") / "data")
    migrate_database(settings)
    with TestClient(create_app(settings)) as client:
        context = client.app.state.context  # type: ignore[attr-defined]
        auth = new_key(context, "team-a")
        made = Registry(client, context, auth, ready_dataset(client, context, auth))
        publish(made, epochs=1)
        publish(made, epochs=1, seed=2)
        yield made


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def held_out_pngs(count: int) -> list[bytes]:
    _, held_out = digits_split()
    return [png_bytes(image) for image, _ in held_out[:count]]


def test_json_and_multipart_give_the_same_answers_in_order(served: Registry) -> None:
    client, auth = served.client, served.auth
    first, second = held_out_pngs(2)
    body = {
        "images": [
            {"name": "a.png", "data": b64(first)},
            {"name": "junk.png", "data": b64(b"not an image")},
            {"name": "bad64", "data": "%%%"},
            {"data": b64(second)},
        ],
        "top_k": 3,
    }
    answered = client.post("/v1/models/digits/versions/1/predict", headers=auth, json=body)
    assert answered.status_code == 200, answered.text
    out = answered.json()
    assert (out["model"], out["version"], out["task"]) == ("digits", 1, "digits")
    a, junk, bad, unnamed = out["predictions"]
    assert [p["image"] for p in out["predictions"]] == ["a.png", "junk.png", "bad64", "image-3"]
    assert len(a["top"]) == 3
    probabilities = [t["probability"] for t in a["top"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert junk["error"]["code"] == "not_an_image"
    assert bad["error"]["code"] == "invalid_base64"
    assert unnamed["top"] is not None

    multipart = client.post(
        "/v1/models/digits/versions/1/predict",
        headers=auth,
        files=[("images", ("a.png", first)), ("images", ("b.png", second))],
        data={"top_k": "3", "task": "digits"},
    ).json()
    assert multipart["predictions"][0]["top"] == a["top"]
    assert multipart["predictions"][1]["top"] == unnamed["top"]


def test_batched_answers_match_the_plain_predictor(served: Registry) -> None:
    client, auth = served.client, served.auth
    images = held_out_pngs(6)
    # Concurrent calls, so several of them share forward passes.
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda png: client.post(
                    "/v1/models/digits/versions/1/predict",
                    headers=auth,
                    json={"images": [{"name": "x.png", "data": b64(png)}], "top_k": 3},
                ).json(),
                images,
            )
        )
    version = client.get("/v1/models/digits/versions/1", headers=auth).json()
    predictor = Predictor.load(version_folder(served.context, version["id"]))
    expected = predictor.predict([Image.open(BytesIO(png)) for png in images], top_k=3)
    for answer, want in zip(answers, expected, strict=True):
        got = answer["predictions"][0]["top"]
        assert [t["label"] for t in got] == [label for label, _ in want]
        assert np.allclose([t["probability"] for t in got], [p for _, p in want], atol=1e-5)


def test_bad_requests_name_the_parameter(served: Registry) -> None:
    client, auth = served.client, served.auth
    path = "/v1/models/digits/versions/1/predict"
    png = b64(held_out_pngs(1)[0])
    assert_error(
        client.post(path, headers=auth, json={"images": [{"data": png}], "task": "captions"}),
        422,
        "unknown_task",
        "task",
    )
    assert_error(
        client.post(path, headers=auth, json={"images": [{"data": png}], "top_k": 0}),
        422,
        "invalid_request",
        "top_k",
    )
    assert_error(
        client.post(path, headers=auth, json={"images": []}), 422, "invalid_request", "images"
    )
    assert_error(
        client.post(path, headers=auth, files=[("images", ("a.png", b"x"))], data={"top_k": "a"}),
        422,
        "invalid_request",
        "top_k",
    )
    broken = client.post(path, headers={**auth, "content-type": "application/json"}, content=b"{")
    assert_error(broken, 422, "invalid_request")
    assert_error(
        client.post(path, headers={**auth, "content-type": "text/plain"}, content=b"hi"),
        415,
        "unsupported_media_type",
    )
    many = {"images": [{"data": png}] * 65}
    assert_error(client.post(path, headers=auth, json=many), 413, "too_many_images", "images")


def test_full_queue_answers_503_with_retry_after(served: Registry) -> None:
    # A second app on the same data, whose model takes one waiting request at most.
    settings = make_settings(served.context.settings.data_dir, batch_queue_size=1)
    path = "/v1/models/digits/versions/2/predict"
    body = {"images": [{"data": b64(held_out_pngs(1)[0])}]}
    with TestClient(create_app(settings)) as client:
        auth = served.auth
        assert client.post(path, headers=auth, json=body).status_code == 200  # loads the model
        cache: ModelCache = client.app.state.predictors  # type: ignore[attr-defined]
        (loaded,) = cache.loaded()
        model = cache._loaded[loaded]
        assert model.batcher is not None
        release = threading.Event()
        entered = threading.Event()
        real_forward = model.forward

        def slow_forward(batch: torch.Tensor) -> list[np.ndarray]:
            entered.set()
            release.wait(10)
            return real_forward(batch)

        model.forward = slow_forward
        try:
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(client.post, path, headers=auth, json=body)
                assert entered.wait(10)  # the first call is in its forward pass
                queued = pool.submit(client.post, path, headers=auth, json=body)
                deadline = time.monotonic() + 10
                while model.batcher._queue.qsize() < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                refused = client.post(path, headers=auth, json=body)
                assert_error(refused, 503, "overloaded")
                assert refused.headers["Retry-After"] == "1"
                release.set()
                assert running.result().status_code == 200
                assert queued.result().status_code == 200
        finally:
            release.set()


def fake_model(forward: Any, name: str = "m") -> LoadedModel:
    return LoadedModel(
        version_id=f"mv_{name}",
        name=name,
        tasks={"main": ["a", "b"]},
        preprocessing=Preprocessing(image_size=8, mean=(0, 0, 0), std=(1, 1, 1)),
        backend="torch",
        nbytes=100,
        forward=forward,
    )


def test_batcher_gathers_waiting_requests_up_to_the_maximum() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def forward(batch: torch.Tensor) -> list[np.ndarray]:
        gate.wait(10)
        sizes.append(len(batch))
        return [np.tile(batch[:, :1, 0, 0].numpy(), (1, 2))]

    batcher = Batcher(
        fake_model(forward), max_size=4, max_delay=0.0, queue_size=10, metrics=InferenceMetrics()
    )
    futures = [batcher.submit(torch.full((1, 3, 8, 8), float(i))) for i in range(6)]
    gate.set()
    results = [f.result(10) for f in futures]
    # Each request gets back its own rows, however the passes were cut.
    assert [float(r[0][0, 0]) for r in results] == [0, 1, 2, 3, 4, 5]
    assert sum(sizes) == 6
    assert max(sizes) <= 4
    assert len(sizes) < 6  # some requests shared a pass
    batcher.stop()

    blocked = threading.Event()
    slow = Batcher(
        fake_model(lambda b: (blocked.wait(10), [np.zeros((len(b), 2))])[1]),
        max_size=1,
        max_delay=0.0,
        queue_size=1,
        metrics=InferenceMetrics(),
    )
    try:
        slow.submit(torch.zeros(1, 3, 8, 8))
        time.sleep(0.2)  # taken by the worker, which now blocks
        slow.submit(torch.zeros(1, 3, 8, 8))
        with pytest.raises(QueueFullError):
            slow.submit(torch.zeros(1, 3, 8, 8))
    finally:
        blocked.set()
        slow.stop()


def test_cache_unloads_least_recently_used_within_the_budget(served: Registry) -> None:
    session_versions = []
    with served.context.db.session() as session:
        for version in session.query(ModelVersion).order_by(ModelVersion.version):
            version.model  # noqa: B018  (loaded while the session is open)
            session_versions.append(version)
        settings = served.context.settings.model_copy(
            update={"model_cache_bytes": 1, "inference_backend": "onnx"}
        )
        metrics = InferenceMetrics()
        cache = ModelCache(store=served.context.store, settings=settings, metrics=metrics)
        first, second = session_versions
        loaded = cache.get(first)
        assert loaded.backend == "onnx"
        assert cache.get(first) is loaded
        cache.get(second)
        # One byte of budget: only the model just used stays loaded.
        assert cache.loaded() == [second.id]
        cache.get(first)
        assert cache.loaded() == [first.id]
        loads = metrics.cache_loads.labels("digits", first.id)._value.get()
        hits = metrics.cache_hits.labels("digits", first.id)._value.get()
        assert (loads, hits) == (2, 1)
        cache.close()


def test_onnx_backend_agrees_with_torch(served: Registry) -> None:
    png = b64(held_out_pngs(1)[0])
    answers = []
    for backend in ("torch", "onnx"):
        settings = make_settings(
            served.context.settings.data_dir,
            inference_backend=backend,
        )
        with TestClient(create_app(settings)) as client:
            response = client.post(
                "/v1/models/digits/versions/1/predict",
                headers=served.auth,
                json={"images": [{"data": png}], "top_k": 2},
            )
            assert response.status_code == 200, response.text
            answers.append(response.json()["predictions"][0]["top"])
            cache = client.app.state.predictors  # type: ignore[attr-defined]
            assert {cache._loaded[v].backend for v in cache.loaded()} == {backend}
    torch_top, onnx_top = answers
    assert [t["label"] for t in torch_top] == [t["label"] for t in onnx_top]
    assert np.allclose(
        [t["probability"] for t in torch_top], [t["probability"] for t in onnx_top], atol=1e-5
    )


def test_metrics_report_latency_batches_queue_and_cache(served: Registry) -> None:
    client = served.client
    client.post(
        "/v1/models/digits/versions/1/predict",
        headers=served.auth,
        json={"images": [{"data": b64(held_out_pngs(1)[0])}]},
    )
    text = client.get("/metrics").text
    for name in (
        'thaw_predict_request_seconds_count{model="digits"',
        "thaw_inference_batch_size_bucket",
        'thaw_inference_queue_depth{model="digits"',
        'thaw_model_cache_hits_total{model="digits"',
        'thaw_model_cache_loads_total{model="digits"',
        "thaw_model_cache_bytes",
    ):
        assert name in text, name


def test_other_tenants_cannot_predict(served: Registry) -> None:
    other = new_key(served.context, "team-b")
    png = b64(held_out_pngs(1)[0])
    for path in ("/v1/models/digits/versions/1/predict", "/v1/models/digits/versions/x/predict"):
        response = served.client.post(path, headers=other, json={"images": [{"data": png}]})
        assert response.status_code == 404, response.text
        assert "digit_0" not in response.text
    multipart = served.client.post(
        "/v1/models/digits/versions/1/predict",
        headers=other,
        files=[("images", ("a.png", base64.b64decode(png)))],
    )
    assert multipart.status_code == 404
