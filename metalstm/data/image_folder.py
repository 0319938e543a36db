"""Any folder of class sub-folders as few-shot episodes: ``data=image_folder data.root=DIR``.

Two layouts:

    DIR/<class>/<image>                  classes split train/val/test by ``class_split`` (seeded shuffle)
    DIR/{train,val,test}/<class>/<image> the split is given by the folders

Images (PNG, JPEG, ... by suffix; other files are skipped) are converted to ``channels`` (1 gray, 3 RGB),
resized to ``image_size`` and cached as one uint8 tensor (``cache_dir``, default ``~/.cache/metalstm``),
keyed by the folder's listing (paths, sizes, modification times) and the preprocessing settings.
Classes may differ in size; every class needs at least shots + query images.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metalstm.config import choice, count, setting
from metalstm.data.class_tasks import ClassEpisodeConfig, ClassTasks
from metalstm.data.episodes import SPLITS, split_by_shares
from metalstm.data.images import (
    IMAGE_SUFFIXES,
    cache_folders,
    cache_name,
    cached,
    file_listing,
    image_files,
    read_image,
    stack_classes,
)
from metalstm.errors import DataError

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass
class ImageFolderConfig(ClassEpisodeConfig):
    root: str | None = None  # required: the folder of class sub-folders
    image_size: int = count(84, minimum=4)
    channels: int = choice(3, (1, 3))  # 1: grayscale, 3: RGB
    invert: bool = False
    # train/val/test shares of the classes (ignored with train|val|test folders)
    class_split: list[float] = setting(factory=lambda: [0.64, 0.16, 0.20], minimum=0, exclusive=True)
    split_seed: int = count(0, minimum=0)
    cache_dir: str | None = None  # null: ~/.cache/metalstm
    rotate_splits: list[str] = setting(factory=list, choices=SPLITS)
    meta_batch_size: int = count(4)
    eval_batch_size: int = count(20)

    def check(self) -> None:
        if not self.root:
            self.refuse("data=image_folder needs data.root=<a folder with one sub-folder of images per class>.")
        self.check_three_shares("class_split")

    def example_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)


def class_folders(root: Path, split_seed: int, fractions: list[float]) -> dict[str, list[Path]]:
    """The class folders of each split."""
    if all((root / s).is_dir() for s in SPLITS):
        return {s: sorted(p for p in (root / s).iterdir() if p.is_dir()) for s in SPLITS}
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if len(classes) < 3:
        raise DataError(
            f"{root} has {len(classes)} class sub-folder(s); few-shot episodes need classes for train, val and test. "
            f"Put each class's images in its own sub-folder of {root} (or use {root}/train|val|test/<class>/)."
        )
    return {s: [classes[i] for i in part] for s, part in split_by_shares(len(classes), fractions, split_seed).items()}


def load_class_images(root: Path, folders: list[Path], image_size: int, channels: int, invert: bool,
                      cache_dir: str | None, minimum: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images of each class folder, [classes, max images, C, S, S] uint8, and the per-class counts."""
    files = []
    for folder in folders:
        images = image_files(folder)
        skipped = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES]
        if skipped:
            log.info("%s: skipped %d file(s) that are not images (e.g. %s)", folder, len(skipped), skipped[0])
        if len(images) < minimum:
            raise DataError(
                f"Class folder {folder} has {len(images)} image(s), but each episode draws shots + query = {minimum} "
                f"per class. Add images, remove the folder, or lower data.shots/data.query/data.eval_query."
            )
        files.append(images)
    stamp = {"version": CACHE_VERSION, "image_size": image_size, "channels": channels, "invert": invert,
             "files": file_listing([f for group in files for f in group], root)}
    name = cache_name("image_folder", root, f"{image_size}px_{channels}ch{'_inv' if invert else ''}")

    def build() -> dict:
        log.info("preprocessing %d images of %d classes in %s (once; cached afterwards)",
                 sum(map(len, files)), len(files), root)
        per_class = [np.stack([read_image(f, image_size, invert, channels) for f in group]) for group in files]
        images, counts = stack_classes(per_class)
        return {"images": images, "counts": counts}

    data = cached(name, stamp, cache_folders(cache_dir), build)
    return data["images"], data["counts"]


def build_image_folder(cfg: ImageFolderConfig) -> ClassTasks:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={cfg.root} is not a folder ({root.resolve()}). Point it at a folder with one "
                        f"sub-folder of images per class.")
    splits = class_folders(root, cfg.split_seed, list(cfg.class_split))
    ordered = [folder for s in SPLITS for folder in splits[s]]
    images, counts = load_class_images(root, ordered, cfg.image_size, cfg.channels, cfg.invert, cfg.cache_dir,
                                       cfg.examples_per_class())
    sizes = {s: len(splits[s]) for s in SPLITS}
    split_classes = {"train": torch.arange(sizes["train"]),
                     "val": torch.arange(sizes["train"], sizes["train"] + sizes["val"]),
                     "test": torch.arange(sizes["train"] + sizes["val"], len(ordered))}
    return ClassTasks(
        images, split_classes, ways=cfg.ways, shots=cfg.shots, query=cfg.query, eval_query=cfg.eval_query,
        train_shots=cfg.train_shots, train_ways=cfg.train_ways, rotate_splits=cfg.rotate_splits, counts=counts,
        info={"dataset": "image_folder", "root": str(root), "image_size": cfg.image_size, "channels": cfg.channels,
              "class_names": {s: [p.name for p in splits[s]] for s in SPLITS}},
    )
