"""Training memory: predict it (``estimate``), pick a config that fits (``plan``), measure it
(``profile_steps``, ``ladder``, ``phases.measure_phases``) and compare with real runs
(``reference``). The design and its validation are in docs/memory.md.

    >>> from vlmfit import memory
    >>> memory.estimate("qwen2.5-vl-7b", image_size=(1000, 1000)).table()  # doctest: +SKIP
"""

from vlmfit.memory.activations import layer_bytes, lora_copies, vision_forward_bytes
from vlmfit.memory.architecture import Arch, arch, arch_from_config
from vlmfit.memory.constants import GIB, OFFLOAD_SPEED, OFFLOAD_WORTH
from vlmfit.memory.estimator import (
    Estimate,
    activations_gib,
    estimate,
)
from vlmfit.memory.figures import plot_breakdown, plot_ladder
from vlmfit.memory.planner import (
    Candidate,
    PlanResult,
    WontFitError,
    advice,
    check_fits,
    explain_oom,
    local_gpu_gib,
    plan,
    relative_speed,
    worst_sample,
)
from vlmfit.memory.profile import (
    LADDER_COLUMNS,
    format_rows,
    free_memory,
    growth,
    ladder,
    model_batch,
    profile_steps,
    step_callback,
    synthetic_batch,
)

__all__ = [
    "GIB",
    "LADDER_COLUMNS",
    "OFFLOAD_SPEED",
    "OFFLOAD_WORTH",
    "Arch",
    "Candidate",
    "Estimate",
    "PlanResult",
    "WontFitError",
    "activations_gib",
    "advice",
    "arch",
    "arch_from_config",
    "check_fits",
    "estimate",
    "explain_oom",
    "format_rows",
    "free_memory",
    "growth",
    "ladder",
    "layer_bytes",
    "local_gpu_gib",
    "lora_copies",
    "model_batch",
    "plan",
    "plot_breakdown",
    "plot_ladder",
    "profile_steps",
    "relative_speed",
    "step_callback",
    "synthetic_batch",
    "vision_forward_bytes",
    "worst_sample",
]
