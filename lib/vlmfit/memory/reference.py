"""The measured reference table: peak allocated memory of real training steps (model x
method x image budget) from the GPU sweep (``docs/memory-validation.json``) and the CUDA
runs of a runs folder, each beside the estimator's prediction."""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any

from vlmfit.budget import Budget
from vlmfit.memory.estimator import estimate
from vlmfit.memory.planner import _cfg_estimate, worst_sample

GIB = 2**30
ROOT = Path(__file__).resolve().parents[3]
#: The GPU sweep's table (``benchmarks/memory_sweep.py``), committed with the repository.
VALIDATION = ROOT / "docs" / "memory-validation.json"
METHOD_ORDER = ("lora", "qlora", "full", "projector")

#: Columns of the reference table, in order (``reference_rows`` keys).
REFERENCE_COLUMNS = [
    "model", "method", "kind", "image", "visual_tokens", "sequence_tokens", "micro_batch",
    "checkpointing", "measured_gib", "reserved_gib", "predicted_gib", "error_pct",
    "predicted_now_gib", "error_now_pct", "gpu", "source",
]  # fmt: skip
#: Headers for people (markdown / HTML), same order as ``REFERENCE_COLUMNS``.
REFERENCE_HEADERS = [
    "model", "method", "kind", "image (budget)", "visual tokens", "tokens / sample",
    "micro-batch", "checkpointing", "measured peak GiB", "reserved GiB", "predicted GiB",
    "error", "predicted now GiB", "error now", "GPU", "source",
]  # fmt: skip


def _validation_path(path: str | Path | None) -> Path:
    if path is not None:
        return Path(path)
    local = Path("docs") / "memory-validation.json"  # a checkout in the working directory
    return VALIDATION if VALIDATION.exists() or not local.exists() else local


def _image_label(image: Any, max_image_tokens: int | None) -> str:
    if isinstance(image, list | tuple) and len(image) == 2:
        label = f"{image[0]}x{image[1]}"
    else:
        label = str(image)
    return f"{label} @{max_image_tokens} tokens" if max_image_tokens else label


def _predict_now(args: dict[str, Any]) -> float | None:
    """The estimator as it is in this checkout, on a sweep row's ``estimate_args``."""

    try:
        a = dict(args)
        model = a.pop("model")
        mit = a.pop("max_image_tokens", None)
        if a.get("image_size") is not None:
            a["image_size"] = tuple(a["image_size"])
        budget = Budget(max_image_tokens=mit) if mit else None
        return estimate(model, budget=budget, **a).peak_gib
    except Exception:  # noqa: BLE001 - a row the estimator cannot take keeps its measurement
        return None


def _sweep_rows(doc: dict[str, Any], source: str, estimate_now: bool) -> list[dict[str, Any]]:
    out = []
    for r in doc.get("rows", []):
        if r.get("measured_gib") is None:  # failed or not run: nothing measured
            continue
        args = r.get("estimate_args") or {}
        out.append(
            {
                "model": r["model"],
                "method": r["finetune"],
                "kind": r.get("kind", "sft"),
                "image": _image_label(r.get("image"), r.get("max_image_tokens")),
                "visual_tokens": r.get("visual_tokens"),
                "sequence_tokens": r.get("sequence_tokens"),
                "micro_batch": r["mb"],
                "checkpointing": bool(r["ckpt"]),
                "measured_gib": r["measured_gib"],
                "reserved_gib": r.get("reserved_gib"),
                "predicted_gib": r.get("predicted_gib"),
                "error_pct": r.get("error_pct"),
                "predicted_now_gib": _predict_now(args) if estimate_now and args else None,
                "error_now_pct": None,
                "gpu": r.get("gpu") or doc.get("gpu"),
                "source": f"{source} ({r.get('path', 'trainer')})",
                "id": r.get("id"),
                "pixels": r["image"][0] * r["image"][1] if r.get("image") else 0,
            }
        )
    return out


def _run_rows(runs_dir: Path, estimate_now: bool) -> list[dict[str, Any]]:
    """CUDA runs of ``runs_dir``: the training peak of ``summary.json`` (single process)."""
    from vlmfit.train import runs

    out = []
    for summary_path in sorted(runs_dir.glob("*/summary.json")):
        try:
            s = runs.read_json(summary_path)
            c = runs.read_json(summary_path.parent / "config.json")["config"]
        except (OSError, ValueError, KeyError):
            continue
        peak = s.get("train_peak_memory_gib")
        if peak is None or (s.get("processes") or 1) > 1:  # CPU run, or one GPU of several
            continue
        mem = runs.MetricsLog(summary_path.parent / "memory.jsonl").read()
        reserved = [r["mem_reserved_gib"] for r in mem if "mem_reserved_gib" in r]
        predicted = _predict_run(c) if estimate_now else None
        seq = predicted[1] if predicted else None
        out.append(
            {
                "model": s.get("model", c.get("model")),
                "method": s.get("finetune", c.get("finetune")),
                "kind": s.get("method", c.get("method", "sft")),
                "image": _image_label("dataset", c.get("max_image_tokens")),
                "visual_tokens": seq[1] if seq else None,
                "sequence_tokens": seq[0] if seq else None,
                "micro_batch": c.get("per_device_train_batch_size"),
                "checkpointing": bool(c.get("gradient_checkpointing")),
                "measured_gib": peak,
                "reserved_gib": max(reserved) if reserved else None,
                "predicted_gib": None,  # a run records its measurement, not a prediction
                "error_pct": None,
                "predicted_now_gib": predicted[0] if predicted else None,
                "error_now_pct": None,
                "gpu": s.get("device"),
                "source": f"{runs_dir.name}/{summary_path.parent.name}",
                "id": summary_path.parent.name,
                "pixels": 0,
            }
        )
    return out


def _predict_run(config: dict[str, Any]) -> tuple[float, tuple[int, int]] | None:
    """What the run's memory check predicts: its configuration and longest sample."""
    from vlmfit.config import RunConfig

    try:
        names = {f.name for f in dataclasses.fields(RunConfig)}
        cfg = RunConfig(**{k: v for k, v in config.items() if k in names})
        data = Path(cfg.data or "")
        folder = data.parent if data.name == "records.jsonl" else data
        worst = worst_sample(folder)
        return _cfg_estimate(cfg, *worst).peak_gib, worst
    except Exception:  # noqa: BLE001 - no cache or an old configuration: no prediction
        return None


def _sort_key(r: dict[str, Any]) -> tuple:
    from vlmfit.models import registry

    try:
        size = registry.get(r["model"]).params_b
    except Exception:  # noqa: BLE001 - a model no longer registered sorts last
        size = math.inf
    method = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 9
    return (size, r["model"], method, r["pixels"], r["image"], r["kind"] != "sft",
            r["micro_batch"], not r["checkpointing"], r["source"])  # fmt: skip


def reference_source(validation: str | Path | None = None) -> dict[str, Any]:
    """Where the sweep's numbers come from: GPU, versions, command, commit, date (or
    ``{"missing": path}`` when the table is not there)."""
    path = _validation_path(validation)
    if not path.exists():
        return {"missing": str(path)}
    doc = json.loads(path.read_text())
    keys = ("gpu", "versions", "command", "git", "started", "steps", "warmup", "summary")
    return {"path": _shown(path)} | {k: doc.get(k) for k in keys}


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def reference_rows(
    validation: str | Path | None = None,
    runs_dir: str | Path | None = "runs",
    *,
    model: str | None = None,
    estimate_now: bool = True,
) -> list[dict[str, Any]]:
    """One row per measured configuration (``REFERENCE_COLUMNS``), sorted by model size,
    method (LoRA, QLoRA, full, projector), image budget, kind, micro-batch, checkpointing.

    Rows come from measurements only: the GPU sweep (``docs/memory-validation.json``; rows
    that failed carry no measurement and are left out) and the CUDA runs of ``runs_dir``
    (``train_peak_memory_gib`` of ``summary.json``; CPU and multi-process runs are left
    out). ``measured_gib`` is the peak allocated memory of a training step (the largest
    per-step ``torch.cuda.max_memory_allocated`` after the warm-up); ``predicted_gib`` is the
    estimator's prediction recorded with the measurement (``error_pct``: its error; a run records none);
    ``predicted_now_gib`` the estimator of this checkout on the same arguments (for a run:
    what its memory check predicts for its longest sample) and ``error_now_pct`` its error;
    ``estimate_now=False`` skips it.
    """
    path = _validation_path(validation)
    rows: list[dict[str, Any]] = []
    if path.exists():
        doc = json.loads(path.read_text())
        rows += _sweep_rows(doc, f"{path.parent.name}/{path.name}", estimate_now)
    if runs_dir is not None and Path(runs_dir).is_dir():
        rows += _run_rows(Path(runs_dir), estimate_now)
    if model:
        rows = [r for r in rows if r["model"] == model]
    for r in rows:
        now, peak = r["predicted_now_gib"], r["measured_gib"]
        r["error_now_pct"] = 100 * (now / peak - 1) if now is not None and peak else None
    return sorted(rows, key=_sort_key)


def _cell(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key == "checkpointing":
        return "on" if v else "off"
    if key.startswith("error"):
        return f"{v:+.1f} %"
    if key.endswith("_gib"):
        return f"{v:.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def source_lines(source: dict[str, Any]) -> list[str]:
    """Where the numbers come from, for people: GPU, date, versions, command, commit."""
    if "missing" in source:
        return [
            f"No measured reference: {source['missing']} is missing (benchmarks/memory_sweep.py "
            "on a GPU writes it)."
        ]
    versions = ", ".join(f"{k} {v}" for k, v in (source.get("versions") or {}).items())
    git = source.get("git") or {}
    summ = source.get("summary") or {}
    lines = [
        f"Measured on one {source.get('gpu')} ({summ.get('measured', '?')} of "
        f"{summ.get('configurations', '?')} configurations), {source.get('started')}, "
        f"random weights, {source.get('warmup')} warm-up + {source.get('steps')} steps each: "
        "the peak is the largest per-step torch.cuda.max_memory_allocated after the warm-up.",
        f"Versions: {versions}.",
        f"Command: {source.get('command')} (git {git.get('commit')}"
        f"{', uncommitted changes' if git.get('dirty') else ''}).",
        f"Source: {source.get('path')}. 'predicted' is the estimator at that commit, "
        "'predicted now' this checkout's (python -m vlmfit estimate with the same arguments).",
    ]
    for f in summ.get("failed") or []:
        lines.append(f"Not measured: {f.get('id')} ({f.get('error')}).")
    return lines


def reference_markdown(rows: list[dict[str, Any]], source: dict[str, Any] | None = None) -> str:
    """The reference table as markdown, with where the numbers come from below it."""
    head = "| " + " | ".join(REFERENCE_HEADERS) + " |"
    rule = "|" + "|".join("---" for _ in REFERENCE_HEADERS) + "|"
    body = ["| " + " | ".join(_cell(k, r.get(k)) for k in REFERENCE_COLUMNS) + " |" for r in rows]
    text = "\n".join([head, rule, *body]) if rows else "(no measured configurations)"
    if source is not None:
        text += "\n\n" + "\n".join(f"- {line}" for line in source_lines(source))
    return text


def reference_html(rows: list[dict[str, Any]], source: dict[str, Any] | None = None) -> str:
    """The reference table as HTML (a report cell), grouped by model and method."""
    if not rows:
        table = "<p>(no measured configurations)</p>"
    else:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in REFERENCE_HEADERS)
        body, group = [], None
        for r in rows:
            if (r["model"], r["method"]) != group:
                group = (r["model"], r["method"])
                span = len(REFERENCE_COLUMNS)
                body.append(
                    f'<tr><th colspan="{span}" style="text-align:left">'
                    f"{html.escape(r['model'])} &middot; {html.escape(r['method'])}</th></tr>"
                )
            cells = "".join(
                f"<td><b>{_cell(k, r.get(k))}</b></td>"
                if k == "measured_gib"
                else f"<td>{html.escape(_cell(k, r.get(k)))}</td>"
                for k in REFERENCE_COLUMNS
            )
            body.append(f"<tr>{cells}</tr>")
        table = f"<table><tr>{head}</tr>{''.join(body)}</table>"
    notes = ""
    if source is not None:
        notes = "".join(f"<p>{html.escape(line)}</p>" for line in source_lines(source))
    return table + notes


def reference_pivot(rows: list[dict[str, Any]]) -> str:
    """The reference as model x method rows and image-budget columns (HTML): each cell the
    measured peaks of that combination, ``GiB (micro-batch, checkpointing[, dpo])``."""
    images: list[str] = []
    for r in sorted(rows, key=lambda r: (r["pixels"] or math.inf, r["image"])):
        if r["image"] not in images:
            images.append(r["image"])
    cells: dict[tuple[str, str], dict[str, list[str]]] = {}
    for r in rows:
        tag = f"mb {r['micro_batch']}, {'ckpt' if r['checkpointing'] else 'no ckpt'}"
        tag += ", dpo" if r["kind"] == "dpo" else ""
        cells.setdefault((r["model"], r["method"]), {}).setdefault(r["image"], []).append(
            f"<b>{r['measured_gib']:.1f}</b> ({tag})"
        )
    head = "<tr><th>model</th><th>method</th>" + "".join(
        f"<th>{html.escape(i)}</th>" for i in images
    )
    body = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{html.escape(f)}</td>"
        + "".join(f"<td>{'<br>'.join(by.get(i, ['-']))}</td>" for i in images)
        + "</tr>"
        for (m, f), by in cells.items()
    )
    return f"<table>{head}</tr>{body}</table>" if rows else "<p>(no measured configurations)</p>"
