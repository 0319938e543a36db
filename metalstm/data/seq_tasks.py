"""Few-shot sequence-to-sequence tasks with a hidden rule (embedded, no download).

A task draws a rule: a substitution cipher over the alphabet (a random permutation), a structural
transform of the positions (reverse, or rotate left by k), or a composition of the two. Its support
set is K input/output pairs under the rule, its query set new inputs under the same rule.

Sequences are token ids 1..alphabet of random length in [min_length, max_length], padded with 0 to
max_length; targets have the input's length and are padded the same way. Every rule belongs to one
split, by a hash of the rule itself, so train, validation and test rules are disjoint.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from metalstm.config import count, setting
from metalstm.core import PAD, EpisodeBatch, TaskSpec
from metalstm.data.episodes import EpisodeConfig
from metalstm.errors import ConfigError

FAMILIES = ("cipher", "reverse", "rotate", "cipher+reverse", "cipher+rotate")
SPLIT_FRACTIONS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}


@dataclass
class SeqTasksConfig(EpisodeConfig):
    alphabet: int = count(8, minimum=3)  # symbols 1..alphabet; 0 pads (3 or more, so ciphers split)
    min_length: int = count(3)
    max_length: int = count(8)
    shots: int = count(5)  # K input/output pairs per task
    query: int = count(10)  # query pairs per task, meta-training
    eval_query: int = count(20)  # query pairs per task, validation and test
    families: list[str] = setting(factory=lambda: list(FAMILIES), choices=FAMILIES)
    split_seed: int = count(0, minimum=0)  # which rules are train, val and test
    meta_batch_size: int = count(16)
    eval_batch_size: int = count(100)

    def check(self) -> None:
        if self.max_length < self.min_length:
            self.refuse(f"data.max_length={self.max_length} is below data.min_length={self.min_length}.")
        if not self.families:
            self.refuse(f"data.families=[] is empty: choose one or more of {list(FAMILIES)}.")

    def spec(self) -> TaskSpec:
        return {"task_type": "seq2seq", "input_shape": (self.max_length,), "vocab": self.alphabet + 1,
                "output_dim": self.alphabet + 1, "output_length": self.max_length}


@dataclass(frozen=True)
class Rule:
    permutation: tuple[int, ...]  # image of symbols 1..alphabet (identity for structural rules alone)
    transform: str  # none | reverse | rotate
    shift: int  # rotate: positions to the left

    def key(self) -> str:
        return f"{self.permutation}/{self.transform}/{self.shift}"

    def apply(self, tokens: list[int]) -> list[int]:
        out = [self.permutation[t - 1] for t in tokens]
        if self.transform == "reverse":
            out = out[::-1]
        elif self.transform == "rotate":
            k = self.shift % len(out)
            out = out[k:] + out[:k]
        return out


class SeqTasks:
    task_type = "seq2seq"

    def __init__(self, cfg: SeqTasksConfig):
        self.cfg = cfg
        self.spec = cfg.spec()

    def split_of(self, rule: Rule) -> str:
        digest = hashlib.sha256(f"{self.cfg.split_seed}/{rule.key()}".encode()).digest()
        u = int.from_bytes(digest[:8], "little") / 2**64
        return next(s for s, (low, high) in SPLIT_FRACTIONS.items() if low <= u < high)

    def draw_rule(self, split: str, generator: torch.Generator) -> Rule:
        """A random rule of ``split``: draw from the families until the rule's hash falls in the split.
        (Families with few rules, such as plain reversal, may have none in a split; they are skipped.)"""
        c = self.cfg
        identity = tuple(range(1, c.alphabet + 1))
        for _ in range(10_000):
            family = c.families[int(torch.randint(len(c.families), (1,), generator=generator))]
            permutation = identity
            if "cipher" in family:
                permutation = tuple((torch.randperm(c.alphabet, generator=generator) + 1).tolist())
            transform = "reverse" if "reverse" in family else "rotate" if "rotate" in family else "none"
            shift = int(torch.randint(1, c.max_length, (1,), generator=generator)) if transform == "rotate" else 0
            rule = Rule(permutation, transform, shift)
            if self.split_of(rule) == split:
                return rule
        raise ConfigError(f"data.families={list(c.families)} has no {split} rules; add a cipher family.")

    def sample(self, split: str, num_tasks: int, generator: torch.Generator) -> EpisodeBatch:
        c = self.cfg
        n = c.shots + (c.query if split == "train" else c.eval_query)
        x = torch.full((num_tasks, n, c.max_length), PAD, dtype=torch.long)
        y = torch.full_like(x, PAD)
        for task in range(num_tasks):
            rule = self.draw_rule(split, generator)
            lengths = torch.randint(c.min_length, c.max_length + 1, (n,), generator=generator).tolist()
            for i, length in enumerate(lengths):
                tokens = (torch.randint(1, c.alphabet + 1, (length,), generator=generator)).tolist()
                x[task, i, :length] = torch.tensor(tokens)
                y[task, i, :length] = torch.tensor(rule.apply(tokens))
        return EpisodeBatch(x[:, : c.shots], y[:, : c.shots], x[:, c.shots :], y[:, c.shots :])

    def describe(self) -> dict:
        c = self.cfg
        return {"dataset": "seq_tasks", "alphabet": c.alphabet, "lengths": [c.min_length, c.max_length],
                "shots": c.shots, "query": c.query, "eval_query": c.eval_query, "families": list(c.families),
                "split_seed": c.split_seed}
