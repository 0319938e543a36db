"""Shared fixtures: a tiny Omniglot in the official layout, the real one when ../shared has it."""
from __future__ import annotations

import json
import os

if "PYTEST_XDIST_WORKER" in os.environ:  # one test process per core: one math thread each, and in the
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # train.py processes they start (set before torch loads)
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import random
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)
# the CPU allocator is built once, here (pytest_configure), and found by every test process, also those that run
# with another HOME
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "metalstm"))

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Build the CPU allocator's extension once, before the test processes start (they load the build): a first
    build prints a line that tests of an entry point's output would otherwise see."""
    if not hasattr(config, "workerinput"):
        from metalstm.allocator import build_segments

        build_segments()

CONFIG_DIR = REPO / "configs"
REAL_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"


def draw_character(class_id: int, drawing: int) -> Image.Image:
    """A 105x105 1-bit drawing: strokes fixed per character, jittered per drawer (like the real ones)."""
    strokes = random.Random(class_id)
    jitter = random.Random(class_id * 1000 + drawing)
    image = Image.new("1", (105, 105), 1)
    pen = ImageDraw.Draw(image)
    dx, dy = jitter.randint(-4, 4), jitter.randint(-4, 4)
    for _ in range(3):
        points = [(strokes.randint(15, 90) + dx, strokes.randint(15, 90) + dy) for _ in range(3)]
        pen.line(points, fill=0, width=5)
    return image


def make_omniglot(root: Path, background: int = 6, evaluation: int = 2, characters: int = 5, zipped: bool = True) -> Path:
    """Omniglot in the official layout: <part>/<Alphabet>/characterNN/XXXX_YY.png, as zips or folders."""
    root.mkdir(parents=True, exist_ok=True)
    class_id = 0
    for part, alphabets in (("images_background", background), ("images_evaluation", evaluation)):
        files = {}
        for a in range(alphabets):
            for c in range(1, characters + 1):
                class_id += 1
                for d in range(1, 21):
                    name = f"{part}/Alphabet_{part[7]}{a}/character{c:02d}/{class_id:04d}_{d:02d}.png"
                    files[name] = draw_character(class_id, d)
        if zipped:
            with zipfile.ZipFile(root / f"{part}.zip", "w") as archive:
                for name, image in files.items():
                    with archive.open(name, "w") as f:
                        image.save(f, format="PNG")
        else:
            for name, image in files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                image.save(root / name)
    return root


def stroke_file(class_id: int, drawing: int) -> str:
    """One drawing in the official stroke format: START, 'x,y,time_ms' rows, BREAK after each stroke."""
    shape, jitter = random.Random(class_id), random.Random(class_id * 1000 + drawing)
    lines, t = ["START"], 0
    for _ in range(shape.randint(1, 3)):
        x, y = shape.uniform(20, 80), -shape.uniform(20, 80)
        vx, vy = shape.uniform(-3, 3), shape.uniform(-3, 3)
        for _ in range(shape.randint(6, 14)):
            x, y, t = x + vx + jitter.gauss(0, 0.5), y + vy + jitter.gauss(0, 0.5), t + jitter.randint(10, 40)
            lines.append(f"{x:.6f},{y:.6f},{t}")
        lines.append("BREAK")
    return "\n".join(lines) + "\n"


def make_strokes(root: Path, characters: int = 16, shared: int = 2, zipped: bool = True) -> Path:
    """The two official stroke subsets: strokes_background_smallN/<Alphabet>/characterNN/XXXX_YY.txt.
    ``shared`` characters are in both subsets (as Greek and Latin are): 2 * characters - shared distinct."""
    root.mkdir(parents=True, exist_ok=True)
    for subset in (1, 2):
        part = f"strokes_background_small{subset}"
        ids = range(1, characters + 1) if subset == 1 else range(characters - shared + 1, 2 * characters - shared + 1)
        files = {f"{part}/Alphabet_{class_id % 3}/character{class_id:02d}/{class_id:04d}_{d:02d}.txt":
                 stroke_file(class_id, d) for class_id in ids for d in range(1, 21)}
        for name, text in files.items():
            if not zipped:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_text(text)
        if zipped:
            with zipfile.ZipFile(root / f"{part}.zip", "w") as archive:
                for name, text in files.items():
                    archive.writestr(name, text)
    return root


def class_image(class_id: int, index: int, size: int = 32) -> Image.Image:
    """An RGB image of a class: a class colour and a class shape, jittered per image."""
    shape, jitter = random.Random(class_id), random.Random(class_id * 7919 + index)
    colour = tuple(shape.randint(40, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), tuple(jitter.randint(0, 30) for _ in range(3)))
    pen = ImageDraw.Draw(image)
    box = [shape.randint(0, size // 2) + jitter.randint(-2, 2), shape.randint(0, size // 2) + jitter.randint(-2, 2)]
    pen.rectangle([*box, box[0] + size // 3, box[1] + size // 3], fill=colour)
    return image


def make_image_folder(root: Path, sizes: list[int], split_folders: bool = False) -> Path:
    """One sub-folder of JPEGs per class (class i holds sizes[i] images), or train|val|test/<class>/."""
    for class_id, count in enumerate(sizes):
        split = ("train", "val", "test")[min(class_id * 3 // len(sizes), 2)] if split_folders else ""
        folder = root / split / f"class_{class_id:02d}"
        folder.mkdir(parents=True)
        for i in range(count):
            class_image(class_id, i).save(folder / f"img_{i:03d}.jpg", quality=95)
    return root


def make_mini_imagenet(root: Path, form: str, classes: tuple[int, int, int] = (6, 5, 5), per_class: int = 20) -> Path:
    """mini-ImageNet in one of its two published forms, with small images: the split CSVs + images/, or
    the mini-imagenet-cache-<split>.pkl pickles."""
    import pickle

    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    class_id = 0
    for split, n_classes in zip(("train", "val", "test"), classes):
        rows, arrays, class_dict = ["filename,label"], [], {}
        for _ in range(n_classes):
            label = f"n{class_id:08d}"
            for i in range(per_class):
                image = class_image(class_id, i, size=84)
                if form == "csv":
                    (root / "images").mkdir(exist_ok=True)
                    name = f"{label}{i:08d}.jpg"
                    image.save(root / "images" / name, quality=95)
                    rows.append(f"{name},{label}")
                else:
                    class_dict.setdefault(label, []).append(len(arrays))
                    arrays.append(np.asarray(image, dtype=np.uint8))
            class_id += 1
        if form == "csv":
            (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
        else:
            with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
                pickle.dump({"image_data": np.stack(arrays), "class_dict": class_dict}, f, protocol=4)
    return root


def ts_series(class_id: int, index: int, length: int, dims: int = 1) -> list[list[float]]:
    """A class-shaped noisy curve: class c is a sine of frequency c + 1, each series shifted and scaled."""
    g = torch.Generator().manual_seed(1000 * class_id + index)
    t = torch.linspace(0, 1, length)
    return [((2 + d) * torch.sin(2 * torch.pi * (class_id + 1) * t + 0.3 * d) * (1 + torch.rand(1, generator=g))
             + 5 * torch.rand(1, generator=g) + 0.05 * torch.randn(length, generator=g)).tolist() for d in range(dims)]


def make_timeseries(root: Path) -> Path:
    """A tiny archive in the UCR/UEA layout: SetA (.ts, 6 classes, variable length 12-30 with a missing value),
    SetB (.tsv, 4 classes, length 20), SetC (.ts, 2 dimensions, 3 classes); 6 series per class, 3 in each file."""
    for name, classes, dims, suffix in (("SetA", 6, 1, ".ts"), ("SetB", 4, 1, ".tsv"), ("SetC", 3, 2, ".ts")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for part, first in (("TRAIN", 0), ("TEST", 3)):
            lines = []
            for c in range(classes):
                for i in range(first, first + 3):
                    length = 12 + 3 * ((c + i) % 7) if name == "SetA" else 20
                    series = ts_series(c + 10 * dims, i, length, dims)
                    if suffix == ".tsv":
                        lines.append("\t".join([str(c + 1)] + [f"{v:.6f}" for v in series[0]]))
                        continue
                    values = [",".join(f"{v:.6f}" for v in dim) for dim in series]
                    if name == "SetA" and c == 0 and i == 1:
                        values[0] = values[0].replace(values[0].split(",")[4], "?", 1)
                    lines.append(":".join(values) + f":c{c}")
            header = [] if suffix == ".tsv" else ["# a generated test set", f"@problemName {name}", "@timeStamps false",
                                                   f"@univariate {str(dims == 1).lower()}", "@data"]
            (root / name / f"{name}_{part}{suffix}").write_text("\n".join(header + lines) + "\n")
    return root


def timeseries_overrides(data: str, root: Path) -> list[str]:
    """Point a time-series experiment (data=timeseries or series_forecast) at the tiny archive ``make_timeseries``
    wrote in ``root``, with windows, lengths and ways its short series allow."""
    if data == "timeseries":
        return [f"data.root={root}", "data.sets=[SetA,SetB,SetC]", "data.channels=2", "data.length=16", "data.ways=2"]
    return [f"data.root={root}", "data.sets=[SetA,SetC]", "data.context=4", "data.horizon=2", "data.shots=2",
            "data.query=2", "data.eval_query=2", "data.support_fraction=0.5"]


TEXT_CLASSES = ["sport", "weather", "cooking", "music", "travel", "finance", "garden", "space", "health", "chess"]


def corpus_texts(per_class: int = 8) -> dict[str, list[str]]:
    """A generated corpus: each class's texts mix words of its own topic (``<class>0``..``<class>5``) with shared
    ones, lengths 5-20 words."""
    shared = ["the", "a", "of", "and", "today", "people", "said", "new"]
    corpus = {}
    for c, name in enumerate(TEXT_CLASSES):
        texts = []
        for i in range(per_class):
            count = 5 + (3 * i + c) % 16
            texts.append(" ".join(f"{name}{(i + k) % 6}" if (i + k + c) % 3 else shared[(i * k + c) % 8]
                                  for k in range(count)).capitalize() + ".")
        corpus[name] = texts
    return corpus


def make_text_corpus(root: Path, layout: str = "folders") -> Path:
    """The generated corpus as a folder of .txt files per class, or as two .jsonl files (half the classes each)."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = corpus_texts()
    if layout == "folders":
        for name, texts in corpus.items():
            (root / name).mkdir(exist_ok=True)
            for i, text in enumerate(texts):
                (root / name / f"{i:03d}.txt").write_text(text + "\n")
        return root
    items = [(name, text) for name, texts in corpus.items() for text in texts]
    for part, chunk in (("a", items[: len(items) // 2]), ("b", items[len(items) // 2 :])):
        (root / f"{part}.jsonl").write_text("".join(json.dumps({"text": t, "label": n}) + "\n" for n, t in chunk))
    return root


def text_overrides(root: Path) -> list[str]:
    return [f"data.root={root}", "data.ways=2", "data.length=12", "data.vocab_size=100"]


@pytest.fixture(scope="session")
def text_fixture(tmp_path_factory) -> Path:
    return make_text_corpus(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="session")
def timeseries_fixture(tmp_path_factory) -> Path:
    return make_timeseries(tmp_path_factory.mktemp("timeseries"))


@pytest.fixture(scope="session")
def omniglot_fixture(tmp_path_factory) -> Path:
    """30 background + 10 evaluation characters, 20 drawings each, as the two official zips; beside
    them the two official stroke subsets (30 distinct characters, 20 drawings each)."""
    root = make_omniglot(tmp_path_factory.mktemp("omniglot"))
    return make_strokes(root)


@pytest.fixture(scope="session")
def mini_imagenet_fixture(tmp_path_factory) -> Path:
    """mini-ImageNet in its CSV form: 6/5/5 classes of 20 small images."""
    return make_mini_imagenet(tmp_path_factory.mktemp("mini_imagenet"), "csv")


@pytest.fixture(scope="session")
def real_omniglot() -> Path:
    if not (REAL_OMNIGLOT / "images_background.zip").is_file():
        pytest.skip(f"real Omniglot not found in {REAL_OMNIGLOT}")
    return REAL_OMNIGLOT


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished sinusoid MAML run (a few steps), read-only for every test: what eval, resume, predict and the
    API read (a test that changes a run works on a copy)."""
    home = tmp_path_factory.mktemp("trained")
    result = run_script("train.py", "trainer.max_steps=3", "data.val_tasks=10", "data.test_tasks=10",
                        f"hydra.run.dir={home / 'run'}", cwd=home)
    assert result.returncode == 0, result.stderr[-2000:]
    return home / "run"


def fixture_overrides(root: Path, cache: Path, data: str = "omniglot") -> list[str]:
    """Point any Omniglot experiment at the fixture: it has no Vinyals split (use Lake's), and its
    5 validation characters make 20 classes for 20-way tasks only with rotations."""
    if data == "omniglot_strokes":
        return [f"data.root={root}", "data.download=false"]
    return [f"data.root={root}", f"data.cache_dir={cache}", "data.split=lake", "data.download=false",
            "data.rotate_splits=[train,val,test]"]


def run_script(script: str, *args: str, cwd: Path, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run train.py / eval.py as a user would, from ``cwd`` (outputs/ lands there)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def central_differences(loss: Callable[[], torch.Tensor], params: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """d loss / d params by central differences, one coordinate at a time (float64 params)."""
    numeric = []
    for p in params:
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
            up = loss().item()
            with torch.no_grad():
                p.view(-1)[i] -= 2 * eps
            down = loss().item()
            with torch.no_grad():
                p.view(-1)[i] += eps
            numeric.append((up - down) / (2 * eps))
    return torch.tensor(numeric, dtype=torch.float64)


def pytest_report_header(config) -> str:
    """The size of the fault matrix (tests/faults/test_matrix.py and, for train, test_config_rules.py)."""
    sys.path.insert(0, str(Path(__file__).parent / "faults"))
    from test_config_rules import KEYS
    from test_matrix import matrix_size

    entries, faults, cells = matrix_size()
    return (f"fault matrix: {entries} entry points x {faults} fault classes, {cells + len(KEYS)} cases ({cells} in "
            f"test_matrix.py, {len(KEYS)} of train x every numeric setting in test_config_rules.py)")
