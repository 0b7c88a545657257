"""Content identity of input files, for run fingerprints: what the bytes are, not when they were touched.

:func:`file_identity` is ``{"path", "size", "sample_sha256"}``: the sha256 of the file's size and of up to
three ``window``-byte windows (start, middle, end; 1 MiB for the corpus files). ``touch``, a copy or a
restore from backup keep it; an edit almost always changes it (an edit that keeps the size and lies
entirely outside the three windows is the blind spot: the docs say so). Reading 3 MiB costs milliseconds
even for a 100 GB corpus.

Long listings (thousands of image shards or embedding files, :func:`anisogen.encode.images.describe_image_source`)
use :data:`LISTING_WINDOW` (64 KiB): at most 192 KiB read per file instead of 3 MiB, with the same kind of
blind spot (a same-size edit that misses the first, middle and last 64 KiB). For a tar shard the first window
holds the first members' headers and bytes, the last one the final member and the end-of-archive blocks.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, BinaryIO, Callable

WINDOW = 1 << 20
#: Window of :func:`sample_sha256` for long listings of files (image shards, embedding files).
LISTING_WINDOW = 64 << 10

#: ``read(file, offset, length) -> bytes``: how :func:`sample_sha256` reads one window of the open file
#: (injectable, e.g. to count the bytes read).
ReadFn = Callable[[BinaryIO, int, int], bytes]


def read_window(f: BinaryIO, offset: int, length: int) -> bytes:
    """``length`` bytes of the open binary file ``f`` from ``offset`` (fewer at the end of the file)."""
    f.seek(offset)
    return f.read(length)


def sample_sha256(path: str | os.PathLike, *, window: int = WINDOW, read: ReadFn | None = None) -> str:
    """sha256 of the size and of the first, middle and last ``window`` bytes of ``path`` (the whole file when
    it is at most ``3 * window`` bytes). ``read`` reads one window (default :func:`read_window`); at most
    ``3 * window`` bytes are asked for in all."""
    read = read or read_window
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h = hashlib.sha256(str(size).encode())
        if size <= 3 * window:
            h.update(read(f, 0, size))
        else:
            for start in (0, size // 2 - window // 2, size - window):
                h.update(read(f, start, window))
    return h.hexdigest()


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path": absolute path, "size": bytes, "sample_sha256": ...}`` (see the module docstring)."""
    return {"path": os.path.abspath(path), "size": os.path.getsize(path), "sample_sha256": sample_sha256(path)}
