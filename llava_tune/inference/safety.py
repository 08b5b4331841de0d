"""What every server of a model checks, the web page and the API alike: the address it
listens on, and an image's size before it is decoded."""

from __future__ import annotations

import ipaddress
import re
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from llava_tune.errors import UserError


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_host(host: str, listen_public: bool) -> None:
    """Refuse a non-loopback address unless the user said --listen-public."""
    if not is_loopback(host) and not listen_public:
        raise UserError(f"--host {host} would let anyone who can reach this machine use the "
                        "model; add --listen-public to do that on purpose, or leave --host at "
                        "127.0.0.1")


def max_image_pixels() -> int:
    """The largest upload, in pixels: PIL's decompression-bomb limit (about 89 million,
    ~270 MB decoded as RGB); `PIL.Image.MAX_IMAGE_PIXELS` changes it."""
    return int(Image.MAX_IMAGE_PIXELS or 0) or 89_478_485


def check_upload(path: str | Path | BinaryIO) -> tuple[int, int]:
    """Refuse a file that is not an image, or one too large to decode safely. Reads only the
    header: a 20000 x 20000 image is refused before any pixel is decoded.

    Returns its (width, height)."""
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            # Past the limit but under twice it PIL only warns; the size check below refuses.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError as err:
        # PIL refuses past twice its limit before telling the size; its message has the count.
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found[1]):,}" if found else f"more than {2 * limit:,}"
        raise UserError(f"this image has {size} pixels; upload one of at most {limit:,} pixels "
                        "(e.g. 4096 x 4096)") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise UserError("this file is not an image that can be read; upload a PNG, JPEG, "
                        "WebP, GIF or BMP image") from None
    if width * height > limit:
        raise UserError(f"this image is {width} x {height} = {width * height:,} pixels; upload "
                        f"one of at most {limit:,} pixels (e.g. 4096 x 4096)")
    return width, height
