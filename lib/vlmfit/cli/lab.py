"""``vlmfit lab``: JupyterLab with a token; prints the full URL once it listens."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

from vlmfit.cli.common import Parser, command


def lab_command(ip: str, port: int, root: bool | None = None) -> list[str]:
    """The ``jupyter lab`` command line (the token travels in JUPYTER_TOKEN, not argv)."""
    root = os.geteuid() == 0 if root is None else root
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        f"--ip={ip}",
        f"--port={port}",
        "--no-browser",
        "--ServerApp.port_retries=0",  # the printed URL is the port it listens on, or it fails
        "--ServerApp.log_level=WARN",  # its INFO lines would bury the URL printed below
        f"--ServerApp.allow_remote_access={ip not in ('127.0.0.1', 'localhost')}",
    ]
    if root:  # a root shell on a host or a root container: Jupyter refuses without it
        cmd.append("--allow-root")
    return cmd


def _listening(port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout):
        return True
    return False


@command("lab")
def cli_lab(argv: list[str]) -> int:
    """``vlmfit lab``: JupyterLab with a token; prints the full URL once it listens."""
    p = Parser("lab", "JupyterLab with a token; prints the full URL once it listens.")
    p.add_argument("--ip", default="127.0.0.1", help="interface (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8888, help="(default 8888)")
    a = p.parse_args(argv)
    if _listening(a.port):
        p.error(f"port {a.port} is taken; choose LAB_PORT=<port>")
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(24)
    env = dict(os.environ, JUPYTER_TOKEN=token)
    proc = subprocess.Popen(lab_command(a.ip, a.port), env=env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    url = f"http://127.0.0.1:{a.port}/lab?token={token}"
    while proc.poll() is None:
        if _listening(a.port):
            where = (
                " (published on the host's 127.0.0.1 by docker run -p 127.0.0.1:PORT:PORT)"
                if os.environ.get("VLMFIT_IN_CONTAINER") == "1"
                else ""
            )
            print(f"\nJupyterLab is running{where}; open:\n\n    {url}\n", flush=True)
            break
        time.sleep(0.3)
    return proc.wait()
