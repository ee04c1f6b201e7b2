"""Opening images and videos robustly: every reader and every later stage touches pixels
through here, so all agree on what an image *is* (decoded, EXIF-oriented RGB) and every
failure is a :class:`MediaError` with a one-line reason."""

from vlmfit.data.media.images import (
    DEFAULT_MAX_PIXELS,
    check_image,
    image_size,
    open_image,
    resize_image,
    to_rgb,
)
from vlmfit.data.media.sources import MediaError
from vlmfit.data.media.videos import VideoInfo, probe_video, sample_count, sample_video

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MediaError",
    "VideoInfo",
    "check_image",
    "image_size",
    "open_image",
    "probe_video",
    "resize_image",
    "sample_count",
    "sample_video",
    "to_rgb",
]
