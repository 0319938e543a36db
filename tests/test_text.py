"""data=text: few-shot text classification from a folder of .txt files per class or from JSON Lines."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TEXT_CLASSES, corpus_texts, make_text_corpus
from metalstm.data import DATASETS
from metalstm.data.text import PAD, UNKNOWN, TextConfig, build_text, words
from metalstm.errors import ConfigError, DataError


def config(root, **settings) -> TextConfig:
    return DATASETS.parse({"name": "text", "root": str(root), "ways": 2, "length": 12, "vocab_size": 100,
                           **settings}).config


def test_both_layouts_give_the_same_classes_texts_and_tokens(tmp_path):
    folders = build_text(config(make_text_corpus(tmp_path / "folders", "folders")))
    jsonl = build_text(config(make_text_corpus(tmp_path / "jsonl", "jsonl")))
    assert sorted(folders.info["class_names"]["train"] + folders.info["class_names"]["val"]
                  + folders.info["class_names"]["test"]) == sorted(TEXT_CLASSES)
    assert folders.info["class_names"] == jsonl.info["class_names"]
    # the same texts in the same order within each class (files sorted by name, lines in file order)
    assert torch.equal(folders.images, jsonl.images) and torch.equal(folders.counts, jsonl.counts)
    assert folders.spec == {"task_type": "classification", "input_shape": (12,), "output_dim": 2, "vocab": 100}


def test_a_single_jsonl_file_is_a_corpus(tmp_path):
    root = make_text_corpus(tmp_path / "jsonl", "jsonl")
    lines = (root / "a.jsonl").read_text() + (root / "b.jsonl").read_text()
    (tmp_path / "all.jsonl").write_text(lines)
    assert build_text(config(tmp_path / "all.jsonl")).info["class_names"] == build_text(config(root)).info["class_names"]


def test_texts_are_encoded_with_the_training_classes_words_only(tmp_path):
    tasks = build_text(config(make_text_corpus(tmp_path / "c")))
    names = {s: tasks.info["class_names"][s] for s in ("train", "val", "test")}
    corpus = corpus_texts()
    index = sorted(TEXT_CLASSES)
    for split, unseen_ok in (("train", False), ("test", True)):
        for name in names[split]:
            row = tasks.images[index.index(name)]
            first = words(corpus[name][0])[:12]
            ids = row[0][: len(first)]
            assert (row[0][len(first):] == PAD).all()  # padded after the text
            topical = [i for i, w in zip(ids.tolist(), first) if w.startswith(name)]
            # a test class's own topic words never occur in training texts: unknown; a train class's are known
            assert all((i == UNKNOWN) == unseen_ok for i in topical), (split, name, ids, first)


def test_episodes_are_token_ids_the_lstm_encoder_embeds(tmp_path):
    from metalstm.learners import BASE_LEARNERS, build_base_learner

    tasks = build_text(config(make_text_corpus(tmp_path / "c"), shots=1, query=3))
    batch = tasks.sample("train", 4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 2, 12) and batch.support_x.dtype == torch.long
    assert batch.query_x.shape == (4, 6, 12) and int(batch.support_x.max()) < 100
    learner = build_base_learner(BASE_LEARNERS.parse({"name": "lstm_encoder", "hidden": 8, "input_dim": 4}), tasks.spec)
    assert learner(batch.query_x[0]).shape == (6, 2)


def test_long_texts_are_cut_and_small_classes_left_out(tmp_path):
    root = make_text_corpus(tmp_path / "c")
    (root / "tiny").mkdir()
    (root / "tiny" / "only.txt").write_text("one text alone")
    tasks = build_text(config(root, length=3, query=3))
    assert tasks.images.shape[-1] == 3 and (tasks.images[..., :3] != PAD).all(dim=-1)[tasks.images.sum(-1) > 0].all()
    assert tasks.info["left_out_classes"] == ["tiny"]


def test_bad_input_is_named_with_its_file_and_line(tmp_path):
    root = make_text_corpus(tmp_path / "j", "jsonl")
    with open(root / "b.jsonl", "a") as f:
        f.write(json.dumps({"body": "no text field", "label": "x"}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl, line 41: not a JSON object with 'text' and 'label'"):
        build_text(config(root))
    (root / "b.jsonl").write_text('{"text": "a", "label": "x"}\n{broken\n')
    with pytest.raises(DataError, match=r"b\.jsonl, line 2"):
        build_text(config(root))
    with pytest.raises(DataError, match="does not exist"):
        build_text(config(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither .jsonl files nor sub-folders"):
        build_text(config(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="data=text needs data.root"):
        DATASETS.parse({"name": "text"})
