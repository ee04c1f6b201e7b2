"""The Unsloth rows of benchmarks/fastpath.py, run under Unsloth's own interpreter.

Unsloth 2026.10.9 needs transformers <= 5.17, trl <= 1.15 and datasets < 5, which clash
with vlmfit's lock, so its cases run in another Python environment::

    UNSLOTH_PYTHON=python3 UNSLOTH_SITE=/tmp/unsloth python benchmarks/fastpath.py --suite qwen7b
    UNSLOTH_PYTHON=python3 UNSLOTH_SITE=/tmp/unsloth \\
        python benchmarks/unsloth_driver.py --suite qwen7b --out reports/bench   # these rows alone

The second form runs the Unsloth rows alone (a GPU command has a time limit) and prints the
table over the last row of each of the suite's cases in ``OUT/rows.jsonl``: fastpath's rows
from an earlier command with the same ``--out`` get their "vs unsloth" ratios there.

- ``UNSLOTH_PYTHON``: the interpreter that has (or, with ``UNSLOTH_SITE``, gets) Unsloth.
  Unset: the rows say "not run (no Unsloth environment: UNSLOTH_PYTHON unset)".
- ``UNSLOTH_SITE``: a folder of unpacked wheels (``scripts/build_unsloth_carry.sh`` makes
  ``.gpu/unsloth.tar.xz``) that becomes the child's whole ``PYTHONPATH``. vlmfit's own
  ``PYTHONPATH`` is never passed on (vlmfit's carry holds transformers 5.23).
- ``UNSLOTH_CASE_TIMEOUT``: seconds for one case (default 1800); past it the case is
  killed and its row says so.

Which cases: the suite's counterparts. A GPU loop (``unsloth-loop``) at each micro-batch of
the suite's ``plain`` / ``vlmfit-loop`` rows, and Unsloth end to end (``unsloth``) at each
micro-batch and step count of its ``vlmfit`` rows, per model and method. DPO rows and lever
probes (cases with ``over``) have none.

For each model, vlmfit's interpreter first writes the inputs (one fresh process): the
full-size random weights with ``vlmfit.models.save_random`` (config, safetensors and the
local processor: the folder vlmfit's QLoRA loads too; built once and cached) and fastpath's
data (``make_data``). Then each case runs ``benchmarks/unsloth_case.py`` in a fresh process
of ``UNSLOTH_PYTHON`` (peak memory is the process's own), from ``WORK/unsloth-cwd`` (Unsloth
writes its compile cache into the working directory), with ``UNSLOTH_DISABLE_STATISTICS=1
HF_HUB_OFFLINE=1``. Each row is appended to ``OUT/rows.jsonl``; each case's full output goes
to ``OUT/unsloth-logs/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASE_SCRIPT = HERE / "unsloth_case.py"
NOT_RUN = "not run (no Unsloth environment: UNSLOTH_PYTHON unset)"
CHILD_ENV = {
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


# ------------------------------------------------------------------------------ plan


def plan(suite: list[dict]) -> list[dict]:
    """The Unsloth cases that mirror a suite's rows, grouped by model (first seen first)."""
    cases: list[dict] = []
    for c in suite:
        if c.get("over") or "dpo" in c["path"]:
            continue
        if c["path"] in ("plain", "vlmfit-loop"):
            u = {"path": "unsloth-loop", "model": c["model"], "finetune": c["finetune"]}
            u["mb"] = c["mb"]
        elif c["path"] == "vlmfit":
            u = {"path": "unsloth", "model": c["model"], "finetune": c["finetune"]}
            u |= {"mb": c["mb"], "steps": c["steps"]}
        else:
            continue
        if u not in cases:
            cases.append(u)
    models = list(dict.fromkeys(c["model"] for c in cases))
    return sorted(cases, key=lambda c: models.index(c["model"]))


def not_run_rows(suite: list[dict], why: str = NOT_RUN) -> list[dict]:
    """One row per (model, method) the Unsloth cases would cover, saying why they did not run."""
    pairs = dict.fromkeys((c["model"], c["finetune"]) for c in plan(suite))
    return [
        {"model": m, "finetune": f, "path": "unsloth", "mb": "-", "error": why} for m, f in pairs
    ]


def data_size(cases: list[dict]) -> int:
    """Samples for make_data, as fastpath.run_case sizes them."""
    return max([max(64, c["mb"] * (c.get("steps", 8) + 2)) for c in cases] or [64])


# ------------------------------------------------------------------------- processes


def child_env(site: str | None) -> dict[str, str]:
    """The environment of an Unsloth process: ours, less vlmfit's Python path, plus CHILD_ENV."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if site:
        env["PYTHONPATH"] = site
    return env | CHILD_ENV


def _run(cmd: list[str], *, env: dict, cwd: Path | None, timeout: float | None):
    """(returncode or None on timeout, stdout, stderr); the whole process group is killed
    on timeout (Unsloth and torch.compile start worker processes)."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err


def _tagged(stdout: str, tag: str) -> dict | None:
    found = [ln[len(tag) + 1 :] for ln in stdout.splitlines() if ln.startswith(tag + " ")]
    return json.loads(found[-1]) if found else None


def _tail(text: str, n: int = 300) -> str:
    return " ".join((text or "").strip().split())[-n:] or "no output"


def _timeout() -> float:
    return float(os.environ.get("UNSLOTH_CASE_TIMEOUT") or 1800)


def environment_problem(python: str, site: str | None) -> tuple[str | None, dict]:
    """Why the Unsloth environment cannot run (None if it can), and its versions."""
    exe = shutil.which(python)
    if not exe:
        return f"UNSLOTH_PYTHON={python!r} is not an executable", {}
    if site and not (Path(site) / "unsloth").is_dir():
        return (
            f"UNSLOTH_SITE={site!r} holds no unsloth/ (unpack .gpu/unsloth.tar.xz there: "
            "scripts/build_unsloth_carry.sh)",
            {},
        )
    code, out, err = _run(
        [exe, str(CASE_SCRIPT), "--check"], env=child_env(site), cwd=None, timeout=300
    )
    found = _tagged(out, "CHECK")
    if found is None:
        return f"{python} {CASE_SCRIPT.name} --check failed (exit {code}): {_tail(err)}", {}
    if found.get("problems"):
        return "Unsloth environment: " + "; ".join(found["problems"]), found
    return None, found


def prepare_model(model: str, n: int, work: Path, log_dir: Path) -> dict:
    """Random weights and data for one model, written by vlmfit's interpreter (fresh process)."""
    cmd = [sys.executable, __file__, "--prepare", model, "--n", str(n), "--work", str(work)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    code, out, err = _run(cmd, env=env, cwd=None, timeout=_timeout())
    (log_dir / f"prepare-{model}.log").write_text(out + "\n--- stderr\n" + err)
    setup = _tagged(out, "SETUP")
    if setup is None:
        why = "timed out" if code is None else f"exit {code}"
        raise RuntimeError(f"preparing {model}'s random weights failed ({why}): {_tail(err)}")
    return setup


def run_case(case: dict, setup: dict, python: str, site: str | None, work: Path, logs: Path):
    """One Unsloth case in a fresh process of ``python``; its row (an error is a row too)."""
    full = case | {
        "weights_dir": setup["weights_dir"],
        "data_dir": setup["data_dir"],
        "setup": {k: setup.get(k) for k in ("language_modules", "peak_flops")},
    }
    cwd = work / "unsloth-cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(CASE_SCRIPT), "--case", json.dumps(full), "--work", str(work)]
    t = time.time()
    code, out, err = _run(cmd, env=child_env(site), cwd=cwd, timeout=_timeout())
    name = f"{case['path']}-{case['model']}-{case['finetune']}-mb{case['mb']}"
    log = logs / f"{name}.log"
    log.write_text(f"$ {' '.join(cmd)}\n{out}\n--- stderr\n{err}")
    row = _tagged(out, "ROW")
    if row is None:
        why = f"timed out after {_timeout():.0f} s" if code is None else f"exit {code}"
        row = {**case, "error": f"{why}, no ROW ({log}): {_tail(err)}"}
    row["wall_s"] = round(time.time() - t, 1)
    if "error" in row:
        print(err[-3000:], file=sys.stderr)
    return row


def run_rows(
    suite: list[dict],
    work: Path,
    out: Path,
    prepare: Callable[[str, int, Path, Path], dict] | None = None,
) -> list[dict]:
    """The suite's Unsloth rows: run under ``UNSLOTH_PYTHON``, or "not run" rows without it.

    Each row is printed and appended to ``out/rows.jsonl`` as it comes, as fastpath does.
    ``prepare(model, n, work, log_dir) -> {weights_dir, data_dir, ...}``: default
    ``prepare_model`` (tests pass their own).
    """
    python = os.environ.get("UNSLOTH_PYTHON", "").strip()
    if not python:
        return not_run_rows(suite)
    cases = plan(suite)
    if not cases:
        return []
    python = shutil.which(python) or python  # one interpreter for the check and the cases
    site = os.environ.get("UNSLOTH_SITE", "").strip() or None
    work, out = Path(work), Path(out)
    logs = out / "unsloth-logs"
    logs.mkdir(parents=True, exist_ok=True)
    prepare = prepare or prepare_model
    problem, found = environment_problem(python, site)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        with open(out / "rows.jsonl", "a") as f:  # kept even when a later case is cut off
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if problem:
        seen = {"versions": found["versions"]} if found.get("versions") else {}
        for case in cases:
            emit({**case, "error": problem, **seen})
        return rows
    n = data_size(cases)
    for model in dict.fromkeys(c["model"] for c in cases):
        try:
            setup = prepare(model, n, work, logs)
        except Exception as e:  # noqa: BLE001 - its cases become error rows
            for case in (c for c in cases if c["model"] == model):
                emit({**case, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        for case in (c for c in cases if c["model"] == model):
            emit(run_case(case, setup, python, site, work, logs))
    return rows


# -------------------------------------------------------------------- vlmfit's side


def _fastpath():
    spec = importlib.util.spec_from_file_location("fastpath_bench", HERE / "fastpath.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # puts lib/ on sys.path
    return mod


def _prepare(model: str, n: int, work: Path) -> dict:
    """Runs in vlmfit's interpreter: make_data, then save_random (on the GPU when there is one)."""
    fp = _fastpath()
    train_json = fp.make_data(work / "data", n=n)
    import torch

    from vlmfit import models
    from vlmfit.models import registry
    from vlmfit.train import fastpath

    spec = registry.get(model)
    weights = models.save_random(spec, dtype=torch.bfloat16)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "model": model,
        "weights_dir": str(weights),
        "data_dir": str(train_json.parent),
        "language_modules": list(spec.family.language_modules),
        "peak_flops": fastpath.peak_flops(gpu),
        "gpu": gpu,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--suite", help="run this fastpath suite's Unsloth rows alone")
    ap.add_argument("--out", default="results/fastpath")
    ap.add_argument("--work", default="/tmp/vlmfit-bench", help="data, caches and runs")
    ap.add_argument("--prepare", metavar="MODEL", help=argparse.SUPPRESS)  # child: inputs
    ap.add_argument("--n", type=int, default=64, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    work = Path(a.work)
    if a.prepare:
        print("SETUP " + json.dumps(_prepare(a.prepare, a.n, work)), flush=True)
        return 0
    fp = _fastpath()
    if a.suite not in fp.SUITES:
        ap.error(f"--suite: one of {', '.join(sorted(fp.SUITES))}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = fp.SUITES[a.suite]
    rows = run_rows(suite, work, out)
    if os.environ.get("UNSLOTH_PYTHON", "").strip():  # with the suite's own rows run before
        rows = latest_rows(out / "rows.jsonl", suite + plan(suite))
    md = fp.table(rows)
    (out / f"unsloth-{a.suite}.md").write_text(md + "\n")
    print(md)
    return 0


def _key(row: dict) -> str:
    keep = ("path", "model", "finetune", "mb", "steps", "over", "fused", "step")
    return json.dumps({k: row.get(k) for k in keep}, sort_keys=True)


def latest_rows(rows_jsonl: Path, cases: list[dict]) -> list[dict]:
    """The last row of each case in ``rows_jsonl`` (fastpath's and these), in ``cases`` order:
    the table of a suite whose vlmfit rows and Unsloth rows ran in separate commands."""
    last = {}
    if rows_jsonl.exists():
        for line in rows_jsonl.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                last[_key(row)] = row
    return [last[k] for k in dict.fromkeys(_key(c) for c in cases) if k in last]


if __name__ == "__main__":
    raise SystemExit(main())
