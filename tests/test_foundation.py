"""The workbench frame: one source of pins, the Makefile front door, clean notebooks.

pytest -q tests/test_foundation.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import lock_filter  # noqa: E402

REQUIRED_TARGETS = [
    "setup",
    "demo",
    "preprocess",
    "profile",
    "sft",
    "dpo",
    "train",
    "plan",
    "bench",
    "lab",
    "test",
    "lint",
    "image",
    "container-test",
    "wheelhouse",
    "clean",
]


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in lock_filter.pins((ROOT / "requirements.lock").read_text()):
        req = line.split(";")[0].strip()
        name, _, version = req.partition("==")
        pins.setdefault(name.lower(), version)
    return pins


def test_lock_has_exact_pins_for_every_direct_dependency():
    pins = lock_pins()
    assert pins, "requirements.lock is empty"
    assert all(v for v in pins.values()), "every lock line must be an exact == pin"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in project["dependencies"]]
    missing = [d for d in deps if d.lower() not in pins]
    assert not missing, f"pyproject dependencies missing from requirements.lock: {missing}"
    for must in [
        "torch",
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "datasets",
        "pillow",
        "papermill",
        "jupyterlab",
        "nbstripout",
    ]:
        assert must in pins, must


def test_environment_yml_matches_the_lock():
    """environment.yml is generated from the lock; a hand edit or a stale lock fails here."""
    expected = lock_filter.environment_yml((ROOT / "requirements.lock").read_text())
    assert (ROOT / "environment.yml").read_text() == expected, "run `make lock`"


def test_container_installs_the_lock():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "requirements.lock" in dockerfile
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:[\w.-]+$", dockerfile, re.M), "pinned CUDA base"
    # no second set of pins in the Dockerfile
    assert not re.search(r"pip install[^\n]*==", dockerfile)
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.M), "runs as a non-root user"


def test_cpu_filter_drops_cuda_wheels_only():
    text = (ROOT / "requirements.lock").read_text()
    cpu = lock_filter.filtered(text, "cpu")
    full = lock_filter.filtered(text, "cuda")
    dropped = {x.split("==")[0] for x in set(full) - set(cpu)}
    assert dropped and all(
        d.startswith("nvidia-") or d in {"triton", "torchvision"} for d in dropped
    )
    assert any(x.startswith("torch==") for x in cpu)


def test_make_help_lists_every_target_with_a_description():
    out = subprocess.run(
        ["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    listed = dict(re.findall(r"^\s+(?:\x1b\[36m)?([\w-]+)(?:\x1b\[0m)?\s+(.+)$", out, re.M))
    missing = [t for t in REQUIRED_TARGETS if t not in listed]
    assert not missing, f"make help lacks: {missing}"
    assert all(listed[t].strip() for t in REQUIRED_TARGETS)


def test_make_default_goal_is_help():
    out = subprocess.run(["make", "-s"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "container-test" in out.stdout


def test_lib_is_not_ignored_by_git():
    inside = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True
    )
    if inside.returncode != 0:
        pytest.skip("not a git checkout (the container image excludes .git)")
    r = subprocess.run(
        ["git", "check-ignore", "-q", "lib/vlmfit/__init__.py"], cwd=ROOT, capture_output=True
    )
    assert r.returncode == 1, "lib/ must not be git-ignored"


NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(nb):
    data = json.loads(nb.read_text())
    dirty = [
        i
        for i, c in enumerate(data["cells"])
        if c.get("outputs") or c.get("execution_count") is not None
    ]
    assert not dirty, f"{nb.name}: cells {dirty} carry outputs (nbstripout)"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_have_one_parseable_parameters_cell(nb, caplog):
    import papermill

    data = json.loads(nb.read_text())
    tagged = [c for c in data["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    src = "".join(tagged[0]["source"])
    names = [re.split("[:=]", ln)[0].strip() for ln in src.splitlines() if ln and ln[0] != "#"]
    with caplog.at_level("WARNING"):
        params = papermill.inspect_notebook(str(nb))
    assert sorted(params) == sorted(names), "papermill could not parse every parameter line"
    assert all("#" in ln for ln in src.splitlines() if ln.strip()), "one comment per parameter"


def test_unknown_notebook_parameter_is_an_error(tmp_path):
    from vlmfit.report.preflight import ParameterError
    from vlmfit.report.runner import run_notebook

    with pytest.raises(ParameterError, match="modle"):
        run_notebook(ROOT / "notebooks" / "sft.ipynb", "x", {"modle": "smolvlm"}, tmp_path)
    assert not list(tmp_path.iterdir()), "nothing is written for a rejected call"


def test_notebook_cli_rejects_unknown_parameter(capsys):
    from vlmfit.cli import main

    rc = main(["notebook", str(ROOT / "notebooks" / "dpo.ipynb"), "-p", "bogus", "1"])
    assert rc == 2
    assert "bogus" in capsys.readouterr().err


def test_parse_value_turns_make_strings_into_python():
    from vlmfit.report.preflight import parse_value

    assert parse_value("1") == 1
    assert parse_value("2e-4") == 2e-4
    assert parse_value("none") is None
    assert parse_value("true") is True
    assert parse_value("data/x.json") == "data/x.json"
    assert parse_value("{'use_dora': True}") == {"use_dora": True}


def test_readme_shows_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "docker run --gpus all" in readme


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    for cmd in ("make test", "make lint", "make container-test"):
        assert cmd in ci


# `make lab` itself (root on a host, the token, the printed URL, the interface):
# tests/test_workbench_lab.py
