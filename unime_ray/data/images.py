"""Opening images that come from outside (query bytes, corpus and MMEB files) with the formats the API
documents only: PNG, JPEG, WebP, GIF, BMP.

Pillow otherwise tries every format it knows, some of which run other programs or parse far more than
pixels: an EPS or PostScript file is rendered by starting Ghostscript (`gs`) on its bytes whenever `gs`
is installed. Every reader of outside images goes through `open_image`, so no such format is ever tried.
"""

from pathlib import Path
from typing import IO

from PIL import Image

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def open_image(source: str | Path | IO[bytes]) -> Image.Image:
    """`Image.open(source)` trying only IMAGE_FORMATS (lazy, like Image.open: the pixels are decoded on
    `load()`). Raises PIL.UnidentifiedImageError for anything else, whatever its extension."""
    return Image.open(source, formats=IMAGE_FORMATS)
