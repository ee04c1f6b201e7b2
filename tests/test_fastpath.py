"""The fast path computes what the plain recipe computes, with less work.

pytest -q tests/test_fastpath.py

Tiny models on CPU in fp32: the fast path's loss on a fixed batch equals the plain
recipe's (model(**batch).loss, vision tower under autograd), the LoRA weights after a few
AdamW steps match, the frozen vision tower records no autograd graph, training reads the
preprocessing cache lazily, and the DataLoader workers run the image processor.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from vlmfit import train
from vlmfit.config import resolve
from vlmfit.train import fastpath

TINY = ["tiny-smolvlm", "tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def _cfg(shapes, tmp_path, **kw):
    base = dict(
        model="tiny-qwen2-vl",
        data=str(shapes / "sft_train.json"),
        eval_data=None,
        runs_dir=str(tmp_path / "runs"),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        gradient_checkpointing=False,
        learning_rate=1e-2,
        lora_r=4,
        lora_alpha=8,
    )
    base.update(kw)
    cfg, _ = resolve(base)
    return cfg


def _batch(cfg, model, processor, shapes):
    """A real training batch: the prepared cache through TRL's VLM collator."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    folder = train.prepare_data(cfg, cfg.data, progress=False)
    ds = train.load_prepared(folder, preference=False)
    collator = DataCollatorForVisionLanguageModeling(processor)
    batch = collator([ds[i] for i in range(4)])
    device = next(model.parameters()).device  # a GPU machine builds the model on its GPU
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _build(cfg):
    """Build with seeded weights, LoRA B non-zero so the adapter shapes the loss from step 0."""
    from vlmfit.models import resolve_source

    resolve_source(cfg.spec, cfg.weights)  # build a missing tiny model first (it draws seeds)
    torch.manual_seed(0)
    model, processor = train.build_model(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, processor


def _fused_loss(model, batch):
    """The loss as TRL's SFTTrainer computes it: chunked LM head, no full logits."""
    return model(**batch, fused_lm_head=True).loss


@pytest.mark.parametrize("name", TINY)
def test_fast_path_matches_the_plain_recipe_loss_and_lora_weights(
    name, shapes, tiny_cache, tmp_path
):
    from trl.trainer.utils import add_fused_lm_head

    kw = dict(model=name, train_projector=True, gradient_checkpointing=True)
    plain_cfg = _cfg(shapes, tmp_path, vision_no_grad=False, **kw)
    fast_cfg = _cfg(shapes, tmp_path, vision_no_grad=True, **kw)
    plain, processor = _build(plain_cfg)
    fast, _ = _build(fast_cfg)
    assert fast.vlmfit_vision_no_grad and not plain.vlmfit_vision_no_grad
    add_fused_lm_head(fast.get_base_model())
    batch = _batch(fast_cfg, fast, processor, shapes)
    plain.train()
    fast.train()

    # SGD: the update is the gradient itself (Adam's normalisation would blow rounding-level
    # differences of near-zero gradients up to a full learning-rate step)
    opts = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        for m in (plain, fast)
    ]
    for step in range(3):
        lp = plain(**copy.copy(batch)).loss
        lf = _fused_loss(fast, copy.copy(batch))
        assert torch.isfinite(lp)
        torch.testing.assert_close(
            lf, lp, rtol=1e-5, atol=1e-5, msg=lambda m, step=step: f"step {step}: {m}"
        )
        for loss, opt in zip((lp, lf), opts, strict=True):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    plain_w = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    fast_w = {n: p for n, p in fast.named_parameters() if p.requires_grad}
    assert plain_w.keys() == fast_w.keys() and any(
        "merger" in n or "connector" in n for n in fast_w
    )
    for n in plain_w:
        torch.testing.assert_close(fast_w[n], plain_w[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize(
    ("name", "train_projector"), [(n, tp) for n in TINY for tp in (False, True)]
)
def test_frozen_vision_tower_records_no_autograd_graph(
    name, train_projector, shapes, tiny_cache, tmp_path
):
    """Every vision module before the projector runs with grad off, outputs nothing to
    back-propagate, and no vision weight gets a gradient; the plain recipe does record."""
    seen: dict[str, list[bool]] = {}

    def watch(model, cfg):
        from vlmfit.models import module_groups

        groups = module_groups(model, cfg.spec)
        leaves = {n.rsplit(".", 1)[0] for n in groups["vision"]}
        mods = dict(model.named_modules())
        key = "fast" if cfg.vision_no_grad else "plain"
        seen[key] = []
        for n in leaves:
            mods[n].register_forward_hook(
                lambda m, i, o: seen[key].append(
                    torch.is_grad_enabled() and isinstance(o, torch.Tensor) and o.requires_grad
                )
            )

    for flag in (False, True):
        cfg = _cfg(
            shapes,
            tmp_path,
            model=name,
            vision_no_grad=flag,
            train_projector=train_projector,
            gradient_checkpointing=True,
        )
        model, processor = _build(cfg)
        watch(model, cfg)
        model.train()
        batch = _batch(cfg, model, processor, shapes)
        model(**batch).loss.backward()
        from vlmfit.models import module_groups

        params = dict(model.named_parameters())
        vision = module_groups(model, cfg.spec)["vision"]
        assert all(params[n].grad is None for n in vision)
        if flag:
            assert seen["fast"] and not any(seen["fast"]), "a vision module recorded autograd"
        else:
            assert any(seen["plain"]), "the plain recipe tracks the frozen tower"


def test_vision_no_grad_is_off_when_the_vision_tower_trains(shapes, tiny_cache, tmp_path):
    cfg = _cfg(shapes, tmp_path, model="tiny-smolvlm", train_vision=True)
    model, _ = _build(cfg)
    assert model.vlmfit_vision_no_grad == []
    assert any(p.requires_grad for n, p in model.named_parameters() if "vision_model" in n)


def test_training_reads_the_prepared_cache_lazily_without_the_source(shapes, tiny_cache, tmp_path):
    """Preprocessing's budgeted images are what training reads, as paths decoded on access;
    the source images are not needed any more."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(shapes, src)
    cfg = _cfg(src, tmp_path, model="tiny-smolvlm")
    folder = train.prepare_data(cfg, cfg.data, progress=False)
    assert folder == train.prepared_folder(folder / "records.jsonl")
    shutil.rmtree(src / "images")  # the source is gone: training must not touch it
    ds = train.load_prepared(folder, preference=False)
    stored = ds.data.column("images").to_pylist()[0][0]
    assert stored["bytes"] is None and stored["path"].startswith(str(folder))
    rows = [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines()]
    assert ds["length"] == [r["length"] for r in rows] and min(ds["length"]) > 0
    cfg.data = str(folder / "records.jsonl")
    summary = train.run(cfg, progress=False)
    assert summary["global_step"] == 2
    with pytest.raises(Exception, match="preference|prompt/chosen/rejected"):
        train.load_prepared(folder, preference=True)


def test_dataloader_workers_run_the_image_processor_and_levers_are_recorded(
    shapes, tiny_cache, tmp_path
):
    cfg = _cfg(shapes, tmp_path, model="tiny-qwen2.5-vl", dataloader_num_workers=2, max_steps=4)
    summary = train.run(cfg, progress=False)
    assert summary["global_step"] == 4 and summary["train_loss"] > 0
    levers = summary["levers"]
    assert levers["dataloader_num_workers"] == 2 and levers["dataloader_prefetch_factor"] == 2
    assert levers["vision_no_grad"] and levers["vision_no_grad_modules"] == ["model.visual"]
    assert levers["train_sampling_strategy"] == "group_by_length"
    assert summary["tokens_per_s"] > 0 and 0 <= summary["data_wait_fraction"] < 1
    logged = [
        json.loads(x)
        for x in (Path(cfg.runs_dir) / cfg.run_id / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("step_s" in r and "data_wait_s" in r for r in logged)
    saved = json.loads((Path(cfg.runs_dir) / cfg.run_id / "summary.json").read_text())
    assert saved["levers"] == levers


def test_auto_workers_and_mfu():
    assert fastpath.dataloader_workers(3) == 3
    if not torch.cuda.is_available():
        assert fastpath.dataloader_workers(None) == 0  # the step already uses every core
    assert fastpath.mfu(1000.0, 7_000_000_000, "NVIDIA H200") == pytest.approx(
        6 * 7e9 * 1000 / 989e12
    )
    assert fastpath.mfu(1000.0, 7_000_000_000, "cpu") is None


@pytest.mark.parametrize("vision_4bit", [True, False])
def test_qlora_keeps_projector_and_lm_head_in_bf16(vision_4bit):
    """transformers matches skip names from the start of a module's full name (or as a
    suffix): bare "visual" / "connector" kept nothing out of 4-bit. Full paths do."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from vlmfit.models import qlora_skip_modules, registry

    for name, vision, projector, language in [
        ("qwen2.5-vl-7b", "model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0",
         "model.language_model.layers.3.mlp.up_proj"),
        ("smolvlm", "model.vision_model.encoder.layers.0.mlp.fc1",
         "model.connector.modality_projection.proj", "model.text_model.layers.3.self_attn.q_proj"),
    ]:  # fmt: skip
        skip = qlora_skip_modules(registry.get(name), vision_4bit=vision_4bit)
        assert should_convert_module(language, skip)
        assert not should_convert_module(projector, skip)
        assert not should_convert_module("lm_head", skip)
        assert should_convert_module(vision, skip) is vision_4bit


def test_make_variables_coerce_by_each_fields_type():
    cfg, _ = resolve(
        {"eval_limit": "4", "dataloader_num_workers": "none", "vision_no_grad": "false",
         "lora_dropout": "0.05", "max_image_tokens": "256"}
    )  # fmt: skip
    assert cfg.eval_limit == 4 and cfg.dataloader_num_workers is None
    assert cfg.vision_no_grad is False and cfg.lora_dropout == 0.05 and cfg.max_image_tokens == 256
    with pytest.raises(ValueError, match="lora_r: expected int"):
        resolve({"lora_r": "sixteen"})


def test_a_run_is_never_replaced_silently(shapes, tiny_cache, tmp_path):
    from vlmfit.train.runs import RunExistsError

    cfg = _cfg(shapes, tmp_path, model="tiny-smolvlm", max_steps=1)
    train.run(cfg, progress=False)
    with pytest.raises(RunExistsError, match="OVERWRITE=1"):
        train.run(cfg, progress=False)
    cfg.overwrite = True
    assert train.run(cfg, progress=False)["global_step"] == 1


def _segment_sdpa(q, k, v, cu, max_len, scale):
    """A reference for the fused kernel: SDPA over each segment, (tokens, heads, dim)."""
    out = [
        torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale
        ).transpose(0, 1)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
    ]
    return torch.cat(out)


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_vision_attention_in_one_call_per_block_equals_the_per_window_path(
    name, shapes, tiny_cache, tmp_path, monkeypatch
):
    """With vision_attention=varlen the vision tower calls one kernel per block with every
    window's boundaries, and computes what transformers' per-window SDPA computes. (The
    CUDA kernel itself is compared on the GPU: tests/test_bench_fastpath.py.)"""
    calls: list[int] = []

    def kernel(q, k, v, cu, max_len, scale):
        assert q.dtype in (torch.float16, torch.bfloat16), "flash takes half precision only"
        calls.append(len(cu) - 1)
        assert cu.dtype == torch.int32 and max_len == int((cu[1:] - cu[:-1]).max())
        return _segment_sdpa(q, k, v, cu, max_len, scale)

    monkeypatch.setattr(fastpath, "varlen_available", lambda device=None: None)
    monkeypatch.setattr(fastpath, "_varlen_kernel", kernel)
    outs = {}
    for kind in ("sdpa", "varlen"):
        cfg = _cfg(shapes, tmp_path, model=name, vision_attention=kind)
        model, processor = _build(cfg)
        assert model.vlmfit_vision_attention == kind
        batch = _batch(cfg, model, processor, shapes)
        vision = model.get_base_model().model.visual
        n_blocks = len(vision.blocks)
        with torch.no_grad():
            outs[kind] = vision(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        outs[kind] = getattr(outs[kind], "pooler_output", outs[kind])
    assert len(calls) == n_blocks, "one fused call per vision block, not one per window"
    assert max(calls) > 1, "the batch's windows (or images) went into one call"
    # the fp32 tiny tower goes through the kernel in bf16, as flash requires
    torch.testing.assert_close(outs["varlen"], outs["sdpa"], rtol=2e-2, atol=2e-2)


def test_vision_attention_falls_back_to_sdpa_and_says_why(shapes, tiny_cache, tmp_path):
    cfg = _cfg(shapes, tmp_path, model="tiny-qwen2-vl")  # the default: varlen
    model, _ = _build(cfg)
    assert model.vlmfit_vision_attention.startswith("sdpa (")  # no CUDA here
    cfg = _cfg(shapes, tmp_path, model="tiny-smolvlm")
    model, _ = _build(cfg)
    assert model.vlmfit_vision_attention == "sdpa (batched tiles: nothing to fuse)"


class _TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(32, 48, bias=False)
        self.up = torch.nn.Linear(32, 64, bias=True)

    def forward(self, x):
        return self.q(x).sum(-1) + self.up(x).sum(-1)


def _lora_pair(dtype, dropout=0.0):
    """The same PEFT LoRA model twice (B non-zero), the second with fused LoRA."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _TwoLinears().to(dtype)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q", "up"])
    plain = get_peft_model(copy.deepcopy(base), cfg)
    for n, p in plain.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    fused = copy.deepcopy(plain)
    assert fastpath.fuse_lora(fused) == 2
    return plain, fused


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.float().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, x.grad, grads


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_lora_computes_what_peft_computes(autocast):
    """Output, input gradient and adapter gradients equal PEFT's: exactly in fp32, within
    bf16 rounding on bf16 weights under autocast (as the Trainer runs them)."""
    dtype = torch.bfloat16 if autocast else torch.float32
    plain, fused = _lora_pair(dtype)
    x = torch.randn(2, 5, 32).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = _grads(plain, x)
        got = _grads(fused, x)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    assert ref[2].keys() == got[2].keys() and len(got[2]) == 4
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], **tol, msg=n)


def test_fused_lora_makes_no_copy_of_the_activation():
    """PEFT casts each adapted layer's bf16 input to fp32 (and autocast casts it back);
    the fused path converts only the small adapter weights."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.seen = numel, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].numel() >= self.numel:
                self.seen += 1
            return func(*args, **(kwargs or {}))

    plain, fused = _lora_pair(torch.bfloat16)
    x = torch.randn(4, 64, 32, dtype=torch.bfloat16)
    counts = {}
    for name, model in (("peft", plain), ("fused", fused)):
        with torch.autocast("cpu", dtype=torch.bfloat16), Copies(x.numel()) as mode:
            model(x.requires_grad_(True)).sum().backward()
        counts[name] = mode.seen
    assert counts["peft"] >= 2 and counts["fused"] == 0, counts


def test_fused_lora_leaves_disabled_dropout_and_merged_adapters_to_peft():
    plain, fused = _lora_pair(torch.float32, dropout=0.1)
    x = torch.randn(3, 32)
    plain.eval(), fused.eval()  # dropout off at eval: PEFT's path, same result
    torch.testing.assert_close(fused(x), plain(x))
    plain, fused = _lora_pair(torch.float32)
    with plain.disable_adapter(), fused.disable_adapter():  # DPO's reference model
        torch.testing.assert_close(fused(x), plain(x))
        torch.testing.assert_close(fused(x), plain.get_base_model()(x))
    with_adapter = fused(x)
    fused.merge_adapter()
    torch.testing.assert_close(fused(x), with_adapter, rtol=1e-5, atol=1e-5)


def test_activation_offloading_is_off_unless_asked_or_needed(monkeypatch):
    """None (the default) is off, GPU or not: with fused LoRA the copies no longer hide (the
    7B, run 6: -32% tokens/s for -1.12 GiB); the memory check turns it on where the run fits
    no other way (tests/test_memory.py); an explicit value always wins."""

    def cfg(model, **kw):
        return resolve({"model": model, **kw})[0]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for model in ("qwen2.5-vl-7b", "qwen2-vl-2b", "smolvlm"):
        assert not fastpath.offloads_activations(cfg(model))
    assert fastpath.offloads_activations(cfg("smolvlm", activation_offloading=True))
    assert not fastpath.offloads_activations(cfg("qwen2.5-vl-7b", activation_offloading=False))


def test_autocast_is_off_where_fused_lora_already_computes_in_bf16(shapes, tiny_cache, tmp_path):
    """None (the default): no autocast for LoRA / QLoRA with fused LoRA, whose loss and
    gradients in bf16 match the autocast run's within bf16 rounding; on for full
    fine-tuning and for PEFT's own LoRA forward; an explicit value wins."""
    assert not fastpath.uses_autocast(resolve({"model": "smolvlm"})[0])
    assert fastpath.uses_autocast(resolve({"model": "smolvlm", "finetune": "full"})[0])
    assert fastpath.uses_autocast(resolve({"model": "smolvlm", "fused_lora": False})[0])
    assert fastpath.uses_autocast(resolve({"model": "smolvlm", "autocast": True})[0])
    cfg = _cfg(shapes, tmp_path, model="tiny-qwen2.5-vl")
    model, processor = _build(cfg)
    model.to(torch.bfloat16)  # as loaded on a GPU: bf16 weights, fp32 adapters
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    batch = _batch(cfg, model, processor, shapes)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    model.train()
    runs = {}
    for autocast in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        runs[autocast] = (loss.float(), grads)
    torch.testing.assert_close(runs[False][0], runs[True][0], rtol=2e-2, atol=2e-2)
    for n, g in runs[True][1].items():
        assert (
            torch.nn.functional.cosine_similarity(g.flatten(), runs[False][1][n].flatten(), 0)
            > 0.99
        ), n


def test_tiled_vision_tower_in_chunks_computes_what_one_pass_computes(shapes, tiny_cache, tmp_path):
    """``vision_chunk``: SmolVLM's frozen tower runs N tiles a pass (its transient memory
    stops growing with the micro-batch); the loss and the LoRA gradients are unchanged."""
    results = {}
    for chunk in (0, 3):
        cfg = _cfg(shapes, tmp_path, model="tiny-smolvlm", vision_chunk=chunk)
        model, processor = _build(cfg)
        (name,) = model.vlmfit_vision_no_grad  # the whole tower, before the connector
        tower = model.base_model.model.get_submodule(name)
        calls: list[int] = []
        tower.embeddings.register_forward_hook(lambda m, i, o, calls=calls: calls.append(len(o)))
        model.train()
        batch = _batch(cfg, model, processor, shapes)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[chunk] = (loss.detach(), grads, calls)
    tiles = sum(results[0][2])
    assert results[0][2] == [tiles] and tiles > 3  # one pass over every tile of the batch
    assert results[3][2] == [min(3, tiles - a) for a in range(0, tiles, 3)]
    torch.testing.assert_close(results[3][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[3][1].keys() == results[0][1].keys() and results[0][1]
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[3][1][n], g, rtol=1e-4, atol=1e-6)


def test_chunked_tiles_passes_flat_patch_sequences_through():
    """Qwen's tower takes one flat patch sequence (2-D): never split."""
    seen = []

    def forward(pixel_values, grid_thw=None):
        seen.append(pixel_values.shape)
        return pixel_values * 2

    x = torch.ones(10, 6)
    assert torch.equal(fastpath.chunked_tiles(forward, 3, (x,), {"grid_thw": None}), x * 2)
    assert seen == [(10, 6)]
    tiles = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).reshape(5, 3, 2, 2)
    out = fastpath.chunked_tiles(
        lambda pixel_values: pixel_values + 1, 2, (), {"pixel_values": tiles}
    )
    assert torch.equal(out, tiles + 1)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offloaded_layer_inputs_give_the_gradients_of_plain_checkpointing(
    name, dropout, shapes, tiny_cache, tmp_path
):
    """``activation_offloading`` (one process): the language model's checkpointed layers keep
    their input in host memory and recompute the rest (``vlmfit.train.offload``); the loss
    and every LoRA gradient equal non-reentrant checkpointing's, dropout masks included
    (the recompute replays the forward's random state)."""
    from vlmfit.train import offload

    results = {}
    for offloading in (False, True):
        cfg = _cfg(shapes, tmp_path, model=name, gradient_checkpointing=True,
                   activation_offloading=offloading, lora_dropout=dropout)  # fmt: skip
        model, processor = _build(cfg)
        layers = model.get_base_model().get_decoder().layers
        assert model.vlmfit_offloaded_layers == (len(layers) if offloading else 0)
        assert fastpath.trl_offloading(cfg) is False  # TRL's hooks stay off either way
        model.train()
        batch = _batch(cfg, model, processor, shapes)
        calls = []
        original = offload._Stash.__init__

        def counted(self, hidden, calls=calls, original=original):
            calls.append(tuple(hidden.shape))
            original(self, hidden)

        offload._Stash.__init__ = counted
        try:
            torch.manual_seed(3)
            loss = model(**batch).loss
            loss.backward()
        finally:
            offload._Stash.__init__ = original
        assert len(calls) == (len(layers) if offloading else 0)
        assert not offload._pending  # every stash was consumed by its backward
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[offloading] = (loss.detach(), grads)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
    assert results[True][1].keys() == results[False][1].keys() and results[False][1]
    for n, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_offloaded_checkpoint_runs_plainly_without_grad_and_falls_back_where_it_must():
    """A reference forward (no grad) stashes nothing; an input without grad or another
    argument that needs one goes through non-reentrant checkpointing instead."""
    import functools

    from vlmfit.train import offload

    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(offload.offloaded_checkpoint(lin, x), lin(x))
    assert not offload._pending
    other = torch.randn(2, 4, requires_grad=True)
    run = functools.partial(lambda h, extra: lin(h) * extra, extra=other)
    offload.offloaded_checkpoint(run, x).sum().backward()
    assert not offload._pending and other.grad is not None  # checkpoint kept its gradient
    y = torch.randn(2, 4)
    out = offload.offloaded_checkpoint(lin, y)
    out.sum().backward()
    assert lin.weight.grad is not None and not offload._pending


@pytest.mark.parametrize("name", TINY)
def test_host_embeddings_compute_what_the_device_table_computes(name, shapes, tiny_cache, tmp_path):
    """``host_embeddings``: the frozen input-embedding table moves to host memory; the loss
    and LoRA gradients are unchanged, PEFT's input-grad hook moves with it, the table keeps
    its state_dict name and ``model.to`` leaves it on the host. (``offload.host_embeddings``
    moves it only off a GPU and never a table the LM head shares: checked on the GPU.)"""
    from vlmfit.train import offload

    cfg = _cfg(shapes, tmp_path, model=name, gradient_checkpointing=True,
               activation_offloading=True, host_embeddings=False)  # fmt: skip
    model, processor = _build(cfg)
    assert model.vlmfit_host_embeddings == 0
    base = model.get_base_model()
    batch = _batch(cfg, model, processor, shapes)
    model.train()
    results = []
    for host in (False, True):
        if host:
            emb = base.get_input_embeddings()
            hooks = list(emb._forward_hooks.values())
            assert hooks  # enable_input_require_grads
            base.set_input_embeddings(offload.HostEmbedding(emb))
            moved = base.get_input_embeddings()
            assert list(moved._forward_hooks.values()) == hooks
            key = next(k for k in model.state_dict() if k.endswith("embed_tokens.weight"))
            torch.testing.assert_close(model.state_dict()[key], emb.weight.cpu())
            model.to(next(model.parameters()).device)
            assert moved.table.device.type == "cpu"
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0])
    assert results[1][1].keys() == results[0][1].keys() and results[0][1]
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, msg=n)


def test_host_embeddings_follow_offloading_unless_set():
    def cfg(**kw):
        return resolve({"model": "qwen2.5-vl-7b", **kw})[0]

    assert not fastpath.uses_host_embeddings(cfg())
    assert fastpath.uses_host_embeddings(cfg(activation_offloading=True))
    assert not fastpath.uses_host_embeddings(cfg(activation_offloading=True, host_embeddings=False))
    assert fastpath.uses_host_embeddings(cfg(host_embeddings=True))
