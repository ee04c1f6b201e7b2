"""Merge a run's LoRA adapter into its base model (``vlmfit merge RUN``)."""

from __future__ import annotations

from pathlib import Path

from vlmfit.config import RunConfig
from vlmfit.train import runs
from vlmfit.train.model import init_source


def merge_adapter(run: str | Path, out: str | Path, runs_dir: str = "runs") -> Path:
    """Merge a run's LoRA adapter into its base model and save it for export."""
    from peft import PeftModel

    from vlmfit.models import load_model

    rdir = Path(run) if Path(run).exists() else runs.run_dir(runs_dir, str(run))
    cfg = RunConfig.from_dict(runs.read_json(rdir / "config.json")["config"])  # old runs too
    full_init, _ = init_source(cfg)
    model, processor = load_model(cfg.spec, weights=cfg.weights, path=full_init)
    merged = PeftModel.from_pretrained(model, rdir / "adapter").merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    return out
