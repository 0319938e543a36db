"""Omniglot (Lake et al. 2015) from its official files.

``root`` holds ``images_background.zip`` and ``images_evaluation.zip`` as downloaded from the
official repository, or the folders they extract to. The first run decodes all 32,460 drawings,
resizes them and stores one uint8 tensor (``omniglot_<size>px.pt``) beside the data, or in
``~/.cache/metalstm`` when the data folder is read-only; later runs load it in about a second.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metalstm.config import choice, count, setting
from metalstm.core import SPLITS, TaskSpec
from metalstm.data.class_tasks import ClassEpisodeConfig, ClassTasks, class_spec
from metalstm.data.images import UNREADABLE, cache_folders, cached, prepare_image
from metalstm.errors import DataError
from metalstm.files import atomic_write

log = logging.getLogger(__name__)

BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
SOURCES = {  # name -> md5 of the official zip
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
DRAWINGS_PER_CHARACTER = 20
CACHE_VERSION = 2
SPLIT_NAMES = ("vinyals", "random", "lake")


@dataclass
class OmniglotConfig(ClassEpisodeConfig):
    root: str = "data/omniglot"  # holds the official zips (downloaded there when missing and download=true)
    download: bool = True
    cache_dir: str | None = None  # null: beside the data, or ~/.cache/metalstm if that is read-only
    image_size: int = count(28, minimum=4)
    invert: bool = True  # strokes 1, background 0
    split: str = choice("vinyals", SPLIT_NAMES)  # vinyals | random (1100/100/423 characters) | lake (background -> train/val)
    split_seed: int = count(0, minimum=0)  # for the random and lake splits; independent of the training seed
    rotate_splits: list[str] = setting(factory=lambda: ["train"], choices=SPLITS)  # rotations by 90/180/270 as new classes
    within_alphabet: bool = False  # every task's classes from one alphabet (Lake et al.'s harder protocol)
    # meta-train on the train and validation characters (1,200 in the Vinyals split, as Snell et al. and Nichol et
    # al.); validation then scores trained-on classes, so no best checkpoint is kept and the final weights are tested
    trainval: bool = False
    # Santoro et al.'s online episodes: no support set; a stream of data.query (data.eval_query at validation and
    # test) drawings of each of data.ways characters in random order, each answered before its label is shown
    stream: bool = False
    meta_batch_size: int = count(32)
    eval_batch_size: int = count(50)

    def check(self) -> None:
        if self.stream and self.train_shots is not None:
            self.refuse("data.stream=true has no support set, so data.train_shots has no meaning; remove it.")
        shots = 0 if self.stream else self.shots
        train_shots = shots if self.train_shots is None else self.train_shots
        for key, total in (("data.train_shots + data.query", train_shots + self.query),
                           ("data.shots + data.eval_query", shots + self.eval_query)):
            if total > DRAWINGS_PER_CHARACTER:
                self.refuse(f"{key} = {total} drawings per character, but Omniglot has {DRAWINGS_PER_CHARACTER}; "
                            f"lower them.")

    def example_shape(self) -> tuple[int, ...]:
        return (1, self.image_size, self.image_size)

    def spec(self) -> TaskSpec:
        return class_spec(self.example_shape(), self.ways, self.train_ways, self.stream)

    @property
    def val_held_out(self) -> bool:
        return not self.trainval


def build_omniglot(cfg: OmniglotConfig) -> ClassTasks:
    images, names = load_omniglot(Path(cfg.root).expanduser(), cfg.image_size, cfg.invert, cfg.download, cfg.cache_dir)
    splits = split_characters(names, cfg.split, cfg.split_seed)
    if cfg.trainval:
        splits["train"] = splits["train"] + splits["val"]
    groups = None
    if cfg.within_alphabet:
        alphabets = [name.rsplit("/", 1)[0] for name in names]
        index = {a: i for i, a in enumerate(dict.fromkeys(alphabets))}
        groups = torch.tensor([index[a] for a in alphabets])
    return ClassTasks(
        images,
        {s: torch.tensor(v) for s, v in splits.items()},
        ways=cfg.ways,
        shots=cfg.shots,
        query=cfg.query,
        eval_query=cfg.eval_query,
        train_shots=cfg.train_shots, train_ways=cfg.train_ways,
        rotate_splits=cfg.rotate_splits,
        groups=groups,
        val_in_train=cfg.trainval,
        stream=cfg.stream,
        info={"dataset": "omniglot", "split": cfg.split, "trainval": cfg.trainval, "image_size": cfg.image_size,
              "root": str(cfg.root)},
    )


# ----------------------------------------------------------------------------------------- files


def find_sources(root: Path, download: bool, sources: dict[str, str] = SOURCES) -> dict[str, Path]:
    """The zip (preferred) or extracted folder of each official part (name -> md5), downloading if allowed."""
    found, missing = {}, []
    for name in sources:
        zip_path, folder = root / f"{name}.zip", root / name
        if zip_path.is_file():
            found[name] = zip_path
        elif folder.is_dir():
            found[name] = folder
        else:
            missing.append(name)
    if missing and download:
        for name in missing:
            found[name] = download_zip(name, root, sources)
        missing = []
    if missing:
        raise DataError(
            f"Omniglot files not found: looked for {', '.join(f'{m}.zip' for m in missing)} (or the extracted "
            f"folders) in {root.resolve()}. Point data.root at the folder that holds the official files "
            f"(data.root=/path/to/omniglot), or set data.download=true to fetch them from {BASE_URL}."
        )
    return found


def download_zip(name: str, root: Path, sources: dict[str, str] = SOURCES) -> Path:
    """Fetch ``name``.zip into ``root`` via a temporary file, check its md5, then rename atomically."""
    wanted = " and ".join(f"{n}.zip" for n in sources)
    url, target = f"{BASE_URL}/{name}.zip", root / f"{name}.zip"
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"{name}.zip is not in {root} and cannot be downloaded there ({e.strerror}). Set data.root to a "
            f"folder that holds {wanted}, or to a writable folder."
        ) from e
    log.info("downloading %s -> %s", url, target)
    md5 = hashlib.md5()
    try:
        with atomic_write(target, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
            while chunk := response.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
            if md5.hexdigest() != sources[name]:  # raised inside: nothing is renamed into place
                raise DataError(
                    f"The download of {url} is corrupt (md5 {md5.hexdigest()}, expected {sources[name]}); "
                    f"nothing was saved. Run again, or download it by hand into {root}."
                )
    except OSError as e:  # URLError is an OSError
        raise DataError(
            f"{name}.zip is not in {root.resolve()} and downloading {url} failed ({getattr(e, 'reason', e)}). "
            f"Without network, copy {wanted} into that folder or point data.root at a folder that has them."
        ) from e
    finally:
        if created and not any(root.iterdir()):
            root.rmdir()  # leave no empty folder behind a failed download
    return target


def fingerprint(path: Path) -> str:
    """sha256 of a zip, or of the (relative path, size) listing of an extracted folder."""
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    else:
        for p in sorted(path.rglob("*.png")):
            digest.update(f"{p.relative_to(path)}:{p.stat().st_size}\n".encode())
    return digest.hexdigest()


DRAWING_NAME = re.compile(r"\d{4}_\d{2}\.(png|txt)")  # the official files: <character id>_<drawer>.png/.txt


def read_drawings(source: Path, name: str, suffix: str = ".png") -> dict[str, list[tuple[str, bytes]]]:
    """character key ('images_background/<Alphabet>/characterNN') -> sorted [(file name, bytes)]
    of the drawing files (``suffix``: .png images, .txt pen strokes) in a zip or extracted folder.

    Nothing is extracted: zips are read in memory, and a member whose path leaves the archive's folder
    ('..', absolute paths) is refused. A file that is not an official drawing name is an error naming it
    (hidden files such as .DS_Store are skipped); an empty character folder is kept (with no drawings)."""
    characters: dict[str, list[tuple[str, bytes]]] = {}

    def add(parts: list[str], read: Callable[[], bytes], where: str) -> None:
        if len(parts) != 4 or parts[0] != name or parts[3].startswith("."):
            return
        if not DRAWING_NAME.fullmatch(parts[3]):
            raise DataError(f"{where} is not an Omniglot drawing (the official files are named <id>_<nn>{suffix}). "
                            f"Remove the stray file from the class folder, or use the official download.")
        if parts[3].endswith(suffix):
            characters.setdefault("/".join(parts[:3]), []).append((parts[3], read()))

    if source.is_file():
        try:
            with zipfile.ZipFile(source) as archive:
                for member in archive.namelist():
                    parts = member.split("/")
                    if member.startswith("/") or ".." in parts or "\\" in member:
                        raise DataError(f"{source} holds {member!r}, a path outside the archive's folder (a 'zip slip'); "
                                        f"refusing to read it. Use the official download.")
                    if member.endswith("/") and len(parts) == 4 and parts[0] == name:  # a character folder
                        characters.setdefault("/".join(parts[:3]), [])
                    elif not member.endswith("/"):
                        add(parts, lambda m=member: archive.read(m), f"{source}:{member}")
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(
                f"{source} is not a readable zip ({e}); it may be truncated. Delete it and download it again "
                f"(data.download=true fetches it)."
            ) from e
    else:
        for folder in source.glob("*/*"):
            if folder.is_dir():
                characters.setdefault(f"{name}/{folder.parent.name}/{folder.name}", [])
                for file in folder.iterdir():
                    if file.is_file():
                        add([name, folder.parent.name, folder.name, file.name], file.read_bytes, str(file))
    if not characters:
        raise DataError(f"{source} holds no drawings in the official layout ({name}/<Alphabet>/<character>/*{suffix}).")
    return {k: sorted(v) for k, v in characters.items()}


OFFICIAL_SIZE = (105, 105)


def decode(png: bytes, size: int, invert: bool, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(png)) as image:
            if image.size != OFFICIAL_SIZE:
                raise DataError(f"{where} is {image.size[0]}x{image.size[1]} pixels; official Omniglot drawings are "
                                f"105x105. Replace the file with the official download.")
            return prepare_image(image, size, invert)
    except UNREADABLE as e:
        raise DataError(f"{where} is not a readable PNG ({type(e).__name__}: {e}); replace the file with the official "
                        f"download.") from e


# ----------------------------------------------------------------------------------------- cache


def load_omniglot(
    root: Path, image_size: int, invert: bool, download: bool, cache_dir: str | None
) -> tuple[torch.Tensor, list[str]]:
    """uint8 images [1623, 20, 1, size, size] and the character keys, from cache when it is current."""
    sources = find_sources(root, download)
    stamp = {
        "version": CACHE_VERSION,
        "image_size": image_size,
        "invert": invert,
        "sources": {name: fingerprint(path) for name, path in sorted(sources.items())},
    }
    data = cached(f"omniglot_{image_size}px{'_inv' if invert else ''}.pt", stamp, cache_folders(cache_dir, root),
                  lambda: preprocess(sources, image_size, invert))
    return data["images"], list(data["characters"])


def preprocess(sources: dict[str, Path], size: int, invert: bool) -> dict:
    log.info("preprocessing Omniglot to %dx%d (once; cached afterwards)", size, size)
    characters, arrays = [], []
    for name in SOURCES:
        for key, drawings in sorted(read_drawings(sources[name], name).items()):
            if len(drawings) != DRAWINGS_PER_CHARACTER:
                raise DataError(
                    f"{key} in {sources[name]} has {len(drawings)} drawings, expected {DRAWINGS_PER_CHARACTER}; "
                    f"the data is incomplete. Replace it with the official download."
                )
            where = f"{sources[name]}{':' if sources[name].is_file() else '/'}{key.split('/', 1)[1]}"
            arrays.append(np.stack([decode(png, size, invert, f"{where}/{file}") for file, png in drawings]))
            characters.append(key)
    return {"images": torch.from_numpy(np.stack(arrays)), "characters": characters}  # [characters, 20, 1, S, S]


# ----------------------------------------------------------------------------------------- splits


def split_characters(characters: list[str], split: str, seed: int) -> dict[str, list[int]]:
    """Indices into ``characters`` for train/val/test; the three sets are disjoint."""
    index = {c: i for i, c in enumerate(characters)}
    if split == "vinyals":
        listing = json.loads(resources.files("metalstm.data").joinpath("splits/vinyals.json").read_text())
        missing = [c for s in ("train", "val", "test") for c in listing[s] if c not in index]
        if missing:
            alphabets = sorted({c.rsplit("/", 1)[0] for c in missing})
            raise DataError(
                f"{len(missing)} characters of the Vinyals split are not in the data, from alphabet(s) "
                f"{', '.join(alphabets[:5])}{' ...' if len(alphabets) > 5 else ''}: the Omniglot files are incomplete. "
                f"Replace them with the official downloads (or use data.split=lake or random on partial data)."
            )
        return {s: [index[c] for c in listing[s]] for s in ("train", "val", "test")}
    if split == "random":  # MAML's protocol: a seeded shuffle of all characters
        order = list(range(len(characters)))
        random.Random(seed).shuffle(order)
        n_test = 423 * len(characters) // 1623
        n_val = 100 * len(characters) // 1623
        return {"train": order[: -(n_val + n_test)], "val": order[-(n_val + n_test) : -n_test], "test": order[-n_test:]}
    # lake: evaluation alphabets are the test set; 5 seeded background alphabets validate
    alphabet = lambda c: c.rsplit("/", 1)[0]  # noqa: E731
    background = sorted({alphabet(c) for c in characters if c.startswith("images_background/")})
    val_alphabets = set(random.Random(seed).sample(background, max(1, len(background) // 6)))
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, c in enumerate(characters):
        if c.startswith("images_evaluation/"):
            out["test"].append(i)
        else:
            out["val" if alphabet(c) in val_alphabets else "train"].append(i)
    return out
