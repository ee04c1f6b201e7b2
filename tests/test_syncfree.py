"""Steps without host syncs (``RunConfig.sync_free``): the same run and metrics as TRL's own
loss, no ``.item()`` / ``bool(tensor)`` from the training loop between logs, and the NaN
filter of the logged loss kept.

pytest -q tests/test_syncfree.py
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch

from vlmfit import train
from vlmfit.config import resolve


def _cfg(shapes, tmp_path, **kw):
    base = dict(
        model="tiny-smolvlm",
        data=str(shapes / "sft_train.json"),
        eval_data=None,
        runs_dir=str(tmp_path / "runs"),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=2,
        save_steps=100,
        learning_rate=1e-3,
    )
    cfg, _ = resolve(base | kw)
    return cfg


def _logged(cfg) -> list[dict]:
    lines = (Path(cfg.runs_dir) / cfg.run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_sync_free_steps_log_what_trls_loss_logs_and_train_the_same_weights(
    shapes, tiny_cache, tmp_path
):
    from safetensors.torch import load_file

    runs = {}
    for sync_free in (False, True):
        cfg = _cfg(shapes, tmp_path / str(sync_free), sync_free=sync_free, run="r")
        summary = train.run(cfg, progress=False)
        assert summary["levers"]["sync_free"] is sync_free
        adapter = load_file(Path(cfg.runs_dir) / "r" / "adapter" / "adapter_model.safetensors")
        runs[sync_free] = (_logged(cfg), adapter)
    (trl_logs, trl_w), (own_logs, own_w) = runs[False], runs[True]
    assert len(own_logs) == len(trl_logs) == 2
    for a, b in zip(own_logs, trl_logs, strict=True):
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert a[key] == b[key], (key, a, b)  # the same operations, in the same order
    assert own_logs[-1]["num_tokens"] > own_logs[0]["num_tokens"] > 0
    assert all(math.isfinite(r["entropy"]) and r["entropy"] > 0 for r in own_logs)
    assert own_w.keys() == trl_w.keys()
    for name in own_w:
        torch.testing.assert_close(own_w[name], trl_w[name], rtol=1e-5, atol=1e-6, msg=name)


LOOP_FILES = ("syncfree.py", "sft_trainer.py", "trainer.py")


@pytest.mark.parametrize("sync_free", [True, False])
def test_the_training_loop_asks_the_gpu_for_no_value_between_logs(
    sync_free, shapes, tiny_cache, tmp_path, monkeypatch
):
    """On a GPU each of these calls waits for the queued kernels; on the CPU they are cheap,
    so the test counts the calls the trainer makes (the model's own are not counted)."""
    from transformers import TrainerCallback

    calls: list[str] = []
    stepping = {"on": False}

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if stepping["on"]:
                caller = inspect.stack(0)[1]
                if Path(caller.filename).name in LOOP_FILES:
                    calls.append(f"{Path(caller.filename).name}:{caller.lineno} {name}")
            return original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        spy(name)

    class Window(TrainerCallback):  # the steps between two logs, logging excluded
        def on_step_begin(self, args, state, control, **kw):
            stepping["on"] = state.global_step >= 1

        def on_step_end(self, args, state, control, **kw):
            stepping["on"] = False

    cfg = _cfg(shapes, tmp_path, sync_free=sync_free, logging_steps=10, max_steps=3)
    train.run(cfg, progress=False, callbacks=(Window(),))
    if sync_free:
        assert calls == []
    else:  # TRL's metrics and the Trainer's NaN filter: what sync_free removes
        assert any(c.startswith("sft_trainer.py:") for c in calls)
        assert any(c.startswith("trainer.py:") for c in calls)


def test_a_non_finite_step_logs_what_the_trainer_nan_filter_logs(
    shapes, tiny_cache, tmp_path, monkeypatch
):
    """Step 2's micro-batch losses read as NaN (its gradients stay finite): the logged loss
    with the GPU-side filter equals the Trainer's own filter's, and stays finite."""
    import transformers

    original = transformers.Trainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        return torch.full_like(loss, float("nan")) if self.state.global_step == 1 else loss

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    logs = {}
    for sync_free in (False, True):
        cfg = _cfg(shapes, tmp_path / str(sync_free), sync_free=sync_free, run="r")
        train.run(cfg, progress=False)
        logs[sync_free] = [r["loss"] for r in _logged(cfg)]
    assert logs[True] == logs[False]
    assert all(math.isfinite(v) for v in logs[True])


@pytest.mark.gpu
def test_on_a_gpu_no_sync_comes_from_the_training_loop_or_the_batch_copy(
    shapes, tiny_cache, tmp_path
):
    """CUDA's sync debug mode flags every host-GPU sync; between logs none may come from the
    trainer or accelerate's batch transfer (the model's own forward may still sync)."""
    import traceback
    import warnings

    from transformers import TrainerCallback

    culprits: list[str] = []
    files = (*LOOP_FILES, "data_loader.py", "operations.py")

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):  # the Python line that called the syncing op
            caller = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
            if Path(caller[-1].filename).name in files:
                culprits.append(f"{Path(caller[-1].filename).name}:{caller[-1].lineno}")

    class Window(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            on = 1 <= state.global_step < args.max_steps - 1  # the next batch's copy included
            torch.cuda.set_sync_debug_mode("warn" if on else "default")

    cfg = _cfg(shapes, tmp_path, logging_steps=10, max_steps=4, dataloader_num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        try:
            train.run(cfg, progress=False, callbacks=(Window(),))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert culprits == []
