"""The dashboard listens on this machine only unless it is exposed on purpose."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(pid: int, port: int, timeout: float = 60.0) -> list[str]:
    """The addresses the process tree of ``pid`` listens on at ``port`` (waits until there is one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        found = [c.laddr.ip for p in procs for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"nothing listened on port {port} within {timeout} s")


@pytest.mark.slow
def test_streamlit_started_from_the_repository_listens_on_localhost_only():
    port = _free_port()
    # No --server.address: the repository's .streamlit/config.toml must supply it.
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port",
                             str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert set(_listening(proc.pid, port)) == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_make_dashboard_binds_to_localhost_unless_address_is_given():
    dry = subprocess.run(["make", "-n", "dashboard"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--server.address 127.0.0.1" in dry
    exposed = subprocess.run(["make", "-n", "dashboard", "ADDRESS=0.0.0.0"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    assert "--server.address 0.0.0.0" in exposed
