"""Few-shot text classification: N-way K-shot episodes over the classes of a labelled corpus, as token ids.

``root`` holds the corpus in one of two standard layouts:

- a folder per class, ``<root>/<class>/*.txt``: one text per file (20 Newsgroups, IMDB's aclImdb, scikit-learn's
  ``load_files``);
- JSON Lines, ``<root>/*.jsonl`` (or ``root`` one such file): one object per line holding a text and its label,
  ``{"text": "...", "label": "..."}`` (the field names are ``data.text_field`` and ``data.label_field``), as Hugging
  Face data sets export them.

Texts are lower-cased and split into words (letters, digits, apostrophes). The vocabulary is the
``vocab_size - 2`` most frequent words of the training classes' texts (ids 2, 3, ...; 0 is padding and 1 any other
word), so validation and test classes add no words of their own. Each text becomes its first ``length`` tokens,
padded with 0: the LSTM encoder's state stays put on padding, so a short text encodes as itself. Classes are split
train/val/test by a seeded shuffle (``class_split``); classes with fewer texts than an episode draws are left out
and listed in the log and results.json.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from metalstm.config import count, setting
from metalstm.core import TaskSpec
from metalstm.data.class_tasks import ClassEpisodeConfig, ClassTasks, class_spec, drawable_classes
from metalstm.data.episodes import SPLITS, split_by_shares
from metalstm.errors import DataError

log = logging.getLogger(__name__)
PAD, UNKNOWN = 0, 1
WORD = re.compile(r"[a-z0-9']+")


@dataclass
class TextConfig(ClassEpisodeConfig):
    root: str | None = None  # required: a folder with a sub-folder of .txt files per class, or .jsonl files (or one)
    length: int = count(64, minimum=1)  # tokens per text: longer texts are cut, shorter ones padded
    vocab_size: int = count(10000, minimum=3)  # with padding and the unknown word
    text_field: str = "text"  # JSON Lines: the field with the text
    label_field: str = "label"  # and the one with its class
    class_split: list[float] = setting(factory=lambda: [0.6, 0.2, 0.2], minimum=0, exclusive=True)  # train/val/test
    split_seed: int = count(0, minimum=0)
    query: int = count(5)
    eval_query: int = count(5)
    meta_batch_size: int = count(16)
    eval_batch_size: int = count(50)

    def check(self) -> None:
        if not self.root:
            self.refuse("data=text needs data.root: a folder with one sub-folder of .txt files per class, or of "
                        ".jsonl files with a text and a label per line (docs/data.md).")
        self.check_three_shares("class_split")

    def example_shape(self) -> tuple[int, ...]:
        return (self.length,)

    def spec(self) -> TaskSpec:
        return {**class_spec(self.example_shape(), self.ways, self.train_ways), "vocab": self.vocab_size}


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def read_corpus(cfg: TextConfig) -> dict[str, list[list[str]]]:
    """class -> its texts, each a list of words."""
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root={cfg.root} does not exist; point it at a folder with one sub-folder of .txt files "
                        f"per class, or at .jsonl files with '{cfg.text_field}' and '{cfg.label_field}' on each line.")
    jsonl = [root] if root.is_file() else sorted(root.glob("*.jsonl"))
    if jsonl:
        return read_jsonl(jsonl, cfg.text_field, cfg.label_field)
    per_class = {folder.name: [words(path.read_text(encoding="utf-8", errors="replace"))
                               for path in sorted(folder.glob("*.txt"))]
                 for folder in sorted(p for p in root.iterdir() if p.is_dir())}
    per_class = {name: texts for name, texts in per_class.items() if texts}
    if not per_class:
        raise DataError(f"data.root={cfg.root} holds neither .jsonl files nor sub-folders of .txt files (one per "
                        f"class); see docs/data.md for the two layouts.")
    return per_class


def read_jsonl(paths: list[Path], text_field: str, label_field: str) -> dict[str, list[list[str]]]:
    per_class: dict[str, list[list[str]]] = {}
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text, label = record[text_field], record[label_field]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise DataError(
                        f"{path}, line {number}: not a JSON object with '{text_field}' and '{label_field}' "
                        f"({type(error).__name__}: {str(error)[:80]}); each line must be one, e.g. "
                        f'{{"{text_field}": "a text", "{label_field}": "its class"}} (or set data.text_field and '
                        f"data.label_field to the corpus's names).") from None
                if not isinstance(text, str):
                    raise DataError(f"{path}, line {number}: '{text_field}' is {type(text).__name__}, not a text.")
                per_class.setdefault(str(label), []).append(words(text))
    return per_class


def vocabulary(texts: list[list[str]], size: int) -> dict[str, int]:
    """The ``size - 2`` most frequent words (ties by first appearance) -> ids 2, 3, ..."""
    counts = Counter(word for text in texts for word in text)
    return {word: i + 2 for i, (word, _) in enumerate(counts.most_common(size - 2))}


def encode(text: list[str], vocab: dict[str, int], length: int) -> torch.Tensor:
    ids = [vocab.get(word, UNKNOWN) for word in text[:length]]
    return torch.tensor(ids + [PAD] * (length - len(ids)), dtype=torch.long)


def build_text(cfg: TextConfig) -> ClassTasks:
    corpus = read_corpus(cfg)
    every = sorted(corpus)
    keep = drawable_classes(every, [len(corpus[n]) for n in every], cfg.examples_per_class(), "text", "texts",
                            f"data.root={cfg.root}", "add classes")
    names = [every[i] for i in keep]
    small = [n for n in every if n not in names]
    splits = split_by_shares(len(names), cfg.class_split, cfg.split_seed)
    vocab = vocabulary([text for i in splits["train"] for text in corpus[names[i]]], cfg.vocab_size)
    most = max(len(corpus[n]) for n in names)
    examples = torch.zeros(len(names), most, cfg.length, dtype=torch.long)
    for i, name in enumerate(names):
        for j, text in enumerate(corpus[name]):
            examples[i, j] = encode(text, vocab, cfg.length)
    counts = torch.tensor([len(corpus[n]) for n in names])
    tokens = examples[examples != PAD]
    log.info("text: %d classes, %d-%d texts each, %d words in the vocabulary, %.0f %% of tokens unknown; split %s",
             len(names), int(counts.min()), int(counts.max()), len(vocab) + 2,
             100 * float((tokens == UNKNOWN).float().mean()) if tokens.numel() else 0.0,
             {s: len(splits[s]) for s in SPLITS})
    info = {"dataset": "text", "root": str(cfg.root), "length": cfg.length, "vocab_size": cfg.vocab_size,
            "words_in_vocabulary": len(vocab), "split_seed": cfg.split_seed, "left_out_classes": small,
            "class_names": {s: [names[i] for i in splits[s]] for s in SPLITS}}
    return TextTasks(examples, {s: torch.tensor(v, dtype=torch.long) for s, v in splits.items()}, ways=cfg.ways,
                     shots=cfg.shots, query=cfg.query, eval_query=cfg.eval_query, train_shots=cfg.train_shots,
                     train_ways=cfg.train_ways, counts=counts, info=info, vocab=cfg.vocab_size)


class TextTasks(ClassTasks):
    """Episodes of token-id texts [length] (0 = padding), spec ``vocab``."""

    def __init__(self, *args, vocab: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab = vocab

    @property
    def spec(self) -> TaskSpec:
        return {**super().spec, "vocab": self.vocab}
