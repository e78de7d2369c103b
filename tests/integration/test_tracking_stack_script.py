"""scripts/tracking_stack.py as a user runs it: start, print the tracking URI, stop everything on a signal."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "tracking_stack.py"
START_TIMEOUT_S = 150


def _read_until_ready(process: subprocess.Popen, stderr_path: Path) -> dict[str, str]:
    """Read the script's stdout until its summary ends; return the ``NAME=value`` and ``label: value`` lines."""
    lines: queue.Queue[str] = queue.Queue()
    # A thread reads because select() cannot see lines already held in the text wrapper's buffer.
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()

    summary: dict[str, str] = {}
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if "=" in line:
            name, value = line.strip().split("=", 1)
            summary[name] = value
        elif ": " in line:
            label, value = line.strip().split(": ", 1)
            summary[label] = value
        if line.startswith("logs: "):
            return summary

    process.kill()
    process.wait()
    raise AssertionError(
        f"the script printed no complete summary within {START_TIMEOUT_S} s: {summary}\n{stderr_path.read_text()[-3000:]}"
    )


def _read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_script_stops_every_service_on_signal(stop_signal, stack_tools, tmp_path):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT)], cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        summary = _read_until_ready(process, stderr_path)
        tracking_uri = summary["MLFLOW_TRACKING_URI"]
        folder = Path(summary["logs"])
        env_file = Path(summary["addresses and credentials"])
        stack_env = _read_env_file(env_file)

        with urllib.request.urlopen(tracking_uri + "/health", timeout=5) as response:
            assert response.status == 200
        assert oct(env_file.stat().st_mode & 0o777) == oct(0o600)
        ports = {
            "MLflow": urlparse(tracking_uri).port,
            "S3": urlparse(stack_env["MLFLOW_S3_ENDPOINT_URL"]).port,
            "PostgreSQL": urlparse(stack_env["POSTGRES_URI"]).port,
        }
        for name, port in ports.items():
            assert _port_open(port), f"{name} is not listening on port {port}"

        process.send_signal(stop_signal)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert returncode == 0, stderr_path.read_text()[-3000:]
    assert "stopped PostgreSQL" in stderr_path.read_text()
    for name, port in ports.items():
        assert not _port_open(port), f"{name} still listens on port {port} after the script stopped"
    assert not folder.exists()

