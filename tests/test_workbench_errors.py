"""Mistakes stop early, in one line, without a traceback (issue 10, points 2 and 7).

    pytest -q tests/test_workbench_errors.py

Each case runs the real entry point (`make ...` or `python -m vlmfit ...`) as a user
would, and checks: non-zero exit, the message (with its "did you mean"), no traceback,
that nothing was started or overwritten, and how long it took.
"""

from __future__ import annotations

import dataclasses
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlmfit.config import RunConfig
from vlmfit.models import registry
from vlmfit.report.preflight import ParameterError, check_parameters, hub_problem

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"


def _make(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    t0 = time.time()
    proc = subprocess.run(
        ["make", "-s", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return proc, time.time() - t0


def _vlmfit(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "vlmfit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _our_lines(stderr: str) -> list[str]:
    """stderr without make's own trailer (`make: *** [...] Error 2`)."""
    return [x for x in stderr.splitlines() if x.strip() and not x.startswith("make")]


def _one_line_error(proc, *needles: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = _our_lines(proc.stderr)
    assert lines, proc.stdout + proc.stderr
    last = lines[-1]
    assert last.startswith("vlmfit"), last
    for n in needles:
        assert n in last, last
    return last


def test_unknown_model_says_did_you_mean_before_any_notebook(tmp_path):
    proc, took = _make("preprocess", "MODEL=smolvlmm", f"REPORTS={tmp_path}")
    _one_line_error(proc, "unknown MODEL 'smolvlmm'", "did you mean 'smolvlm'")
    assert list(tmp_path.iterdir()) == [], "no notebook ran, no report was written"
    assert took < 60


def test_missing_data_fails_preprocess_and_keeps_the_good_report(tmp_path):
    good = tmp_path / "preprocess-tiny-smolvlm.html"
    good.write_text("<title>the good report</title>")
    proc, _ = _make(
        "preprocess", "MODEL=tiny-smolvlm", "DATA=data/no-such.json", f"REPORTS={tmp_path}"
    )
    _one_line_error(proc, "data 'data/no-such.json': no such file or folder")
    assert good.read_text() == "<title>the good report</title>"


def test_unknown_params_name_says_did_you_mean(tmp_path):
    proc, _ = _make(
        "sft",
        "MODEL=tiny-smolvlm",
        "RUN=wb-never",
        "PARAMS=learning_rat=1e-3",
        f"REPORTS={tmp_path}",
    )
    _one_line_error(proc, "unknown parameter 'learning_rat'", "did you mean 'learning_rate'")
    assert not (ROOT / "runs" / "wb-never").exists()


def test_params_take_runconfig_fields_into_extra():
    params = check_parameters(NB / "sft.ipynb", {"lora_r": 8, "extra": {"use_dora": True}})
    assert params == {"extra": {"lora_r": 8, "use_dora": True}}
    with pytest.raises(ParameterError, match="did you mean 'lora_alpha'"):
        check_parameters(NB / "sft.ipynb", {"extra": {"lora_alfa": 8}})
    # the preprocessing notebook has no `extra`: a training field is simply unknown there
    with pytest.raises(ParameterError, match="unknown parameter 'lora_r'"):
        check_parameters(NB / "preprocess.ipynb", {"lora_r": 8})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_fails_in_seconds_naming_the_fixes(tmp_path):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    env["HF_HUB_OFFLINE"] = "0"
    proc, took = _make("preprocess", "MODEL=smolvlm", f"REPORTS={tmp_path / 'r'}", env=env)
    last = _one_line_error(proc, "cannot reach", "HuggingFaceTB/SmolVLM-256M-Instruct")
    for fix in ("WEIGHTS=random", "tiny-*", "local model folder"):
        assert fix in last
    assert took < 30, f"{took:.0f} s"
    assert not (tmp_path / "r").exists()


class _Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in hub endpoint: one known model, everything else 404."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        ok = self.path.startswith("/api/models/HuggingFaceTB/SmolVLM-256M-Instruct/revision/")
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_hub_probe_against_a_real_http_endpoint(tmp_path, monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HOME", str(tmp_path))
        assert hub_problem("smolvlm", "hub") == (None, False)
        problem, _ = hub_problem("qwen2-vl-2b", "hub")
        assert "Qwen/Qwen2-VL-2B-Instruct@main: not found" in problem
        assert hub_problem("smolvlm", "random") == (None, False)  # no hub involved
        assert hub_problem("tiny-smolvlm", "hub") == (None, False)
    finally:
        server.shutdown()


def test_train_cli_did_you_mean_and_both_spellings(tmp_path):
    proc = _vlmfit("train", "--max_stpes", "3", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "did you mean '--max-steps'" in proc.stderr
    proc = _vlmfit("train", "--model", "smolvlmx", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    out = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(out) == 1 and "unknown model 'smolvlmx'" in out[0], out
    assert not (tmp_path / "runs").exists(), "nothing created for a bad configuration"


def test_flags_take_either_spelling():
    a = _vlmfit(
        "tokens", "--model", "qwen2.5-vl-7b", "--image", "1000x1000", "--max-image-tokens", "256"
    )
    b = _vlmfit(
        "tokens", "--model", "qwen2.5-vl-7b", "--image", "1000x1000", "--max_image_tokens", "256"
    )
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.strip().splitlines()[-1] == "tokens: 256"


def test_train_help_lists_every_field_with_default_and_meaning():
    proc = _vlmfit("train", "--help")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    for f in dataclasses.fields(RunConfig):
        flag = f"--{f.name.replace('_', '-')}"
        (i,) = [i for i, x in enumerate(lines) if x.split()[:1] == [flag]]
        assert "default" in lines[i], lines[i]
        meaning = lines[i + 1].strip()
        assert meaning and not meaning.startswith("--"), f"{flag} has no meaning"


def test_tokens_help_lists_the_models():
    proc = _vlmfit("tokens", "--help")
    assert proc.returncode == 0
    for name in registry.names():
        assert f"\n  {name} " in proc.stdout


def test_make_help_shows_the_dials_with_their_values():
    proc, _ = _make("help", "MODEL=qwen2.5-vl-7b", "PARAMS=lora_r=8")
    out = proc.stdout
    assert proc.returncode == 0 and "$(" not in out, "every $(VAR) expanded"
    dials = {}
    for line in out.splitlines():
        parts = line.replace("\x1b[33m", "").replace("\x1b[0m", "").split()
        if parts and parts[0].isupper():
            dials[parts[0]] = parts[1:]
    for dial in ("MODEL", "WEIGHTS", "DATA", "FINETUNE", "MAX_STEPS", "DPO", "PARAMS", "RESUME"):
        assert dial in dials, f"make help lacks {dial}"
        assert len(dials[dial]) >= 2, f"{dial}: value and meaning"
    assert dials["MODEL"][0] == "qwen2.5-vl-7b" and dials["PARAMS"][0] == "lora_r=8"
    assert "Measure memory and speed of qwen2.5-vl-7b's training step" in out


@pytest.mark.parametrize("command", ["preprocess", "train"])
def test_unreachable_hub_fails_fast_on_the_command_line_too(command, tmp_path):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    env["HF_HUB_OFFLINE"] = "0"
    args = ["--model", "smolvlm"]
    if command == "preprocess":
        args = [str(ROOT / "data" / "no-matter.json"), *args]
    t0 = time.time()
    proc = _vlmfit(command, *args, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and time.time() - t0 < 30
    last = _one_line_error(proc, "cannot reach", "WEIGHTS=random")
    assert last.startswith(f"vlmfit {command}: error:")
