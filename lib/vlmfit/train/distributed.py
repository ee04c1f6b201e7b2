"""Training on several GPUs (or machines) through ``accelerate launch``: DDP, FSDP2, ZeRO-3.

``vlmfit launch`` checks everything once, then runs ``vlmfit train`` on every rank, where the
Trainer does data parallelism, sharding and checkpoints. The helpers here make it behave under
several processes and are no-ops in one (``WORLD_SIZE`` unset). See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from vlmfit import files
from vlmfit.train.runs import REPO_ROOT

#: accelerate configs, one per engine (``DIST=``); the file is ``accelerate/<name>.yaml``.
CONFIG_DIR = REPO_ROOT / "accelerate"
ENGINES = {
    "ddp": "DDP: a full replica per GPU, gradients all-reduced (LoRA, QLoRA, small full FT)",
    "fsdp2": "FSDP2: weights, gradients and optimizer states sharded over the GPUs",
    "zero3": "DeepSpeed ZeRO-3: weights, gradients and optimizer states partitioned",
}
#: Process-group timeout: rank 0 evaluates by generation while the other ranks wait.
TIMEOUT = timedelta(hours=2)


class LaunchError(RuntimeError):
    """A distributed launch that cannot run, found before any process starts."""


# --------------------------------------------------------------------- inside a rank


def world_size() -> int:
    """Processes in this run (``WORLD_SIZE`` set by accelerate / torchrun; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return world_size() > 1


@functools.cache
def state():
    """accelerate's ``PartialState`` under a launcher (process group initialised), else None.

    Made before the model loads so each rank binds its own GPU (``cuda:LOCAL_RANK``) and
    gloo is chosen on CPU; the Trainer later reuses this same state.
    """
    if not is_distributed():
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=TIMEOUT)


def rank() -> int:
    s = state()
    return s.process_index if s else 0


def is_main() -> bool:
    """True on global rank 0 (and in a single process): the one that writes run files."""
    s = state()
    return s.is_main_process if s else True


def device() -> str:
    """This rank's device: ``cuda:LOCAL_RANK`` under a launcher, else cuda / cpu."""
    s = state()
    if s is not None:
        return str(s.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (creates, preprocesses, caches), the others after it."""
    s = state()
    if s is None:
        yield
        return
    with s.main_process_first():
        yield


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Each machine's first process runs the block first (its model cache), then the others."""
    s = state()
    if s is None:
        yield
        return
    with s.local_main_process_first():
        yield


def barrier() -> None:
    s = state()
    if s is not None:
        s.wait_for_everyone()


def on_main(fn, default: Any = None) -> Any:
    """``fn()`` on rank 0 only (the others wait for it); ``default`` on the other ranks."""
    out = fn() if is_main() else default
    barrier()
    return out


def _image_id(image: Any) -> str:
    """An image's file (PIL keeps the path it was opened from), else a hash of its pixels."""
    if isinstance(image, dict):
        return str(image.get("path") or hashlib.sha256(image.get("bytes") or b"").hexdigest())
    name = getattr(image, "filename", "")
    return name or hashlib.sha256(image.tobytes()).hexdigest()


def sample_id(example: dict[str, Any]) -> str:
    """A short hash of one training example: its text and its images (file or pixels)."""
    images = [_image_id(i) for i in example.get("images") or []]
    text = {k: v for k, v in example.items() if k not in ("images", "length")}
    raw = json.dumps([text, images], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


class SampleLog:
    """Wrap a collator: append the ids of each batch's examples to this rank's log.

    ``runs/<run>/ranks/rank-<k>.jsonl``, one line per batch; shows that the ranks trained
    on disjoint shards of the data (accelerate's sampler shards, the Trainer seeds it).
    Lines are short single writes in append mode: DataLoader workers may share the file.
    """

    def __init__(self, collator, path: str | Path):
        self.collator = collator
        self.path = str(path)

    def __getattr__(self, name):  # the wrapped collator's attributes (TRL reads some)
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, examples):
        line = json.dumps({"samples": [sample_id(e) for e in examples]}) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
        return self.collator(examples)


def launch_engine() -> str:
    """``ddp``, ``fsdp2`` or ``zero3``: what accelerate tells the ranks through the
    environment (``ddp`` in one process too)."""
    if is_distributed() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "zero3"
    if is_distributed() and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp2"
    return "ddp"


def sharded() -> bool:
    """Launched with FSDP or DeepSpeed: weights and optimizer states are divided over GPUs."""
    return launch_engine() != "ddp"


def engine(trainer) -> str:
    """``ddp``, ``fsdp`` or ``deepspeed`` for a prepared Trainer (``none`` in one process)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "fsdp"
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "deepspeed"
    return "ddp" if is_distributed() else "none"


def save_model(trainer, out: Path) -> Path:
    """The adapter (or full model) in the single-GPU format, written once by rank 0.

    Called on every rank: FSDP2 and ZeRO-3 gather the sharded weights in a collective
    (FSDP switched to a full state dict for this save; its checkpoints stay sharded).
    The Trainer writes through the unwrapped model's ``save_pretrained`` on rank 0 only,
    so a LoRA run gives ``adapter_config.json`` + ``adapter_model.safetensors`` as in one
    process; ``training_args.bin`` is dropped (it is in every checkpoint).
    """
    import shutil

    target, tmp = out / "adapter", out / ".adapter.tmp"
    if is_main() and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    if engine(trainer) == "fsdp":
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp))
    if is_main():
        (tmp / "training_args.bin").unlink(missing_ok=True)
        files.replace_folder(tmp, target)
        print(f"rank {rank()} of {world_size()}: saved {target}", flush=True)
    barrier()
    return target


# ------------------------------------------------------------------------- launcher


def config_file(dist: str) -> Path:
    if dist not in ENGINES:
        raise LaunchError(f"DIST={dist!r}: expected one of {', '.join(ENGINES)}")
    path = CONFIG_DIR / f"{dist}.yaml"
    if not path.is_file():
        raise LaunchError(f"DIST={dist}: accelerate config {path} is missing")
    return path


def check_engine(dist: str, nproc: int, *, cuda: bool | None = None) -> None:
    """Refuse what cannot run here, in one line, before any process starts."""
    config_file(dist)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if nproc < 1:
        raise LaunchError(f"NPROC={nproc}: expected at least 1 process")
    if dist == "zero3" and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(
            "DIST=zero3 needs DeepSpeed, which is not installed (it is not in requirements.lock): "
            "run `pip install deepspeed` on the GPU host, or use DIST=fsdp2 (same sharding, "
            "no extra package)"
        )
    if dist != "ddp" and not cuda:
        raise LaunchError(
            f"DIST={dist} shards over CUDA GPUs and this machine has none; on CPU only DIST=ddp "
            "runs (gloo backend)"
        )
    if cuda and nproc > torch.cuda.device_count():
        raise LaunchError(
            f"NPROC={nproc} but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
            "one process per GPU"
        )


def launch_command(
    train_args: list[str],
    *,
    nproc: int,
    dist: str = "ddp",
    nnodes: int = 1,
    node_rank: int = 0,
    main_address: str | None = None,
    main_port: int | None = None,
) -> list[str]:
    """The ``accelerate launch`` line that runs ``python -m vlmfit train`` on every rank.

    ``nproc`` counts processes on this machine (one per GPU); accelerate's
    ``--num_processes`` is the total over all machines.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(config_file(dist)), "--num_processes", str(nproc * nnodes)]
    cmd += ["--num_machines", str(nnodes), "--machine_rank", str(node_rank)]
    if main_address:
        cmd += ["--main_process_ip", main_address]
    if main_port:
        cmd += ["--main_process_port", str(main_port)]
    return [*cmd, "-m", "vlmfit", "train", *train_args]


def prepare(
    overrides: dict[str, Any],
    train_args: list[str],
    *,
    overwrite: bool,
    node_rank: int = 0,
    dist: str = "ddp",
) -> list[str]:
    """Check the run configuration and the run folder once; the flags every rank gets.

    Every rank runs ``vlmfit train``, which refuses an existing run folder: the launcher
    applies run protection here (RESUME / OVERWRITE as in one process), on the first
    machine only, then tells the ranks to replace a fresh run (rank 0 alone deletes it).
    """
    from vlmfit.config import ConfigError, resolve
    from vlmfit.train import runs

    try:
        cfg, _ = resolve(overrides)
    except ConfigError as e:
        raise LaunchError(f"configuration error: {e}") from None
    if cfg.finetune == "qlora" and dist != "ddp":
        raise LaunchError(
            f"finetune=qlora with DIST={dist}: vlmfit's 4-bit weights are not stored for "
            "sharding; QLoRA runs under DIST=ddp (one 4-bit copy per GPU)"
        )
    if node_rank == 0:
        runs.check_run_dir(
            runs.run_dir(cfg.runs_dir, cfg.run_id), resume=cfg.resume, overwrite=overwrite
        )
    return train_args if cfg.resume else [*train_args, "--overwrite"]


if __name__ == "__main__":  # the older spelling of `vlmfit launch` (benchmarks/scaling.py)
    from vlmfit.cli import main

    sys.exit(main(["launch", *sys.argv[1:]]))
