"""Files written and read safely: atomic writes (temp file + rename), VOC palette PNGs, images,
and the one content hash behind every cache key and change check (`Digest`).

Every module that writes an output goes through here, so no reader (nor a resumed run after a
crash) ever sees a half-written file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from wsss.errors import DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once at import: os.umask can only be read by setting it
_CHUNK = 1 << 20


class Digest:
    """A content hash (blake2b, 128 bits, hex): stores are keyed by it, so a cache goes stale
    exactly when what made it changes. Texts are length-prefixed, so parts never run together."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)

    def bytes(self, data: bytes) -> Digest:
        self._hash.update(data)
        return self

    def text(self, value: str) -> Digest:
        encoded = value.encode()
        return self.bytes(len(encoded).to_bytes(8, "little") + encoded)

    def file(self, path: Path) -> Digest:
        """The file's name, size and bytes (read in chunks), or that it is absent."""
        if not path.is_file():
            return self.text(f"absent:{path.name}")
        self.text(f"file:{path.name}:{path.stat().st_size}")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                self.bytes(chunk)
        return self

    def hex(self) -> str:
        return self._hash.hexdigest()


def digest(*parts: Any) -> str:
    """The `Digest` of JSON-serialisable parts (keys sorted): a cache key of what they make."""
    return Digest().text(json.dumps(parts, sort_keys=True, default=str)).hex()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it: readers (and a resumed run
    after a crash) never see a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; a plain open() would honour umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON via temp file + rename, so a crash never leaves a truncated file."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """A DataFrame as CSV via temp file + rename (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, frame.to_csv(index=False).encode())


def voc_palette() -> list[int]:
    """The standard VOC colour map (768 ints), so our PNGs open in the usual VOC viewers/tools."""
    return list(_voc_palette())


@functools.cache
def _voc_palette() -> tuple[int, ...]:
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return tuple(palette)


def save_palette_png(path: str | Path, labels: np.ndarray) -> None:
    """Save an HxW map of class ids (0..255) as a VOC palette PNG, atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D map of class ids, got shape {labels.shape}")
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError("labels must lie in 0..255 to fit a palette PNG")
        labels = labels.astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(labels))  # mode "L"; putpalette makes it "P"
    image.putpalette(_voc_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def open_image(path: Path, what: str) -> Image.Image:
    """Open and fully decode, so truncated or corrupt files fail here with the file's name."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None


def output_folder(path: Path, what: str) -> Path:
    """Create the folder ``path`` (and its parents) for outputs, or raise a `DataError` naming
    ``what`` (the flag or key that gave it) when it cannot be: checked before the work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"{what} {path} exists and is not a folder") from None
    except (NotADirectoryError, PermissionError) as e:
        raise DataError(f"{what} {path}: cannot create the folder ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"{what} {path}: the folder is not writable")
    return path
