"""Training on tiny offline models: assistant-only loss, PEFT adapters, DPO, resume, config errors.

pytest -q tests/test_train.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmfit import train
from vlmfit.config import ConfigError, RunConfig, resolve, validate
from vlmfit.models import registry

TINY = ["tiny-smolvlm", "tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def _cfg(shapes, tmp_path, **kw) -> RunConfig:
    base = dict(
        model="tiny-qwen2-vl",
        data=str(shapes / "sft_train.json"),
        eval_data=str(shapes / "sft_test.json"),
        runs_dir=str(tmp_path / "runs"),
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=2,
        eval_limit=4,
        eval_max_new_tokens=3,
        gradient_checkpointing=False,
        learning_rate=1e-3,
    )
    base.update(kw)
    cfg, _ = resolve(base)
    return cfg


# ------------------------------------------------------------------ assistant-only loss


@pytest.mark.parametrize("name", TINY)
def test_assistant_only_loss_unmasks_exactly_the_assistant_replies(name, tiny_cache, tmp_path):
    """Two assistant turns: only their tokens (and each turn's end token) carry labels."""
    from PIL import Image

    spec = registry.get(name)
    cfg = RunConfig(
        model=name, runs_dir=str(tmp_path), finetune="full", gradient_checkpointing=False
    )
    model, processor = train.build_model(cfg)
    img = Image.new("RGB", (64, 48), (200, 30, 30))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "And the shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a square"}]},
    ]
    short = [messages[0], {"role": "assistant", "content": [{"type": "text", "text": "no"}]}]
    ds = train.to_dataset(
        [{"messages": messages, "images": [img]}, {"messages": short, "images": [img]}]
    )
    trainer = train.build_trainer(cfg, model, processor, ds, None, tmp_path, None)
    batch = trainer.data_collator([ds[0], ds[1]])
    tok = processor.tokenizer
    end = spec.family.turn_end
    for row, expected in ((0, ["red", "a square"]), (1, ["no"])):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        kept = labels != -100
        assert torch.equal(labels[kept], ids[kept]), "labels are the input ids where kept"
        # contiguous runs of kept positions = one assistant reply each
        runs, cur = [], []
        for i, k in enumerate(kept.tolist()):
            if k:
                cur.append(i)
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        texts = [tok.decode(ids[r]) for r in runs]
        assert [t.removesuffix("\n").removesuffix(end).strip() for t in texts] == expected
        assert all(end in t for t in texts), (
            "the end-of-turn token is trained (the model learns to stop)"
        )
        image_id = tok.convert_tokens_to_ids(spec.family.image_token)
        assert not kept[ids == image_id].any(), "image tokens are masked"
        if "attention_mask" in batch:
            assert not kept[batch["attention_mask"][row] == 0].any(), "padding is masked"


# --------------------------------------------------------------------------- SFT / DPO


def test_lora_sft_trains_saves_a_standard_peft_adapter_and_a_summary(shapes, tiny_cache, tmp_path):
    from peft import PeftModel

    cfg = _cfg(shapes, tmp_path, finetune="lora", lora_r=4, lora_alpha=8, train_projector=True)
    model, processor = train.build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before, "LoRA leaves trainable parameters"
    summary = train.run(cfg, progress=False)
    out = Path(cfg.runs_dir) / cfg.run_id
    assert summary["global_step"] == 3
    assert (
        summary["train_loss"] == pytest.approx(summary["train_loss"]) and summary["train_loss"] > 0
    )
    for key in ("model", "method", "peak_memory_gib", "runtime_s", "eval_before", "eval_after"):
        assert key in summary
    assert 0.0 <= summary["eval_after"]["exact_match"] <= 1.0
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").exists()
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4
    assert any("merger" in m for m in conf["target_modules"]), "projector gets LoRA"
    # loads with PEFT's own API, and every trainable tensor moved during training
    base, _ = train.build_model(RunConfig(model=cfg.model, finetune="full", runs_dir=cfg.runs_dir))
    loaded = PeftModel.from_pretrained(base, adapter)
    trained = dict(loaded.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, trained[n].detach())]
    assert len(changed) == len(before), set(before) - set(changed)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m and "mem_rss_gib" in m for m in metrics)
    env = json.loads((out / "environment.json").read_text())
    assert env["lock_sha256_16"] and "torch" in env


def test_dpo_from_sft_adapter_uses_the_adapter_disabled_reference(shapes, tiny_cache, tmp_path):
    sft = _cfg(shapes, tmp_path, finetune="lora", lora_r=4, max_steps=2)
    train.run(sft, progress=False)
    cfg = _cfg(
        shapes,
        tmp_path,
        method="dpo",
        data=str(shapes / "dpo_train.json"),
        preference_eval_data=str(shapes / "dpo_test.json"),
        init_adapter=sft.run_id,
        max_steps=2,
        per_device_train_batch_size=2,
    )
    from vlmfit.train import pipeline  # run() looks build_trainer up there

    seen = {}
    real = pipeline.build_trainer

    def spy(*a, **k):
        t = real(*a, **k)
        seen["ref"] = t.ref_model
        seen["peft"] = type(t.model).__name__
        return t

    pipeline.build_trainer = spy
    try:
        summary = train.run(cfg, progress=False)
    finally:
        pipeline.build_trainer = real
    assert seen["ref"] is None and seen["peft"] == "PeftModelForCausalLM"
    assert summary["global_step"] == 2
    assert "eval_rewards/accuracies" in summary["dpo_eval"]
    assert "eval_rewards/margins" in summary["dpo_eval"]
    assert (Path(cfg.runs_dir) / cfg.run_id / "adapter" / "adapter_config.json").exists()


def test_killed_run_resumes_from_its_last_checkpoint(shapes, tiny_cache, tmp_path):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt("simulated kill")

    cfg = _cfg(shapes, tmp_path, finetune="lora", lora_r=4, max_steps=5, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, progress=False, callbacks=(Kill(),))
    out = Path(cfg.runs_dir) / cfg.run_id
    assert (out / "checkpoints" / "checkpoint-2").exists()
    assert not (out / "summary.json").exists()
    cfg.resume = True
    summary = train.run(cfg, progress=False)
    assert summary["resumed_from"].endswith("checkpoint-2")
    assert summary["global_step"] == 5 == summary["max_steps"]


def test_merge_adapter_matches_the_adapter_model(shapes, tiny_cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    cfg = _cfg(
        shapes, tmp_path, finetune="lora", lora_r=4, max_steps=2, init_lora_weights="gaussian"
    )
    train.run(cfg, progress=False)
    out = train.merge_adapter(cfg.run_id, tmp_path / "merged", runs_dir=cfg.runs_dir)
    merged = AutoModelForImageTextToText.from_pretrained(out)
    base, _ = train.build_model(RunConfig(model=cfg.model, finetune="full", runs_dir=cfg.runs_dir))
    peft_model = PeftModel.from_pretrained(base, Path(cfg.runs_dir) / cfg.run_id / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a = merged(input_ids=ids).logits
        b = peft_model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(
    "flags",
    [
        {"use_dora": True},
        {"use_rslora": True},
        {"init_lora_weights": "gaussian"},
        {"finetune": "projector"},
        {"finetune": "full", "train_vision": True, "train_language": False},
        {"projector_learning_rate": 5e-3, "train_projector": True},
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()),
)
def test_training_variants_take_a_step(flags, shapes, tiny_cache, tmp_path):
    kw = {"finetune": "lora", "lora_r": 4, **flags}
    cfg = _cfg(shapes, tmp_path, model="tiny-smolvlm", max_steps=1, eval_data=None, **kw)
    model, _ = train.build_model(cfg)
    groups = {}
    from vlmfit.models import module_groups

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for g, names in module_groups(model, cfg.spec).items():
        groups[g] = bool(trainable & set(names))
    if cfg.finetune == "projector":
        assert groups == {"vision": False, "projector": True, "language": False, "other": False}
    if flags.get("train_language") is False:
        assert groups["vision"] and not groups["language"]
    if cfg.use_dora:
        assert any("lora_magnitude_vector" in n for n in trainable)
    opt = train.make_optimizer(cfg, model)
    if cfg.projector_learning_rate:
        assert sorted(g["lr"] for g in opt.param_groups) == [1e-3, 5e-3]
    summary = train.run(cfg, progress=False)
    assert summary["global_step"] == 1 and summary["train_loss"] > 0


# ------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "llava-13b"}, "unknown model"),
        ({"finetune": "qlora"}, "needs a CUDA GPU"),
        ({"bf16": True}, "bf16"),
        (
            {"train_vision": False, "train_projector": False, "train_language": False},
            "everything is frozen",
        ),
        ({"finetune": "full", "use_dora": True}, "LoRA options"),
        ({"method": "dpo", "finetune": "full"}, "second copy"),
        ({"modle": "smolvlm"}, "unknown configuration key"),
        ({"method": "sft", "init_adapter": "x"}, "init_adapter is for DPO"),
    ],
)
def test_bad_configuration_fails_before_any_model_loads(overrides, message, monkeypatch):
    import vlmfit.models

    monkeypatch.setattr(vlmfit.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=message):
        cfg, _ = resolve(overrides)
        validate(cfg)


def test_dpo_on_data_without_preferences_fails_before_the_model_loads(
    shapes, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        "vlmfit.train.pipeline.build_model", lambda *a, **k: pytest.fail("model loaded")
    )
    cfg = _cfg(shapes, tmp_path, method="dpo", data=str(shapes / "sft_train.json"))
    with pytest.raises(ConfigError, match="needs preference data"):
        train.run(cfg, progress=False)


def test_cli_train_reports_configuration_errors(capsys):
    from vlmfit.cli import main

    assert main(["train", "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_training_is_deterministic_under_a_seed(shapes, tiny_cache, tmp_path):
    results = []
    for i in range(2):
        cfg = _cfg(shapes, tmp_path / str(i), model="tiny-smolvlm", finetune="full", seed=3)
        s = train.run(cfg, progress=False)
        results.append((s["train_loss"], s["eval_after"]))
    assert results[0] == results[1]


def test_hub_revision_is_pinned_and_can_be_overridden():
    from vlmfit.models import resolve_source

    spec = registry.get("qwen2.5-vl-3b")
    assert resolve_source(spec, "hub") == (spec.hub_id, spec.revision)
    assert resolve_source(spec, "hub", "abc123") == (spec.hub_id, "abc123")
    cfg, origin = resolve({"revision": "abc123"})
    assert cfg.revision == "abc123" and origin["revision"] == "override"
