"""mini-ImageNet with the Ravi & Larochelle (2017) split: 64 train, 16 val, 20 test classes, 600 images each.

``data=mini_imagenet data.root=DIR`` reads either of the two forms the data set circulates in:

    DIR/train.csv, val.csv, test.csv + DIR/images/   the split files (``filename,label`` rows) and the images
    DIR/mini-imagenet-cache-{train,val,test}.pkl     the common pickles: {"image_data": uint8 [N, 84, 84, 3],
                                                     "class_dict": {label: [row indices]}}

The pickles are read by an unpickler that builds numpy arrays, dicts and lists and nothing else: a file
that asks for any other object is refused, so a crafted pickle cannot run code. Images are resized to
``image_size`` (84 as published) and cached as one uint8 tensor in ``cache_dir`` (default ``~/.cache/metalstm``).
"""
from __future__ import annotations

import csv
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metalstm.config import count
from metalstm.data.class_tasks import ClassEpisodeConfig, ClassTasks
from metalstm.data.episodes import SPLITS
from metalstm.data.images import cache_folders, cache_name, cached, file_listing, prepare_image, read_image, stack_classes
from metalstm.errors import DataError

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass
class MiniImageNetConfig(ClassEpisodeConfig):
    root: str | None = None  # required: the folder with the split CSVs + images/, or the three pickles
    image_size: int = count(84, minimum=4)
    cache_dir: str | None = None  # null: ~/.cache/metalstm
    meta_batch_size: int = count(4)
    eval_batch_size: int = count(20)

    def check(self) -> None:
        if not self.root:
            self.refuse("data=mini_imagenet needs data.root=<the folder with train.csv, val.csv, test.csv and "
                        "images/, or the mini-imagenet-cache-*.pkl files>.")

    def example_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only; any other global is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain data are read")
        return super().find_class(module, name)


def read_pickle(path: Path) -> tuple[list[str], list[np.ndarray]]:
    """A mini-imagenet-cache pickle -> class labels and their images [n, 84, 84, 3] uint8."""
    try:
        with open(path, "rb") as f:
            data = ArrayUnpickler(f, encoding="latin1").load()
        images, class_dict = data["image_data"], data["class_dict"]
        labels = sorted(class_dict)
        return labels, [np.asarray(images[np.asarray(class_dict[label])], dtype=np.uint8) for label in labels]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
        raise DataError(
            f"{path} is not a mini-ImageNet cache pickle ({type(e).__name__}: {e}). It must hold a dict with "
            f"'image_data' (uint8 [N, 84, 84, 3]) and 'class_dict' ({{label: [indices]}}); re-download it, or use the "
            f"CSV form (train.csv, val.csv, test.csv and images/)."
        ) from e


def read_split_csv(path: Path) -> dict[str, list[str]]:
    """label -> image file names, in file order."""
    classes: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        for number, row in enumerate(csv.DictReader(f), start=2):
            if not row.get("filename") or not row.get("label"):
                raise DataError(f"{path} line {number}: expected 'filename,label' columns, got {row}. The split files "
                                f"of Ravi & Larochelle have the header 'filename,label'.")
            classes.setdefault(row["label"], []).append(row["filename"])
    return classes


def load(root: Path, size: int, cache_dir: str | None) -> dict:
    """{"images": uint8 [100, 600, 3, S, S], "counts", "labels": {split: [label]}} from either form."""
    csvs = [root / f"{s}.csv" for s in SPLITS]
    pickles = [root / f"mini-imagenet-cache-{s}.pkl" for s in SPLITS]
    if all(p.is_file() for p in csvs):
        form, sources = "csv", csvs
    elif all(p.is_file() for p in pickles):
        form, sources = "pickle", pickles
    else:
        raise DataError(
            f"mini-ImageNet not found in {root.resolve()}: expected train.csv, val.csv, test.csv and an images/ folder "
            f"(Ravi & Larochelle's split), or mini-imagenet-cache-train.pkl, -val.pkl and -test.pkl. Point data.root "
            f"at the folder that holds one of them."
        )
    images_dir = root / "images"  # the CSV form's images count too: a replaced image makes the cache stale
    listed = sources + (sorted(p for p in images_dir.iterdir() if p.is_file()) if form == "csv" and images_dir.is_dir() else [])
    stamp = {"version": CACHE_VERSION, "image_size": size, "form": form, "sources": file_listing(listed, root)}

    def build() -> dict:
        labels: dict[str, list[str]] = {}
        per_class: list[np.ndarray] = []
        for split, source in zip(SPLITS, sources):
            if form == "csv":
                classes = read_split_csv(source)
                for label, names in classes.items():
                    missing = [n for n in names if not (root / "images" / n).is_file()]
                    if missing:
                        raise DataError(f"{root / 'images' / missing[0]} (listed in {source.name}) does not exist; "
                                        f"{len(missing)} image(s) of class {label} are missing. Restore the images/ folder.")
                    per_class.append(np.stack([read_image(root / "images" / n, size, channels=3) for n in names]))
            else:
                names_of_split, arrays = read_pickle(source)
                classes = dict.fromkeys(names_of_split)
                for array in arrays:
                    resized = [prepare_image(Image.fromarray(a), size, channels=3) for a in array]
                    per_class.append(np.stack(resized))
            labels[split] = list(classes)
        images, counts = stack_classes(per_class)
        return {"images": images, "counts": counts, "labels": labels}

    return cached(cache_name("mini_imagenet", root, f"{form}_{size}px"), stamp, cache_folders(cache_dir), build)


def build_mini_imagenet(cfg: MiniImageNetConfig) -> ClassTasks:
    data = load(Path(cfg.root).expanduser(), cfg.image_size, cfg.cache_dir)
    sizes = [len(data["labels"][s]) for s in SPLITS]
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    split_classes = {s: torch.arange(start, start + n) for s, start, n in zip(SPLITS, starts, sizes)}
    return ClassTasks(
        data["images"], split_classes, ways=cfg.ways, shots=cfg.shots, query=cfg.query, eval_query=cfg.eval_query,
        train_shots=cfg.train_shots, train_ways=cfg.train_ways, counts=data["counts"],
        info={"dataset": "mini_imagenet", "root": str(cfg.root), "image_size": cfg.image_size,
              "classes_per_split": dict(zip(SPLITS, sizes))},
    )
