"""Image files -> uint8 tensors, and the preprocessing cache every image data set shares."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metalstm.errors import DataError
from metalstm.files import atomic_write

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder (by suffix), sorted; other files and sub-folders are not images."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def prepare_image(image: Image.Image, size: int, invert: bool = False, channels: int = 1) -> np.ndarray:
    """Any image -> uint8 [channels, size, size]: grayscale (1) or RGB (3), resized, inverted if asked
    (Omniglot's strokes become 255 on 0)."""
    mode = {1: "L", 3: "RGB"}[channels]
    pixels = np.asarray(image.convert(mode).resize((size, size), Image.LANCZOS), dtype=np.uint8)
    pixels = 255 - pixels if invert else pixels
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


# what PIL raises for a file it cannot read: broken or truncated (OSError, incl. UnidentifiedImageError; some
# decoders raise ValueError or SyntaxError), or over its size guard (DecompressionBombError, ~179 megapixels)
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_image(path: Path, size: int, invert: bool = False, channels: int = 1) -> np.ndarray:
    """An image file -> uint8 [channels, size, size]; an unreadable file is a DataError naming it."""
    try:
        with Image.open(path) as image:
            return prepare_image(image, size, invert, channels)
    except PermissionError as e:
        raise DataError(f"{path} cannot be read: permission denied. Give your user read access (chmod a+r), or "
                        f"remove the file from the folder.") from e
    except Image.DecompressionBombError as e:  # PIL refuses images over ~179 megapixels
        raise DataError(f"{path} is too large to read safely ({e}). Shrink it, or remove it from the folder.") from e
    except UNREADABLE as e:
        raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e}). Replace or remove the file.") from e


def stack_classes(per_class: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Classes of [n_i, C, H, W] images -> [classes, max n_i, C, H, W] (zero-padded) and the counts n_i
    (None when every class has the same number)."""
    longest = max(len(a) for a in per_class)
    images = torch.zeros(len(per_class), longest, *per_class[0].shape[1:], dtype=torch.uint8)
    for i, array in enumerate(per_class):
        images[i, : len(array)] = torch.from_numpy(array)
    counts = torch.tensor([len(a) for a in per_class])
    return images, None if bool((counts == longest).all()) else counts


def file_listing(files: list[Path], root: Path) -> str:
    """A fingerprint of source files for a cache stamp: relative path, size and modification time of each."""
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_folders(cache_dir: str | None, *beside: Path) -> list[Path]:
    """Where a preprocessing cache is looked for, then written: ``cache_dir`` when set, else the ``beside``
    folders (e.g. the data's own), then ``~/.cache/metalstm``."""
    return [Path(cache_dir).expanduser()] if cache_dir else [*beside, Path.home() / ".cache" / "metalstm"]


def cache_name(kind: str, root: Path, settings: str) -> str:
    """A cache file name unique to a data folder (by its absolute path) and the preprocessing settings."""
    return f"{kind}_{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]}_{settings}.pt"


def writable(folder: Path) -> bool:
    """Writable, and not marked read-only: a folder without write bits is left alone even by root."""
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def cached(name: str, stamp: dict, folders: list[Path], build: Callable[[], dict]) -> dict:
    """``build()``'s tensors, from ``<folder>/<name>`` when a cache there has the same ``stamp`` (source
    fingerprints and preprocessing settings); otherwise built and stored in the first writable folder."""
    for folder in folders:
        path = folder / name
        if path.is_file():
            try:
                stored = torch.load(path, weights_only=True)
                if stored.get("stamp") == stamp:
                    log.info("loaded from cache %s", path)
                    return stored["data"]
                log.info("cache %s is stale (other source files or preprocessing); rebuilding", path)
            except Exception as e:  # a damaged cache is rebuilt, never trusted
                log.warning("cache %s is unreadable (%s); rebuilding", path, e)
    data = build()
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not writable(folder):
                continue
            with atomic_write(folder / name, "wb") as f:
                torch.save({"stamp": stamp, "data": data}, f)
            log.info("preprocessed data cached at %s", folder / name)
            break
        except OSError:
            log.info("cannot write the cache in %s; trying the next place", folder)
    return data
