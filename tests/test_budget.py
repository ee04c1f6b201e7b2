"""Visual-token arithmetic (vlmfit.budget) against the REAL transformers image processors.

Run: ``.venv/bin/python -m pytest -q tests/test_budget.py``

The processors are built offline with the published settings (no hub access). They are
called with ``do_rescale=False, do_normalize=False``: those steps do not touch the geometry
and skipping them makes 12 MP images ~10x faster; resizing, tiling and patchifying run as
in training. Most of the wall time is importing torch/transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from vlmfit import budget as B
from vlmfit import cli
from vlmfit.budget import Budget
from vlmfit.budget.cost import processed_size
from vlmfit.models import registry

QwenPil = pytest.importorskip(
    "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
).Qwen2VLImageProcessorPil
IdeficsPil = pytest.importorskip(
    "transformers.models.idefics3.image_processing_pil_idefics3"
).Idefics3ImageProcessorPil

QWEN = registry.get("qwen2-vl-2b")  # hub defaults: 3,136 .. 12,845,056 px
QWEN_CARD = dataclasses.replace(  # model-card budget: 256 .. 1280 tokens
    registry.get("qwen2.5-vl-7b"),
    processor={"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28},
)
SMOL = registry.get("smolvlm")  # 2048 / tile 512 / patch 16 / scale 4 -> 64 per tile
SMOL_2B = registry.get("smolvlm-2b")  # 1536 / 384 / 14 / 3 -> 81 per tile
SMOL_NOSPLIT = dataclasses.replace(SMOL, processor={**SMOL.processor, "do_image_splitting": False})

# (width, height): reference examples, tiny images (below min_pixels), odd sizes, extreme
# aspect ratios up to Qwen's 200:1 limit, an image just above the hub max_pixels.
QWEN_SIZES = [
    (448, 448), (1000, 1000), (2000, 2000), (3024, 4032), (4500, 3000), (640, 480),
    (1920, 1080), (1080, 1920), (1, 1), (10, 10), (27, 29), (29, 27), (14, 14), (55, 57),
    (1, 200), (200, 1), (2, 300), (7, 1400), (28, 5000), (4000, 30), (333, 777), (1001, 999),
    (4567, 123), (97, 3001), (6000, 30),
]  # fmt: skip
# Idefics3 resizes every image to ~2048 px, so keep inputs moderate; elongated ones are cheap.
IDEFICS_SIZES = [
    (4032, 3024), (1000, 1000), (1, 1), (10, 10), (27, 29), (1, 500), (500, 1), (28, 5000),
    (4000, 30), (640, 480), (480, 640), (1920, 1080), (1080, 1920), (333, 777), (1001, 999),
    (513, 512), (100, 3000), (3000, 100), (2049, 1), (700, 300), (1234, 567), (1, 5000),
]  # fmt: skip


def qwen_processor(settings: dict, **kw) -> QwenPil:
    return QwenPil(
        min_pixels=settings["min_pixels"],
        max_pixels=settings["max_pixels"],
        patch_size=settings.get("patch_size", 14),
        merge_size=settings.get("merge_size", 2),
        do_rescale=False,
        do_normalize=False,
        **kw,
    )


def qwen_real(proc: QwenPil, w: int, h: int) -> tuple[int, tuple[int, int]]:
    """(tokens, (w, h) fed to the encoder) from the real processor's image_grid_thw."""
    _, gh, gw = (
        int(x) for x in proc(Image.new("RGB", (w, h)), return_tensors="np")["image_grid_thw"][0]
    )
    return gh * gw // proc.merge_size**2, (gw * proc.patch_size, gh * proc.patch_size)


def idefics_processor(p: dict, **over) -> IdeficsPil:
    kw = {"size": p["size"], "max_image_size": p["max_image_size"]}
    kw["do_image_splitting"] = p.get("do_image_splitting", True)
    kw.update(over)
    # do_pad=False: one image per call needs no batch padding; tiles = len(pixel_values[0])
    kw.setdefault("do_pad", False)
    return IdeficsPil(**kw, do_rescale=False, do_normalize=False)


def idefics_real(proc: IdeficsPil, image: Image.Image, tile_tokens: int) -> tuple[int, int, int]:
    """(tokens, rows, cols): tiles (pixel_values[0], i.e. shape[1] when padded) x per tile."""
    out = proc(image, return_row_col_info=True)
    return len(out["pixel_values"][0]) * tile_tokens, out["rows"][0][0], out["cols"][0][0]


# --------------------------------------------------------------------------- reference numbers


def test_reference_examples():
    assert [B.image_tokens(QWEN, s, s) for s in (448, 1000, 2000)] == [256, 1296, 5041]
    assert B.image_tokens(QWEN, 3024, 4032) == 15552
    assert B.image_tokens(SMOL, 4032, 3024) == 832  # 3 x 4 + 1 tiles x 64
    assert B.image_tokens(SMOL_NOSPLIT, 4032, 3024) == 64
    assert B.image_tokens(SMOL, 1000, 1000) == 17 * 64  # measured table: 17 tiles, 1088
    assert B.image_tokens(SMOL, 4032, 3024, Budget(do_image_splitting=False)) == 64
    padded = idefics_processor(SMOL.processor, do_pad=True)  # any 4:3 image: 13 tiles
    out = padded(Image.new("RGB", (640, 480)), return_tensors="np")
    assert out["pixel_values"].shape[1] * 64 == 832


def test_area_test_uses_rounded_sides():
    """smart_resize compares the ROUNDED area with max_pixels: 1000x1000 is 1,000,000 px, under
    the model card's 1,003,520, yet 1008x1008 exceeds it, so it shrinks to 980x980 (1,225)."""
    assert B.image_tokens(QWEN_CARD, 1000, 1000) == 1225
    assert qwen_real(qwen_processor(QWEN_CARD.processor), 1000, 1000) == (1225, (980, 980))


# --------------------------------------------------------------------------- vs real processors


@pytest.mark.parametrize(
    "spec", [QWEN, QWEN_CARD, registry.get("tiny-qwen2-vl")], ids=["hub", "card", "tiny"]
)
def test_qwen_tokens_match_processor(spec):
    proc = qwen_processor(spec.processor)
    bad = []
    # Huge inputs are slow (12 MP -> 290 MB of patches at hub defaults): the 12 MP photo
    # runs in every config, 2000x2000 and 13.5 MP (above max_pixels) at hub defaults only.
    big = {(2000, 2000), (4500, 3000)}
    for w, h in QWEN_SIZES if spec is QWEN else [s for s in QWEN_SIZES if s not in big]:
        tokens, size = qwen_real(proc, w, h)
        if (B.image_tokens(spec, w, h), processed_size(spec, w, h, None)) != (tokens, size):
            bad.append(((w, h), B.image_tokens(spec, w, h), tokens))
        assert B.image_sequence_tokens(spec, w, h) == tokens + 2
    assert not bad, bad


def test_qwen_rejects_aspect_ratio_over_200_like_processor():
    proc = qwen_processor(QWEN.processor)
    for w, h in [(1, 500), (201, 1), (5000, 20)]:
        with pytest.raises(ValueError, match="aspect ratio"):
            proc(Image.new("RGB", (w, h)))
        with pytest.raises(ValueError, match="aspect ratio"):
            B.image_tokens(QWEN, w, h)


def test_qwen_replace_image_token_count():
    """Qwen2VLProcessor writes grid_t*grid_h*grid_w / merge**2 pads (needs no tokenizer here;
    the full processor cannot be built without torchvision for its video processor)."""
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    fake = SimpleNamespace(image_processor=SimpleNamespace(merge_size=2), image_token="<p>")
    proc = qwen_processor(QWEN.processor)
    out = proc(Image.new("RGB", (640, 480)), return_tensors="np")
    text = Qwen2VLProcessor.replace_image_token(fake, out, 0)
    assert text.count("<p>") == B.image_tokens(QWEN, 640, 480)


@pytest.mark.parametrize(
    "spec",
    [SMOL, SMOL_2B, SMOL_NOSPLIT, registry.get("tiny-smolvlm")],
    ids=["256m", "2b", "nosplit", "tiny"],
)
def test_idefics3_tokens_match_processor(spec):
    p = spec.processor
    proc = idefics_processor(p)
    tile_tokens = p["image_seq_len"]
    bad = []
    # The 12 MP input alone costs ~0.3 s of LANCZOS: run it for the 256M settings only.
    for w, h in IDEFICS_SIZES if spec is SMOL else [s for s in IDEFICS_SIZES if s != (4032, 3024)]:
        want = idefics_real(proc, Image.new("RGB", (w, h)), tile_tokens)
        _, _, rows, cols = B.idefics3_layout(
            w,
            h,
            longest_edge=p["size"]["longest_edge"],
            tile=p["max_image_size"]["longest_edge"],
            do_image_splitting=p["do_image_splitting"],
        )
        if (B.image_tokens(spec, w, h), rows, cols) != want:
            bad.append(((w, h), B.image_tokens(spec, w, h), rows, cols, want))
    assert not bad, bad


def test_idefics3_longest_edge_not_multiple_of_tile():
    """Processing derives the short side from the rounded-up long side; transformers'
    get_number_of_image_patches helper does not, and undercounts here (3 vs 5 tiles)."""
    spec = dataclasses.replace(SMOL, processor={**SMOL.processor, "size": {"longest_edge": 1000}})
    proc = idefics_processor(spec.processor)
    tokens, rows, cols = idefics_real(proc, Image.new("RGB", (1000, 510)), 64)
    assert (rows, cols, tokens) == (2, 2, 5 * 64)
    assert B.image_tokens(spec, 1000, 510) == tokens
    assert proc.get_number_of_image_patches(510, 1000)[0] == 3  # the helper's (wrong) count


def test_idefics3_single_tile_is_one_tile_not_zero():
    """For a single tile (no splitting, or an image within one tile) the processor's
    get_number_of_image_patches says 0 patches; processing encodes one tile all the same."""
    for spec, (w, h) in [(SMOL_NOSPLIT, (640, 480)), (registry.get("tiny-smolvlm"), (10, 10))]:
        p = spec.processor
        proc = idefics_processor(p)
        assert proc.get_number_of_image_patches(h, w) == (0, 0, 0)  # the helper's (wrong) count
        tokens, rows, cols = idefics_real(proc, Image.new("RGB", (w, h)), p["image_seq_len"])
        assert (rows, cols, tokens) == (0, 0, p["image_seq_len"])
        assert B.image_tokens(spec, w, h) == tokens


def _tiny_tokenizer(special: tuple[str, ...], merge_newlines: bool):
    """Byte-level BPE with no merges except optionally "\\n\\n" (as SmolLM2's BPE has)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    if merge_newlines:
        vocab["ĊĊ"], merges = len(vocab), [("Ċ", "Ċ")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": list(special)})
    return fast


@pytest.mark.parametrize("merge", [True, False], ids=["nn-merged", "nn-split"])
def test_idefics3_sequence_tokens_match_processor_text(merge):
    from transformers.models.idefics3 import Idefics3Processor

    spec = registry.get("tiny-smolvlm")
    tok = _tiny_tokenizer(registry.IDEFICS3.special_tokens, merge)
    for split in (True, False):
        ip = idefics_processor(spec.processor, do_image_splitting=split)
        proc = Idefics3Processor(ip, tok, image_seq_len=spec.processor["image_seq_len"])
        budget = Budget(do_image_splitting=split)
        for w, h in [(100, 60), (60, 100), (64, 64), (10, 10), (300, 20), (1, 1), (40, 90)]:
            ids = proc(text=["<image>"], images=[[Image.new("RGB", (w, h))]])["input_ids"][0]
            got = B.image_sequence_tokens(spec, w, h, budget, merges_double_newline=merge)
            assert got == len(ids), (w, h, split)
            image_id = tok.convert_tokens_to_ids("<image>")
            assert B.image_tokens(spec, w, h, budget) == ids.count(image_id)


# --------------------------------------------------------------------------- budgets

QWEN_BUDGETS = [
    Budget(max_image_tokens=256),
    Budget(max_image_tokens=64),
    Budget(max_image_tokens=1280, min_image_tokens=256),
    Budget(max_pixels=500_000),
    Budget(max_longest_edge=512),
    Budget(max_longest_edge=1000, max_image_tokens=900),
]
BUDGET_SIZES = [s for s in QWEN_SIZES if max(s) / min(s) <= 200]


@pytest.mark.parametrize("budget", QWEN_BUDGETS, ids=lambda b: b.describe())
def test_qwen_budget_size_is_fixed_point_within_budget(budget):
    kwargs = B.processor_kwargs(QWEN, budget)
    proc_budget = qwen_processor(kwargs)
    proc_default = qwen_processor(QWEN.processor)
    for w, h in BUDGET_SIZES:
        nw, nh = B.budget_size(QWEN, w, h, budget)
        assert nw % 28 == 0 and nh % 28 == 0
        # The processor (with the budget's kwargs, and with the defaults) leaves it unchanged.
        tokens, size = qwen_real(proc_budget, nw, nh)
        assert size == (nw, nh), (w, h)
        assert qwen_real(proc_default, nw, nh)[1] == (nw, nh)
        assert tokens == B.image_tokens(QWEN, w, h, budget)
        if budget.max_image_tokens:
            assert tokens <= budget.max_image_tokens
        if budget.max_pixels:
            assert nw * nh <= budget.max_pixels
        if budget.max_longest_edge:
            assert max(nw, nh) <= budget.max_longest_edge
        # Never larger than what the processor itself makes of the image under these settings.
        ph, pw = B.smart_resize(h, w, 28, kwargs["min_pixels"], kwargs["max_pixels"])
        assert nw <= pw and nh <= ph, (w, h, (nw, nh), (pw, ph))
        if budget.min_image_tokens is None:
            assert tokens <= B.image_tokens(QWEN, w, h)
        # Aspect ratio within one 28-px grid step, unless a side sits at the 28-px minimum.
        if min(nw, nh) > 28:
            assert (nw - 28) / (nh + 28) <= w / h <= (nw + 28) / (nh - 28), (w, h, nw, nh)


def test_qwen_budget_examples_and_elongated_images():
    assert B.budget_size(QWEN, 1000, 1000, Budget(max_image_tokens=256)) == (448, 448)
    assert B.budget_size(QWEN, 448, 448, Budget(max_image_tokens=256)) == (448, 448)  # kept
    assert B.budget_size(QWEN, 1000, 1000, Budget(max_image_tokens=2000)) == (1008, 1008)
    # smart_resize keeps sides >= 28 px, so max_pixels alone lets 4000x30 reach 92 tokens;
    # budget_size trims the long side to stay within 64.
    kw = B.processor_kwargs(QWEN, Budget(max_image_tokens=64))
    assert qwen_real(qwen_processor(kw), 4000, 30)[0] == 92
    assert B.budget_size(QWEN, 4000, 30, Budget(max_image_tokens=64)) == (64 * 28, 28)
    with pytest.raises(ValueError):
        B.budget_size(QWEN, 100, 100, Budget(max_image_tokens=2))  # below min_pixels (4 tokens)


@pytest.mark.parametrize(
    "budget,longest",
    [
        (Budget(max_image_tokens=1088), 2048),
        (Budget(max_image_tokens=1087), 1536),  # 3x3+1 tiles = 640
        (Budget(max_image_tokens=320), 1024),  # 2x2+1 = 320
        (Budget(max_image_tokens=100), 512),  # one tile = 64
        (Budget(max_longest_edge=1200), 1024),
        (Budget(max_pixels=1600 * 1600), 1536),
    ],
)
def test_idefics3_processor_kwargs_within_budget(budget, longest):
    kwargs = B.processor_kwargs(SMOL, budget)
    assert kwargs["size"] == {"longest_edge": longest}
    proc = idefics_processor(kwargs)
    cap = budget.max_image_tokens or math.inf
    for w, h in [(1600, 1200), (3000, 100), (10, 10), (777, 333)]:
        tokens, _, _ = idefics_real(proc, Image.new("RGB", (w, h)), 64)
        assert tokens == B.image_tokens(SMOL, w, h, budget) <= cap
        # Pre-resizing to budget_size (a downscale, or nothing) does not change the cost.
        nw, nh = B.budget_size(SMOL, w, h, budget)
        assert nw <= w and nh <= h
        if (nw, nh) != (w, h):
            assert idefics_real(proc, Image.new("RGB", (nw, nh)), 64)[0] == tokens
    with pytest.raises(ValueError, match="one tile"):
        B.processor_kwargs(SMOL, Budget(max_image_tokens=63))


def test_cost_table():
    rows = B.cost_table(QWEN, [(1000, 1000), (3024, 4032), (1, 500)], Budget(max_image_tokens=256))
    assert [(r["tokens_before"], r["tokens_after"]) for r in rows[:2]] == [
        (1296, 256),
        (15552, 234),
    ]
    assert (rows[0]["new_width"], rows[0]["new_height"]) == (448, 448)
    assert rows[2]["error"] and rows[2]["tokens_before"] is None


# --------------------------------------------------------------------------- video


def test_video_constants_match_transformers_source():
    import transformers

    src = (
        Path(transformers.__file__).parent / "models/qwen2_vl/video_processing_qwen2_vl.py"
    ).read_text()
    assert 'size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}' in src
    for name in ("patch_size", "merge_size", "temporal_patch_size"):
        m = re.search(rf"^    {name} = (\d+)$", src, re.M)
        assert m and int(m.group(1)) == B.QWEN_VIDEO_DEFAULTS[name], name
    image = QwenPil()
    assert {
        "min_pixels": image.size["shortest_edge"],
        "max_pixels": image.size["longest_edge"],
        "patch_size": image.patch_size,
        "merge_size": image.merge_size,
    } == B.QWEN_IMAGE_DEFAULTS


def test_video_tokens():
    # Each temporal patch (2 frames) is one smart_resize'd frame at the VIDEO limits.
    v = B.QWEN_VIDEO_DEFAULTS
    proc = qwen_processor(v)
    for w, h, n in [(640, 360, 16), (1920, 1080, 7), (100, 100, 1), (3840, 2160, 64)]:
        per_patch, _ = qwen_real(proc, w, h)
        assert B.video_tokens(QWEN, w, h, n) == math.ceil(n / 2) * per_patch
    assert B.video_tokens(QWEN, 640, 360, 16) == 8 * 13 * 23
    with pytest.raises(ValueError, match="does not take video"):
        B.video_tokens(SMOL, 640, 360, 8)


def test_video_tokens_match_video_processor():
    """vlmfit counts video tokens itself: transformers' Qwen2VLVideoProcessor imports
    torchvision, which the CPU install lacks. Where it imports, its count is the truth."""
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    except Exception as e:  # ImportError, or RuntimeError from a torchvision for another torch
        pytest.skip(f"transformers' Qwen2-VL video processor does not import here: {e}")
    proc = Qwen2VLVideoProcessor()
    for budget in [None, Budget(max_image_tokens=64), Budget(min_image_tokens=200)]:
        lo, hi = B.qwen_pixel_range(B.QWEN_VIDEO_DEFAULTS, budget)
        kw = {"size": {"shortest_edge": lo, "longest_edge": hi}}
        for w, h, n in [(640, 360, 16), (1920, 1080, 7), (100, 100, 1), (3840, 2160, 64)]:
            patches = proc.get_num_of_video_patches(n, h, w, kw)
            assert B.video_tokens(QWEN, w, h, n, budget) == patches // 4, (w, h, n, budget)


@pytest.mark.parametrize(
    "budget",
    [
        None,
        Budget(max_image_tokens=256),
        Budget(max_pixels=150_000, max_image_tokens=256, min_image_tokens=16),
        Budget(min_image_tokens=200),
        Budget(max_longest_edge=512),
    ],
    ids=str,
)
def test_qwen_pixel_caps_one_rule(budget):
    """Image settings, video frames and the cache's video-processor settings take their
    min / max pixels from one rule (qwen_pixel_range): the budget's min_image_tokens is the
    floor, the lowest of the processor's max_pixels, the budget's max_pixels and
    max_image_tokens * 784 the cap."""
    from vlmfit.preprocess.output import _video_processor_kwargs

    def expected(defaults):
        b = budget or Budget()
        lo = b.min_image_tokens * 784 if b.min_image_tokens else defaults["min_pixels"]
        caps = [
            defaults["max_pixels"],
            b.max_pixels,
            b.max_image_tokens and b.max_image_tokens * 784,
        ]
        return lo, min(c for c in caps if c)

    image = expected(QWEN.processor)
    video = expected(B.QWEN_VIDEO_DEFAULTS)
    if budget is not None:
        kw = B.processor_kwargs(QWEN, budget)
        assert (kw["min_pixels"], kw["max_pixels"]) == image
        vkw = _video_processor_kwargs(budget, [])
        assert (vkw["min_pixels"], vkw["max_pixels"]) == video
    assert B.qwen_pixel_range(QWEN.processor, budget) == image
    assert B.qwen_pixel_range(B.QWEN_VIDEO_DEFAULTS, budget) == video
    for w, h in [(1920, 1080), (100, 100)]:
        fh, fw = B.smart_resize(h, w, 28, *video)
        assert B.video_frame_size(QWEN, w, h, budget) == (fw, fh)


# --------------------------------------------------------------------------- CLI


def _last_count(text: str) -> int:
    return int(re.search(r"^tokens: (\d+)$", text, re.M).group(1))


def test_cli_tokens(capsys):
    assert cli.main(["tokens", "--model", "qwen2.5-vl-7b", "--image", "1000x1000"]) == 0
    out = capsys.readouterr().out
    assert _last_count(out) == 1296
    assert "1296 visual tokens (resized by the processor to 1008x1008; grid 36x36)" in out
    assert "only downscales above max_pixels" in out  # the seed pitfall is visible

    argv = [
        "tokens",
        "--model",
        "qwen2.5-vl-7b",
        "--image",
        "1000x1000",
        "--max-image-tokens",
        "256",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert _last_count(out) == 256 and "-> 256 tokens at 448x448 with --max-image-tokens 256" in out

    assert cli.main(["tokens", "--model", "smolvlm", "--image", "4032x3024", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == 832 and data["before"]["tiles"] == 13

    assert (
        cli.main(["tokens", "--model", "qwen2-vl-2b", "--image", "640x360", "--video-frames", "16"])
        == 0
    )
    assert _last_count(capsys.readouterr().out) == 8 * 13 * 23


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--model", "nope", "--image", "10x10"], "unknown model"),
        (["--model", "smolvlm", "--image", "10by10"], "WIDTHxHEIGHT"),
        (["--model", "smolvlm", "--image", "0x10"], ">= 1"),
        (["--model", "smolvlm"], "required"),
        (["--model", "qwen2-vl-2b", "--image", "1x500"], "aspect ratio"),
    ],
)
def test_cli_errors(capsys, argv, msg):
    assert cli.main(["tokens", *argv]) == 2
    assert msg in capsys.readouterr().err
