"""A trained meta-learner on a new task of your own:

    from metalstm import load_learner
    learner = load_learner("outputs/2026-11-23/12-00-00")     # a run folder or a .ckpt file
    task = learner.adapt(support_images, support_labels)      # PIL images, uint8 arrays, files, any size
    probs = task.predict(query_images)                        # [n_query, n_way]: column i is task.classes[i]

Images go through the training preprocessing (grayscale or RGB, resize, inversion); adaptation is the
meta-learner's own test-time procedure (MAML's inner steps, the LSTM optimizer's updates, the memory
LSTM's reading of the support set, ProtoNet's prototypes), exactly as at meta-test.
"""
from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metalstm.assembly import build_module, parse
from metalstm.checkpointing import find_checkpoint, load_checkpoint, restore_weights
from metalstm.core import EpisodeBatch
from metalstm.data.images import IMAGE_SUFFIXES, UNREADABLE, image_files, prepare_image
from metalstm.errors import CheckpointError, ConfigError, DataError
from metalstm.module import MetaLearningModule


class AdaptedTask:
    """The meta-learner adapted to one support set; ``predict`` scores new examples of that task."""

    def __init__(self, learner: Learner, support_x: Tensor, support_y: Tensor, classes: list[Hashable] | None):
        self.learner, self.support_x, self.support_y = learner, support_x, support_y
        self.classes = classes  # label of each output column (classification)

    def predict(self, query: Any) -> Tensor:
        """Class probabilities [n_query, n_way] (classification) or outputs [n_query, ...] (other tasks)."""
        x = self.learner.prepare(query)
        module = self.learner.module
        batch = EpisodeBatch(self.support_x[None], self.support_y[None], x[None],
                             torch.zeros(1, len(x), dtype=torch.long, device=x.device))
        module.eval()
        with torch.enable_grad():  # adaptation differentiates, even for a caller under no_grad
            outputs = module.meta_learner.predict(batch)[0].detach()
        return outputs.softmax(-1) if self.classes is not None else outputs


class Learner:
    """A trained meta-learner, its task spec and its input preprocessing."""

    def __init__(self, module: MetaLearningModule, spec: dict, config: dict):
        self.module, self.spec, self.config = module, spec, config
        data = config["data"]
        self.image_size = data.get("image_size") if len(spec["input_shape"]) == 3 else None
        self.invert = bool(data.get("invert", False))

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def prepare(self, examples: Any) -> Tensor:
        """Examples -> the tensor [n, *input_shape] the learner was trained on."""
        shape = tuple(self.spec["input_shape"])
        if isinstance(examples, (Tensor, np.ndarray)) and tuple(examples.shape[1:]) == shape:
            dtype = torch.long if "vocab" in self.spec else torch.float32
            x = torch.as_tensor(examples)
            if x.is_floating_point() and not torch.isfinite(x).all():
                bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
                raise DataError(f"Examples {bad[:10]} hold NaN or infinite values; the learner's answers for them (and, "
                                f"in a support set, for every query) would be meaningless. Remove or repair them.")
            return x.to(self.device, dtype)  # already in the training format
        if self.image_size is None:
            raise DataError(
                f"Expected examples as one array of shape [n, {', '.join(map(str, shape))}] (this learner's input), got "
                f"{type(examples).__name__} of shape {list(np.shape(examples)) if not isinstance(examples, str) else []}."
            )
        channels = shape[0] if shape[0] in (1, 3) else 1
        pixels = [prepare_image(self.to_image(item), self.image_size, self.invert, channels) for item in examples]
        images = torch.from_numpy(np.stack(pixels)).float().div(255)  # [n, channels, S, S]
        return images.expand(-1, shape[0], -1, -1).to(self.device)

    @staticmethod
    def to_image(item: Any) -> Image.Image:
        if isinstance(item, Image.Image):
            return item
        if isinstance(item, (str, Path)):
            try:
                with Image.open(item) as image:
                    return image.copy()
            except UNREADABLE as e:
                raise DataError(f"Cannot read image {item}: {type(e).__name__}: {e}. Pass readable PNG/JPEG files, PIL "
                                f"images or uint8 arrays.") from e
        array = np.asarray(item.cpu() if isinstance(item, Tensor) else item)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise DataError(f"An image array must be uint8 [H, W] or [H, W, channels], got {array.dtype} {list(array.shape)}.")
        return Image.fromarray(array)

    def adapt(self, support: Any, labels: Sequence[Any] | Tensor) -> AdaptedTask:
        """Adapt to a support set: examples and their labels (any hashable class names for classification).

        The output columns of ``predict`` follow ``task.classes``: numeric labels in numeric order (labels 0..n-1 give
        column i = label i), any other labels sorted by their text."""
        if self.spec["task_type"] == "stream":
            raise ConfigError("This learner was meta-trained on streams (data.stream=true), which have no support set: "
                              "it answers each example before seeing its label, so adapt/predict do not apply. "
                              "Evaluate it with eval.py, or meta-train with data.stream=false.")
        x = self.prepare(support)
        if self.spec["task_type"] != "classification":
            return AdaptedTask(self, x, torch.as_tensor(labels).to(self.device), None)
        names = [v.item() if isinstance(v, Tensor) else v for v in labels]
        if len(names) != len(x):
            raise DataError(f"adapt got {len(x)} support examples but {len(names)} labels; give one label per example.")
        numeric = all(isinstance(n, numbers.Real) and not isinstance(n, bool) for n in names)
        classes = sorted(set(names)) if numeric else sorted(set(names), key=str)
        ways = self.spec["output_dim"]
        if len(classes) != ways:
            raise DataError(
                f"This learner was meta-trained on {ways}-way tasks, but the support set has {len(classes)} classes "
                f"({classes[:10]}); give examples of exactly {ways} classes, or meta-train with data.ways={len(classes)}."
            )
        y = torch.tensor([classes.index(n) for n in names], device=self.device)
        return AdaptedTask(self, x, y, classes)


def load_learner(path: str | Path, device: str | None = None) -> Learner:
    """A run folder (its best, else last, checkpoint) or a .ckpt file -> a Learner on ``device``
    (default: the GPU if there is one). Nothing is unpickled (``weights_only``)."""
    path = Path(path).expanduser()
    checkpoint_path = find_checkpoint(str(path), None) if path.is_dir() else find_checkpoint(None, str(path))
    checkpoint = load_checkpoint(checkpoint_path)
    config, spec = checkpoint["metalstm"]["config"], checkpoint["metalstm"].get("spec")
    settings = parse(config)
    module = build_module(settings, spec or settings.spec, config)
    restore_weights(module, checkpoint, checkpoint_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Learner(module.to(device), module.spec, config)


def predict_folders(learner: Learner, support: Path, query: Path) -> tuple[list[Path], list[Hashable], Tensor]:
    """``support``: one sub-folder of images per class (the folder name is the class); ``query``: images.
    Returns the query files, the class of each probability column, and the probabilities [n_query, n_way]."""
    for name, folder in (("support", support), ("query", query)):
        if not folder.is_dir():
            raise DataError(f"{name}={folder} is not a folder. Give support=DIR with one sub-folder of images per class "
                            f"and query=DIR with the images to classify.")
    files, labels = [], []
    for class_dir in sorted(p for p in support.iterdir() if p.is_dir()):
        for file in image_files(class_dir):
            files.append(file)
            labels.append(class_dir.name)
    if not files:
        raise DataError(f"support={support} has no class sub-folders with images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        f"put each class's support images in a sub-folder named after the class.")
    queries = image_files(query)
    if not queries:
        raise DataError(f"query={query} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    task = learner.adapt(files, labels)
    return queries, task.classes, task.predict(queries)


def predict_cli(cfg: Any) -> list[tuple[str, str, float]]:
    """What ``predict.py`` does: one line per query file (file, predicted class, its probability), also
    written to ``predictions.csv`` in the run's output folder."""
    if not cfg.get("support") or not cfg.get("query"):
        raise DataError("predict.py needs support=DIR (one sub-folder of images per class) and query=DIR (images).")
    source = cfg.get("ckpt_path") or cfg.get("run_dir")
    if not source:
        raise CheckpointError("predict.py needs run_dir=<a train run folder> or ckpt_path=<file.ckpt>.")
    learner = load_learner(source, device=cfg.get("device"))
    queries, classes, probs = predict_folders(learner, Path(cfg.support).expanduser(), Path(cfg.query).expanduser())
    best, column = probs.max(1)
    rows = [(str(q), str(classes[c]), float(p)) for q, c, p in zip(queries, column.tolist(), best.tolist())]
    lines = ["file,prediction,probability", *(f"{f},{c},{p:.4f}" for f, c, p in rows)]
    output = Path(cfg.paths.output_dir) / "predictions.csv"
    output.write_text("\n".join(lines) + "\n")
    for file, label, p in rows:
        print(f"{file}\t{label}\t{p:.4f}")
    return rows
