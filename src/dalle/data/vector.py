"""SVG drawings -> square raster images, for the folder source (and so the `openmoji` source).

`render_svg(data, size)` renders with resvg (the `resvg-py` wheel: no system library) at
`size x size` on a white background and returns PNG bytes, which then go through
`dalle.data.images.process_image` like any other image. A drawing that does not parse or render
raises `ImageRejected("render_failed", ...)`: the folder source turns it into a failed manifest
row with that reason. The drawing's own size (its `viewBox`, else width/height, else the render
size) is reported as the original size, so the prepare stage's `min_side` filter reads the
drawing, not the render.
"""
from __future__ import annotations

import re
from typing import Any

from dalle.data.images import ImageRejected
from dalle.errors import DataError

VECTOR_EXTS = (".svg",)
INSTALL_HINT = "pip install 'dalle[openmoji]' (or: pip install resvg-py==0.5.0)"
_VIEWBOX = re.compile(rb"""viewBox\s*=\s*["']\s*[-\d.eE+]+[\s,]+[-\d.eE+]+[\s,]+([\d.eE+]+)"""
                      rb"""[\s,]+([\d.eE+]+)""")
_MAX_SVG_BYTES = 8 << 20  # a drawing, not a document


def resvg() -> Any:
    """The resvg_py module, or one DataError line that says how to install it."""
    try:
        import resvg_py
    except ImportError:
        raise DataError(f"SVG images need the resvg-py package, which is not installed: "
                        f"{INSTALL_HINT}") from None
    return resvg_py


def intrinsic_size(data: bytes, default: int) -> tuple[int, int]:
    """The drawing's declared (width, height) from its viewBox; `default` square when absent."""
    found = _VIEWBOX.search(data[:4096])
    if not found:
        return default, default
    try:
        w, h = (int(round(float(v))) for v in found.groups())
    except ValueError:
        return default, default
    return (w, h) if w > 0 and h > 0 else (default, default)


def render_svg(data: bytes, size: int) -> tuple[bytes, tuple[int, int]]:
    """SVG bytes -> (PNG bytes of size x size on white, the drawing's declared size)."""
    if len(data) > _MAX_SVG_BYTES:
        raise ImageRejected("render_failed", f"{len(data)} bytes is over {_MAX_SVG_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ImageRejected("render_failed", f"not UTF-8 text ({exc.reason})") from None
    try:
        png = resvg().svg_to_bytes(svg_string=text, background="#ffffff", width=size,
                                   height=size, skip_system_fonts=True)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - resvg raises ValueError, a crafted file anything
        detail = " ".join(str(exc).split())[:200]
        raise ImageRejected("render_failed", f"{type(exc).__name__}: {detail}") from None
    return bytes(png), intrinsic_size(data, size)
