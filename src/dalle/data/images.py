"""Decode, validate and normalise images for every data source (url_list, folder, webdataset).

One entry point, `process_image(data, size, ...)`: open the bytes with PIL, refuse what is not a
usable image with a short reason (`ImageRejected.kind`), convert any mode to RGB, resize the
shorter side to `size`, centre-crop to `size x size` and re-encode (JPEG or PNG). The reasons are
the manifest's `error` column: `not_an_image`, `truncated`, `too_small`, `decompression_bomb`,
`unsupported`, `undecodable` (a decoder failing in any other way on a crafted file).

Safety: PIL's decompression-bomb guard stays on (`Image.MAX_IMAGE_PIXELS`), and the pixel count is
checked against `max_pixels` from the header alone, before a single pixel is decoded. Truncated
files are errors (`ImageFile.LOAD_TRUNCATED_IMAGES` stays False). Animated images keep their first
frame; palette and alpha images are composited on white; CMYK/YCbCr/LAB are converted; 16- and
32-bit integer images are scaled to 8 bits; float images are refused.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_CONVERTIBLE = {"RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageRejected(Exception):
    """A sample whose bytes are not a usable image; `kind` is a stable manifest reason."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Processed:
    data: bytes  # the re-encoded image
    ext: str  # "jpg" | "png"
    width: int
    height: int
    original_width: int
    original_height: int
    original_format: str
    original_mode: str


def open_image(data: bytes, max_pixels: int, min_side: int = 1) -> Image.Image:
    """Open lazily and check the header: format known, size sane. Decodes no pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc).split(".")[0]) from None
    except Exception as exc:  # noqa: BLE001 - a crafted header can raise anything in a plugin
        head = data[:16]
        kind = "truncated" if _looks_like_image(head) else "not_an_image"
        raise ImageRejected(kind, f"cannot identify image ({len(data)} bytes: "
                                  f"{type(exc).__name__}: {exc})"[:300]) from None
    return check_size(img, max_pixels, min_side)


def check_size(img: Image.Image, max_pixels: int, min_side: int = 1) -> Image.Image:
    """Refuse from the header alone (nothing decoded): more than `max_pixels`, or too small."""
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected("decompression_bomb", f"{width}x{height} = {width * height} pixels "
                                                  f"> max_pixels {max_pixels}")
    if min(width, height) < min_side:
        raise ImageRejected("too_small", f"{width}x{height} is under min_side {min_side}")
    return img


def _looks_like_image(head: bytes) -> bool:
    magics = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
    return any(head.startswith(m) for m in magics)


def load_rgb(img: Image.Image, draft_size: int | None = None) -> Image.Image:
    """Decode all pixels (first frame) and return an RGB image; refuses with a reason."""
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))  # libjpeg DCT scaling: >= size each side
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc).split(".")[0]) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRejected("truncated", f"cannot decode pixels ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a crafted file can raise anything in a decoder
        raise ImageRejected("undecodable", f"{type(exc).__name__}: {exc}"[:200]) from None
    try:
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is no orientation tag
    except Exception:  # noqa: BLE001 - a broken EXIF block: keep the pixels as stored
        pass
    try:
        return to_rgb(img)
    except ImageRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - a mode PIL cannot convert
        detail = f"{img.mode}: {type(exc).__name__}: {exc}"[:200]
        raise ImageRejected("unsupported", detail) from None


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _WIDE_INT_MODES:
        arr = np.asarray(img).astype(np.float64)  # [H, W], 16-bit (or wider) integer samples
        scale = 257.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 1.0
        arr8 = np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode in _CONVERTIBLE:
        return img.convert("RGB")
    raise ImageRejected("unsupported", f"image mode {mode} is not supported")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (aspect kept) and keep the centre `size x size`.

    Done in one resampling pass over the centre square only (`resize(box=...)`): the same
    pixels as resize-then-crop, without resampling the parts that are cropped away.
    """
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    if (width, height) == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC,
                      box=(left, top, left + side, top + side))


def encode(img: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"image format {fmt!r} is not one of {sorted(FORMATS)}")
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def process_image(data: bytes, size: int, *, min_side: int = 1, max_pixels: int = 89_478_485,
                  fmt: str = "jpg", quality: int = 95) -> Processed:
    """Bytes -> validated, RGB, `size x size`, re-encoded. Raises ImageRejected with a reason."""
    img = open_image(data, max_pixels, min_side)
    original = (img.size, img.format or "unknown", img.mode)
    rgb = resize_center_crop(load_rgb(img, draft_size=size), size)
    out = encode(rgb, fmt, quality)
    (ow, oh), ofmt, omode = original
    return Processed(out, fmt, rgb.width, rgb.height, ow, oh, ofmt, omode)


def decode_rgb(data: bytes, max_pixels: int = 89_478_485) -> np.ndarray:
    """Stored image bytes -> uint8 [H, W, 3] (for dedup and readers); the size is checked from
    the header before any pixel is decoded (ImageRejected)."""
    with open_image(data, max_pixels) as img:
        return np.asarray(to_rgb(img))


def pixel_sha256(pixels: np.ndarray) -> str:
    """Content hash of decoded pixels, shape included: equal images re-encoded alike match."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()
