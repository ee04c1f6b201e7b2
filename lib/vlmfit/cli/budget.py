"""``vlmfit tokens``: the visual-token cost of an image size; the budget flags it shares."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from vlmfit.cli.common import Parser, command, image_size, models_help


def add_budget_arguments(parser) -> None:
    """The budget options shared by ``vlmfit tokens`` and ``vlmfit preprocess``."""
    parser.add_argument("--max-image-tokens", type=int, help="visual tokens per image")
    parser.add_argument("--max-pixels", type=int, help="pixels per image after resizing")
    parser.add_argument("--max-longest-edge", type=int, help="px")
    parser.add_argument("--min-image-tokens", type=int, help="Qwen only (min_pixels)")
    # Idefics3's image splitting into tiles (``--split`` in preprocess names the dataset split)
    tiles = parser.add_mutually_exclusive_group()
    tiles.add_argument(
        "--image-splitting", dest="do_image_splitting", action="store_true", default=None
    )
    tiles.add_argument("--no-image-splitting", dest="do_image_splitting", action="store_false")


def budget_from_args(args):
    from vlmfit.budget import Budget

    return Budget(
        max_image_tokens=args.max_image_tokens,
        max_pixels=args.max_pixels,
        max_longest_edge=args.max_longest_edge,
        min_image_tokens=args.min_image_tokens,
        do_image_splitting=args.do_image_splitting,
    )


def parser() -> Parser:
    p = Parser(
        "tokens",
        "The visual tokens of an image size for MODEL, at the processor's defaults and, with a "
        "budget, after it.\nThe last line is always `tokens: N` (the final count).",
        epilog=models_help(),
    )
    p.add_argument("--model", required=True, help="registry name or hub id")
    p.add_argument(
        "--image", required=True, type=image_size, help="WIDTHxHEIGHT in px, e.g. 1000x1000"
    )
    add_budget_arguments(p)
    p.add_argument("--video-frames", type=int, help="frames (after sampling); Qwen only")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _describe(spec, w: int, h: int, budget) -> tuple[str, dict]:
    """One human-readable clause and a JSON-able dict for one (image, budget)."""
    from vlmfit.budget.cost import budget_size, image_sequence_tokens, image_tokens, processed_size
    from vlmfit.budget.idefics3 import idefics3_tiles

    tokens = image_tokens(spec, w, h, budget)
    info: dict[str, Any] = {"tokens": tokens}
    if spec.is_qwen:
        if budget is not None and not budget.is_empty():
            pw, ph = budget_size(spec, w, h, budget)
        else:
            pw, ph = processed_size(spec, w, h, None)
        info.update(resized=[pw, ph], grid=[ph // 28, pw // 28])
        text = f"to {pw}x{ph}; grid {ph // 28}x{pw // 28}"
    else:
        s, (rw, rh, rows, cols), n = idefics3_tiles(spec, w, h, budget)
        info.update(resized=[rw, rh], rows=rows, cols=cols, tiles=n, tile_tokens=s["tile_tokens"])
        layout = f"{rows}x{cols} tiles + global" if rows or cols else f"one {s['tile']} px tile"
        text = f"to {rw}x{rh}; {layout} = {n} x {s['tile_tokens']} tokens"
    info["sequence_tokens"] = image_sequence_tokens(spec, w, h, budget)
    return text, info


@command("tokens")
def cli_tokens(argv: list[str]) -> int:
    """``vlmfit tokens --model MODEL --image WxH [budget flags] [--json]``."""
    from vlmfit.budget.cost import budget_size, processor_kwargs
    from vlmfit.budget.qwen import QWEN_CARD_MAX_TOKENS, qwen_settings
    from vlmfit.models import registry

    p = parser()
    args = p.parse_args(argv)
    w, h = args.image
    spec = registry.get(args.model)
    budget = budget_from_args(args)
    try:
        if args.video_frames is not None:
            return _video(spec, w, h, args.video_frames, budget, args.json)
        text, before = _describe(spec, w, h, None)
        after_text, after = _describe(spec, w, h, budget) if not budget.is_empty() else ("", None)
    except ValueError as err:
        p.error(f"{spec.name} {w}x{h}: {err}")

    final = after if after is not None else before
    if args.json:
        out = {
            "model": spec.name,
            "family": spec.family.name,
            "width": w,
            "height": h,
            "tokens": final["tokens"],
            "tokens_before": before["tokens"],
            "before": before,
            "budget": {k: v for k, v in asdict(budget).items() if v is not None},
            "after": after,
            "processor_kwargs": processor_kwargs(spec, budget),
            "budget_size": list(budget_size(spec, w, h, budget)) if after else None,
        }
        print(json.dumps(out))
        return 0
    print(
        f"{spec.name} {w}x{h}: {before['tokens']} visual tokens (resized by the processor {text})"
    )
    if after is not None:
        nw, nh = budget_size(spec, w, h, budget)
        how = (
            f"resize to {nw}x{nh} before the processor (budget_size)"
            if spec.is_qwen
            else f"processor kwargs {processor_kwargs(spec, budget)}"
        )
        where = (
            f"at {after['resized'][0]}x{after['resized'][1]}"
            if spec.is_qwen
            else f"({after_text.replace('to ', 'resized to ', 1)})"
        )
        print(f"  -> {after['tokens']} tokens {where} with {budget.describe()} ({how})")
    elif spec.is_qwen and before["tokens"] > QWEN_CARD_MAX_TOKENS:
        s = qwen_settings(spec)
        print(
            f"  note: Qwen's processor only downscales above max_pixels={s['max_pixels']} px "
            f"({s['max_pixels'] // 784} tokens); the model card suggests <= "
            f"{QWEN_CARD_MAX_TOKENS}: cap it with --max-image-tokens"
        )
    print(f"  sequence: {final['sequence_tokens']} tokens including markup")
    print(f"tokens: {final['tokens']}")
    return 0


def _video(spec, w: int, h: int, n_frames: int, budget, as_json: bool) -> int:
    from vlmfit.budget.qwen import QWEN_VIDEO_DEFAULTS, video_frame_size, video_tokens

    tokens = video_tokens(spec, w, h, n_frames, budget)
    fw, fh = video_frame_size(spec, w, h, budget)
    grid_t = math.ceil(n_frames / QWEN_VIDEO_DEFAULTS["temporal_patch_size"])
    if as_json:
        print(
            json.dumps(
                {
                    "model": spec.name,
                    "width": w,
                    "height": h,
                    "frames": n_frames,
                    "tokens": tokens,
                    "frame_size": [fw, fh],
                    "grid": [grid_t, fh // 28, fw // 28],
                }
            )
        )
        return 0
    print(
        f"{spec.name} video {w}x{h} x {n_frames} frames: {tokens} visual tokens "
        f"(frames resized to {fw}x{fh}; {grid_t} temporal patches x {fh // 28}x{fw // 28})"
    )
    print(f"tokens: {tokens}")
    return 0
