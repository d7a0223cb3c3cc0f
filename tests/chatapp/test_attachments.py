"""Uploaded chat images are decoded to be validated, kept within limits and stripped."""

from __future__ import annotations

import io
import os
import struct
import zlib

import pytest
from PIL import ExifTags, Image

from chatapp.chat.attachments import (
    MAX_BYTES,
    MAX_SIDE,
    ImageRejected,
    PreparedImage,
    prepare_image,
)

NOT_AN_IMAGE = "This file is not an image we can read (PNG, JPEG, WebP or GIF)."


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def decode(prepared: PreparedImage) -> Image.Image:
    image = Image.open(io.BytesIO(prepared.content))
    image.load()
    return image


def noise(size: tuple[int, int]) -> Image.Image:
    """An image that does not compress, so that cutting its file short loses pixels."""
    return Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1×1 PNG whose IHDR says width×height, with a correct CRC: a bomb's header."""
    data = bytearray(encode(Image.new("1", (1, 1)), "PNG"))
    ihdr = bytearray(data[12:29])  # the chunk type and its 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def exif_with_gps(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneCo"
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (13.0, 24.0, 36.0)
    return exif


# --- accepted ---------------------------------------------------------------------------------


def test_a_png_with_transparency_stays_a_png_with_its_alpha() -> None:
    image = Image.new("RGBA", (64, 48), (10, 20, 30, 128))

    prepared = prepare_image(encode(image, "PNG"))

    assert prepared.media_type == "image/png"
    assert (prepared.width, prepared.height) == (64, 48)
    assert not prepared.downscaled
    output = decode(prepared)
    assert output.format == "PNG"
    assert output.getpixel((5, 5)) == (10, 20, 30, 128)


def test_an_opaque_png_becomes_a_jpeg() -> None:
    prepared = prepare_image(encode(Image.new("RGBA", (64, 48), (200, 0, 0, 255)), "PNG"))
    assert prepared.media_type == "image/jpeg"
    assert decode(prepared).format == "JPEG"


def test_a_jpeg_is_turned_upright_by_its_exif_orientation() -> None:
    # Given a 400×300 photo stored on its side: red on the left, blue on the right, and
    # orientation 6 ("turn it a quarter turn clockwise to view")
    image = Image.new("RGB", (400, 300), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 200, 300))

    prepared = prepare_image(encode(image, "JPEG", exif=exif_with_gps(orientation=6)))

    # Then it is 300 wide and 400 tall, the stored left side now on top
    assert (prepared.width, prepared.height) == (300, 400)
    assert (prepared.original_width, prepared.original_height) == (300, 400)
    output = decode(prepared)
    assert output.getpixel((150, 50)) == pytest.approx((255, 0, 0), abs=40)
    assert output.getpixel((150, 350)) == pytest.approx((0, 0, 255), abs=40)
    # and no orientation tag is left to turn it a second time
    assert ExifTags.Base.Orientation not in output.getexif()


def test_a_large_image_is_downscaled_to_the_longest_side_limit() -> None:
    image = Image.new("RGB", (5000, 3000), (30, 120, 60))

    prepared = prepare_image(encode(image, "JPEG"))

    assert prepared.downscaled
    assert (prepared.width, prepared.height) == (MAX_SIDE, 1229)
    assert (prepared.original_width, prepared.original_height) == (5000, 3000)
    assert decode(prepared).size == (MAX_SIDE, 1229)


def test_a_large_png_is_downscaled_too() -> None:
    prepared = prepare_image(encode(Image.new("RGB", (3000, 5000)), "PNG"), max_side=1000)
    assert (prepared.width, prepared.height) == (600, 1000)
    assert prepared.downscaled


def test_a_turned_large_photo_is_downscaled_upright() -> None:
    image = Image.new("RGB", (5000, 3000))
    prepared = prepare_image(encode(image, "JPEG", exif=exif_with_gps(orientation=8)))
    assert (prepared.width, prepared.height) == (1229, MAX_SIDE)
    assert (prepared.original_width, prepared.original_height) == (3000, 5000)


def test_an_animated_gif_keeps_its_first_frame_as_a_png() -> None:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "lime", "blue")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3

    prepared = prepare_image(data)

    assert prepared.media_type == "image/png"
    output = decode(prepared)
    assert getattr(output, "n_frames", 1) == 1
    assert output.convert("RGB").getpixel((20, 15)) == (255, 0, 0)


def test_a_webp_is_accepted() -> None:
    prepared = prepare_image(encode(Image.new("RGB", (32, 32), "green"), "WEBP"))
    assert prepared.media_type == "image/jpeg"
    assert (prepared.width, prepared.height) == (32, 32)


def test_a_multi_picture_jpeg_from_a_camera_is_accepted() -> None:
    # Pillow opens these as "MPO"; they are JPEGs to everyone else.
    first, second = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"

    prepared = prepare_image(data)

    assert prepared.media_type == "image/jpeg"
    assert decode(prepared).format == "JPEG"


def test_a_16_bit_greyscale_png_keeps_its_greys() -> None:
    # Pillow's own 16-to-8-bit conversion clips, which would turn this white.
    pixels = [32768 if x >= 50 else 4096 for _y in range(20) for x in range(100)]
    image = Image.frombytes("I;16", (100, 20), struct.pack(f"<{len(pixels)}H", *pixels))

    output = decode(prepare_image(encode(image, "PNG")))

    assert output.convert("L").getpixel((75, 10)) == pytest.approx(128, abs=2)
    assert output.convert("L").getpixel((10, 10)) == pytest.approx(16, abs=2)


@pytest.mark.parametrize(("image_format", "mode"), [("JPEG", "RGB"), ("PNG", "RGBA")])
def test_exif_and_gps_are_stripped(image_format: str, mode: str) -> None:
    image = Image.new(mode, (64, 48), (1, 2, 3, 100) if mode == "RGBA" else (1, 2, 3))
    data = encode(image, image_format, exif=exif_with_gps())
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.GPSInfo)

    prepared = prepare_image(data)

    output = decode(prepared)
    assert not output.getexif()
    assert "exif" not in output.info
    assert b"PhoneCo" not in prepared.content


def test_an_image_exactly_at_the_byte_limit_is_accepted() -> None:
    data = encode(Image.new("RGB", (8, 8)), "PNG")
    assert prepare_image(data, max_bytes=len(data)).width == 8


# --- rejected ---------------------------------------------------------------------------------


def test_it_rejects_an_image_over_the_byte_limit_naming_both_sizes() -> None:
    data = b"\x89PNG" + bytes(int(23.4 * 1024 * 1024) - 4)
    with pytest.raises(ImageRejected) as rejected:
        prepare_image(data)
    assert str(rejected.value) == "The image is 23.4 MB; the limit is 20 MB."
    assert len(data) > MAX_BYTES


def test_a_size_just_over_the_limit_does_not_read_as_the_limit() -> None:
    with pytest.raises(ImageRejected, match=r"^The image is 20.1 MB; the limit is 20 MB\.$"):
        prepare_image(bytes(MAX_BYTES + 1))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(os.urandom(4096), id="random bytes"),
        pytest.param(b"", id="empty"),
        pytest.param(b"GIF89a", id="a bare GIF signature"),
        pytest.param(b"%PDF-1.7\n" + os.urandom(100), id="a PDF"),
    ],
)
def test_it_rejects_what_is_not_an_image(data: bytes) -> None:
    with pytest.raises(ImageRejected) as rejected:
        prepare_image(data)
    assert str(rejected.value) == NOT_AN_IMAGE


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_it_rejects_a_truncated_image(image_format: str) -> None:
    data = encode(noise((256, 256)), image_format)
    truncated = data[: len(data) // 2]
    Image.open(io.BytesIO(truncated))  # the header still reads: only decoding finds out

    with pytest.raises(ImageRejected) as rejected:
        prepare_image(truncated)
    assert str(rejected.value) == NOT_AN_IMAGE


def test_it_rejects_a_truncated_webp() -> None:
    data = encode(noise((256, 256)), "WEBP")
    truncated = data[: len(data) // 2]  # Pillow decodes a WebP as it opens it

    with pytest.raises(ImageRejected) as rejected:
        prepare_image(truncated)
    assert str(rejected.value) == NOT_AN_IMAGE


@pytest.mark.parametrize(("image_format", "name"), [("BMP", "BMP"), ("TIFF", "TIFF")])
def test_it_rejects_a_format_we_do_not_take_by_name(image_format: str, name: str) -> None:
    data = encode(Image.new("RGB", (16, 16)), image_format)
    with pytest.raises(ImageRejected) as rejected:
        prepare_image(data)
    assert str(rejected.value) == (
        f"{name} images are not supported; please send a PNG, JPEG, WebP or GIF."
    )


def test_it_rejects_a_heic_photo_by_name() -> None:
    data = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + os.urandom(64)
    with pytest.raises(ImageRejected, match=r"^HEIC images are not supported"):
        prepare_image(data)


def test_it_rejects_too_many_pixels_from_the_header_before_decoding() -> None:
    # 8000×7000 is 56 megapixels; the file is a 1×1 image, so only the header says so.
    with pytest.raises(ImageRejected) as rejected:
        prepare_image(png_claiming_size(8000, 7000))
    assert str(rejected.value) == "The image is 8000×7000 pixels; the limit is 50 megapixels."


def test_it_rejects_a_decompression_bomb_pillow_refuses_to_open() -> None:
    # 900 megapixels: over twice Pillow's own limit, so Image.open refuses it outright.
    with pytest.raises(ImageRejected) as rejected:
        prepare_image(png_claiming_size(30000, 30000))
    assert str(rejected.value) == "The image is over 179 megapixels; the limit is 50 megapixels."


def test_it_rejects_a_real_highly_compressed_huge_image() -> None:
    # 64 megapixels of white in a few kilobytes: a real, valid file, refused before decoding.
    data = encode(Image.new("1", (8000, 8000), 1), "PNG")
    assert len(data) < 100_000

    with pytest.raises(ImageRejected) as rejected:
        prepare_image(data, max_pixels=10_000_000)
    assert str(rejected.value) == "The image is 8000×8000 pixels; the limit is 10 megapixels."
