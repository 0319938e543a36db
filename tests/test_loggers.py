"""Dashboards: a run's metrics and config read back from TensorBoard's event files and W&B's offline run."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from conftest import run_script
from test_train_eval import run_dir_of

WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) records


def wandb_records(path: Path) -> list[object]:
    """Every protobuf Record of an offline W&B run file (wandb's own reader lives in its Go core)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, records = path.read_bytes(), 7, b"", []
    assert data.startswith(b":W&B")
    while pos + 7 <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < 7:  # block trailer too short for a header: padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
        if kind in (0, 1, 4):
            chunks = b""
    return records


def key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_tensorboard_and_wandb_offline_hold_the_logged_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_script("train.py", "+experiment=sinusoid", "logger=[csv,tensorboard,wandb]", "trainer.max_steps=40",
                        "trainer.val_check_interval=20", "trainer.log_every_n_steps=10", "data.test_tasks=20",
                        cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    test_mse = json.loads((run / "results.json").read_text())["metrics"]["test/mse"]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "val/mse", "test/mse"} <= set(scalars)
    assert abs(events.Scalars("test/mse")[-1].value - test_mse) < 1e-5

    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(wandb_file)
    history = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    assert any("train/loss" in h for h in history) and any("val/mse" in h for h in history)
    assert abs(next(h["test/mse"] for h in history if "test/mse" in h) - test_mse) < 1e-6
    (run_record,) = [r.run for r in records if r.HasField("run")]
    assert run_record.run_group == "sinusoid" and run_record.job_type == "train" and run_record.project == "metalstm"
    config_keys = {key(item) for r in records if r.HasField("config") for item in r.config.update}
    assert {"meta_learner", "data", "base_learner", "optim", "seed"} <= config_keys

    # eval.py logs to the same project and group, as job_type eval
    evaluation = run_script("eval.py", f"run_dir={run}", "logger=wandb", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    (eval_file,) = tmp_path.glob("outputs/eval/*/*/wandb/offline-run-*/run-*.wandb")
    eval_records = wandb_records(eval_file)
    (eval_run,) = [r.run for r in eval_records if r.HasField("run")]
    assert eval_run.run_group == "sinusoid" and eval_run.job_type == "eval" and eval_run.run_id != run_record.run_id
    eval_history = [{key(i): json.loads(i.value_json) for i in r.history.item} for r in eval_records if r.HasField("history")]
    assert abs(next(h["test/mse"] for h in eval_history if "test/mse" in h) - test_mse) < 1e-6
