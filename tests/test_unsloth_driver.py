"""CPU: the Unsloth rows of benchmarks/fastpath.py (benchmarks/unsloth_driver.py).

Unsloth itself needs a GPU and its own environment, so its interpreter is faked here: a
script that answers ``--check`` and prints a ``ROW`` line per case, as
benchmarks/unsloth_case.py does. What runs for real: the plan of cases, the child's
environment, the parsing of rows and errors, fastpath's table with its "vs unsloth" column,
fastpath.main's hand-off to the driver, unsloth_case's data and timing helpers (tiny
processors), and the carry build script's syntax (bash -n). Nothing here runs Unsloth.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def driver():
    return _load("unsloth_driver")


@pytest.fixture
def fastpath():
    return _load("fastpath")


FAKE = """\
#!{python}
# A stand-in for the Unsloth interpreter: argv[1] is benchmarks/unsloth_case.py.
import json, os, sys, time
args = sys.argv[1:]
assert args[0].endswith("unsloth_case.py"), args
mode = os.environ.get("FAKE_MODE", "ok")
if "--check" in args:
    problems = ["unsloth needs transformers<=5.17.0; found transformers 5.23.0"] if mode == "old" else []
    print("CHECK " + json.dumps({{"versions": {{"unsloth": "2026.10.9"}}, "problems": problems}}))
    sys.exit(0)
case = json.loads(args[args.index("--case") + 1])
if mode == "crash":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory", file=sys.stderr)
    sys.exit(1)
if mode == "hang":
    time.sleep(60)
print("==((====))==  Unsloth banner on stdout")
tps = {{"unsloth-loop": 2000.0, "unsloth": 1000.0}}[case["path"]] * case["mb"]
seen = {{k: os.environ.get(k) for k in ("PYTHONPATH", "UNSLOTH_DISABLE_STATISTICS", "HF_HUB_OFFLINE")}}
row = {{k: v for k, v in case.items() if k != "setup"}}
row.update(peak_gib=10.0, reserved_gib=11.0, tokens_per_s=tps, samples_per_s=tps / 1700,
           tokens_per_sample=1700.0, mfu=None, gpu="fake", env=seen, cwd=os.getcwd(),
           setup=case["setup"])
print("ROW " + json.dumps(row))
"""


@pytest.fixture
def fake_unsloth(tmp_path, monkeypatch):
    """UNSLOTH_PYTHON = a fake interpreter, UNSLOTH_SITE = a folder with unsloth/ in it."""
    exe = tmp_path / "fake-python"
    exe.write_text(FAKE.format(python=sys.executable))
    exe.chmod(0o755)
    site = tmp_path / "site"
    (site / "unsloth").mkdir(parents=True)
    monkeypatch.setenv("UNSLOTH_PYTHON", str(exe))
    monkeypatch.setenv("UNSLOTH_SITE", str(site))
    monkeypatch.setenv("PYTHONPATH", "/tmp/site-of-vlmfit:/somewhere/lib")  # never passed on
    monkeypatch.delenv("FAKE_MODE", raising=False)
    return exe, site


def fake_prepare(calls: list):
    def prepare(model, n, work, log_dir):
        calls.append((model, n))
        return {
            "weights_dir": f"/w/{model}",
            "data_dir": str(work / "data"),
            "language_modules": ["model.language_model", "lm_head"],
            "peak_flops": 989e12,
        }

    return prepare


def test_plan_mirrors_the_suite(driver, fastpath):
    cases = driver.plan(fastpath.SUITES["qwen7b"])
    assert cases == [
        {"path": "unsloth-loop", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 1},
        {"path": "unsloth-loop", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 4},
        {"path": "unsloth", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 4, "steps": 14},
    ]  # DPO rows have no Unsloth counterpart
    smol = driver.plan(fastpath.SUITES["smolvlm"])
    assert {(c["path"], c["finetune"], c["mb"]) for c in smol} == {
        ("unsloth-loop", "lora", 4),
        ("unsloth", "lora", 4),
        ("unsloth-loop", "qlora", 4),
        ("unsloth", "qlora", 4),
    }
    assert driver.plan(fastpath.SUITES["probe"]) == []  # lever probes ("over") have none
    ms = [c["model"] for c in driver.plan(fastpath.SUITES["all"])]
    runs = [m for i, m in enumerate(ms) if i == 0 or ms[i - 1] != m]
    assert runs == ["smolvlm", "qwen2.5-vl-7b"]  # grouped by model: one set-up each
    assert driver.data_size(smol) == max(64, 4 * 42)


def test_not_run_rows_without_unsloth_python(driver, fastpath, tmp_path, monkeypatch):
    monkeypatch.delenv("UNSLOTH_PYTHON", raising=False)

    def never(*a):
        raise AssertionError("nothing is prepared without UNSLOTH_PYTHON")

    rows = driver.run_rows(fastpath.SUITES["smolvlm"], tmp_path, tmp_path / "out", never)
    assert [(r["model"], r["finetune"]) for r in rows] == [
        ("smolvlm", "lora"),
        ("smolvlm", "qlora"),
    ]
    for r in rows:
        assert r["path"] == "unsloth" and r["mb"] == "-"
        assert r["error"] == "not run (no Unsloth environment: UNSLOTH_PYTHON unset)"
    md = fastpath.table(rows)
    assert "| smolvlm | lora | unsloth | - | not run (no Unsloth environment" in md
    assert all(line.count("|") == 12 for line in md.splitlines())  # 11 columns each


def test_fake_interpreter_rows_and_the_vs_unsloth_column(driver, fastpath, fake_unsloth, tmp_path):
    exe, site = fake_unsloth
    out, work = tmp_path / "out", tmp_path / "work"
    calls: list = []
    rows = driver.run_rows(fastpath.SUITES["qwen7b"], work, out, fake_prepare(calls))
    assert calls == [("qwen2.5-vl-7b", 64)]  # one set-up per model
    assert [(r["path"], r["mb"]) for r in rows] == [
        ("unsloth-loop", 1),
        ("unsloth-loop", 4),
        ("unsloth", 4),
    ]
    for r in rows:
        assert "error" not in r, r
        assert r["gpu"] == "fake" and r["wall_s"] >= 0
        # the child's path is the Unsloth carry alone, never vlmfit's
        assert r["env"] == {
            "PYTHONPATH": str(site),
            "UNSLOTH_DISABLE_STATISTICS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        assert r["cwd"] == str(work / "unsloth-cwd")  # Unsloth's compile cache goes there
        assert r["weights_dir"] == "/w/qwen2.5-vl-7b"
        assert r["setup"]["language_modules"] == ["model.language_model", "lm_head"]
    saved = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["path"] for r in saved] == [r["path"] for r in rows]
    assert len(list((out / "unsloth-logs").glob("*.log"))) == 3

    ours = [
        {"path": "plain", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 1},
        {"path": "vlmfit-loop", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 1},
        {"path": "vlmfit-loop", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 4},
        {"path": "vlmfit", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 4, "steps": 14},
        {"path": "vlmfit-dpo", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 1},
    ]
    tps = [1000.0, 3000.0, 6000.0, 5000.0, 1500.0]
    ours = [
        c | {"peak_gib": 20.0, "reserved_gib": 21.0, "tokens_per_s": t, "samples_per_s": 1.0}
        for c, t in zip(ours, tps, strict=True)
    ]
    md = fastpath.table(ours + rows).splitlines()
    assert md[0].endswith("| vs plain | vs unsloth |")
    by = {(ln.split("|")[3].strip(), ln.split("|")[4].strip()): ln for ln in md[2:]}
    cell = {k: [c.strip() for c in v.split("|")[-3:-1]] for k, v in by.items()}
    # [vs plain, vs unsloth]; Unsloth: loop 2000 * mb, end to end 1000 * mb tokens/s
    assert cell[("plain", "1")] == ["1.00x", "-"]
    assert cell[("vlmfit-loop", "1")] == ["3.00x", "1.50x"]  # 3000 / 2000 (loop vs loop)
    assert cell[("vlmfit-loop", "4")] == ["6.00x", "0.75x"]  # 6000 / 8000
    assert cell[("vlmfit", "4")] == ["5.00x", "1.25x"]  # 5000 / 4000 (end to end)
    assert cell[("vlmfit-dpo", "1")] == ["-", "-"]  # no plain-dpo row here, no Unsloth DPO
    assert cell[("unsloth-loop", "1")] == ["2.00x", "-"]  # Unsloth rows: a ratio vs plain
    assert cell[("unsloth", "4")] == ["4.00x", "-"]


def test_crash_timeout_and_environment_errors_are_rows(
    driver, fastpath, fake_unsloth, tmp_path, monkeypatch
):
    exe, site = fake_unsloth
    suite = [{"path": "vlmfit-loop", "model": "smolvlm", "finetune": "lora", "mb": 4}]
    prep = fake_prepare([])

    monkeypatch.setenv("FAKE_MODE", "crash")
    (row,) = driver.run_rows(suite, tmp_path, tmp_path / "o1", prep)
    assert row["path"] == "unsloth-loop"
    assert row["error"].startswith("exit 1, no ROW")
    assert "torch.OutOfMemoryError: CUDA out of memory" in row["error"]
    assert "unsloth-logs" in row["error"]  # where the whole output is

    monkeypatch.setenv("FAKE_MODE", "hang")
    monkeypatch.setenv("UNSLOTH_CASE_TIMEOUT", "1")
    (row,) = driver.run_rows(suite, tmp_path, tmp_path / "o2", prep)
    monkeypatch.delenv("UNSLOTH_CASE_TIMEOUT")
    assert row["error"].startswith("timed out after 1 s")
    assert row["wall_s"] < 30

    monkeypatch.setenv("FAKE_MODE", "old")  # --check reports an unmet requirement: nothing runs
    (row,) = driver.run_rows(suite, tmp_path, tmp_path / "o3", prep)
    assert row["error"].startswith("Unsloth environment: unsloth needs transformers<=5.17.0")

    monkeypatch.setenv("FAKE_MODE", "ok")

    def broken(model, n, work, log_dir):
        raise RuntimeError("preparing smolvlm's random weights failed (exit 1): boom")

    (row,) = driver.run_rows(suite, tmp_path, tmp_path / "o4", broken)
    assert row["error"] == "RuntimeError: preparing smolvlm's random weights failed (exit 1): boom"

    monkeypatch.setenv("UNSLOTH_SITE", str(tmp_path))  # no unsloth/ in it
    (row,) = driver.run_rows(suite, tmp_path, tmp_path / "o5", prep)
    assert "holds no unsloth/" in row["error"]

    monkeypatch.setenv("UNSLOTH_PYTHON", str(tmp_path / "no-such-python"))
    (row,) = driver.run_rows(suite, tmp_path, tmp_path / "o6", prep)
    assert "is not an executable" in row["error"]
    assert fastpath.table([row]).splitlines()[-1].count("|") == 12


def test_fastpath_main_hands_the_unsloth_rows_to_the_driver(
    fastpath, fake_unsloth, tmp_path, monkeypatch
):
    """main(): the suite's own cases (their processes faked), then the driver's rows, one table."""
    monkeypatch.syspath_prepend(str(BENCH))
    import unsloth_driver  # the module main() imports

    monkeypatch.setattr(unsloth_driver, "prepare_model", fake_prepare([]))
    ours = {"path": "vlmfit-loop", "model": "smolvlm", "finetune": "lora", "mb": 4}
    monkeypatch.setitem(fastpath.SUITES, "t", [ours])
    done = ours | {"peak_gib": 2.0, "reserved_gib": 3.0, "tokens_per_s": 12000.0}

    def fake_run(cmd, **kw):
        assert "--case" in cmd
        return subprocess.CompletedProcess(cmd, 0, "ROW " + json.dumps(done) + "\n", "")

    monkeypatch.setattr(fastpath.subprocess, "run", fake_run)
    out = tmp_path / "out"
    assert fastpath.main(["--suite", "t", "--out", str(out), "--work", str(tmp_path)]) == 0
    result = json.loads((out / "fastpath-t.json").read_text())
    assert [r["path"] for r in result["rows"]] == ["vlmfit-loop", "unsloth-loop"]
    md = (out / "fastpath-t.md").read_text()
    assert "| smolvlm | lora | vlmfit-loop | 4 | 2.00 | 3.00 | 12,000 |" in md
    assert md.splitlines()[2].rstrip().endswith("| 1.50x |")  # 12,000 / 8,000
    assert len((out / "rows.jsonl").read_text().splitlines()) == 2


def test_unsloth_rows_alone_join_the_suite_rows_of_an_earlier_command(
    driver, fake_unsloth, tmp_path, monkeypatch
):
    """unsloth_driver.py --suite: its rows, then one table with fastpath's rows of rows.jsonl."""
    monkeypatch.setattr(driver, "prepare_model", fake_prepare([]))
    out = tmp_path / "out"
    out.mkdir()
    old = {"path": "vlmfit", "model": "qwen2.5-vl-7b", "finetune": "lora", "mb": 4, "steps": 14}
    stale = old | {"peak_gib": 1.0, "reserved_gib": 1.0, "tokens_per_s": 1.0}
    fresh = old | {"peak_gib": 20.0, "reserved_gib": 21.0, "tokens_per_s": 6000.0}
    other = {"path": "vlmfit", "model": "smolvlm", "finetune": "lora", "mb": 4, "steps": 40}
    other |= {"peak_gib": 2.0, "reserved_gib": 3.0, "tokens_per_s": 5.0}  # another suite's
    lines = [json.dumps(r) for r in (stale, other, fresh)]
    (out / "rows.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["--suite", "qwen7b", "--out", str(out), "--work", str(tmp_path)]
    assert driver.main(argv) == 0
    md = (out / "unsloth-qwen7b.md").read_text().splitlines()
    assert [ln.split("|")[3].strip() for ln in md[2:]] == [
        "vlmfit",
        "unsloth-loop",
        "unsloth-loop",
        "unsloth",
    ]  # the suite's order, its cases only, the last row of each
    assert md[2].rstrip().endswith("| 6,000 | - | - | - | 1.50x |")  # 6000 / (1000 * 4)


def test_case_script_helpers(tmp_path):
    case = _load("unsloth_case")
    r = case.steady_rate([1.0, 2.0, 2.5, 3.0, 3.5], [100, 100, 100, 100, 100], skip=2)
    assert r["tokens_per_s"] == pytest.approx(300 / 1.5)  # steps 3-5 over 2.0 -> 3.5
    assert r["s_per_step"] == pytest.approx(0.5)
    assert r["measured"] == "steps 3-5 of 5 (first 2 skipped: warm-up)"
    with pytest.raises(ValueError, match="warm-up"):
        case.steady_rate([1.0, 2.0], [1, 1], skip=2)
    fp = _load("fastpath")
    data = fp.make_data(tmp_path / "data", n=3, side=64)
    recs = case.load_records(data.parent, 5)  # cycles past the 3 samples
    assert len(recs) == 5 and recs[3] == recs[0]
    path, prompt, answer = recs[0]
    assert path.exists() and prompt == "Describe this picture in detail." and len(answer) > 400
    import numpy as np

    class Slotted:  # like Unsloth's collators: __slots__, no __dict__
        __slots__ = ("width",)

        def __init__(self):
            self.width = 3

        def __call__(self, examples):
            return {"attention_mask": np.ones((len(examples), self.width))}

    seen: list[int] = []
    coll = Slotted()
    case._count_tokens(coll, seen)
    assert isinstance(coll, Slotted) and type(coll).__name__ == "Slotted"
    coll([1, 2]), coll([1])
    assert seen == [6, 3]
    found = case.check()  # vlmfit's venv: no unsloth, said plainly
    assert found["versions"]["unsloth"] is None
    assert any("unsloth is not installed" in p for p in found["problems"])


@pytest.mark.parametrize(("tiny", "family", "nested"), [
    ("tiny-qwen2.5-vl", "qwen2_5_vl", False),
    ("tiny-smolvlm", "idefics3", True),
])  # fmt: skip
def test_loop_batch_through_a_real_processor(tiny_cache, tmp_path, tiny, family, nested):
    from vlmfit.models import builders as tiny_mod
    from vlmfit.models.processors import load_processor

    case = _load("unsloth_case")
    fp = _load("fastpath")
    data = fp.make_data(tmp_path / "data", n=2, side=64)
    proc = load_processor(tiny_mod.ensure_tiny(tiny), family)
    batch = case.loop_batch(proc, case.load_records(data.parent, 2), nested)
    assert batch["input_ids"].shape[0] == 2 and "pixel_values" in batch
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == -100).all()
    assert (batch["labels"][~pad] == batch["input_ids"][~pad]).all()


def test_case_script_reports_a_missing_unsloth_as_a_row(tmp_path):
    c = {"path": "unsloth-loop", "model": "smolvlm", "finetune": "lora", "mb": 1}
    c |= {"weights_dir": str(tmp_path), "data_dir": str(tmp_path), "setup": {}}
    script = str(BENCH / "unsloth_case.py")
    proc = subprocess.run(
        [sys.executable, script, "--case", json.dumps(c), "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    row = json.loads(line[4:])
    assert row["error"] == "ModuleNotFoundError: No module named 'unsloth'"
    assert "setup" not in row and row["path"] == "unsloth-loop"
    bad = subprocess.run(
        [sys.executable, script, "--case", json.dumps(c | {"path": "x"})],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "unknown Unsloth path 'x'" in bad.stdout


def test_check_reads_unsloths_own_requirements(tmp_path):
    """--check: unsloth's Requires-Dist against what the interpreter would import (here vlmfit's
    transformers 5.2x and trl 1.16, as when /tmp/site leaks onto the Unsloth path)."""
    import importlib.metadata as md

    info = tmp_path / "site" / "unsloth-2026.10.9.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text(
        "Metadata-Version: 2.1\nName: unsloth\nVersion: 2026.10.9\n"
        "Requires-Dist: transformers<=5.17.0,>=4.52.4\n"
        "Requires-Dist: trl!=0.19.0,<=1.15.0,>=0.18.2\n"
        "Requires-Dist: torch<2.15.0,>=2.4.0\n"
        'Requires-Dist: fastapi==0.141.1; extra == "studio"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "unsloth_case.py"), "--check"],
        capture_output=True,
        text=True,
        env=env | {"PYTHONPATH": str(tmp_path / "site")},
        timeout=120,
    )
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHECK ")]
    found = json.loads(line[6:])
    assert found["versions"]["unsloth"] == "2026.10.9"
    from packaging.specifiers import SpecifierSet

    want = []
    for name, spec in (
        ("transformers", "<=5.17.0,>=4.52.4"),
        ("trl", "!=0.19.0,<=1.15.0,>=0.18.2"),
    ):
        if md.version(name) not in SpecifierSet(spec):
            want.append(f"unsloth needs {name}{spec}; found {name} {md.version(name)}")
    assert want  # vlmfit's lock: transformers 5.2x, trl >= 1.16
    assert found["problems"] == want  # torch (a +cpu build) passes; "studio" is not asked for


def test_build_script_is_valid_bash():
    script = ROOT / "scripts" / "build_unsloth_carry.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    for pin in ("unsloth==2026.10.9", "trl==1.15.0", "datasets==4.8.5", "bitsandbytes==0.50.2"):
        assert pin in text
    assert "libbitsandbytes_cuda130.so" in text and "xz -T2 -6" in text
