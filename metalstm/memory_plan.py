"""What a run's training steps will need in memory, measured before the first step, and the settings that fit.

Probe steps (meta-loss and backward, no update) on one task and on several tasks of real training batches, with
those tasks' graphs alive together, give the memory of a step as fixed + per_task * alive, where ``alive`` is the
number of tasks whose graphs a step holds at once: MAML's ``task_chunk``, the whole meta-batch for the other
methods. The probes restore every parameter, buffer and random state they touch, so training runs as it would
have. On a CPU the measure is the process's resident set (Linux), on a GPU the memory torch allocates.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from metalstm.allocator import release_freed_memory
from metalstm.core import EpisodeBatch
from metalstm.errors import ConfigError, ResourceError
from metalstm.memory import GIB, available_bytes, current_bytes, is_out_of_memory, peak_bytes, reset_peak

log = logging.getLogger(__name__)
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: object, key: str = "memory_budget") -> int | None:
    """``8GB``, ``512MiB``, ``1.5GB`` or a number of bytes -> bytes; None -> None."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}={value!r} is not an amount of memory; write it as a number with a unit, e.g. "
                          f"{key}=8GB or {key}=512MiB (units: {', '.join(u for u in UNITS if u)}), or null for no budget.")
    return int(float(match.group(1)) * UNITS[unit])


@dataclass(frozen=True)
class Estimate:
    """A step's memory above the process's use before training: fixed + per_task * alive (bytes)."""

    base: int  # the process's memory before the probes (CPU: resident; GPU: allocated)
    fixed: int
    per_task: int

    def need(self, alive: int) -> int:
        return self.base + self.fixed + self.per_task * alive

    def most_alive(self, limit: int) -> int:
        """The most tasks alive at once whose step fits ``limit`` (0: not even one)."""
        room = limit - self.base - self.fixed
        if room < self.per_task:
            return 0
        return room // self.per_task if self.per_task else 2**31


@contextlib.contextmanager
def restored(meta_learner: torch.nn.Module) -> Iterator[None]:
    """Run probes without a trace: parameters, buffers (BatchNorm running statistics), gradients and the random
    number generators are as before."""
    state = copy.deepcopy(meta_learner.state_dict())
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        meta_learner.load_state_dict(state)
        meta_learner.zero_grad(set_to_none=True)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def probe_peaks(meta_learner: torch.nn.Module, batches: list[tuple[EpisodeBatch, int | None]], device: torch.device,
                precision: str, recompute: dict[str, bool] | None = None,
                evaluate: bool = False) -> tuple[int, list[int]] | None:
    """The process's memory before the probes and each probe step's peak above it: a meta-loss and backward on each
    (batch, task_chunk) in turn (task_chunk None: as configured), with MAML's ``recompute`` settings (None: as
    configured); with ``evaluate``, a validation step instead (adaptation and query outputs, no meta-gradient).
    None where this platform cannot measure it."""
    if device.type == "cpu":
        release_freed_memory()  # memory freed earlier (reading the data) would hide the probes' growth
    base = current_bytes(device)
    if base is None or peak_bytes(device) is None:
        return None
    cfg = getattr(meta_learner, "cfg", None)
    knobs = {k: getattr(cfg, k) for k in ("task_chunk", *getattr(cfg, "RECOMPUTE", ())) if hasattr(cfg, k)}
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(precision).split("-")[0])
    peaks = []
    with restored(meta_learner):
        reset_peak(device)  # on a CPU the high-water mark only rises: probe in growing order
        try:
            for batch, chunk in batches:
                if "task_chunk" in knobs:
                    cfg.task_chunk = knobs["task_chunk"] if chunk is None else chunk
                for key, value in (recompute or {}).items():
                    if key in knobs:
                        setattr(cfg, key, value)
                if device.type == "cuda":
                    reset_peak(device)
                batch = EpisodeBatch(*(t.to(device) for t in batch))
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False):
                    loss = None if evaluate else meta_learner.meta_loss(batch).loss
                    if evaluate:
                        meta_learner.predict(batch)
                if loss is not None:
                    loss.backward()
                meta_learner.zero_grad(set_to_none=True)
                del loss, batch
                peaks.append(max((peak_bytes(device) or 0) - base, 0))
        finally:
            for k, v in knobs.items():
                setattr(cfg, k, v)
    return base, peaks


def measure(meta_learner: torch.nn.Module, batch: EpisodeBatch, device: torch.device, precision: str,
            recompute: dict[str, bool] | None = None) -> Estimate | None:
    """The memory of a training step as fixed + per_task * alive, from probe steps on the first task of ``batch``
    and on all its tasks, their graphs alive together; None where this platform cannot measure it."""
    first = EpisodeBatch(*(t[:1] for t in batch))
    probed = probe_peaks(meta_learner, [(first, 1), (batch, batch.num_tasks)], device, precision, recompute)
    if probed is None:
        return None
    base, (one, all_tasks) = probed
    per_task = max(all_tasks - one, 0) // max(batch.num_tasks - 1, 1)
    return Estimate(base=base, fixed=max(one - per_task, 0), per_task=per_task)


def alive_tasks(meta_learner: torch.nn.Module, batch_tasks: int, device: torch.device) -> int:
    """How many tasks' graphs a training step of ``batch_tasks`` tasks holds at once."""
    cfg = getattr(meta_learner, "cfg", None)
    if cfg is not None and hasattr(cfg, "task_chunk") and hasattr(meta_learner, "task_chunk"):
        probe = EpisodeBatch(*(torch.empty(batch_tasks, 1, 1, device=device) for _ in range(4)))
        return meta_learner.task_chunk(probe)
    return batch_tasks


@dataclass(frozen=True)
class Plan:
    need: int  # bytes, the estimated peak of a training step (whole process on a CPU)
    limit: int | None  # bytes: the budget, or the memory this process can have
    changes: dict[str, object]  # settings changed to fit the budget (empty: as configured)


# of the limit: training steps peak above their probe by what the training loop holds (the next batch, fetched
# ahead) and by the heap's layout, which varies run to run (W1 and W2 shapes: 1-8 % in nine runs)
MARGIN = 0.9


def plan(meta_learner: torch.nn.Module, draw: Callable[[int], EpisodeBatch], batch_tasks: int, device: torch.device,
         precision: str, budget: int | None, drivers: str, evaluation: EpisodeBatch | None = None) -> Plan | None:
    """Measure a step's memory; refuse, before training, a run that does not fit the machine's free memory; under
    a ``budget``, choose MAML's task_chunk, checkpoint_inner and checkpoint_query to fit it: as configured if that
    fits; else, in turn, as configured, with the inner loop checkpointed, and with the query pass recomputed too
    (where the base learner can), the largest chunk that fits (at least 2 tasks, 1 in the last).
    ``draw(n)``: n training tasks; ``evaluation``: a validation batch (data.eval_batch_size tasks), or None.
    Probes on 1 and 2 tasks give a line (fixed + per_task * alive) that proposes a chunk; two whole steps with it
    (the second grows into the heap the first left, as training's steps do),
    then a validation step on ``evaluation`` (MAML evaluates task_chunk tasks at a time), measured, decide (a step's
    resident set grows faster than the line: W1's measured 18 % above it), halving the chunk until both fit. A
    probe that runs out of memory counts as not fitting. None where memory cannot be measured here."""
    pair = draw(2)
    try:
        estimate = measure(meta_learner, pair, device, precision)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise refusal(None, available_bytes(device), device, "the memory this machine has free", drivers,
                      "even two tasks' probe step ran out of memory; lower the ways, shots or query per task, or "
                      "data.image_size, or the network's width") from None
    if estimate is None:
        return None
    alive = alive_tasks(meta_learner, batch_tasks, device)
    free = available_bytes(device)
    machine = None if free is None else estimate.base + free
    limit = min(x for x in (budget, machine) if x is not None) if (budget or machine) else None
    which = "the budget memory_budget" if budget is not None and limit == budget else "the memory this machine has free"
    batch = draw(batch_tasks)
    measured: list[int] = []

    def step_need(chunk: int | None, recompute: dict[str, bool] | None = None) -> int | None:
        """Two whole steps' measured need, or a validation step's where that is more (each the process's memory
        before it plus its peak, each from the memory in use: training hands the heap's free pages back between
        the two, module.phase_starts); None: out of memory."""
        try:
            base, peaks = probe_peaks(meta_learner, [(batch, chunk)] * 2, device, precision, recompute)
            need = base + max(peaks)
            if evaluation is not None:
                base, peaks = probe_peaks(meta_learner, [(evaluation, chunk)], device, precision, evaluate=True)
                need = max(need, base + max(peaks))
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            return None
        measured.append(need)
        return need

    if limit is None:
        return Plan(step_need(None) or estimate.need(alive), None, {})
    target = int(MARGIN * limit)
    need: int | None = estimate.need(alive)
    if estimate.base + 1.5 * (need - estimate.base) <= limit:  # the line says it may fit: measure the step itself
        need = step_need(None)
        if need is not None and need <= target:
            return Plan(need, limit, {})
    cfg = getattr(meta_learner, "cfg", None)
    second_order = cfg is not None and hasattr(cfg, "checkpoint_inner") and not cfg.first_order
    settings = "data.meta_batch_size, the ways, shots or query per task (data.eval_query at validation and test), " + (
        "or data.image_size" if hasattr(cfg, "task_chunk") else "data.image_size, or data.eval_batch_size (the tasks "
        "evaluated at once)")
    if budget is None:  # no budget to fit: the run stops, saying what would fit
        chunking = ("set memory_budget (e.g. memory_budget=" + f"{int(MARGIN * limit / 2**20)}MiB) and metalstm chooses "
                    "meta_learner.task_chunk and checkpoint_inner to fit it, or set them yourself; or lower "
                    if second_order else "set meta_learner.task_chunk=1 or lower " if hasattr(cfg, "task_chunk") else "lower ")
        raise refusal(need, limit, device, which, drivers, chunking + settings)
    if second_order:
        configured = {key: getattr(cfg, key) for key in cfg.RECOMPUTE}
        tiers = [configured, {**configured, "checkpoint_inner": True}]
        if meta_learner.learner.recomputes():
            tiers.append({"checkpoint_inner": True, "checkpoint_query": True})
        tiers = [tier for i, tier in enumerate(tiers) if tier not in tiers[:i]]
        for tier in tiers:
            line = estimate if tier == configured else measure(meta_learner, pair, device, precision, tier)
            if line is None:
                continue
            smallest = 1 if tier is tiers[-1] else 2  # one task at a time only with every recomputation on
            chunk = min(line.most_alive(target), alive - 1 if tier == configured else alive)
            while chunk >= smallest:
                chunk_need = step_need(chunk, tier)
                if chunk_need is not None and chunk_need <= target:
                    changes: dict[str, object] = {"task_chunk": chunk}
                    changes.update({key: True for key, value in tier.items() if value and not configured[key]})
                    return fitted(meta_learner, Plan(chunk_need, limit, changes))
                chunk = chunk // 2 if chunk > smallest else 0
        every = " and ".join(f"meta_learner.{key}=true" for key, value in tiers[-1].items() if value)
        raise refusal(min(measured) if measured else need, limit, device, which, drivers,
                      f"even with meta_learner.task_chunk=1 and {every} (one task at a time, recomputed): "
                      f"lower {settings}, use fewer meta_learner.inner_steps, set meta_learner.first_order=true, "
                      "or raise memory_budget")
    raise refusal(need, limit, device, which, drivers, f"lower {settings}, or raise memory_budget")


def refusal(need: int | None, limit: int | None, device: torch.device, which: str, drivers: str,
            advice: str) -> ResourceError:
    amount = f"about {need / GIB:.2f} GiB" if need is not None else "more memory than it could have (a probe step ran out)"
    room = f" ({limit / GIB:.2f} GiB, of which {MARGIN:.0%} is used)" if limit is not None else ""
    return ResourceError(
        f"A training step of this run needs {amount} on {device} (measured by probe steps before training), more "
        f"than {which}{room}; nothing was trained. This run has {drivers}. To fit: {advice}.")


def fitted(meta_learner: torch.nn.Module, chosen: Plan) -> Plan:
    for key, value in chosen.changes.items():
        setattr(meta_learner.cfg, key, value)
    log.info("memory_budget: %s (a step's estimated peak %.2f GiB, limit %.2f GiB)",
             ", ".join(f"meta_learner.{k}={v}" for k, v in chosen.changes.items()), chosen.need / GIB, chosen.limit / GIB)
    return chosen
