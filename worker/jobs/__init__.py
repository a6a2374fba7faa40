"""Runs one training job: claim it in the database, train with the engine, publish the result.

- `attempt.py`: one delivery of the job's task, from its claim to how the attempt ends;
- `hooks.py`: the job's hooks into training (events, checkpoints, lease, cancellation);
- `training.py`: from the dataset to a trained model (`lr: auto`, shared features, resume);
- `publish.py`: the version's folder, its upload and its fenced registration.
"""

from worker.jobs.attempt import execute
from worker.jobs.hooks import JobHooks, claim, shutdown_requested
from worker.jobs.training import download_checkpoint

__all__ = ["JobHooks", "claim", "download_checkpoint", "execute", "shutdown_requested"]
