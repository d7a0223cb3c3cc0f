"""Images attached to chat messages: validated by decoding them, limited, downscaled.

Nothing about an upload is trusted, not its name, its content type or its header: an image is
accepted only once Pillow has decoded every pixel of it, and what we keep is always our own
re-encoding (PNG or JPEG), which also drops EXIF, GPS, XMP and text chunks.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageOps

MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 50_000_000
MAX_SIDE = 2048
JPEG_QUALITY = 90

MediaType = Literal["image/png", "image/jpeg"]

# The decoders Pillow may try, in order: the four we accept, then a few we open only far
# enough to read their header, to name them in the refusal.
OPENERS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PSD")
# What we accept, as Pillow names the formats. Pillow's JPEG opener reports the
# multi-picture JPEGs that many phones and cameras write as MPO; to everyone else it is JPEG.
ACCEPTED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "GIF"}
# Phones send these; Pillow cannot read HEIF, so recognise them by their ISO-BMFF brand.
FTYP_BRANDS = {
    b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC", b"heis": "HEIC",
    b"hevc": "HEIC", b"hevx": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF",
    b"avif": "AVIF", b"avis": "AVIF",
}  # fmt: skip

NOT_AN_IMAGE = "This file is not an image we can read (PNG, JPEG, WebP or GIF)."


class ImageRejected(ValueError):
    """The upload is not an image we take; ``str(error)`` is a message for the user."""


@dataclass(frozen=True)
class PreparedImage:
    content: bytes
    media_type: MediaType  # always a re-encoding, so never the WebP or GIF that came in
    width: int
    height: int
    # As the user sees the original: after its EXIF orientation, before downscaling.
    original_width: int
    original_height: int
    downscaled: bool


def prepare_image(
    data: bytes,
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
) -> PreparedImage:
    """Decode an uploaded image and re-encode it within the limits, or raise ImageRejected.

    CPU-bound (up to a few hundred milliseconds for a large photo): call it from async code
    through ``asgiref.sync.sync_to_async``, not on the event loop.
    """
    if len(data) > max_bytes:
        raise ImageRejected(
            f"The image is {_megabytes(len(data), up=True)}; the limit is {_megabytes(max_bytes)}."
        )
    if data[4:8] == b"ftyp" and (brand := FTYP_BRANDS.get(data[8:12])):
        raise ImageRejected(_unsupported(brand))

    try:
        # Reads the header, not the pixels. Pillow's own bomb check (Image.MAX_IMAGE_PIXELS,
        # a process-wide setting we leave alone) refuses anything over twice its limit here,
        # before we get to see the size; our own, tighter limit comes next.
        image = Image.open(io.BytesIO(data), formats=OPENERS)
    except Image.DecompressionBombError:
        raise ImageRejected(
            f"The image is over {_megapixels(2 * (Image.MAX_IMAGE_PIXELS or 0))} megapixels; "
            f"the limit is {_megapixels(max_pixels)} megapixels."
        ) from None
    except Exception:  # UnidentifiedImageError, and whatever a malformed header raises
        raise ImageRejected(NOT_AN_IMAGE) from None

    with image:
        image_format = str(image.format)
        if image_format not in ACCEPTED_FORMATS:
            raise ImageRejected(_unsupported(image_format))
        stored_width, stored_height = image.size
        if stored_width * stored_height > max_pixels:
            raise ImageRejected(
                f"The image is {stored_width}×{stored_height} pixels; "
                f"the limit is {_megapixels(max_pixels)} megapixels."
            )
        target = _fit(image.size, max_side)
        if image_format in {"JPEG", "MPO"} and target != image.size:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the target): a
            # fraction of the time and memory of decoding a 50 MP photo whole.
            image.draft(None, target)
        try:
            # Decode every pixel: this is what catches truncated and corrupt files. For an
            # animated GIF, WebP or PNG it decodes the first frame, which is all we keep.
            image.load()
        except Exception:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ...
            raise ImageRejected(NOT_AN_IMAGE) from None
        return _reencode(
            image,
            stored_size=(stored_width, stored_height),
            source_format=image_format,
            max_side=max_side,
        )


def _reencode(
    image: Image.Image, *, stored_size: tuple[int, int], source_format: str, max_side: int
) -> PreparedImage:
    icc_profile = image.info.get("icc_profile")  # colour, not metadata: keep it
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:  # unreadable EXIF: show the pixels as stored rather than refuse them
        upright = image.copy()
    # Orientations 5 to 8 turn the picture a quarter turn, so the user sees it the other way up.
    turned = upright.size != image.size
    original_size = (stored_size[1], stored_size[0]) if turned else stored_size
    target = _fit(original_size, max_side)

    if upright.mode.startswith("I"):
        # 16-bit greyscale: Pillow's conversion to 8 bits clips (nearly everything turns
        # white), so scale it down ourselves.
        upright = upright.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    transparent = _has_transparency(upright)
    upright = upright.convert("RGBA" if transparent else "RGB")
    if upright.size != target:  # too large, or decoded at a draft scale above the target
        upright = upright.resize(target, Image.Resampling.LANCZOS)

    # Nothing of the original's info (EXIF, XMP, PNG text, comments) goes into the new file.
    upright.info = {}
    buffer = io.BytesIO()
    media_type: MediaType
    if transparent or source_format == "GIF":
        upright.save(buffer, "PNG", icc_profile=icc_profile)
        media_type = "image/png"
    else:
        upright.save(buffer, "JPEG", quality=JPEG_QUALITY, icc_profile=icc_profile)
        media_type = "image/jpeg"
    return PreparedImage(
        content=buffer.getvalue(),
        media_type=media_type,
        width=upright.width,
        height=upright.height,
        original_width=original_size[0],
        original_height=original_size[1],
        downscaled=target != original_size,
    )


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The size with the longest side at most max_side, keeping the aspect ratio."""
    width, height = size
    longest = max(width, height)
    if longest <= max_side:
        return size
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _has_transparency(image: Image.Image) -> bool:
    """Whether any pixel is less than opaque (an alpha channel alone is not enough)."""
    if image.mode == "P":
        if "transparency" not in image.info:
            return False
        image = image.convert("RGBA")
    elif "transparency" in image.info:  # a tRNS colour key on an L or RGB PNG
        image = image.convert("RGBA")
    if "A" not in image.getbands():
        return False
    return image.getchannel("A").getextrema() != (255, 255)


def _megabytes(size: int, *, up: bool = False) -> str:
    # Rounding a size that is over the limit up keeps "20.0 MB; the limit is 20 MB" away.
    tenths = size * 10 / (1024 * 1024)
    value = (math.ceil(tenths) if up else round(tenths)) / 10
    return f"{value:g} MB"


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1_000_000:.3g}"


def _unsupported(format_name: str) -> str:
    return f"{format_name} images are not supported; please send a PNG, JPEG, WebP or GIF."
