"""Meta-training throughput of metalstm on named workloads, in the one-line format of
../shared/bench/peer_bench.py, so the two can be run back to back and compared:

    python scripts/bench.py W1            # ours
    python ../shared/bench/peer_bench.py loop   # a peer, same shapes (W1 = its defaults)

Workloads (random inputs of the real shapes, as the peer script uses):
  W1  second-order MAML, Conv-4 (64 filters, max-pool, as the peer's), 5-way 1-shot, 15 query per class,
      meta-batch 32, 5 inner steps
  W2  the same, 20-way 1-shot, meta-batch 16
  W3  second-order MAML, LSTM encoder-decoder (hidden 128) on seq_tasks shapes (length 8, 8 symbols),
      5-shot, 10 query, meta-batch 16, 5 inner steps
  W4  the Ravi LSTM optimizer (hidden 20), MLP 40-40 on sinusoid shapes (5-shot, 10 query), meta-batch 25,
      5 inner steps
  W5  the Ravi LSTM optimizer, Conv-4 (32 filters, strided), 5-way 1-shot, 15 query per class, meta-batch 16,
      5 inner steps

One step = meta_loss + backward + Adam step of our MetaLearner, exactly as the training loop runs it.
    python scripts/bench.py W1 --profile  # also: where a step's time goes (operator and input shape), the
                                          # step's floating-point work, and the share of this machine's
                                          # measured peak (a large float32 and bfloat16 matmul) it reaches
Prints the median tasks/s over timed steps after a warm-up, and the peak memory (GPU: allocated by torch;
CPU: the process's peak resident set, and its resident set before the first step: a step's own memory is the
difference).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metalstm.allocator import cpu_allocator, keep_freed_memory  # noqa: E402
from metalstm.core import EpisodeBatch  # noqa: E402
from metalstm.data.seq_tasks import SeqTasks, SeqTasksConfig  # noqa: E402
from metalstm.learners import BASE_LEARNERS, build_base_learner  # noqa: E402
from metalstm.memory import current_bytes  # noqa: E402
from metalstm.meta import META_LEARNERS, build_meta_learner  # noqa: E402
from metalstm.meta.maml import VECTORIZE, MAMLConfig  # noqa: E402
from metalstm.objectives import get_objective  # noqa: E402

MAML = {"name": "maml", "inner_lr": 0.4, "inner_steps": 5}
RAVI = {"name": "lstm_optimizer", "variant": "ravi", "inner_steps": 5}
CONV4 = {"name": "conv4", "filters": 64, "downsample": "maxpool"}
WORKLOADS = {
    "W1": {"ways": 5, "shots": 1, "query": 15, "meta_batch": 32, "learner": CONV4},
    "W2": {"ways": 20, "shots": 1, "query": 15, "meta_batch": 16, "learner": CONV4},
    "W3": {"seq": True, "shots": 5, "query": 10, "meta_batch": 16, "learner": {"name": "lstm_seq2seq", "hidden": 128}},
    "W4": {"regression": True, "shots": 5, "query": 10, "meta_batch": 25, "meta": RAVI,
           "learner": {"name": "mlp", "hidden": [40, 40]}},
    "W5": {"ways": 5, "shots": 1, "query": 15, "meta_batch": 16, "meta": RAVI, "learner": {"name": "conv4", "filters": 32}},
}


def workload(name: str, device: str, **options: object) -> tuple[torch.nn.Module, EpisodeBatch, str]:
    """The meta-learner and a batch of workload ``name``; ``options``: MAML settings that differ from the workload's
    (vectorize, task_chunk, checkpoint_inner, checkpoint_query, inner_steps)."""
    w = WORKLOADS[name]
    if w.get("seq"):
        source = SeqTasks(SeqTasksConfig(shots=w["shots"], query=w["query"]))
        spec = source.spec
        batch = source.sample("train", w["meta_batch"], torch.Generator().manual_seed(0))
        shape = f"seq_tasks shots={w['shots']} query={w['query']}"
    elif w.get("regression"):
        spec = {"task_type": "regression", "input_shape": (1,), "output_dim": 1}
        x = torch.empty(w["meta_batch"], w["shots"] + w["query"], 1).uniform_(-5, 5)
        y = torch.sin(x + torch.rand(w["meta_batch"], 1, 1) * 3) * (0.1 + torch.rand(w["meta_batch"], 1, 1) * 4.9)
        batch = EpisodeBatch(x[:, : w["shots"]], y[:, : w["shots"]], x[:, w["shots"] :], y[:, w["shots"] :])
        shape = f"sinusoid shots={w['shots']} query={w['query']}"
    else:
        spec = {"task_type": "classification", "input_shape": (1, 28, 28), "output_dim": w["ways"]}
        n_s, n_q = w["ways"] * w["shots"], w["ways"] * w["query"]
        labels = torch.arange(w["ways"])
        batch = EpisodeBatch(torch.randn(w["meta_batch"], n_s, 1, 28, 28),
                             labels.repeat_interleave(w["shots"]).expand(w["meta_batch"], -1).contiguous(),
                             torch.randn(w["meta_batch"], n_q, 1, 28, 28),
                             labels.repeat_interleave(w["query"]).expand(w["meta_batch"], -1).contiguous())
        shape = f"ways={w['ways']} shots={w['shots']} query={w['query']}"
    objective = get_objective(spec["task_type"])
    learner = build_base_learner(BASE_LEARNERS.parse(w["learner"]), spec)
    method = {**w.get("meta", MAML), **options}
    meta = build_meta_learner(META_LEARNERS.parse(method), learner, objective.loss, spec)
    meta, batch = meta.to(device), EpisodeBatch(*(t.to(device) for t in batch))
    meta.diagnose = False  # as the training loop runs it between the steps it logs (no gate summaries)
    mode = (f" vectorize={meta.vectorize_mode(batch.support_x)} task_chunk={meta.task_chunk(batch)}"
            + "".join(f" {k}" for k in MAMLConfig.RECOMPUTE if method.get(k))
            if hasattr(meta, "vectorize_mode") else "")
    return meta, batch, f"{shape} {method['name']} meta_batch={w['meta_batch']} steps={method['inner_steps']}{mode}"


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n matrix product in ``dtype`` on ``device``: the practical peak of the chip."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile(step: Callable[[], None], count: Callable[[], None], device: str, seconds: float, rows: int = 15) -> None:
    """Print the step's work (FlopCounterMode: forward, backward and double backward), its GFLOP/s against the
    measured matmul peaks, and where its time goes, by operator and input shape (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        count()
    gflop = counter.get_total_flops() / 1e9
    achieved = gflop / seconds
    fp32, bf16 = matmul_peak(torch.float32, device), matmul_peak(torch.bfloat16, device)
    print(f"work: {gflop:.1f} GFLOP per step, {achieved:.1f} GFLOP/s achieved; 2048^2 matmul peak: float32 "
          f"{fp32:.1f} GFLOP/s ({100 * achieved / fp32:.0f} % reached), bfloat16 {bf16:.1f} GFLOP/s")
    by_op = sorted(counter.get_flop_counts().get("Global", {}).items(), key=lambda kv: -kv[1])
    print("work by operator: " + ", ".join(f"{op} {flops / 1e9:.1f}" for op, flops in by_op[:8]))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        step()
        synchronize(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows, max_name_column_width=40,
                                                             max_shapes_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--iters", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vectorize", default="auto", choices=VECTORIZE,
                        help="MAML's meta_learner.vectorize (auto: vmap, but grouped for Conv-4 on CPU)")
    parser.add_argument("--task-chunk", type=int, default=0, help="MAML's meta_learner.task_chunk (0: auto)")
    parser.add_argument("--checkpoint-inner", action="store_true",
                        help="MAML's meta_learner.checkpoint_inner: each inner step recomputed in the meta-backward")
    parser.add_argument("--checkpoint-query", action="store_true",
                        help="MAML's meta_learner.checkpoint_query: the query pass recomputes its activations")
    parser.add_argument("--steps", type=int, help="inner steps (default: the workload's)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                        help="as trainer.precision: bf16-mixed runs the step's forward under bfloat16 autocast")
    parser.add_argument("--profile", action="store_true", help="also print the step's GFLOP/s against the measured "
                        "matmul peak and its time by operator and input shape")
    args = parser.parse_args()
    keep_freed_memory()  # as train.py and eval.py do
    torch.manual_seed(0)
    options = {"inner_steps": args.steps} if args.steps else {}
    if "meta" not in WORKLOADS[args.workload]:  # MAML's settings
        options.update(vectorize=args.vectorize, task_chunk=args.task_chunk, checkpoint_inner=args.checkpoint_inner,
                       checkpoint_query=args.checkpoint_query)
    meta, batch, shape = workload(args.workload, args.device, **options)
    optimizer = meta.outer_optimizer(1e-3)

    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed",
                              cache_enabled=False)  # as Lightning: each cast its own, gradients summed in float32

    def step() -> None:
        optimizer.zero_grad()
        with autocast:  # as Lightning's bf16-mixed: the forward (and so its double backward) under autocast
            loss = meta.meta_loss(batch).loss
        loss.backward()
        optimizer.step()

    before = current_bytes(torch.device("cpu"))  # the process before its first step: imports, model, data, optimizer
    step()  # warm-up
    rates = []
    for _ in range(args.iters):
        synchronize(args.device)
        start = time.perf_counter()
        step()
        synchronize(args.device)
        rates.append(batch.num_tasks / (time.perf_counter() - start))
    if args.device.startswith("cuda"):
        peak = f"peak_gpu_mem={torch.cuda.max_memory_allocated() / 2**20:.0f}MiB"
    else:
        peak = (f"peak_rss={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f}MiB"
                + (f" before_first_step={before / 2**20:.0f}MiB" if before is not None else "")
                + f" allocator={cpu_allocator().split(' ')[0]}")
    print(f"metalstm-{args.workload} tasks/s {statistics.median(rates):.2f} ({shape} threads={torch.get_num_threads()} "
          f"device={args.device} precision={args.precision} {peak})")
    if args.profile:
        # the work is counted on the same step run one task at a time: torch's counter takes a grouped
        # convolution's backward for a dense one (T times the work it does)
        looped = {"vectorize": "loop", "task_chunk": 1} if "vectorize" in options else {}
        twin, _, _ = workload(args.workload, args.device, **looped)

        def count() -> None:
            twin.meta_loss(batch).loss.backward()

        profile(step, count, args.device, batch.num_tasks / statistics.median(rates))


if __name__ == "__main__":
    main()
