"""Run folders: ``runs/<run-id>/`` with config, metrics, environment and the adapter.

Making one ready without ever replacing a run silently (:func:`prepare_run_dir`), the
environment record and the metrics log. The folder's layout: docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]


class RunExistsError(RuntimeError):
    """Training into a run id that already holds a run, without RESUME=1 or OVERWRITE=1."""


def has_run(path: str | Path) -> bool:
    """Whether a run folder holds a run (its configuration, metrics, checkpoints or adapter)."""
    path = Path(path)
    marks = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "adapter")
    return any((path / m).exists() for m in marks)


def check_run_dir(path: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Raise :class:`RunExistsError` where :func:`prepare_run_dir` would refuse."""
    path = Path(path)
    if resume and overwrite:
        raise RunExistsError("RESUME=1 and OVERWRITE=1 contradict each other: choose one")
    if has_run(path) and not resume and not overwrite:
        raise RunExistsError(
            f"{path} already holds a run; RESUME=1 continues it, OVERWRITE=1 replaces it, "
            "or choose another RUN=<id>"
        )


def prepare_run_dir(path: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``path`` ready for a run without ever replacing one silently.

    A folder that already holds a run is continued with ``resume``, replaced with
    ``overwrite`` (removed first), and otherwise refused with :class:`RunExistsError`
    naming the three ways on. Returns the (existing or new) folder.
    """
    path = Path(path)
    check_run_dir(path, resume, overwrite)
    if has_run(path) and not resume:
        # Move aside first, then delete: a crash never leaves a half-deleted run in place.
        trash = path.with_name(f".{path.name}.replaced")
        if trash.exists():
            shutil.rmtree(trash)
        path.rename(trash)
        shutil.rmtree(trash)
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def lock_hash(root: Path = REPO_ROOT) -> str | None:
    lock = root / "requirements.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.exists() else None


def git_commit(root: Path = REPO_ROOT) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers
    import trl

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "lock_sha256_16": lock_hash(),
        "git_commit": git_commit(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001 - optional on CPU hosts
        env["bitsandbytes"] = None
    return env


class MetricsLog:
    """Append-only JSONL metrics log (survives a killed run; resume appends).

    Follow it live while a run trains: ``python -m vlmfit watch runs/<run>`` (step, loss,
    ETA) or ``tail -f runs/<run>/metrics.jsonl``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        self.write_many([record])

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Append records with one open, flushed: a killed run keeps every line written (no
        fsync: the GPU would wait on the disk at every log; a power cut may lose the last lines)."""
        with self.path.open("a") as f:
            f.write("".join(json.dumps(r, default=float) + "\n" for r in records))

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def run_dir(runs_dir: str | Path, run_id: str) -> Path:
    return Path(runs_dir) / run_id
