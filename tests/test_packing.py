"""Padding-free packing computes what the padded batch computes.

pytest -q tests/test_packing.py

Tiny models on CPU in fp32 (SDPA: transformers builds the block-causal mask from the
restarted positions): the packed row's loss and LoRA gradients equal the padded batch's,
through the model's own loss and TRL's fused LM head; positions restart in each sample.
"""

from __future__ import annotations

import pytest
import torch

from vlmfit import train
from vlmfit.config import resolve
from vlmfit.train import packing

TINY = ["tiny-smolvlm", "tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def _setup(name, shapes, tmp_path, **kw):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vlmfit.models import resolve_source

    cfg, _ = resolve(
        dict(model=name, data=str(shapes / "sft_train.json"), eval_data=None,
             runs_dir=str(tmp_path / "runs"), gradient_checkpointing=False, lora_r=4,
             lora_alpha=8, **kw)
    )  # fmt: skip
    resolve_source(cfg.spec, cfg.weights)
    torch.manual_seed(0)
    model, processor = train.build_model(cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    folder = train.prepare_data(cfg, cfg.data, progress=False)
    ds = train.load_prepared(folder, preference=False)
    lengths = ds["length"]
    picks = sorted(range(len(ds)), key=lambda i: lengths[i])  # shortest and longest together
    rows = [ds[i] for i in (picks[0], picks[-1], picks[len(picks) // 2], picks[1])]
    batch = DataCollatorForVisionLanguageModeling(processor)(rows)
    model.train()
    return model, batch


def _inner(model):
    inner = model.get_base_model().model
    return inner if hasattr(inner, "get_rope_index") else None


def _loss_and_grads(model, inputs, fused=False):
    model.zero_grad(set_to_none=True)
    if fused:
        out = model(**inputs, fused_lm_head=True)
        loss = -out.log_probs.sum() / out.label_mask.sum()
    else:
        loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("name", TINY)
def test_packed_row_trains_exactly_like_the_padded_batch(name, shapes, tiny_cache, tmp_path):
    model, batch = _setup(name, shapes, tmp_path)
    mask = batch["attention_mask"]
    assert (mask.sum(-1) < mask.shape[1]).any(), "the batch needs padding to remove"
    packed = packing.pack(_inner(model), dict(batch))
    assert packed["input_ids"].shape == (1, int(mask.sum()))
    assert packed["attention_mask"] is None
    text = (
        packed["position_ids"][0] if packed["position_ids"].dim() == 3 else packed["position_ids"]
    )
    assert int((text == 0).sum()) == mask.shape[0], "positions restart once per sample"
    ref, ref_g = _loss_and_grads(model, dict(batch))
    got, got_g = _loss_and_grads(model, packed)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert ref_g.keys() == got_g.keys() and ref_g
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["tiny-smolvlm", "tiny-qwen2.5-vl"])
def test_packing_through_trls_fused_lm_head_and_the_training_hook(
    name, shapes, tiny_cache, tmp_path
):
    from trl.trainer.utils import add_fused_lm_head

    model, batch = _setup(name, shapes, tmp_path)
    add_fused_lm_head(model.get_base_model())
    ref, ref_g = _loss_and_grads(model, dict(batch), fused=True)
    packing.enable(model)  # the hook packs training forwards from here on
    got, got_g = _loss_and_grads(model, dict(batch), fused=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=n)
    model.eval()  # evaluation sees the padded batch
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_qwen_positions_are_the_models_own_restarted_per_sample(shapes, tiny_cache, tmp_path):
    model, batch = _setup("tiny-qwen2.5-vl", shapes, tmp_path)
    inner = _inner(model)
    rope, _ = inner.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
    )  # fmt: skip
    packed = packing.pack(inner, dict(batch))
    assert packed["position_ids"].shape == (4, 1, int(batch["attention_mask"].sum()))
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(packed["position_ids"][1:, 0], rope[:, keep])
    first = packed["labels"][0][packed["position_ids"][0, 0] == 0]
    assert (first == -100).all(), "no sample's first token is a target across the boundary"


def _causal_segments(q, k, v, cu, max_len, scale, causal=False):
    """A reference for the fused kernel: causal SDPA per segment, grouped heads shared."""
    assert causal and q.dtype == k.dtype
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale, is_causal=True
        ).transpose(0, 1)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
    ])  # fmt: skip


@pytest.mark.parametrize("name", TINY)
def test_packed_row_through_one_varlen_call_per_layer(
    name, shapes, tiny_cache, tmp_path, monkeypatch
):
    """On a GPU the language model attends through one causal varlen call per layer over
    the packed row (here a per-segment SDPA stands in for the CUDA kernel); the loss and
    gradients still equal the padded batch's, and evaluation keeps SDPA."""
    from vlmfit.train import fastpath

    calls = []

    def kernel(q, k, v, cu, max_len, scale, causal=False):
        calls.append(len(cu) - 1)
        return _causal_segments(q, k, v, cu, max_len, scale, causal)

    monkeypatch.setattr(fastpath, "_varlen_kernel", kernel)
    model, batch = _setup(name, shapes, tmp_path, vision_attention="sdpa")
    ref, ref_g = _loss_and_grads(model, dict(batch))
    packing.enable(model, varlen=True)
    got, got_g = _loss_and_grads(model, dict(batch))
    layers = model.get_base_model().get_decoder().config.num_hidden_layers
    assert calls == [batch["input_ids"].shape[0]] * layers
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=n)
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert len(calls) == layers, "evaluation runs SDPA on the padded batch"


def test_packing_is_recorded_and_sft_only(shapes, tiny_cache, tmp_path):
    model, _ = _setup("tiny-qwen2-vl", shapes, tmp_path, packing=True)
    assert model.vlmfit_packing.startswith("sdpa block mask (")  # no CUDA here
    model, _ = _setup("tiny-qwen2-vl", shapes, tmp_path, packing=True, method="dpo")
    assert model.vlmfit_packing is None


def test_sft_trains_end_to_end_with_packing(shapes, tiny_cache, tmp_path):
    """train.run with packing: TRL's SFTTrainer counts the real tokens and the loss falls
    as without packing (same data order and seed: the same losses)."""
    import json

    losses = {}
    for flag in (False, True):
        cfg, _ = resolve(
            dict(model="tiny-qwen2.5-vl", data=str(shapes / "sft_train.json"), eval_data=None,
                 runs_dir=str(tmp_path / f"runs-{flag}"), max_steps=3, logging_steps=1,
                 per_device_train_batch_size=4, learning_rate=1e-2, lora_r=4, lora_alpha=8,
                 gradient_checkpointing=False, packing=flag, train_sampling_strategy="random",
                 dataloader_num_workers=0)
        )  # fmt: skip
        summary = train.run(cfg, progress=False)
        run = tmp_path / f"runs-{flag}" / summary["run"]
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in rows if "loss" in r]
        tokens = [r["num_tokens"] for r in rows if "num_tokens" in r]
        assert summary["levers"]["packing"] == (
            flag and "sdpa block mask (needs a CUDA GPU)" or None
        )
        assert tokens[-1] > 3 * 4 * 10, "TRL counted the real tokens of every step"
    assert len(losses[True]) == 3
    torch.testing.assert_close(
        torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-5
    )
