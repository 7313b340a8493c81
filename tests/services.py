"""Whole services for the slow tests: free ports, waiting for HTTP, stopping process groups, headless
Chromium. The UI page capture (`scripts/mlflow_ui_pages.py`) uses the same functions."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--virtual-time-budget=15000",
]  # fmt: skip


class ServiceError(RuntimeError):
    """A service did not start (the tests turn it into a failure with its log)."""


def tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise ServiceError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    """Signal the whole process group (the MLflow server forks uvicorn workers), then make sure."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def chromium(*args: str, profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)  # fmt: skip


def pipeline_in_own_state(state: Path, config: dict) -> dict:
    """`python -m tasks pipeline` in a process of its own with a private QUANT_HOME and SQLite store;
    returns its environment (for the processes that read what it recorded)."""
    import json

    env = {**os.environ, "QUANT_HOME": str(state), "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}"}
    env.pop("QUANT_ARTIFACT_ROOT", None)
    proc = subprocess.run([sys.executable, "-m", "tasks", "pipeline", "--config", json.dumps(config)], cwd=Path(__file__).resolve().parent.parent,
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    if proc.returncode != 0:
        raise ServiceError(f"the pipeline failed:\n{proc.stderr[-3000:]}")
    return env
