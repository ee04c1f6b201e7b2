"""The options of one preprocessing run, checked once."""

from __future__ import annotations

from dataclasses import dataclass

from vlmfit.config import RunConfig

POLICIES = ("drop", "shrink")


@dataclass(frozen=True)
class Options:
    """What :func:`~vlmfit.preprocess.preprocess` was asked to do, besides data and model."""

    weights: str = RunConfig.weights  # the run's defaults: RunConfig is their one source
    max_length: int = RunConfig.max_length
    overlength: str = RunConfig.overlength  # drop | shrink
    on_error: str = "fail"  # fail | skip
    workers: int = 1
    progress: bool = True
    video_fps: float = 2.0
    video_max_frames: int = 16
    split: str | None = "train"

    def __post_init__(self) -> None:
        if self.overlength not in POLICIES:
            raise ValueError(f"overlength must be one of {POLICIES}, got {self.overlength!r}")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
