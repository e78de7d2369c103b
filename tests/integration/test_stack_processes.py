"""Process handling of the tracking stack without real servers: start failures, time-outs, missing tools."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from granularity.errors import UserError
from granularity.tracking.stack import ManagedProcess, S3Server, StackError, TrackingStack, find_free_port

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "tracking_stack.py"


class SleepingServer(ManagedProcess):
    """A process that runs but never becomes healthy."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import time; print('starting', flush=True); time.sleep(60)"]

    def is_healthy(self) -> bool:
        return False


def test_unhealthy_service_times_out_and_is_stopped(tmp_path):
    server = SleepingServer("sleeping server", tmp_path / "sleeping.log")

    with pytest.raises(StackError) as caught:
        server.start(timeout_s=1.0)

    message = str(caught.value)
    assert "sleeping server did not become healthy within 1 s" in message
    assert str(tmp_path / "sleeping.log") in message
    assert not server.is_running
    assert "starting" in (tmp_path / "sleeping.log").read_text()


def test_service_exiting_during_start_names_its_log(tmp_path):
    pytest.importorskip("moto.server", reason="moto's S3 server is not installed; run pip install 'moto[server]'")

    # A port that is already bound makes moto's server exit at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = S3Server(tmp_path, port, "bucket", access_key="key", secret_key="secret")

        with pytest.raises(StackError) as caught:
            server.start(timeout_s=60.0)

    message = str(caught.value)
    assert message.startswith("S3 server (moto) exited with code ")
    assert str(tmp_path / "s3.log") in message
    assert "already in use" in (tmp_path / "s3.log").read_text().lower()


def test_stop_kills_process_ignoring_signal(tmp_path):
    class StubbornServer(SleepingServer):
        def command(self) -> list[str]:
            return [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"]

        def is_healthy(self) -> bool:
            return "ready" in self.log_path.read_text()

    server = StubbornServer("stubborn server", tmp_path / "stubborn.log")
    server.start(timeout_s=30.0)
    pid = server.pid

    server.stop(timeout_s=1.0)

    assert not server.is_running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_postgres_is_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GRANULARITY_POSTGRES_BIN", str(tmp_path / "no-postgres"))

    with pytest.raises(UserError, match=r"PostgreSQL binaries \(initdb, postgres\) not found"):
        TrackingStack()


def test_script_exits_2_without_postgres(tmp_path):
    environment = dict(os.environ, GRANULARITY_POSTGRES_BIN=str(tmp_path / "no-postgres"))
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 2
    assert "PostgreSQL binaries (initdb, postgres) not found" in result.stderr
    assert "GRANULARITY_POSTGRES_BIN" in result.stderr


def test_free_port_is_bindable():
    port = find_free_port()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", port))
