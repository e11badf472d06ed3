"""dalle.data.images: every mode converted or refused with a reason; bombs refused early."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dalle.data.images import (ImageRejected, decode_rgb, load_rgb, open_image, pixel_sha256,
                               process_image, resize_center_crop)


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming width x height pixels (a few hundred bytes on the wire)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _reject(data: bytes, **kw) -> str:
    with pytest.raises(ImageRejected) as info:
        process_image(data, 32, **kw)
    return info.value.kind


def test_jpeg_is_resized_cropped_and_reencoded():
    img = Image.new("RGB", (300, 200), (200, 40, 40))
    out = process_image(_bytes(img, "JPEG"), 64, fmt="png")
    assert (out.width, out.height, out.ext) == (64, 64, "png")
    assert (out.original_width, out.original_height, out.original_format) == (300, 200, "JPEG")
    pixels = decode_rgb(out.data)
    assert pixels.shape == (64, 64, 3) and abs(int(pixels[32, 32, 0]) - 200) < 6


def test_centre_crop_keeps_the_middle():
    arr = np.zeros((100, 300, 3), np.uint8)  # [H, W, 3]: red | green | blue thirds
    arr[:, :100, 0] = arr[:, 100:200, 1] = arr[:, 200:, 2] = 255
    crop = np.asarray(resize_center_crop(Image.fromarray(arr), 50))
    assert crop.shape == (50, 50, 3)
    assert crop[:, 5:-5, 1].min() > 200 and crop[:, 5:-5, 0].max() < 60


def test_alpha_and_palette_transparency_composite_on_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    assert decode_rgb(process_image(_bytes(rgba, "PNG"), 40, fmt="png").data)[0, 0].tolist() == [
        255, 255, 255]
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    out = process_image(_bytes(pal, "PNG", transparency=1), 40, fmt="png")
    assert decode_rgb(out.data)[5, 5].tolist() == [255, 255, 255]
    opaque = process_image(_bytes(pal, "PNG"), 40, fmt="png")
    assert decode_rgb(opaque.data)[5, 5].tolist() == [10, 200, 30]


def test_cmyk_and_grey_become_rgb():
    cmyk = Image.new("CMYK", (48, 48), (0, 255, 255, 0))  # red in CMYK
    out = decode_rgb(process_image(_bytes(cmyk, "JPEG", quality=95), 48, fmt="png").data)
    assert out[20, 20, 0] > 200 and out[20, 20, 1] < 50
    grey = Image.new("L", (48, 48), 77)
    assert decode_rgb(process_image(_bytes(grey, "PNG"), 48, fmt="png").data)[0, 0].tolist() == [
        77, 77, 77]


def test_sixteen_bit_png_is_scaled_not_clipped():
    arr = np.full((40, 40), 32896, dtype=np.uint16)  # 128 * 257
    img = Image.fromarray(arr)
    data = _bytes(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert decode_rgb(process_image(data, 40, fmt="png").data)[0, 0].tolist() == [128, 128, 128]


def test_animated_gif_keeps_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    pixels = decode_rgb(process_image(buf.getvalue(), 40, fmt="png").data)
    assert pixels[10, 10, 0] > 200 and pixels[10, 10, 2] < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 30), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    rotated = load_rgb(open_image(_bytes(img, "JPEG", exif=exif), 10**8))
    assert rotated.size == (30, 60)


def test_float_images_are_refused_with_a_reason():
    img = Image.fromarray(np.ones((40, 40), np.float32), mode="F")
    assert _reject(_bytes(img, "TIFF")) == "unsupported"


@pytest.mark.parametrize("data,kind", [
    (b"<html>not found</html>", "not_an_image"),
    (b"", "not_an_image"),
    (bomb_png(), "decompression_bomb"),
])
def test_bad_bytes_are_refused(data, kind):
    assert _reject(data) == kind


def test_truncated_and_tiny_images():
    big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    jpeg = _bytes(Image.fromarray(big), "JPEG")
    assert _reject(jpeg[: len(jpeg) // 2]) == "truncated"
    assert _reject(_bytes(Image.fromarray(big), "PNG")[:300]) == "truncated"
    assert _reject(_bytes(Image.new("RGB", (10, 10)), "PNG"), min_side=32) == "too_small"


def test_max_pixels_checked_before_decoding():
    data = _bytes(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageRejected, match="decompression_bomb: 100x100"):
        open_image(data, max_pixels=9999)


def test_pixel_sha256_ignores_encoding_but_not_content():
    arr = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    a = decode_rgb(_bytes(Image.fromarray(arr), "PNG"))
    b = decode_rgb(_bytes(Image.fromarray(arr), "PNG", compress_level=9))
    assert pixel_sha256(a) == pixel_sha256(b)
    arr[0, 0, 0] ^= 1
    assert pixel_sha256(a) != pixel_sha256(arr)
