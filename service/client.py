"""The Python SDK: a typed client for thaw's HTTP API (what the `thaw` command line runs on).

    with ThawClient("http://127.0.0.1:8000", api_key="thaw_...") as thaw:
        dataset = thaw.wait_dataset(thaw.upload_dataset(Path("pets")).id)
        job = thaw.create_job({"dataset": dataset.id, "model": "pets", "epochs": 3})
        for event in thaw.stream_events(job.id):
            print(event.event, event.data)

Every method raises `ThawError` (status, code, message, param) when the API answers an error.
"""

import json
import logging
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

import httpx
from pydantic import BaseModel

from service.datasets.schemas import DatasetOut
from service.experiments.schemas import ExperimentOut, ExperimentSummaryOut, PromoteOut
from service.inference.schemas import PredictOut
from service.jobs.schemas import JobEventOut, JobOut, LrFindOut, PlanOut
from service.jobs.states import TERMINAL_STATUSES
from service.models.schemas import AliasOut, ModelOut, VersionDetail, VersionOut
from service.monitoring.schemas import FeedbackOut, MonitoringOut
from service.webhooks.schemas import WebhookCreated, WebhookOut

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
M = TypeVar("M", bound=BaseModel)
ProgressCallback = Callable[[int, int], None]
"""Called with (bytes sent so far, total bytes)."""


class ThawError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.param = param


@dataclass(frozen=True)
class StreamEvent:
    """One server-sent event: `status`/`epoch` (with the stored event's id) or `progress`."""

    event: str
    data: dict[str, Any]
    id: int | None = None

    @property
    def terminal(self) -> bool:
        return (
            self.event == "status" and self.data.get("data", {}).get("status") in TERMINAL_STATUSES
        )


class _ProgressReader:
    """A file whose reads report progress; httpx streams multipart files in chunks through it."""

    def __init__(self, file: IO[bytes], total: int, callback: ProgressCallback) -> None:
        self._file = file
        self._total = total
        self._callback = callback
        self._sent = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._sent += len(chunk)
        self._callback(self._sent, self._total)
        return chunk

    def fileno(self) -> int:
        # Lets httpx learn the length from the file itself, so the upload is not buffered.
        return self._file.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


def zip_folder(folder: Path, destination: Path) -> Path:
    """`folder` as a zip whose top entry is the folder itself (one sub-folder per class inside).

    Stored, not deflated: images are compressed already, and this keeps big folders fast.
    """
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, Path(folder.name) / path.relative_to(folder))
    return destination


def parse_ref(text: str) -> tuple[str, str | None]:
    """`name[:version-or-alias]` → (name, ref or None)."""
    name, _, ref = text.partition(":")
    return name, (ref or None)


class ThawClient:
    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- plumbing -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        _raise_for_error(response)
        return response

    def _get(self, model: type[M], path: str, **kwargs: Any) -> M:
        return model.model_validate(self._request("GET", path, **kwargs).json())

    def _pages(self, model: type[M], path: str, **params: Any) -> Iterator[M]:
        after: str | int | None = None
        while True:
            query = {**params, "limit": 200, **({"after": after} if after is not None else {})}
            page = self._request("GET", path, params=query).json()
            yield from (model.model_validate(item) for item in page["data"])
            if not page["has_more"]:
                return
            after = page["last_id"]

    # --- datasets -----------------------------------------------------------------------------

    def upload_dataset(
        self,
        path: Path,
        *,
        name: str | None = None,
        val_fraction: float | None = None,
        seed: int | None = None,
        text_column: str | None = None,
        label_column: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> DatasetOut:
        """Upload an archive, a CSV or JSON Lines file of texts, or a folder (one sub-folder
        per class), zipped on the fly."""
        given = {
            "name": name,
            "val_fraction": val_fraction,
            "seed": seed,
            "text_column": text_column,
            "label_column": label_column,
        }
        fields = {key: str(value) for key, value in given.items() if value is not None}
        if path.is_dir():
            fields.setdefault("name", path.resolve().name)
            with tempfile.TemporaryDirectory(prefix="thaw-upload-") as scratch:
                archive = zip_folder(path, Path(scratch) / f"{path.resolve().name}.zip")
                return self._upload_file(archive, fields, on_progress)
        return self._upload_file(path, fields, on_progress)

    def _upload_file(
        self, path: Path, fields: dict[str, str], on_progress: ProgressCallback | None
    ) -> DatasetOut:
        total = path.stat().st_size
        with path.open("rb") as file:
            body: Any = _ProgressReader(file, total, on_progress) if on_progress else file
            response = self._request(
                "POST",
                "/v1/datasets",
                files={"file": (path.name, body, "application/octet-stream")},
                data=fields,
                timeout=None,
            )
        return DatasetOut.model_validate(response.json())

    def get_dataset(self, dataset_id: str) -> DatasetOut:
        return self._get(DatasetOut, f"/v1/datasets/{dataset_id}")

    def list_datasets(self) -> Iterator[DatasetOut]:
        return self._pages(DatasetOut, "/v1/datasets")

    def wait_dataset(
        self,
        dataset_id: str,
        *,
        timeout: float = 3600.0,
        poll_seconds: float = 1.0,
        on_progress: Callable[[DatasetOut], None] | None = None,
    ) -> DatasetOut:
        """Poll until the dataset is `ready` or `failed` (returned either way)."""
        deadline = time.monotonic() + timeout
        while True:
            dataset = self.get_dataset(dataset_id)
            if on_progress:
                on_progress(dataset)
            if dataset.status != "processing":
                return dataset
            if time.monotonic() > deadline:
                raise TimeoutError(f"dataset {dataset_id} still processing after {timeout}s")
            time.sleep(poll_seconds)

    # --- jobs ---------------------------------------------------------------------------------

    def plan(self, spec: dict[str, Any]) -> PlanOut:
        return PlanOut.model_validate(self._request("POST", "/v1/jobs/plan", json=spec).json())

    def create_job(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> JobOut:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._request("POST", "/v1/jobs", json=spec, headers=headers)
        return JobOut.model_validate(response.json())

    def create_lr_find_job(
        self, spec: dict[str, Any], *, idempotency_key: str | None = None
    ) -> JobOut:
        """Queue the learning-rate finder on a spec's first stage (a job of kind `lr_find`)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._request("POST", "/v1/jobs/lr-find", json=spec, headers=headers)
        return JobOut.model_validate(response.json())

    def lr_finding(self, job_id: str) -> LrFindOut:
        """The finder's curve and suggestion (an `lr_find` job, or a job with `lr: auto`)."""
        return self._get(LrFindOut, f"/v1/jobs/{job_id}/lr-find")

    def lr_find_plot(self, job_id: str) -> bytes:
        """The finder's curve as an SVG image."""
        return self._request("GET", f"/v1/jobs/{job_id}/plots/lr-find.svg").content

    def get_job(self, job_id: str) -> JobOut:
        return self._get(JobOut, f"/v1/jobs/{job_id}")

    def list_jobs(self) -> Iterator[JobOut]:
        return self._pages(JobOut, "/v1/jobs")

    def cancel_job(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def list_events(self, job_id: str) -> Iterator[JobEventOut]:
        return self._pages(JobEventOut, f"/v1/jobs/{job_id}/events")

    def stream_events(
        self, job_id: str, *, after: int | None = None, reconnects: int = 20
    ) -> Iterator[StreamEvent]:
        """Follow the job live until its terminal status event, reconnecting where it left off."""
        last_id = after
        failures = 0
        while True:
            headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
            try:
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events/stream", headers=headers, timeout=None
                ) as response:
                    if response.is_error:
                        response.read()
                        _raise_for_error(response)
                    for event in parse_sse(response.iter_lines()):
                        failures = 0
                        if event.id is not None:
                            last_id = event.id
                        yield event
                        if event.terminal:
                            return
                    return  # the server ended the stream: the job is gone or already over
            except httpx.TransportError as exc:
                failures += 1
                if failures > reconnects:
                    raise
                logger.info("event stream dropped (%s); reconnecting after %s", exc, last_id)
                time.sleep(min(2.0 * failures, 10.0))

    # --- experiments --------------------------------------------------------------------------

    def create_experiment(self, request: dict[str, Any]) -> ExperimentOut:
        response = self._request("POST", "/v1/experiments", json=request)
        return ExperimentOut.model_validate(response.json())

    def get_experiment(self, experiment_id: str) -> ExperimentOut:
        return self._get(ExperimentOut, f"/v1/experiments/{experiment_id}")

    def list_experiments(self) -> Iterator[ExperimentSummaryOut]:
        return self._pages(ExperimentSummaryOut, "/v1/experiments")

    def cancel_experiment(self, experiment_id: str) -> ExperimentOut:
        response = self._request("POST", f"/v1/experiments/{experiment_id}/cancel")
        return ExperimentOut.model_validate(response.json())

    def promote_experiment(
        self, experiment_id: str, *, trial: str | None = None, alias: str = "production"
    ) -> PromoteOut:
        body = {"alias": alias, **({"trial": trial} if trial else {})}
        response = self._request("POST", f"/v1/experiments/{experiment_id}/promote", json=body)
        return PromoteOut.model_validate(response.json())

    # --- webhook ------------------------------------------------------------------------------

    def set_webhook(self, url: str) -> WebhookCreated:
        """Send this tenant's events to `url`; the answer holds the signing secret, once."""
        response = self._request("PUT", "/v1/webhook", json={"url": url})
        return WebhookCreated.model_validate(response.json())

    def get_webhook(self) -> WebhookOut:
        return self._get(WebhookOut, "/v1/webhook")

    def delete_webhook(self) -> None:
        self._request("DELETE", "/v1/webhook")

    # --- models -------------------------------------------------------------------------------

    def list_models(self) -> Iterator[ModelOut]:
        return self._pages(ModelOut, "/v1/models")

    def get_model(self, name: str) -> ModelOut:
        return self._get(ModelOut, f"/v1/models/{name}")

    def list_versions(self, name: str) -> Iterator[VersionOut]:
        return self._pages(VersionOut, f"/v1/models/{name}/versions")

    def resolve_ref(self, name: str, ref: str | None) -> str:
        """A version number or alias; without one, the model's latest version."""
        if ref:
            return ref
        latest = self.get_model(name).latest_version
        if latest is None:
            raise ThawError(404, "version_not_found", f"Model {name!r} has no versions yet.")
        return str(latest.version)

    def get_version(self, name: str, ref: str | None = None) -> VersionDetail:
        return self._get(VersionDetail, f"/v1/models/{name}/versions/{self.resolve_ref(name, ref)}")

    def get_monitoring(self, name: str, ref: str, *, limit: int = 100) -> MonitoringOut:
        """The version's latest monitoring windows, oldest first."""
        path = f"/v1/models/{name}/versions/{ref}/monitoring"
        return self._get(MonitoringOut, path, params={"limit": limit})

    def send_feedback(self, name: str, ref: str, labels: dict[str, str]) -> FeedbackOut:
        """The true label of each prediction id."""
        body = {"feedback": [{"prediction_id": i, "label": label} for i, label in labels.items()]}
        response = self._request("POST", f"/v1/models/{name}/versions/{ref}/feedback", json=body)
        return FeedbackOut.model_validate(response.json())

    def download_artifact(self, name: str, ref: str, artifact: str, destination: Path) -> Path:
        path = f"/v1/models/{name}/versions/{ref}/artifacts/{artifact}"
        with self._http.stream("GET", path, timeout=None) as response:
            if response.is_error:
                response.read()
                _raise_for_error(response)
            partial = destination.with_name(destination.name + ".part")
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
            partial.replace(destination)
        return destination

    def download_export(self, name: str, ref: str, export_format: str, destination: Path) -> Path:
        """A version exported for another stack (`triton`, `mlflow`, `hf`), as a zip."""
        path = f"/v1/models/{name}/versions/{ref}/export"
        params = {"format": export_format}
        with self._http.stream("GET", path, params=params, timeout=None) as response:
            if response.is_error:
                response.read()
                _raise_for_error(response)
            partial = destination.with_name(destination.name + ".part")
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
            partial.replace(destination)
        return destination

    def set_alias(self, name: str, alias: str, version: int) -> AliasOut:
        response = self._request(
            "PUT", f"/v1/models/{name}/aliases/{alias}", json={"version": version}
        )
        return AliasOut.model_validate(response.json())

    def predict(
        self, name: str, ref: str | None, images: list[Path], *, top_k: int = 5
    ) -> PredictOut:
        version = self.resolve_ref(name, ref)
        files = [("images", (image.name, image.read_bytes())) for image in images]
        response = self._request(
            "POST",
            f"/v1/models/{name}/versions/{version}/predict",
            files=files,
            data={"top_k": str(top_k)},
        )
        return PredictOut.model_validate(response.json())

    def predict_texts(
        self, name: str, ref: str | None, texts: list[str], *, top_k: int = 5
    ) -> PredictOut:
        version = self.resolve_ref(name, ref)
        response = self._request(
            "POST",
            f"/v1/models/{name}/versions/{version}/predict",
            json={"texts": texts, "top_k": top_k},
        )
        return PredictOut.model_validate(response.json())


def parse_sse(lines: Iterator[str]) -> Iterator[StreamEvent]:
    """Server-sent events from a stream of lines (comments and `retry:` are skipped)."""
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in fields:
                event_id = fields.get("id")
                yield StreamEvent(
                    event=fields.get("event", "message"),
                    data=json.loads(fields["data"]),
                    id=int(event_id) if event_id else None,
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def _raise_for_error(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        error = response.json()["error"]
        raise ThawError(response.status_code, error["code"], error["message"], error.get("param"))
    except (ValueError, KeyError, TypeError):
        raise ThawError(
            response.status_code, "http_error", response.text[:500] or response.reason_phrase
        ) from None
