"""`make lab` starts for real, as whoever runs it, token required, URL printed (issue 10, 1).

    pytest -q tests/test_workbench_lab.py

Starts JupyterLab with `make lab` on a free port (as root on a host, which Jupyter
refuses without --allow-root; as the image's non-root user in the container), waits for
the printed URL, then asks the server: 403 without the token, 200 with it, and reads
/proc/net/tcp for the address it listens on (127.0.0.1 on a host; in the container
0.0.0.0, which `docker run -p 127.0.0.1:8888:8888` publishes on the host's loopback only).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vlmfit.cli.lab import lab_command

ROOT = Path(__file__).resolve().parents[1]
IN_CONTAINER = os.environ.get("VLMFIT_IN_CONTAINER") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _listen_addresses(port: int) -> set[str]:
    """IPv4 addresses listening on ``port`` (state 0A = LISTEN in /proc/net/tcp)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:
            out.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return out


def test_make_lab_starts_with_a_token_and_prints_its_url(tmp_path):
    port = _free_port()
    log = tmp_path / "lab.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            ["make", "-s", "lab", f"LAB_PORT={port}"],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped together below
            env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")},
        )
    try:
        url = None
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            m = re.search(
                rf"http://127\.0\.0\.1:{port}/lab\?token=([0-9a-f]{{48}})", log.read_text()
            )
            if m:
                url, token = m.group(0), m.group(1)
                break
            time.sleep(0.5)
        assert url, f"no URL with a token printed (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        base = f"http://127.0.0.1:{port}"
        assert _status(f"{base}/api/status") == 403, "a token is required"
        assert _status(f"{base}/api/status?token=wrong") == 403
        assert _status(f"{base}/api/status?token={token}") == 200
        assert _status(url) == 200, "the printed URL opens the lab"
        expected = {"0.0.0.0"} if IN_CONTAINER else {"127.0.0.1"}
        assert _listen_addresses(port) == expected
        assert "Running as root is not recommended" not in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_lab_command_allows_root_only_for_root():
    assert "--allow-root" in lab_command("127.0.0.1", 8888, root=True)
    cmd = lab_command("127.0.0.1", 8888, root=False)
    assert "--allow-root" not in cmd
    assert "--ServerApp.allow_remote_access=False" in cmd and "--ServerApp.port_retries=0" in cmd
    assert not any("token" in a.lower() for a in cmd), "the token is not in argv (ps shows it)"


@pytest.mark.parametrize("container, ip", [("0", "127.0.0.1"), ("1", "0.0.0.0")])
def test_lab_interface_by_default(container, ip):
    out = subprocess.run(
        ["make", "-n", "lab", f"VLMFIT_IN_CONTAINER={container}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"-m vlmfit lab --ip {ip} --port 8888" in out
