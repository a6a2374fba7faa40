"""A job's attempts on the worker side, in-process on a real database: the lease is kept while
setup downloads (before training renews it), a stale attempt neither writes its checkpoint
over a newer attempt's nor is resumed from, and a checkpoint written before parents were named
by key still resumes."""

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from service.cli import migrate_database
from service.context import AppContext
from service.db import utcnow
from service.jobs import transitions
from service.jobs.service import checkpoint_key, job_files_prefix, latest_checkpoint_key
from service.settings import Settings
from service.tables import Dataset, Job, Tenant
from worker import jobs
from worker.engine import TrainingCancelled, TransferConfig, compile_plan
from worker.engine.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppContext]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("worker-host"),
        lease_seconds=3,
        reaper_interval_seconds=3600,
    )
    migrate_database(settings)
    context = AppContext(settings)
    yield context
    context.db.engine.dispose()


def _queued_job(context: AppContext) -> str:
    with context.db.session() as session:
        tenant = Tenant(name=f"team-{time.monotonic_ns()}")
        session.add(tenant)
        session.flush()
        dataset = Dataset(tenant_id=tenant.id, name="digits", status="ready")
        session.add(dataset)
        session.flush()
        job = Job(
            tenant_id=tenant.id,
            dataset_id=dataset.id,
            model_name="digits",
            base_model="efficientnet_lite0",
            strategy="fine_tune",
            spec={},
            plan={},
            queue="cpu",
            max_runtime_seconds=600,
        )
        transitions.create(session, job=job)
        session.commit()
        return job.id


def _hooks(context: AppContext, job_id: str, owner: str) -> jobs.JobHooks:
    claimed = jobs.claim(context, job_id=job_id, owner=owner)
    return jobs.JobHooks(context, job_id=job_id, claim=claimed)


def _take_over(context: AppContext, job_id: str) -> jobs.JobHooks:
    """The reaper finds the lease expired and another worker claims the job: a new attempt."""
    with context.db.session() as session:
        job = session.get_one(Job, job_id)
        transitions.expire_lease(
            session, job=job, max_worker_losses=10, now=utcnow() + timedelta(hours=1)
        )
        session.commit()
    return _hooks(context, job_id, "host-b:2")


def _lease_expiry(context: AppContext, job_id: str) -> object:
    with context.db.session() as session:
        return session.get_one(Job, job_id).lease_expires_at


def _until(what: str, happened: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not happened():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _checkpoint_file(folder: Path, content: bytes) -> Path:
    path = folder / f"checkpoint-{time.monotonic_ns()}.pt"
    path.write_bytes(content)
    return path


def test_the_lease_is_renewed_while_setup_downloads_and_no_longer_after(
    context: AppContext,
) -> None:
    job_id = _queued_job(context)
    hooks = _hooks(context, job_id, "host-a:1")
    claimed_until = _lease_expiry(context, job_id)
    with hooks.renewing_lease():
        # A slow download of the dataset: no training step renews the lease meanwhile.
        _until("a renewal", lambda: _lease_expiry(context, job_id) != claimed_until)
        hooks.check_still_ours()
    assert not any(t.name == f"lease-{job_id}" for t in threading.enumerate())


def test_a_job_taken_over_during_setup_stops_its_stale_attempt(context: AppContext) -> None:
    job_id = _queued_job(context)
    stale = _hooks(context, job_id, "host-a:1")

    def noticed() -> bool:
        try:
            stale.check_still_ours()
        except TrainingCancelled:
            return True
        return False

    with stale.renewing_lease():
        _take_over(context, job_id)
        _until("the stale attempt to notice", noticed)
    assert stale.should_stop()


def test_a_stale_attempt_neither_overwrites_nor_is_resumed_from(
    context: AppContext, tmp_path: Path
) -> None:
    job_id = _queued_job(context)
    store = context.store
    # Saved by a worker from before checkpoints moved under attempts.
    store.put_bytes(f"{job_files_prefix(job_id)}/checkpoint.pt", b"from before")
    stale = _hooks(context, job_id, "host-a:1")
    stale.on_checkpoint(_checkpoint_file(tmp_path, b"epoch 1 by attempt 1"))
    assert latest_checkpoint_key(store, job_id) == checkpoint_key(job_id, 1)
    assert not store.exists(f"{job_files_prefix(job_id)}/checkpoint.pt"), "superseded"

    current = _take_over(context, job_id)
    dest = tmp_path / "resume.pt"
    assert jobs.download_checkpoint(context, job_id=job_id, attempt=current.attempt, dest=dest)
    assert dest.read_bytes() == b"epoch 1 by attempt 1"
    current.on_checkpoint(_checkpoint_file(tmp_path, b"epoch 2 by attempt 2"))
    stale.on_checkpoint(_checkpoint_file(tmp_path, b"epoch 2 by attempt 1"))  # fenced
    assert not store.exists(checkpoint_key(job_id, 1))
    # Even a stale upload already under way when the lease was lost lands beside, not over.
    store.put_bytes(checkpoint_key(job_id, 1), b"late write by attempt 1")
    assert store.get_bytes(checkpoint_key(job_id, 2)) == b"epoch 2 by attempt 2"
    assert jobs.download_checkpoint(context, job_id=job_id, attempt=3, dest=dest)
    assert dest.read_bytes() == b"epoch 2 by attempt 2"


def test_a_checkpoint_naming_its_parent_by_host_path_resumes_the_job_naming_it_by_key(
    tmp_path: Path,
) -> None:
    plan = compile_plan(
        TransferConfig(base_model="efficientnet_lite0", num_classes=2, strategy="fine_tune")
    )
    chained = plan.to_dict() | {"parent": "models/job_1/attempt-1"}
    job_plan = type(plan).from_dict(chained)
    old_plan = {k: v for k, v in chained.items() if k != "parent"}
    old_plan["parent_dir"] = "/srv/thaw/artifacts/models/job_1/attempt-1"
    path = tmp_path / "old.pt"
    torch.save({"plan": old_plan, "epoch": 1}, path)
    assert load_checkpoint(path, job_plan)["epoch"] == 1
    other = type(plan).from_dict(plan.to_dict() | {"parent": "models/job_2/attempt-1"})
    torch.save({"plan": plan.to_dict() | {"parent": "models/job_1/attempt-1"}, "epoch": 1}, path)
    with pytest.raises(ValueError, match="different plan"):
        load_checkpoint(path, other)
