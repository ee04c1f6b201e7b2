"""Issue 11.3: RunConfig is the one source of defaults, under TRL / transformers names."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from vlmfit.config import ConfigError, ConfigWarning, RunConfig, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_method_defaults_live_in_runconfig_and_an_explicit_value_wins():
    assert RunConfig().learning_rate == 2e-4
    assert RunConfig(method="dpo").learning_rate == 5e-5
    assert RunConfig(method="dpo", learning_rate=1e-3).learning_rate == 1e-3
    assert resolve({"method": "dpo"})[0].learning_rate == 5e-5


def test_warmup_is_passed_under_transformers_name_and_the_old_name_still_reads(tmp_path):
    from vlmfit.train.trainer import training_args

    with pytest.warns(ConfigWarning, match="warmup_ratio is now warmup_steps"):
        cfg, _ = resolve({"warmup_ratio": 0.1})
    assert cfg.warmup_steps == 0.1
    with pytest.raises(ConfigError, match="one setting"):
        resolve({"warmup_ratio": 0.1, "warmup_steps": 0.2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = training_args(resolve({"warmup_steps": 0.1})[0], tmp_path, n_train=10)
    assert args.warmup_steps == 0.1


@pytest.mark.parametrize("notebook", ["sft", "dpo"])
def test_notebooks_restate_no_default_of_runconfig(notebook):
    """The parameters cell leaves RunConfig's fields at None (RunConfig fills them)."""
    nb = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text())
    (cell,) = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    lines = "".join(cell["source"]).splitlines()
    fields = set(RunConfig.__dataclass_fields__)
    restated = [
        ln for ln in lines
        if "=" in ln and ln.split("=")[0].strip() in fields
        and ln.split("=", 1)[1].split("#")[0].strip() != "None"
    ]  # fmt: skip
    assert not restated, restated
