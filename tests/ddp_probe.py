"""One meta-training step under Lightning DDP on CPU; every rank saves what it saw.

Run as ``python tests/ddp_probe.py OUT_DIR DEVICES``: Lightning's launcher re-runs this script for
each further rank. Each rank writes OUT_DIR/rank<r>.pt: the initial parameters, its share of the
meta-batch, and the meta-gradient after DDP's all-reduce (read at the optimizer step).
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metalstm.assembly import build  # noqa: E402

CONFIG = {
    "seed": 3,
    "data": {"name": "sinusoid", "shots": 5, "query": 5, "meta_batch_size": 4, "val_tasks": 2, "test_tasks": 2},
    "base_learner": {"name": "mlp", "hidden": [16, 16]},
    # loop: a task at a time, each meta-gradient taken in the forward (task_chunk): DDP sees one ordinary backward
    "meta_learner": {"name": "maml", "inner_lr": 0.1, "inner_steps": 2, "vectorize": "loop"},
    "optim": {"meta_lr": 0.001},
}


class Probe(pl.Callback):
    def __init__(self, out: Path):
        self.out, self.record = out, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.record["initial"] = {k: v.detach().clone() for k, v in module.meta_learner.state_dict().items()}
        self.record["batch"] = [t.clone() for t in batch]

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.record["grads"] = {n: p.grad.clone() for n, p in module.meta_learner.named_parameters()}
        self.record["world"] = trainer.world_size
        torch.save(self.record, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    pl.seed_everything(CONFIG["seed"], verbose=False)
    module, datamodule = build(CONFIG)
    trainer = pl.Trainer(strategy="ddp" if devices > 1 else "auto", accelerator="cpu", devices=devices, max_steps=1,
                         limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, inference_mode=False,
                         callbacks=[Probe(out)], default_root_dir=out)
    trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    main()
