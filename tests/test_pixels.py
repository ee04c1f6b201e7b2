"""uint8 pixels (``RunConfig.uint8_pixels``): SmolVLM's tiles leave the workers as bytes and
are normalized on the device to exactly the processor's values; training is unchanged.

pytest -q tests/test_pixels.py
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmfit import train
from vlmfit.config import resolve
from vlmfit.models import loading
from vlmfit.models.processors import load_processor
from vlmfit.train import fastpath, pixels


@pytest.fixture(scope="module")
def smolvlm_processor():
    cfg, _ = resolve(dict(model="smolvlm", weights="random"))
    return load_processor(loading.save_random(cfg.spec), cfg.spec.family.name)


def _examples():
    """Two chat samples with images of different shapes (the wide one has fewer tiles: the
    batch pads it with empty tiles), as TRL's collator receives them."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((300, 900), (1000, 1000)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append(
            {
                "images": [image],
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "a shape"}]},
                ],
            }
        )
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uint8_batches_decode_to_exactly_the_processors_pixels(smolvlm_processor, dtype):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    codec, raw = pixels.codec_for(smolvlm_processor, "idefics3")
    plain = fastpath.WorkerCollator(DataCollatorForVisionLanguageModeling(smolvlm_processor), dtype)
    lean = fastpath.WorkerCollator(DataCollatorForVisionLanguageModeling(raw), dtype, codec=codec)
    expected, batch = plain(_examples()), lean(_examples())
    assert batch["pixel_values"].dtype == torch.uint8
    assert batch["pixel_attention_mask"].dtype == torch.bool
    assert batch["pixel_values"].nbytes * 2 == expected["pixel_values"].nbytes * (
        1 if dtype == torch.bfloat16 else 0.5
    )
    assert not batch["pixel_attention_mask"].all()  # padding tiles to restore to 0
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(batch[key], expected[key]), key
    kept = weakref.ref(batch["pixel_values"])
    codec.decode_(batch, dtype)
    assert kept() is None  # decoded in place: the byte tensor is gone
    assert batch["pixel_values"].dtype == dtype
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["pixel_attention_mask"], expected["pixel_attention_mask"].bool())


def test_no_codec_where_the_processor_does_not_normalize_bytes(smolvlm_processor):
    assert pixels.codec_for(smolvlm_processor, "qwen2_5_vl") is None
    raw = pixels.codec_for(smolvlm_processor, "idefics3")[1]
    assert pixels.codec_for(raw, "idefics3") is None  # already raw: nothing to move
    assert smolvlm_processor.image_processor.do_normalize  # the caller's processor untouched


def test_float_pixels_that_are_not_bytes_and_other_channel_counts_are_refused():
    codec = pixels.PixelCodec(torch.zeros(3, 256))
    with pytest.raises(ValueError, match="uint8_pixels=False"):
        codec.encode({"pixel_values": torch.full((1, 1, 3, 2, 2), 0.5)})
    with pytest.raises(ValueError, match="4 channels|do not have the 3 channels"):
        codec.decode_(
            {"pixel_values": torch.zeros(1, 1, 4, 2, 2, dtype=torch.uint8)}, torch.float32
        )


def test_training_with_uint8_pixels_is_the_same_run(shapes, tiny_cache, tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for on in (False, True):
        cfg, _ = resolve(
            dict(model="tiny-smolvlm", data=str(shapes / "sft_train.json"), eval_data=None,
                 runs_dir=str(tmp_path / str(on)), run="r", max_steps=3, logging_steps=1,
                 per_device_train_batch_size=4, learning_rate=1e-3, uint8_pixels=on)
        )  # fmt: skip
        summary = train.run(cfg, progress=False)
        assert summary["levers"]["uint8_pixels"] is on
        folder = Path(cfg.runs_dir) / "r"
        losses = [
            json.loads(line)["loss"]
            for line in (folder / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line
        ]
        runs[on] = (losses, load_file(folder / "adapter" / "adapter_model.safetensors"))
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) == 3
    for name, weight in runs[True][1].items():
        assert torch.equal(weight, runs[False][1][name]), name


class _FloatResizing:
    """An image processor whose resize works in float: raw pixels come out with fractions
    (only on its full path; its probe tile, not resized, stays whole)."""

    do_rescale = do_normalize = True
    max_image_size = {"longest_edge": 16}

    def __call__(self, images, return_tensors="pt", do_resize=True, **kwargs):
        x = torch.tensor(np.asarray(images[0][0]), dtype=torch.float32).permute(2, 0, 1)
        if do_resize:
            x = x + 0.25
        if self.do_rescale:
            x = x / 255
        if self.do_normalize:
            x = (x - 0.5) / 0.5
        return {"pixel_values": x[None, None]}


def test_no_codec_for_a_processor_that_resamples_in_float():
    processor = type("P", (), {})()
    processor.image_processor = _FloatResizing()
    assert pixels.codec_for(processor, "idefics3") is None
    _FloatResizing.__call__.__defaults__ = ("pt", False)  # never resizing: bytes stay whole
    try:
        assert pixels.codec_for(processor, "idefics3") is not None
    finally:
        _FloatResizing.__call__.__defaults__ = ("pt", True)


@pytest.mark.gpu
def test_decoding_on_the_gpu_gives_the_cpu_values(smolvlm_processor):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    codec, raw = pixels.codec_for(smolvlm_processor, "idefics3")
    lean = fastpath.WorkerCollator(
        DataCollatorForVisionLanguageModeling(raw), torch.bfloat16, codec=codec
    )
    batch = lean(_examples())
    on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    codec.decode_(batch, torch.bfloat16)
    codec.decode_(on_gpu, torch.bfloat16)
    assert torch.equal(on_gpu["pixel_values"].cpu(), batch["pixel_values"])
