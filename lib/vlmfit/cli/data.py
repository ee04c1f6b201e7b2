"""``vlmfit check`` (validate a dataset) and ``vlmfit data`` (generate the bundled one)."""

from __future__ import annotations

import argparse
import inspect
from collections import Counter

from vlmfit.cli.common import Parser, command, models_help


def check_parser() -> Parser:
    from vlmfit.data.formats import FORMATS
    from vlmfit.data.media import DEFAULT_MAX_PIXELS

    p = Parser(
        "check",
        "Validate a dataset: exit 0 with a summary, or 1 listing every problem as "
        "FILE:RECORD: reason.",
        epilog=models_help(),
    )
    p.add_argument("data", help="a .json/.jsonl/.parquet/.arrow file or a dataset folder")
    p.add_argument("--model", help="registry model: also show visual tokens per image")
    p.add_argument("--format", choices=FORMATS, help="force a format (default: detect)")
    p.add_argument(
        "--split", default="train", help="dataset split to read (default train; 'all': every one)"
    )
    p.add_argument("--dataset", help="a dataset named in DATA/dataset_info.json (LLaMA-Factory)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (exit 0)")
    p.add_argument("--no-media", action="store_true", help="do not open images / videos")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image (w*h)")
    return p


def _range(sizes: list[tuple[int, int]]) -> str:
    if not sizes:
        return ""
    lo = min(sizes, key=lambda s: (s[0] * s[1], s))
    hi = max(sizes, key=lambda s: (s[0] * s[1], s))
    return f", {lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]}"


def _token_line(model: str, sizes: list[tuple[int, int]]) -> str:
    """Visual tokens of the good records' images (their processor accepted every one)."""
    from vlmfit.budget import image_tokens
    from vlmfit.models import registry

    spec = registry.get(model)
    if not sizes:
        return f"visual tokens per image ({model}): no image sizes (no images, or --no-media)"
    tokens = [image_tokens(spec, w, h) for w, h in sizes]
    return (
        f"visual tokens per image ({model}): min {min(tokens)}, max {max(tokens)}, "
        f"mean {sum(tokens) / len(tokens):.0f}, total {sum(tokens)}"
    )


def _summary(report, data: str, model: str | None) -> list[str]:
    per_fmt = ", ".join(f"{k}: {v}" for k, v in sorted(report.counts.items()))
    turns = Counter(m["role"] for r in report.records for m in r.all_turns())
    n_pref = sum(r.is_preference for r in report.records)
    lines = [
        f"{data}: {len(report.records)} records ({per_fmt or 'none'}); format {report.fmt}",
        f"turns: {sum(turns.values())} (system {turns['system']}, user {turns['user']}, "
        f"assistant {turns['assistant']}); preference pairs: {n_pref}",
        f"images: {report.n_images}{_range(report.image_sizes)}",
        f"videos: {report.n_videos}{_range(report.video_sizes)}",
    ]
    if model:
        lines.append(_token_line(model, report.image_sizes))
    return lines


@command("check")
def cli_check(argv: list[str]) -> int:
    """``vlmfit check``: 0 and a summary, or 1 and one ``FILE:RECORD: reason`` per problem."""
    from vlmfit.data.validate import check_dataset
    from vlmfit.models import registry

    args = check_parser().parse_args(argv)
    if args.model:
        registry.get(args.model)  # an unknown model: exit 2 before reading anything
    report = check_dataset(
        args.data,
        fmt=args.format,
        on_error="skip",
        check_media=not args.no_media,
        max_pixels=args.max_pixels,
        split=None if args.split == "all" else args.split,
        dataset=args.dataset,
        model=args.model,
    )
    for line in report.skipped_files:
        print(f"skipped file {line}")
    for problem in report.problems:
        print(problem)
    if report.problems and not args.skip_bad:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(report.by_reason.items()))
        print(
            f"{len(report.problems)} problem(s) in {report.skipped} record(s) of {args.data} "
            f"({kinds}); nothing was changed"
        )
        return 1
    if report.problems:
        print(f"skipped {report.skipped} bad record(s) ({len(report.problems)} problem(s))")
    for line in _summary(report, args.data, args.model):
        print(line)
    return 0 if report.records else 1


@command("data")
def cli_data(argv: list[str]) -> int:
    """``vlmfit data [--out DIR] [--seed N] [--force]``: the bundled shapes dataset."""
    from vlmfit.data import synth

    d = {k: v.default for k, v in inspect.signature(synth.generate).parameters.items()}
    p = Parser("data", "Generate the shapes VQA dataset (SFT and DPO, train and test).")
    p.add_argument("--out", default=d["out_dir"], help=f"output folder ({d['out_dir']})")
    for flag, key, kind, what in [
        ("--seed", "seed", int, "random seed"),
        ("--image-size", "image_size", int, "image side in pixels"),
        ("--n-train", "n_train", int, "SFT train samples"),
        ("--n-test", "n_test", int, "SFT test samples"),
        ("--n-dpo-train", "n_dpo_train", int, "DPO train samples"),
        ("--n-dpo-test", "n_dpo_test", int, "DPO test samples"),
    ]:
        p.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS,
                       help=f"{what} ({d[key]})")  # fmt: skip
    types = ",".join(synth.QUESTION_TYPES)
    p.add_argument("--types", help=f"comma-separated question types ({types})")
    p.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = vars(p.parse_args(argv))
    out, types_arg = args.pop("out"), args.pop("types")
    if types_arg is not None:
        args["question_types"] = [t.strip() for t in types_arg.split(",") if t.strip()]
    try:
        meta = synth.generate(out, **args)
    except (ValueError, FileExistsError) as exc:
        p.error(str(exc))
    totals = ", ".join(f"{s} {v['total']}" for s, v in meta["counts"].items())
    took = f" in {meta['seconds']:.2f}s" if "seconds" in meta else ""
    print(f"{meta['status']}: {meta['path']} (seed {meta['seed']}: {totals}){took}")
    return 0
