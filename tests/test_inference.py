"""Predict: multipart and base64 JSON, per-image errors, tasks, dynamic batching, the bounded
queue, the memory-budgeted model cache, the ONNX backend and the Prometheus metrics."""

import base64
import dataclasses
import gc
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import sqlalchemy
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.auth.service import revoke_key
from service.cli import migrate_database
from service.datasets.ingest import open_image
from service.inference.metrics import InferenceMetrics
from service.inference.resolution import ServedVersion
from service.inference.service import (
    Batcher,
    LoadedModel,
    ModelCache,
    ModelUnloadedError,
    Outputs,
    Prediction,
    QueueFullError,
    fill_predictions,
    predict_limits,
)
from service.main import create_app
from service.tables import ModelVersion
from tests.conftest import digits_split, make_settings, new_key, png_bytes, version_folder
from tests.test_api import assert_error, ready_dataset
from tests.test_registry import Registry, publish
from worker.engine import Predictor
from worker.engine.artifacts import read_model_config
from worker.engine.modalities.image.exported import ExportedImagePreprocessing
from worker.engine.modalities.image.pixels import normalise, view_pixels
from worker.engine.modalities.image.serving import ServedImages
from worker.engine.modalities.text.exported import ExportedTextPreprocessing
from worker.engine.modalities.text.serving import ServedTexts
from worker.engine.onnx_export import export_onnx


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

    # Each answer belongs to its own image: checked against the torch predictor, which shares
    # no code with the service's answer assembly (both routes above do).
    version = client.get("/v1/models/digits/versions/1", headers=auth).json()
    predictor = Predictor.load(version_folder(served.context, version["id"]))
    want_first, want_second = predictor.predict(
        [Image.open(BytesIO(first)), Image.open(BytesIO(second))], top_k=3
    )
    assert_distinct_answers(want_first, want_second)
    assert_same_top(a["top"], want_first)
    assert_same_top(unnamed["top"], want_second)


Top = list[tuple[str, float]]


def assert_same_top(got: list[dict[str, Any]], want: Top, atol: float = 1e-5) -> None:
    """An answer's top-k as the service sent it equals (label, probability) pairs computed
    independently."""
    assert [t["label"] for t in got] == [label for label, _ in want]
    assert np.allclose([t["probability"] for t in got], [p for _, p in want], atol=atol)


def assert_distinct_answers(one: Top, other: Top) -> None:
    """Two inputs' answers differ enough that swapping them would be seen."""
    assert [label for label, _ in one] != [label for label, _ in other] or not np.allclose(
        [p for _, p in one], [p for _, p in other], atol=1e-3
    )


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
    # However many files a multipart call carries, the refusal is the same 413 (500 files
    # were the form parser's own 400).
    for count in (65, 500):
        files = [("images", (f"{index}.png", b"x")) for index in range(count)]
        response = client.post(path, headers=auth, files=files)
        assert_error(response, 413, "too_many_images", "images")
    assert_error(
        client.post(path, headers=auth, json={"images": [{"data": png}], "top_k": True}),
        422,
        "invalid_request",
        "top_k",
    )


def test_numbers_past_the_database_range_are_422(served: Registry) -> None:
    client, auth = served.client, served.auth
    for version in ("9" * 41, str(2**63), "-1", "1.0"):
        for path in (
            f"/v1/models/digits/versions/{version}",
            f"/v1/models/digits/versions/{version}/predict",
        ):
            method = client.post if path.endswith("/predict") else client.get
            assert_error(method(path, headers=auth), 422, "invalid_request", "version")
    largest = client.get(f"/v1/models/digits/versions/{2**63 - 1}", headers=auth)
    assert_error(largest, 404, "version_not_found", "version")
    for wrong in (2**63, True, "1", 0):
        response = client.put(
            "/v1/models/digits/aliases/edge", headers=auth, json={"version": wrong}
        )
        assert_error(response, 422, "invalid_request", "version")


def test_predict_decodes_a_large_jpeg_at_a_reduced_scale_and_caps_other_pixels(
    served: Registry,
) -> None:
    client, auth = served.client, served.auth
    settings = client.app.state.context.settings  # type: ignore[attr-defined]
    assert settings.max_predict_pixels < settings.max_image_pixels
    # Flat images: large in pixels, small in bytes, as the ones that held a call for seconds.
    over = Image.new("RGB", (2100, settings.max_predict_pixels // 2100 + 1), "white")
    jpeg = BytesIO()
    Image.new("RGB", (6000, 6000), "white").save(jpeg, format="JPEG")
    png = BytesIO()
    over.save(png, format="PNG")
    files = [("images", ("big.jpg", jpeg.getvalue())), ("images", ("big.png", png.getvalue()))]
    answer = client.post("/v1/models/digits/versions/1/predict", headers=auth, files=files)
    assert answer.status_code == 200, answer.text
    photo, drawing = answer.json()["predictions"]
    assert photo["top"] is not None, photo
    assert drawing["error"]["code"] == "too_many_pixels"
    # The JPEG was decoded at 1/8 scale: the smallest that still covers the model's input.
    limits = predict_limits(client.app.state.context)  # type: ignore[attr-defined]
    with open_image(BytesIO(jpeg.getvalue()), limits, draft_to=256) as image:
        assert image.size == (750, 750)


def _load_served_model(
    client: TestClient, path: str, auth: dict[str, str], body: dict[str, Any]
) -> LoadedModel:
    """Predict once, so the app loads the version, and hand back what it loaded."""
    assert client.post(path, headers=auth, json=body).status_code == 200
    cache: ModelCache = client.app.state.predictors  # type: ignore[attr-defined]
    (loaded,) = cache.loaded()
    return cache._loaded[loaded]


def test_full_queue_answers_503_with_retry_after(served: Registry) -> None:
    # A second app on the same data, whose model lets one image wait at most.
    settings = make_settings(
        served.context.settings.data_dir, batch_max_size=1, batch_queue_batches=1
    )
    path = "/v1/models/digits/versions/2/predict"
    body = {"images": [{"data": b64(held_out_pngs(1)[0])}]}
    with TestClient(create_app(settings)) as client:
        auth = served.auth
        model = _load_served_model(client, path, auth, body)
        assert model.batcher is not None
        release = threading.Event()
        entered = threading.Event()
        real_forward = model.forward

        def slow_forward(batch: np.ndarray) -> Outputs:
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


EIGHT_PIXELS = ExportedImagePreprocessing(image_size=8, mean=(0, 0, 0), std=(1, 1, 1))


def fake_model(forward: Any, name: str = "m") -> LoadedModel:
    return LoadedModel(
        version_id=f"mv_{name}",
        name=name,
        tasks={"main": ["a", "b"]},
        inputs=ServedImages(EIGHT_PIXELS),
        backend="torch",
        nbytes=100,
        forward=forward,
        temperatures=[1.0],
    )


def pixels(value: int) -> np.ndarray:
    """One 8x8 image whose every channel is `value`, as the decoder hands it to the batcher."""
    return np.full((1, 8, 8, 3), value, dtype=np.uint8)


def test_batcher_gathers_waiting_requests_up_to_the_maximum() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def forward(batch: np.ndarray) -> Outputs:
        gate.wait(10)
        sizes.append(len(batch))
        return Outputs([np.tile(batch[:, :1, 0, 0], (1, 2))], None)

    batcher = Batcher(
        fake_model(forward), max_size=4, max_delay=0.0, queue_batches=3, metrics=InferenceMetrics()
    )
    futures = [batcher.submit(pixels(i)) for i in range(6)]
    gate.set()
    results = [f.result(10) for f in futures]
    # Each request gets back its own rows (normalised as one batch), however the passes were cut.
    assert [float(r.logits[0][0, 0]) for r in results] == pytest.approx([i / 255 for i in range(6)])
    assert sum(sizes) == 6
    assert max(sizes) <= 4
    assert len(sizes) < 6  # some requests shared a pass
    batcher.stop()

    blocked = threading.Event()
    taken = threading.Event()

    def stuck(batch: np.ndarray) -> Outputs:
        taken.set()
        blocked.wait(10)
        return Outputs([np.zeros((len(batch), 2))], None)

    slow = Batcher(
        fake_model(stuck), max_size=1, max_delay=0.0, queue_batches=1, metrics=InferenceMetrics()
    )
    try:
        slow.submit(pixels(0))
        assert taken.wait(10)  # the worker took it and now blocks in its forward pass
        slow.submit(pixels(0))
        with pytest.raises(QueueFullError):
            slow.submit(pixels(0))
    finally:
        blocked.set()
        slow.stop()


def test_a_reservation_holds_room_from_admission_until_its_pass() -> None:
    # Room is counted in inputs (capacity 2 here) from the moment a call is accepted, before
    # its images are decoded, so calls still decoding cannot overfill the queue.
    entered = threading.Event()
    gate = threading.Event()

    def forward(batch: np.ndarray) -> Outputs:
        entered.set()
        gate.wait(10)
        return Outputs([np.zeros((len(batch), 2))], None)

    batcher = Batcher(
        fake_model(forward), max_size=2, max_delay=0.0, queue_batches=1, metrics=InferenceMetrics()
    )
    decoding = batcher.reserve(2)
    with pytest.raises(QueueFullError):
        batcher.reserve(1)
    # One of its two images did not decode: only one goes in, and its room is freed.
    running = decoding.submit(pixels(1))
    assert entered.wait(10)  # in its pass now, no longer waiting
    waiting = [batcher.reserve(1), batcher.reserve(1)]
    with pytest.raises(QueueFullError):
        batcher.reserve(1)
    waiting[0].release()  # that call ended before its pass (nothing readable)
    waiting[0].release()  # twice is harmless
    later = batcher.reserve(1)
    futures = [waiting[1].submit(pixels(2)), later.submit(pixels(3))]
    batcher.stop()  # still serves what it accepted
    gate.set()
    assert [len(f.result(10).logits[0]) for f in (running, *futures)] == [1, 1, 1]
    batcher._thread.join(10)
    with pytest.raises(ModelUnloadedError):
        batcher.reserve(1)

    alone = Batcher(
        fake_model(forward), max_size=2, max_delay=0.0, queue_batches=1, metrics=InferenceMetrics()
    )
    # A call larger than the capacity is one pass: it is let in when nothing waits.
    assert len(alone.submit(np.concatenate([pixels(0)] * 5)).result(10).logits[0]) == 5
    alone.stop()


def test_loaded_models_are_kept_out_of_full_garbage_collections(served: Registry) -> None:
    # A full collection walks every tracked object with the GIL held; what a load built lives
    # until the unload, so it is frozen, and handed back to the collector at the unload.
    client = served.client
    path = "/v1/models/digits/versions/1/predict"
    body = {"images": [{"data": b64(held_out_pngs(1)[0])}]}
    assert client.post(path, headers=served.auth, json=body).status_code == 200
    cache: ModelCache = client.app.state.predictors  # type: ignore[attr-defined]
    for version_id in cache.loaded():
        cache.evict(version_id)
    assert gc.get_freeze_count() == 0
    assert client.post(path, headers=served.auth, json=body).status_code == 200
    assert gc.get_freeze_count() > 0


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
        first, second = (ServedVersion.of(version) for version in session_versions)
        loaded = cache.get(first)
        assert loaded.backend == "onnx"
        assert cache.get(first) is loaded
        cache.get(second)
        # One byte of budget: only the model just used stays loaded.
        assert cache.loaded() == [second.id]
        cache.get(first)
        assert cache.loaded() == [first.id]
        loads = metrics.cache_loads.labels(first.id)._value.get()
        hits = metrics.cache_hits.labels(first.id)._value.get()
        assert (loads, hits) == (2, 1)
        cache.close()


def test_onnx_and_torch_backends_give_the_same_probabilities(served: Registry) -> None:
    # Every label's probability (top_k = all of them), on several held-out images.
    files = [("images", (f"{i}.png", png)) for i, png in enumerate(held_out_pngs(8))]
    answers = {}
    for backend in ("torch", "onnx"):
        settings = make_settings(served.context.settings.data_dir, inference_backend=backend)
        with TestClient(create_app(settings)) as client:
            response = client.post(
                "/v1/models/digits/versions/1/predict",
                headers=served.auth,
                files=files,
                data={"top_k": "100"},
            )
            assert response.status_code == 200, response.text
            answers[backend] = [
                {t["label"]: t["probability"] for t in p["top"]}
                for p in response.json()["predictions"]
            ]
            cache = client.app.state.predictors  # type: ignore[attr-defined]
            assert {cache._loaded[v].backend for v in cache.loaded()} == {backend}
    for torch_scores, onnx_scores in zip(answers["torch"], answers["onnx"], strict=True):
        assert torch_scores.keys() == onnx_scores.keys()
        assert len(torch_scores) == 3
        for label, probability in torch_scores.items():
            assert onnx_scores[label] == pytest.approx(probability, abs=1e-4)


def test_onnx_is_the_default_and_a_failed_parity_check_is_served_by_torch(
    served: Registry, tmp_path: Path
) -> None:
    with served.context.db.session() as session:
        row = session.query(ModelVersion).filter_by(version=1).one()
        passed = ServedVersion.of(row)
    assert passed.exports["onnx"]["exported"] is True
    # A real failed check: no export agrees with PyTorch within a tolerance of zero.
    folder = served.context.store.local_path(passed.artifact_prefix)
    module = Predictor.load(folder).model
    failed = export_onnx(module, image_size=64, out_path=tmp_path / "model.onnx", tolerance=0.0)
    assert not failed.exported
    refused = dataclasses.replace(passed, id="mv_failed", exports={"onnx": failed.to_dict()})

    metrics = InferenceMetrics()
    settings = served.context.settings  # the default backend
    cache = ModelCache(store=served.context.store, settings=settings, metrics=metrics)
    try:
        assert cache.get(passed).backend == "onnx"
        assert cache.get(passed).backend_reason is None
        fallback = cache.get(refused)
        assert fallback.backend == "torch"
        assert fallback.backend_reason == f"ONNX export did not pass: {failed.reason}"
        assert "differs from PyTorch" in fallback.backend_reason
        text = generate_latest(metrics.registry).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        backends = {
            (s.labels["version_id"], s.labels["backend"], s.labels["reason"]): s.value
            for s in families["thaw_inference_backend"].samples
        }
        assert backends == {
            (passed.id, "onnx", ""): 1.0,
            ("mv_failed", "torch", fallback.backend_reason): 1.0,
        }
    finally:
        cache.close()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition, 0 when it is not there yet."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0


def test_metrics_report_latency_batches_queue_and_cache_by_value(served: Registry) -> None:
    client = served.client
    version_id = client.get("/v1/models/digits/versions/1", headers=served.auth).json()["id"]
    labels = {"version_id": version_id}
    names = (
        "thaw_predict_request_seconds_count",
        "thaw_predict_request_seconds_sum",
        "thaw_predict_images_total",
        "thaw_inference_batch_size_count",
        "thaw_inference_batch_size_sum",
        "thaw_model_cache_hits_total",
        "thaw_model_cache_loads_total",
    )
    # Loaded first, so the counted calls are cache hits whichever tests ran before.
    warm = {"images": [{"data": b64(held_out_pngs(1)[0])}]}
    assert (
        client.post(
            "/v1/models/digits/versions/1/predict", headers=served.auth, json=warm
        ).status_code
        == 200
    )
    before = client.get("/metrics").text
    calls, images_per_call = 3, 2
    began = time.perf_counter()
    for _ in range(calls):
        answer = client.post(
            "/v1/models/digits/versions/1/predict",
            headers=served.auth,
            json={"images": [{"data": b64(png)} for png in held_out_pngs(images_per_call)]},
        )
        assert answer.status_code == 200, answer.text
    elapsed = time.perf_counter() - began
    after = client.get("/metrics").text
    grew = {name: sample(after, name, **labels) - sample(before, name, **labels) for name in names}

    assert grew["thaw_predict_request_seconds_count"] == calls
    # Each observed latency is positive and within the calls' wall-clock time.
    assert 0 < grew["thaw_predict_request_seconds_sum"] <= elapsed
    assert grew["thaw_predict_images_total"] == calls * images_per_call
    # One call at a time: each is its own forward pass of its two images.
    assert grew["thaw_inference_batch_size_count"] == calls
    assert grew["thaw_inference_batch_size_sum"] == calls * images_per_call
    assert grew["thaw_model_cache_hits_total"] == calls
    assert sample(after, "thaw_inference_queue_depth", **labels) == 0
    # Loaded by the warm-up call (or before it, once per eviction by the LRU test): the counted
    # calls load nothing.
    assert grew["thaw_model_cache_loads_total"] == 0
    assert sample(after, "thaw_model_cache_loads_total", **labels) >= 1
    assert sample(after, "thaw_model_cache_bytes") > 0
    assert sample(after, "thaw_inference_backend", **labels, backend="onnx", reason="") == 1
    # Whoever scrapes sees every tenant's series: they carry version ids, never model names.
    for family in text_string_to_metric_families(after):
        for found in family.samples:
            assert "model" not in found.labels, found
            assert "digits" not in found.labels.values(), found


def test_resolution_is_cached_and_a_deleted_version_or_moved_alias_is_not_served_stale(
    served: Registry,
) -> None:
    # A cache that would otherwise hold entries for an hour: only invalidation can explain
    # a fresh answer.
    settings = make_settings(served.context.settings.data_dir, resolution_cache_seconds=3600)
    body = {"images": [{"data": b64(held_out_pngs(1)[0])}]}
    with TestClient(create_app(settings)) as client:
        context = client.app.state.context  # type: ignore[attr-defined]
        auth = served.auth
        registry = Registry(client, context, auth, served.dataset_id)
        third = publish(registry, epochs=1, seed=3)
        path = f"/v1/models/digits/versions/{third['version']}/predict"
        put = client.put("/v1/models/digits/aliases/canary", headers=auth, json={"version": 1})
        assert put.status_code == 200, put.text
        canary = "/v1/models/digits/versions/canary/predict"
        for target in (path, canary):
            assert client.post(target, headers=auth, json=body).status_code == 200

        statements: list[str] = []
        listen = sqlalchemy.event.listen
        listen(context.db.engine, "before_cursor_execute", _record_into(statements))
        assert client.post(path, headers=auth, json=body).status_code == 200
        # Neither the key (the key cache) nor the version is looked up again.
        assert statements == []

        moved = client.put("/v1/models/digits/aliases/canary", headers=auth, json={"version": 2})
        assert moved.status_code == 200
        assert client.post(canary, headers=auth, json=body).json()["version"] == 2
        client.delete("/v1/models/digits/aliases/canary", headers=auth)
        assert_error(client.post(canary, headers=auth, json=body), 404, "version_not_found")

        assert client.delete(path.removesuffix("/predict"), headers=auth).status_code == 204
        assert_error(client.post(path, headers=auth, json=body), 404, "version_not_found")
        cache = client.app.state.predictors  # type: ignore[attr-defined]
        assert third["id"] not in cache.loaded()


def test_a_cached_key_is_still_checked_for_revocation_and_its_rate_limit(
    served: Registry,
) -> None:
    # Predict answers a cached key and version on the event loop, without a session: the
    # shared generations and the rate limit are checked there all the same.
    settings = make_settings(served.context.settings.data_dir, rate_limit_per_minute=3)
    body = {"images": [{"data": b64(held_out_pngs(1)[0])}]}
    path = "/v1/models/digits/versions/1/predict"
    with TestClient(create_app(settings)) as client:
        context = client.app.state.context  # type: ignore[attr-defined]
        limited, revoked = new_key(context, "team-a"), new_key(context, "team-a")
        answers = [client.post(path, headers=limited, json=body) for _ in range(4)]
        assert [answer.status_code for answer in answers] == [200, 200, 200, 429]
        assert answers[-1].headers["Retry-After"]
        assert client.post(path, headers=revoked, json=body).status_code == 200
        with context.db.session() as session:
            assert revoke_key(session, prefix=revoked["Authorization"][7:19]) is not None
        assert_error(client.post(path, headers=revoked, json=body), 401, "unauthorized")
        assert_error(client.post(path, json=body), 401, "unauthorized")


def test_normalise_looks_up_exactly_what_computing_each_pixel_gives() -> None:
    def computed(pixels: np.ndarray, preprocessing: ExportedImagePreprocessing) -> np.ndarray:
        scaled = pixels.astype(np.float32) / np.float32(255)
        mean = np.asarray(preprocessing.mean, dtype=np.float32)
        std = np.asarray(preprocessing.std, dtype=np.float32)
        return ((scaled - mean) / std).transpose(0, 3, 1, 2)

    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    random = np.random.default_rng(0).integers(0, 256, (5, 9, 7, 3), dtype=np.uint8)
    for mean, std in [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0, 0.5, 1), (1, 2, 3))]:
        preprocessing = ExportedImagePreprocessing(image_size=8, mean=mean, std=std)
        for batch in (every_value, random, random[:, :, ::-1], random[:0]):
            looked_up = normalise(batch, preprocessing)
            assert looked_up.flags.c_contiguous
            assert looked_up.dtype == np.float32
            want = computed(batch, preprocessing)
            assert looked_up.shape == want.shape
            assert np.array_equal(looked_up.view(np.uint32), want.view(np.uint32))


def _record_into(statements: list[str]) -> Any:
    # The webhook sender polls its outbox on its own threads, whatever requests arrive: only
    # what a request runs is recorded.
    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not threading.current_thread().name.startswith("webhook"):
            statements.append(statement)

    return record


@pytest.mark.parametrize(
    "limit",
    [{"batch_max_size": 1, "batch_queue_batches": 2}, {"predict_max_in_flight": 2}],
    ids=["model queue", "admission"],
)
def test_overload_answers_503_with_retry_after_and_every_call_ends(
    served: Registry, limit: dict[str, int]
) -> None:
    # Many more concurrent calls than the limit, on a model slowed down: each call is either
    # answered or refused at once; none waits without bound.
    settings = make_settings(served.context.settings.data_dir, **limit)
    path = "/v1/models/digits/versions/1/predict"
    body = {"images": [{"data": b64(held_out_pngs(1)[0])}]}
    with TestClient(create_app(settings)) as client:
        auth = served.auth
        model = _load_served_model(client, path, auth, body)
        real_forward = model.forward

        assert model.batcher is not None
        batcher = model.batcher
        depths: list[int] = []

        def slow_forward(batch: np.ndarray) -> Outputs:
            depths.append(batcher._waiting)  # inputs accepted and waiting behind this pass
            time.sleep(0.05)  # a slow model, not synchronisation
            return real_forward(batch)

        model.forward = slow_forward
        with ThreadPoolExecutor(16) as pool:
            calls = [pool.submit(client.post, path, headers=auth, json=body) for _ in range(48)]
            answers = [call.result(timeout=60) for call in calls]
        text = client.get("/metrics").text
    statuses = Counter(answer.status_code for answer in answers)
    at_admission = sample(text, "thaw_predict_rejected_at_admission_total")
    at_queue = sample(text, "thaw_inference_rejected_total")
    # Each refusal is counted where it happened, and only there.
    assert at_admission + at_queue == statuses[503]
    assert (at_admission > 0) == ("predict_max_in_flight" in limit)
    # The model's queue let at most its capacity wait: each accepted call waited for at most
    # two passes ahead of its own (plus the one running when it arrived).
    if "batch_queue_batches" in limit:
        assert max(depths) <= 2, depths
    assert set(statuses) == {200, 503}, statuses
    for answer in answers:
        if answer.status_code == 503:
            assert_error(answer, 503, "overloaded")
            assert answer.headers["Retry-After"] == "1"


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


def test_batch_input_joins_preprocessed_tensors_with_pixels_it_normalises() -> None:
    model = fake_model(lambda batch: [batch])
    tensor = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    joined = model.batch_input([pixels(10), tensor, pixels(200)])
    expected = [normalise(pixels(10), EIGHT_PIXELS), tensor]
    expected.append(normalise(pixels(200), EIGHT_PIXELS))
    np.testing.assert_array_equal(joined, np.concatenate(expected))
    assert model.batch_input([tensor]) is tensor  # a lone tensor goes to the pass as it is


def _predicted(client: TestClient, auth: dict[str, str], version: str, pngs: list[bytes]) -> Any:
    """Predict's probabilities of every label, a row per image, in label order."""
    body = {"images": [{"data": b64(png)} for png in pngs], "top_k": 100}
    answer = client.post(f"/v1/models/digits/versions/{version}/predict", headers=auth, json=body)
    assert answer.status_code == 200, answer.text
    labels = sorted(top["label"] for top in answer.json()["predictions"][0]["top"])
    return labels, np.array(
        [
            [{t["label"]: t["probability"] for t in p["top"]}[label] for label in labels]
            for p in answer.json()["predictions"]
        ]
    )


def test_open_inference_protocol_with_tritonclient(served: Registry) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    from tests.conftest import served_over_http

    client, auth = served.client, served.auth
    pngs = held_out_pngs(3)
    folder = version_folder(
        served.context, client.get("/v1/models/digits/versions/1", headers=auth).json()["id"]
    )
    preprocessing = ExportedImagePreprocessing.of(read_model_config(folder))
    size = preprocessing.image_size
    tensor = normalise(
        np.concatenate(
            [
                view_pixels(Image.open(BytesIO(png)).convert("RGB"), size, ("original",))
                for png in pngs
            ]
        ),
        preprocessing,
    )
    labels, expected = _predicted(client, auth, "1", pngs)
    assert (
        client.put(
            "/v1/models/digits/aliases/production", headers=auth, json={"version": 1}
        ).status_code
        == 200
    )
    with served_over_http(client.app) as url:
        triton_client = triton.InferenceServerClient(url)
        assert triton_client.is_server_live()
        assert triton_client.is_server_ready()
        assert triton_client.is_model_ready("digits", "1", headers=auth)
        metadata = triton_client.get_model_metadata("digits", "1", headers=auth)
        assert metadata["versions"] == ["1"]
        assert {key: metadata["inputs"][0][key] for key in ("name", "datatype", "shape")} == {
            "name": "images",
            "datatype": "FP32",
            "shape": [-1, 3, size, size],
        }
        assert sorted(metadata["outputs"][0]["parameters"]["labels"]) == labels

        def infer(inputs: list[Any], version: str = "1", **parameters: Any) -> Any:
            outputs = [
                triton.InferRequestedOutput("probabilities", binary_data=binary)
                for binary in [parameters.pop("binary_output", True)]
            ] + [triton.InferRequestedOutput("top_labels", binary_data=False)]
            return triton_client.infer(
                "digits",
                inputs,
                model_version=version,
                outputs=outputs,
                # A copy: tritonclient writes its binary header into the dict it is given.
                headers=dict(auth),
                parameters=parameters or None,
            )

        for binary in (True, False):
            images = triton.InferInput("images", list(tensor.shape), "FP32")
            images.set_data_from_numpy(tensor, binary_data=binary)
            result = infer([images], binary_output=binary, top_k=2)
            got = result.as_numpy("probabilities")
            order = [
                metadata["outputs"][0]["parameters"]["labels"].index(label) for label in labels
            ]
            np.testing.assert_allclose(got[:, order], expected, atol=1e-5)
            top = result.as_numpy("top_labels")
            assert top.shape == (3, 2)
            best = [labels[i] for i in expected.argmax(axis=1)]
            assert [
                label.decode() if isinstance(label, bytes) else label for label in top[:, 0]
            ] == best

        for binary in (True, False):
            encoded = triton.InferInput("image_bytes", [3], "BYTES")
            data = pngs if binary else [b64(png).encode() for png in pngs]
            encoded.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
            for version in ("production", ""):  # an alias, and the default version (production)
                result = infer([encoded], version=version)
                assert result.get_response()["model_version"] == "1"
                np.testing.assert_allclose(
                    result.as_numpy("probabilities")[:, order], expected, atol=1e-5
                )

        wrong = triton.InferInput("images", [1, 3, size + 1, size], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 3, size + 1, size), np.float32))
        with pytest.raises(InferenceServerException) as refused:
            infer([wrong])
        assert refused.value.status() == "400"
        assert "shape" in refused.value.message()

        other = new_key(served.context, "team-b")
        images = triton.InferInput("images", list(tensor.shape), "FP32")
        images.set_data_from_numpy(tensor)
        with pytest.raises(InferenceServerException) as hidden:
            triton_client.infer("digits", [images], model_version="1", headers=dict(other))
        assert hidden.value.status() == "404"
        assert "digit" not in str(hidden.value.message()).replace("'digits'", "")
        with pytest.raises(InferenceServerException) as unknown:
            triton_client.get_model_metadata("nothing", headers=auth)
        assert unknown.value.status() == "404"
        triton_client.close()
    answer = client.post(
        "/v2/models/digits/versions/1/infer", headers=auth, content=b'{"inputs": []}'
    )
    assert answer.status_code == 400
    assert isinstance(answer.json()["error"], str)
    client.delete("/v1/models/digits/aliases/production", headers=auth)


def test_an_infer_call_is_capped_by_its_models_inputs_not_the_json_body_limit(
    served: Registry,
) -> None:
    # A batch of preprocessed images is larger than any JSON body thaw takes elsewhere (32
    # images at 64 px are 1.5 MiB): the infer route counts its body against its own cap,
    # which is the model's input size even where predict's encoded images are capped smaller.
    settings = make_settings(
        served.context.settings.data_dir, max_json_body_bytes=1024, max_predict_bytes=1024
    )
    with TestClient(create_app(settings)) as client:
        auth = served.auth
        folder = version_folder(
            served.context, client.get("/v1/models/digits/versions/1", headers=auth).json()["id"]
        )
        preprocessing = ExportedImagePreprocessing.of(read_model_config(folder))
        image = Image.open(BytesIO(held_out_pngs(1)[0]))
        one = view_pixels(image, preprocessing.image_size, ("original",))
        tensor = np.ascontiguousarray(normalise(np.repeat(one, 8, axis=0), preprocessing))
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "FP32",
                        "shape": list(tensor.shape),
                        "parameters": {"binary_data_size": tensor.nbytes},
                    }
                ],
                "outputs": [{"name": "top_labels"}],
            }
        )
        body = header + tensor.astype("<f4").tobytes()
        assert len(body) > settings.max_json_body_bytes
        path = "/v2/models/digits/versions/1/infer"
        headers = {**auth, "Inference-Header-Content-Length": str(len(header))}
        answer = client.post(path, headers=headers, content=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["shape"][0] == 8
        # Elsewhere the limit holds.
        refused = client.post("/v1/jobs/plan", headers=auth, content=b"{" + b" " * 2048 + b"}")
        assert refused.status_code == 413


def exported(client: TestClient, auth: dict[str, str], path: str, fmt: str, into: Path) -> Path:
    """`GET .../export?format=fmt` unzipped into `into`."""
    answer = client.get(f"{path}/export", params={"format": fmt}, headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(BytesIO(answer.content)) as archive:
        archive.extractall(into)
    return into


def triton_config(folder: Path) -> Any:
    """`config.pbtxt` parsed by Triton's own protobuf definitions."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def run_declared(folder: Path, config: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """`1/model.onnx` run in ONNX Runtime with inputs of the shapes `config` declares."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / "1" / "model.onnx"))
    declared = {tensor.name: list(tensor.dims) for tensor in config.input}
    assert set(declared) == set(feeds)
    for name, array in feeds.items():
        assert array.shape[0] <= config.max_batch_size
        assert all(d in (-1, s) for d, s in zip(declared[name], array.shape[1:], strict=True))
    (output,) = config.output
    (logits,) = session.run([output.name], feeds)
    assert list(logits.shape[1:]) == list(output.dims)
    return np.asarray(logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def test_exports_load_in_triton_and_mlflow_and_answer_as_predict(
    served: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.onnx
    import mlflow.pyfunc
    import pandas

    import service.models.export as export

    client, auth = served.client, served.auth
    path = "/v1/models/digits/versions/1"
    version_id = client.get(path, headers=auth).json()["id"]
    pngs = held_out_pngs(3)
    labels, expected = _predicted(client, auth, "1", pngs)
    model_config = read_model_config(version_folder(served.context, version_id))

    repository = exported(client, auth, path, "triton", tmp_path / "triton")
    entry = repository / "digits"
    config = triton_config(entry)
    assert config.backend == "onnxruntime"
    assert config.HasField("dynamic_batching")
    order = (entry / config.output[0].label_filename).read_text().split()
    assert sorted(order) == labels
    prep = ExportedImagePreprocessing.of(model_config)
    tensor = normalise(
        np.concatenate(
            [view_pixels(Image.open(BytesIO(png)), prep.image_size, prep.tta) for png in pngs]
        ),
        prep,
    )
    logits = run_declared(entry, config, {"images": tensor})
    answered = softmax(logits / model_config.temperature)
    columns = [order.index(label) for label in labels]
    np.testing.assert_allclose(answered[:, columns], expected, atol=1e-5)

    loaded = mlflow.pyfunc.load_model(str(exported(client, auth, path, "mlflow", tmp_path / "ml")))
    frame = loaded.predict(pandas.DataFrame({"image": pngs}))
    np.testing.assert_allclose(frame[labels].to_numpy(), expected, atol=1e-5)
    assert mlflow.onnx.load_model(str(tmp_path / "ml")).graph.input[0].name == "images"

    # Built once: a second download is the kept zip, not a new build.
    def refuse(*_: Any) -> None:
        raise AssertionError("built twice")

    monkeypatch.setattr(export, "write_triton", refuse)
    again = client.get(f"{path}/export", params={"format": "triton"}, headers=auth)
    assert again.status_code == 200
    assert zipfile.ZipFile(BytesIO(again.content)).namelist()
    assert_error(
        client.get(f"{path}/export", params={"format": "hf"}, headers=auth),
        409,
        "export_unavailable",
        "format",
    )
    other = new_key(served.context, "team-b")
    refused = client.get(f"{path}/export", params={"format": "mlflow"}, headers=other)
    assert refused.status_code == 404


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Written out here, independently of the service's."""
    exps = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: np.ndarray = exps / exps.sum(axis=1, keepdims=True)
    return probabilities


def test_each_input_gets_its_own_top_labels_calibrated_and_averaged_over_its_views() -> None:
    """Answer assembly alone (no model): the rows of a forward pass become each good input's
    top-k, of the task asked, at its temperature, averaged over the input's adjacent views;
    inputs that failed before the pass keep their error entries."""
    tasks = {"old": ["a", "b"], "new": ["x", "y", "z"]}
    model = LoadedModel(
        version_id="mv_1",
        name="m",
        tasks=tasks,
        inputs=ServedImages(dataclasses.replace(EIGHT_PIXELS, tta=("original", "flip"))),
        backend="onnx",
        nbytes=0,
        forward=lambda batch: Outputs([], None),
        temperatures=[1.0, 2.0],
    )
    new = np.array(
        [
            [1.0, 3.0, 2.0],  # input 0, original view
            [1.0, 2.5, 2.2],  # input 0, flipped
            [900.0, 0.0, 1000.0],  # input 2: large logits stay finite
            [900.0, 0.0, 1000.0],
            [0.5, 0.5, 0.5],  # input 3: a tie keeps the labels' order
            [0.5, 0.5, 0.5],
        ]
    )
    old = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]])
    outputs = Outputs([old, new], None)

    def answer(task: str, top_k: int, calibrated: bool) -> list[Prediction]:
        results: list[Prediction] = [{"image": i} for i in range(4)]
        results[1]["error"] = {"code": "not_an_image"}
        fill_predictions(
            model, results, [0, 2, 3], outputs, task=task, top_k=top_k, calibrated=calibrated
        )
        return results

    def check(results: list[Prediction], logits: np.ndarray, temperature: float, k: int) -> None:
        labels = next(name for name, names in tasks.items() if len(names) == logits.shape[1])
        views = _softmax_rows(logits / temperature).reshape(3, 2, -1).mean(axis=1)
        for index, row in zip((0, 2, 3), views, strict=True):
            top = np.argsort(-row, kind="stable")[:k]
            got = results[index]["top"]
            assert [entry["label"] for entry in got] == [tasks[labels][i] for i in top]
            assert [entry["probability"] for entry in got] == pytest.approx(row[top].tolist())

    calibrated = answer("new", 2, True)
    assert calibrated[1] == {"image": 1, "error": {"code": "not_an_image"}}
    check(calibrated, new, 2.0, 2)
    assert [entry["label"] for entry in calibrated[3]["top"]] == ["x", "y"]  # the tie
    check(answer("new", 9, False), new, 1.0, 3)
    check(answer("old", 0, True), old, 1.0, 1)


def test_a_text_models_answers_have_one_row_per_input_and_ties_in_label_order() -> None:
    labels = [f"label_{i}" for i in range(20)]
    model = LoadedModel(
        version_id="mv_2",
        name="t",
        tasks={"topic": labels},
        # A text model: one row per input, no views.
        inputs=ServedTexts(ExportedTextPreprocessing("", 8, "head", "cls", {}, {}), tokenizer=None),
        backend="onnx",
        nbytes=0,
        forward=lambda batch: Outputs([], None),
        temperatures=[1.0],
    )
    # Many tied scores: a sort that is not stable would answer them out of the labels' order.
    logits = np.random.default_rng(0).integers(0, 2, size=(2, 20)).astype(np.float64)
    results: list[Prediction] = [{"text": 0}, {"text": 1}]
    fill_predictions(
        model, results, [0, 1], Outputs([logits], None), task="topic", top_k=20, calibrated=True
    )
    for result, row in zip(results, logits, strict=True):
        assert [entry["label"] for entry in result["top"]] == [
            labels[i] for i in np.argsort(-row, kind="stable")
        ]
    # A forward pass that answered fewer rows than inputs is an error, not fewer answers.
    with pytest.raises(ValueError, match="zip"):
        fill_predictions(
            model,
            results,
            [0, 1],
            Outputs([logits[:1]], None),
            task="topic",
            top_k=1,
            calibrated=True,
        )
