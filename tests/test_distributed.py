"""Training on several processes through accelerate: a real 2-process DDP run on CPU (gloo).

pytest -q tests/test_distributed.py

The run goes through the same launcher and config as ``make sft NPROC=2`` (``vlmfit
launch`` -> ``accelerate launch --config_file accelerate/ddp.yaml`` -> ``python
-m vlmfit train`` on each rank), on the tiny offline model, in about 25 s on 2 cores.
FSDP2 and ZeRO-3 need CUDA GPUs: here only their configs and the launcher's refusals run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmfit import train
from vlmfit.config import RunConfig
from vlmfit.data import synth
from vlmfit.train import distributed

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, SAMPLES = 8, 2, 32  # 8 steps x 2 per rank x 2 ranks = one pass over 32 samples


def _launch(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLMFIT_DEBUG="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "vlmfit", "launch", *args],
        cwd=cwd,  # the preprocessing cache (data/cache) goes under the test's folder
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _train_args(work: Path, **extra) -> list[str]:
    flags = {
        "model": "tiny-smolvlm",
        "finetune": "lora",
        "lora_r": 8,
        "data": str(work / "shapes" / "sft_train.json"),
        "eval_data": str(work / "shapes" / "sft_test.json"),
        "eval_max_new_tokens": 3,
        "runs_dir": str(work / "runs"),
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_steps": 4,
        "gradient_checkpointing": False,
        "train_sampling_strategy": "random",
    } | extra
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def _samples(run: Path, rank: int) -> list[str]:
    lines = (run / "ranks" / f"rank-{rank}.jsonl").read_text().splitlines()
    return [s for line in lines for s in json.loads(line)["samples"]]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_cache):
    """One 2-process DDP LoRA SFT run: (run folder, launcher output)."""
    from vlmfit.models import builders as tiny

    work = tmp_path_factory.mktemp("ddp")
    synth.generate(
        work / "shapes", seed=0, n_train=SAMPLES, n_test=12, n_dpo_train=4, n_dpo_test=12
    )
    tiny.ensure_tiny("tiny-smolvlm")  # built once here, not raced by the two ranks
    proc = _launch(["--nproc", "2", "--dist", "ddp", "--", *_train_args(work)], work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work / "runs" / "sft-tiny-smolvlm", proc.stdout + proc.stderr


# ------------------------------------------------------------------ the 2-process run


def test_ddp_ranks_train_on_disjoint_shards_and_cover_the_data(ddp_run):
    run, _ = ddp_run
    r0, r1 = _samples(run, 0), _samples(run, 1)
    assert len(r0) == len(r1) == STEPS * BATCH, "each rank took one micro-batch per step"
    assert not set(r0) & set(r1), "no sample trained on both ranks"
    assert len(set(r0) | set(r1)) == SAMPLES, "together the ranks made one pass over the data"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["engine"] == "ddp"
    assert summary["global_step"] == STEPS


def test_ddp_loss_falls_and_rank_zero_alone_logs(ddp_run):
    run, _ = ddp_run
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), "one line per logging step: a single writer"
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(torch.isfinite(torch.tensor(losses)))


def test_ddp_preprocesses_once_and_evaluates_on_rank_zero(ddp_run):
    run, out = ddp_run
    assert out.count("built: data/cache/") == 1, "rank 0 preprocessed; rank 1 hit its cache"
    assert out.count("cache hit: data/cache/") == 1
    ev = json.loads((run / "eval.json").read_text())
    assert ev["before"]["metrics"]["n"] == ev["after"]["metrics"]["n"] == 12


def test_ddp_adapter_is_written_once_in_the_single_gpu_peft_format(ddp_run, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    run, out = ddp_run
    saved = [line for line in out.splitlines() if ": saved " in line]
    assert saved == [f"rank 0 of 2: saved {run / 'adapter'}"], saved
    assert not (run / ".adapter.tmp").exists()
    adapter = run / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 8
    cfg = RunConfig(model="tiny-smolvlm", finetune="full", runs_dir=str(tmp_path))
    base, processor = train.build_model(cfg)
    loaded = PeftModel.from_pretrained(base, adapter)
    trained_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert trained_b and all(p.abs().sum() > 0 for p in trained_b), "B starts at 0: trained"
    # What one process writes for the same model: the same files, tensors and shapes.
    single = train.save_model(loaded, processor, tmp_path / "single")
    assert sorted(p.name for p in adapter.iterdir()) == sorted(p.name for p in single.iterdir())

    def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    assert shapes(adapter) == shapes(single)


def test_ddp_run_killed_after_a_checkpoint_resumes_from_it(ddp_run, tmp_path):
    """A run stopped after checkpoint-4 (later files gone) continues from it on 2 ranks."""
    src, _ = ddp_run
    work = src.parents[1]
    run = tmp_path / "runs" / src.name
    shutil.copytree(src, run)
    shutil.rmtree(run / "checkpoints" / "checkpoint-8")
    for name in ("adapter", "summary.json", "eval.json"):
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    refused = _launch(["--nproc", "2", "--", *_train_args(work, runs_dir=tmp_path / "runs")], work)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    args = _train_args(work, runs_dir=tmp_path / "runs", resume="true")
    proc = _launch(["--nproc", "2", "--", *args], work)
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4")
    assert summary["global_step"] == STEPS
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    # steps 5-8 ran again after the resume: 4 more batches per rank, still disjoint
    r0, r1 = _samples(run, 0), _samples(run, 1)
    assert len(r0) == len(r1) == (STEPS + STEPS // 2) * BATCH
    half = STEPS // 2 * BATCH
    assert r0[-half:] == r0[half : 2 * half] and r1[-half:] == r1[half : 2 * half], (
        "the resumed steps trained on the same batches as the first run's steps 5-8"
    )


# ------------------------------------------------------------------------ launcher


def _dry(args: list[str], cwd: Path) -> list[str]:
    proc = _launch(["--dry-run", *args], cwd)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(">> ")
    import shlex

    return shlex.split(line[3:])


def test_launch_line_runs_the_cli_under_accelerate_with_the_chosen_config(tmp_path):
    cmd = _dry(["--nproc", "2", "--", "--model", "tiny-smolvlm", "--runs-dir", "r"], tmp_path)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(REPO / "accelerate" / "ddp.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    i = cmd.index("-m", 3)
    # a fresh run: run protection was applied by the launcher, the ranks replace
    assert cmd[i:] == ["-m", "vlmfit", "train", "--model", "tiny-smolvlm", "--runs-dir", "r",
                       "--overwrite"]  # fmt: skip


def test_multi_node_launch_line_counts_every_machine(tmp_path):
    cmd = _dry(
        ["--nproc", "8", "--nnodes", "2", "--node-rank", "1", "--main-address", "10.0.0.1",
         "--main-port", "29500", "--", "--model", "tiny-smolvlm", "--resume", "true"],
        tmp_path,
    )  # fmt: skip
    flags = dict(zip(cmd, cmd[1:], strict=False))  # each flag -> the token after it
    assert flags["--num_processes"] == "16" and flags["--num_machines"] == "2"
    assert flags["--machine_rank"] == "1" and flags["--main_process_ip"] == "10.0.0.1"
    assert flags["--main_process_port"] == "29500"
    assert "--overwrite" not in cmd, "a resumed run is continued, never replaced"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "2", "--", "--lora-rr", "8"], "unknown vlmfit train option --lora-rr "
         "(did you mean '--lora-r'?)"),
        (["--nproc", "2", "--", "--finetune", "qlora"], "needs a CUDA GPU"),
        (["--nproc", "2", "--nnodes", "2", "--", "--model", "tiny-smolvlm"], "--main-address"),
    ],
)  # fmt: skip
def test_launcher_refuses_bad_runs_in_one_line_before_any_process(args, message, tmp_path):
    if "qlora" in args and torch.cuda.is_available():
        pytest.skip("QLoRA runs on CUDA: nothing to refuse here")
    proc = _launch(args, tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr and "accelerate.commands.launch" not in proc.stdout


def test_zero3_is_refused_without_deepspeed(tmp_path):
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here: nothing to refuse")
    proc = _launch(["--nproc", "2", "--dist", "zero3", "--", "--model", "tiny-smolvlm"], tmp_path)
    assert proc.returncode == 2
    assert "DIST=zero3 needs DeepSpeed" in proc.stderr and "pip install deepspeed" in proc.stderr


def test_sharding_engines_are_refused_without_cuda():
    for dist in ("fsdp2", "zero3"):
        if dist == "zero3" and importlib.util.find_spec("deepspeed") is None:
            continue  # refused for the missing package first (test above)
        with pytest.raises(distributed.LaunchError, match="has none; on CPU only DIST=ddp"):
            distributed.check_engine(dist, 2, cuda=False)
    with pytest.raises(distributed.LaunchError, match="expected one of ddp, fsdp2, zero3"):
        distributed.check_engine("fsdp", 2, cuda=False)


def test_accelerate_configs_load_with_accelerate_and_say_what_they_shard():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp = load_config_from_file(str(REPO / "accelerate" / "ddp.yaml"))
    fsdp = load_config_from_file(str(REPO / "accelerate" / "fsdp2.yaml"))
    zero = load_config_from_file(str(REPO / "accelerate" / "zero3.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"  # resumable
    assert zero.distributed_type == DistributedType.DEEPSPEED
    assert zero.deepspeed_config["zero_stage"] == 3
    assert zero.deepspeed_config["zero3_save_16bit_model"] is True  # single-GPU format


def test_one_process_is_untouched_by_the_distributed_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.state.cache_clear()
    assert distributed.state() is None and distributed.is_main() and distributed.rank() == 0
    assert distributed.device() == ("cuda" if torch.cuda.is_available() else "cpu")
    with distributed.main_process_first():
        pass
    assert distributed.on_main(lambda: 7) == 7


# --------------------------------------------------------------------------- make


def _make_n(*args: str) -> str:
    proc = subprocess.run(
        ["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_sft_with_nproc_launches_the_cli_and_nproc_1_runs_the_notebook():
    one = _make_n("sft", "MODEL=tiny-smolvlm")
    assert "notebooks/sft.ipynb" in one and "vlmfit launch" not in one
    two = _make_n("sft", "MODEL=tiny-smolvlm", "NPROC=2", "DIST=fsdp2", "FINETUNE=full")
    assert "-m vlmfit launch --nproc 2 --dist fsdp2" in two
    assert "notebooks/sft.ipynb" not in two
    assert "--method sft" in two and "--finetune full" in two and "--model tiny-smolvlm" in two
    dpo = _make_n("dpo", "MODEL=tiny-smolvlm", "NPROC=2")
    assert "--method dpo" in dpo and "--init-adapter sft-tiny-smolvlm" in dpo


@pytest.mark.gpu
def test_qlora_is_refused_with_sharding_engines_and_kept_for_ddp(tmp_path):
    args = ["--model", "tiny-smolvlm", "--finetune", "qlora", "--runs-dir", str(tmp_path)]
    overrides = {"model": "tiny-smolvlm", "finetune": "qlora", "runs_dir": str(tmp_path)}
    with pytest.raises(distributed.LaunchError, match="QLoRA runs under DIST=ddp"):
        distributed.prepare(overrides, args, overwrite=False, dist="fsdp2")
    assert distributed.prepare(overrides, args, overwrite=False, dist="ddp")[-1] == "--overwrite"


# ------------------------------------------------- two GPUs (make test-gpu on a 2-GPU host)


@pytest.mark.gpu
@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("dist", ["ddp", "fsdp2", "zero3"])
def test_two_gpus_train_save_the_single_gpu_format_and_resume_sharded(
    dist, finetune, tmp_path, tiny_cache
):
    """Each engine on 2 GPUs: trains, gathers the model into the one-GPU format, resumes
    from its (sharded) checkpoint."""
    from vlmfit.models import builders as tiny

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, this machine has {torch.cuda.device_count()}")
    if dist == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DIST=zero3 needs deepspeed (pip install deepspeed), not in the lock")
    synth.generate(tmp_path / "shapes", seed=0, n_train=SAMPLES, n_test=12, n_dpo_train=4,
                   n_dpo_test=12)  # fmt: skip
    tiny.ensure_tiny("tiny-qwen2-vl")
    args = _train_args(tmp_path, model="tiny-qwen2-vl", finetune=finetune)
    proc = _launch(["--nproc", "2", "--dist", dist, "--", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    run = tmp_path / "runs" / "sft-tiny-qwen2-vl"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["engine"] == {"ddp": "ddp", "fsdp2": "fsdp", "zero3": "deepspeed"}[dist]
    assert ("eval_note" in summary) == (dist != "ddp"), "sharded: evaluation skipped, said why"
    files = {p.name for p in (run / "adapter").iterdir()}
    want = "adapter_model.safetensors" if finetune == "lora" else "model.safetensors"
    assert want in files and "training_args.bin" not in files
    shutil.rmtree(run / "checkpoints" / "checkpoint-8")
    resumed = _launch(["--nproc", "2", "--dist", dist, "--", *args, "--resume", "true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4") and summary["global_step"] == STEPS
