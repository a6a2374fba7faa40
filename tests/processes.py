"""Running thaw's processes from tests as an operator runs them, and waiting on them."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

THAW = [sys.executable, "-m", "service.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def thaw_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
    env.update({"THAW_DATA_DIR": str(data_dir), "THAW_TORCH_THREADS": "2", **extra})
    return env


def create_key(env: dict[str, str], tenant: str) -> dict[str, str]:
    """An API key, made as an operator makes the first one: migrate, then `thaw keys create`
    (which refuses a database that has no tables)."""
    subprocess.run([*THAW, "migrate"], env=env, capture_output=True, check=True)
    done = subprocess.run(
        [*THAW, "keys", "create", "--tenant", tenant],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {"Authorization": f"Bearer {done.stdout.strip().splitlines()[-1]}"}


@contextmanager
def running(
    command: list[str],
    env: dict[str, str],
    log: Path,
    stop_signal: signal.Signals = signal.SIGINT,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a process for the block's duration, then stop it as its operator does: Ctrl-C for
    the API (uvicorn exits 0 on it, and re-raises SIGTERM), SIGTERM for a Celery worker (it
    takes Ctrl-C for a failure and exits 1).

    A process still running at the end must shut down cleanly: exit code 0 within 30 s, or
    the test fails with the end of its log. One that exited earlier (a test killed it on
    purpose) is the test's to check."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        except BaseException:
            stop(process, stop_signal)
            raise
        if process.poll() is not None:
            return
        code = stop(process, stop_signal)
    if code != 0:
        pytest.fail(
            f"{' '.join(command[-4:])} did not shut down cleanly (exit code {code}):\n"
            + log.read_text(errors="replace")[-3000:]
        )


def stop(process: subprocess.Popen[bytes], stop_signal: signal.Signals) -> int | None:
    """The signal, then SIGKILL after 30 s; the exit code of a clean stop, None if killed."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(stop_signal)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def wait_ready(base: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"server not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def poll(client: httpx.Client, path: str, until: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(path).raise_for_status().json()
        if body["status"] in until:
            return body
        time.sleep(0.25)
    pytest.fail(f"{path} did not reach {until} in {timeout}s: {body}")
