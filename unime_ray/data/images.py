"""Opening images that come from outside (query bytes, corpus and MMEB files) with the formats the API
documents only: PNG, JPEG, WebP, GIF, BMP.

Pillow otherwise tries every format it knows, some of which run other programs or parse far more than
pixels: an EPS or PostScript file is rendered by starting Ghostscript (`gs`) on its bytes whenever `gs`
is installed. Every reader of outside images goes through `open_image`, so no such format is ever tried.
"""

import io
from pathlib import Path
from typing import IO, Any

from PIL import Image

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def open_image(source: str | Path | IO[bytes]) -> Image.Image:
    """`Image.open(source)` trying only IMAGE_FORMATS (lazy, like Image.open: the pixels are decoded on
    `load()`). Raises PIL.UnidentifiedImageError for anything else, whatever its extension."""
    return Image.open(source, formats=IMAGE_FORMATS)


def thumbnail(path: str | Path, side: int, fmt: str, **save: Any) -> bytes | None:
    """The image file at `path` shrunk to fit `side` x `side` (aspect kept, RGB), encoded as `fmt` with
    Pillow's `save` options; None when it is gone, unreadable or not an IMAGE_FORMATS image. Re-encoded
    rather than passed on as stored, so the bytes are always a small image of the format asked for, and
    a bad file is "no image" to the page or client rather than an error."""
    try:
        with open_image(path) as image:
            image = image.convert("RGB")
            image.thumbnail((side, side))
            out = io.BytesIO()
            image.save(out, format=fmt, **save)
            return out.getvalue()
    except Exception:
        return None
