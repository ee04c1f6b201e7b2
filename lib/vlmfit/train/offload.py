"""What a run can keep in host memory instead of the GPU's: the checkpointed layer inputs
(``RunConfig.activation_offloading``) and a frozen input-embedding table (``host_embeddings``).

How the layer inputs travel: :func:`offloaded_checkpoint`; the table: :class:`HostEmbedding`.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


class _Stash:
    """One layer input on its way to the host and back."""

    __slots__ = ("device", "done", "gpu", "host", "ready")

    def __init__(self, hidden: torch.Tensor):
        self.device = hidden.device
        self.gpu: torch.Tensor | None = None
        self.done = False
        if hidden.device.type != "cuda":  # CPU runs: nothing to move (the math is the same)
            self.host, self.ready = hidden.detach().clone(), None
            return
        stream = _copy_stream(hidden.device)
        stream.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(stream):
            self.host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            self.host.copy_(hidden.detach(), non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        hidden.record_stream(stream)  # its memory is not reused before the copy ends

    def prefetch(self) -> None:
        """Start the copy back on the side stream (the backward of the layer above runs)."""
        if self.gpu is not None or self.ready is None:
            return
        stream = _copy_stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self.ready)
            self.gpu = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def fetch(self) -> torch.Tensor:
        if self.ready is None:
            return self.host
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready)
        gpu, self.gpu = self.gpu, None
        gpu.record_stream(current)
        return gpu


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


#: Layer inputs of the forward passes whose backward has not run yet, oldest first: the
#: backward of one layer prefetches the input of the layer below it (the next in line).
_pending: list[_Stash] = []
_MAX_PENDING = 4096  # forwards never followed by a backward (an error) are dropped


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, run, hidden, *args):
        stash = _Stash(hidden)
        if len(_pending) >= _MAX_PENDING:
            _pending.clear()
        _pending.append(stash)
        ctx.run, ctx.stash, ctx.args = run, stash, args
        ctx.rng = _rng_state(hidden.device)
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *grads):
        stash = ctx.stash
        hidden = stash.fetch().detach().requires_grad_(True)
        stash.done = True
        while _pending and _pending[-1].done:
            _pending.pop()
        if _pending:
            _pending[-1].prefetch()  # the layer below, whose backward comes next
        devices = [hidden.device] if hidden.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            _set_rng_state(hidden.device, ctx.rng)
            with torch.enable_grad():
                out = ctx.run(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [
            (o, g)
            for o, g in zip(outs, grads, strict=False)
            if isinstance(o, torch.Tensor) and o.requires_grad and g is not None
        ]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        n_args = len(ctx.args)
        ctx.run = ctx.args = ctx.stash = None
        return (None, hidden.grad) + (None,) * n_args


def _rng_state(device: torch.device):
    cpu = torch.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(device)) if device.type == "cuda" else (cpu, None)


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _needs_grad(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, tuple | list):
        return any(_needs_grad(v) for v in value)
    return False


def offloaded_checkpoint(run, hidden, *args):
    """A ``_gradient_checkpointing_func`` for transformers' checkpointed layers: ``run`` is
    the layer's forward with its keyword arguments bound, ``hidden`` its input.

    With gradient checkpointing a decoder layer keeps only its input until the backward pass
    (Qwen2.5-VL-7B, micro-batch 4: 28 x 55 MB). Here the input is copied to pinned host
    memory on a side stream while the layer runs, and copied back one layer ahead of the
    backward pass that needs it, so neither copy waits on the compute stream. Everything else
    the layer saves is recomputed, as with ``torch.utils.checkpoint``. Only tensors go through
    the host; the layer's other arguments (masks, rotary tables, positions) stay where they are.

    Falls back to non-reentrant checkpointing where offloading the input alone would lose a
    gradient (another argument needs one, or the input itself does not) and runs the layer
    plainly under ``torch.no_grad`` (a reference forward)."""
    if not torch.is_grad_enabled():
        return run(hidden, *args)
    keywords = getattr(run, "keywords", {}) or {}
    if (
        not isinstance(hidden, torch.Tensor)
        or not hidden.requires_grad
        or _needs_grad(args)
        or _needs_grad(tuple(keywords.values()))
    ):
        return checkpoint(run, hidden, *args, use_reentrant=False)
    return _OffloadedCheckpoint.apply(run, hidden, *args)


def enable(model) -> int:
    """Give every checkpointed layer of ``model``'s language model ``offloaded_checkpoint``.

    Call after ``gradient_checkpointing_enable``. Returns how many layers offload."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = 0
    for module in base.get_decoder().modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module._gradient_checkpointing_func = offloaded_checkpoint
            n += 1
    return n


class HostEmbedding(torch.nn.Module):
    """A frozen ``nn.Embedding`` whose table stays in pinned host memory.

    A step looks its rows up on the CPU (the ids cross once, a few KB) and copies the rows
    to the GPU (micro-batch 4 on the 7B: 6,900 x 3,584 bf16, 49 MB). The table is a plain
    attribute, so ``model.to(device)`` leaves it where it is; ``state_dict`` still carries
    it under the original name. Forward hooks of the module it replaces (PEFT's
    ``enable_input_require_grads``) move over with it.
    """

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        weight = embedding.weight.detach()
        self.table = weight.to("cpu").pin_memory() if torch.cuda.is_available() else weight.cpu()
        self.num_embeddings, self.embedding_dim = self.table.shape
        self.padding_idx = embedding.padding_idx
        self._forward_hooks = embedding._forward_hooks
        self._forward_pre_hooks = embedding._forward_pre_hooks

    @property
    def weight(self) -> torch.Tensor:  # what code reading ``embed_tokens.weight`` expects
        return self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to("cpu")
        pin = self.table.is_pinned()
        rows = torch.empty((len(flat), self.embedding_dim), dtype=self.table.dtype, pin_memory=pin)
        torch.index_select(self.table, 0, flat, out=rows)
        return rows.to(ids.device, non_blocking=pin).view(*ids.shape, self.embedding_dim)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.table

    def _load_from_state_dict(self, state_dict, prefix, *args):
        key = prefix + "weight"
        if key in state_dict:
            self.table.copy_(state_dict[key])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory"


def host_embeddings(model) -> int:
    """Move ``model``'s input embeddings to host memory where that is exact: a frozen,
    plain ``nn.Embedding`` not shared with the LM head. Returns the bytes it freed (0: left
    on the device)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings()
    head = base.get_output_embeddings()
    if (
        type(emb) is not torch.nn.Embedding  # scaled embeddings (Gemma) compute more than a lookup
        or emb.weight.requires_grad
        or (head is not None and head.weight is emb.weight)
        or emb.weight.device.type != "cuda"
    ):
        return 0
    freed = emb.weight.numel() * emb.weight.element_size()
    base.set_input_embeddings(HostEmbedding(emb))
    return freed
