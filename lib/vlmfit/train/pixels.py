"""Images cross to the GPU as uint8 and are normalized there (``RunConfig.uint8_pixels``).

SmolVLM's processor upscales a 1000x1000 photo to 17 tiles of 512x512 and normalizes them
in float: the DataLoader workers spend about 40% of their time on that, and each batch
carries 4 bytes a pixel (2 after vlmfit's bf16 cast) plus an int64 pixel mask. Here the
workers run the same processor with ``do_rescale`` / ``do_normalize`` off (uint8 tiles, 1
byte a pixel, the mask as bool); on the device each value goes through a 256-entry table
per channel made by the processor itself, and padding goes back to 0 where the mask says
so. Exact: the table reproduces the processor's float values bit for bit (checked when it
is built, and in tests/test_pixels.py).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

FAMILIES = ("idefics3",)  # tiles of (B, N, C, H, W) with a pixel mask


class PixelCodec:
    """``lut[c, v]``: the processor's normalized value of byte ``v`` in channel ``c``."""

    def __init__(self, lut: torch.Tensor):
        self.lut = lut
        self._on: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> flat table

    def __getstate__(self):  # workers get the CPU table only, never a cached device copy
        return {"lut": self.lut, "_on": {}}

    def encode(self, batch) -> None:
        """Worker side, in place: raw pixels to uint8, the pixel mask to bool."""
        pixels = batch.get("pixel_values")
        if not isinstance(pixels, torch.Tensor):
            return
        if pixels.dtype != torch.uint8:
            if pixels.is_floating_point() and not torch.equal(pixels, pixels.round()):
                raise ValueError(
                    "uint8_pixels: the image processor returned non-integer raw pixels "
                    "(it resamples in float); set uint8_pixels=False"
                )
            batch["pixel_values"] = pixels.clamp(0, 255).to(torch.uint8)
        mask = batch.get("pixel_attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
            batch["pixel_attention_mask"] = mask.bool()

    def decode_(self, batch: dict[str, Any], dtype: torch.dtype, chunk: int = 16) -> None:
        """Device side, in place (the uint8 tensor is released): normalized pixels in
        ``dtype``, 0 where the pixel mask is off (the processor's padding tiles). Batches
        of this collator must pass here before the model: the model would take raw bytes
        as pixel values."""
        pixels = batch.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8:
            return
        if pixels.dim() < 3 or pixels.shape[-3] != len(self.lut):
            raise ValueError(
                f"uint8_pixels: tiles of {tuple(pixels.shape)} do not have the "
                f"{len(self.lut)} channels the table was made for"
            )
        key = (pixels.device, dtype)
        lut = self._on.get(key)
        if lut is None:
            lut = self._on[key] = self.lut.to(pixels.device, dtype).flatten()
        tiles = pixels.reshape(-1, *pixels.shape[-3:])  # (tiles, C, H, W)
        offset = torch.arange(tiles.shape[1], device=pixels.device, dtype=torch.int32) * 256
        out = torch.empty(tiles.shape, dtype=dtype, device=pixels.device)
        for a in range(0, len(tiles), chunk):  # int32 indices for `chunk` tiles at a time
            index = tiles[a : a + chunk].int()
            index += offset.view(-1, 1, 1)
            out[a : a + chunk] = lut[index]
        out = out.view(pixels.shape)
        mask = batch.get("pixel_attention_mask")
        if isinstance(mask, torch.Tensor):
            out.masked_fill_(~mask.bool().unsqueeze(-3), 0)
        batch["pixel_values"] = out


class DecodePixels:
    """Trainer mixin: batches of a :class:`PixelCodec` collator are decoded on the device
    where the Trainer prepares them (training and evaluation), in place."""

    vlmfit_pixel_codec: PixelCodec | None = None
    vlmfit_pixel_dtype: torch.dtype = torch.float32

    def _prepare_inputs(self, inputs):
        if self.vlmfit_pixel_codec is not None:
            self.vlmfit_pixel_codec.decode_(inputs, self.vlmfit_pixel_dtype)
        return super()._prepare_inputs(inputs)


def codec_for(processor, family: str) -> tuple[PixelCodec, Any] | None:
    """(codec, a copy of ``processor`` that leaves pixels raw), or None where the processor
    does not normalize bytes elementwise (then the workers normalize, as before)."""
    ip = getattr(processor, "image_processor", None)
    if family not in FAMILIES or not (
        getattr(ip, "do_rescale", False) and getattr(ip, "do_normalize", False)
    ):
        return None
    raw = copy.deepcopy(processor)
    raw.image_processor.do_rescale = False
    raw.image_processor.do_normalize = False
    lut = _table(processor.image_processor, raw.image_processor)
    return (PixelCodec(lut), raw) if lut is not None else None


def _table(normalizing, raw) -> torch.Tensor | None:
    """The 3 x 256 table from one probe image through both processors (no resizing or
    splitting: the probe is one tile of every byte value), or None unless every byte of
    every channel maps to one value."""
    import numpy as np
    from PIL import Image

    tile = getattr(normalizing, "max_image_size", None)  # a dict, or a SizeDict
    side = tile.get("longest_edge") if isinstance(tile, dict) else getattr(tile, "longest_edge", 0)
    side = max(16, int(side or 64))
    k = np.arange(side * side).reshape(side, side)
    probe = Image.fromarray(np.stack([k % 256, k * 7 % 256, k * 13 % 256], -1).astype("uint8"))
    kwargs = dict(return_tensors="pt", do_resize=False, do_image_splitting=False)
    try:
        x = normalizing(images=[[probe]], **kwargs)["pixel_values"]
        u = raw(images=[[probe]], **kwargs)["pixel_values"]
    except Exception:  # noqa: BLE001 - a processor that takes no such probe: workers normalize
        return None
    if u.shape != x.shape or x.dim() != 5 or not torch.equal(u, u.round()):
        return None
    lut = torch.full((x.shape[2], 256), float("nan"))
    for c in range(x.shape[2]):
        values, byte = x[:, :, c].flatten().float(), u[:, :, c].flatten().long()
        lut[c, byte] = values
        if not torch.equal(lut[c, byte], values) or lut[c].isnan().any():
            return None
    # and the full path (resizing, splitting, padding): the table must give what the
    # normalizing processor gives (one that resamples in float would leave fractions)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (97, 131, 3), np.uint8))
    full = {"pixel_values": raw(images=[[photo]], return_tensors="pt")["pixel_values"]}
    expected = normalizing(images=[[photo]], return_tensors="pt")
    full["pixel_attention_mask"] = expected.get("pixel_attention_mask")
    codec = PixelCodec(lut)
    try:
        codec.encode(full)
    except ValueError:
        return None
    codec.decode_(full, torch.float32)
    return lut if torch.equal(full["pixel_values"], expected["pixel_values"].float()) else None
