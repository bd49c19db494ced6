"""Scale-out with torch.distributed: each rank scans its shard of the batches; statistics all-reduce.

Under `torchrun --nproc_per_node N -m sensitivity scan ...` every rank loads the model and the batch list,
takes batches i with i % N == rank (fitting and held-out batches sharded separately, after the same
split), and combines: observer minima / maxima / per-channel maxima (MIN / MAX), calibrator states (their
own reduce ops), histograms (SUM over the same fixed range), and every error accumulator (sums SUM,
maxima MAX). Decisions are then taken on identical numbers on every rank, and rank 0 writes the report.
Maxima and counts equal the single-process scan exactly; sums to float64 summation-order rounding.

Histogram calibrators (percentile / entropy / mse) grow their range batch by batch, which cannot be
merged exactly; distributed, they run one extra max pass first and then histogram over that global
range (the same as pytorch-quantization fed all batches as one batch; a single process keeps the
growing range for pytorch-quantization parity).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from sensitivity.capture.observe import LayerObserver, RangeHistogram
from sensitivity.capture.passes import PassResult
from sensitivity.metrics import ErrorStats
from sensitivity.quant.calibrators import DyadicHistogram

__all__ = [
    "broadcast",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "reduce_histograms_",
    "reduce_observers_",
    "reduce_pass_",
    "session",
    "shard",
    "sum_floats",
    "world_size",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


@contextlib.contextmanager
def session(device: str = "cpu") -> Iterator[str]:
    """For a command run under torchrun: join the group on entry (yields the device this rank uses: `cuda`
    becomes `cuda:LOCAL_RANK`), and on the way out wait for every rank and leave the group. A plain
    process (WORLD_SIZE unset or 1) gets `device` back and nothing else happens."""
    init_from_env(device)
    if device == "cuda" and is_distributed():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        yield device
    finally:
        if is_distributed():
            dist.barrier()
            dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share: items i with i % world == rank."""
    return list(items[rank() :: world_size()]) if is_distributed() else list(items)


def _reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    t = t.detach().clone().cpu()
    dist.all_reduce(t, op=ops[op])
    return t


def reduce_observers_(observers: dict[str, LayerObserver]) -> None:
    """All-reduce every layer's input statistics and calibrator state in place."""
    if not is_distributed():
        return
    names = sorted(observers)
    mins = _reduce(torch.tensor([observers[n].min_value for n in names], dtype=torch.float64), "min")
    maxs = _reduce(torch.tensor([observers[n].max_abs for n in names], dtype=torch.float64), "max")
    counts = _reduce(torch.tensor([observers[n].batches for n in names], dtype=torch.float64), "sum")
    for i, n in enumerate(names):
        obs = observers[n]
        obs.min_value, obs.max_abs, obs.batches = float(mins[i]), float(maxs[i]), int(counts[i])
        for attr in ("chan_absmax", "col_absmax"):
            local = getattr(obs, attr)
            size = torch.tensor([local.numel() if local is not None else -1], dtype=torch.float64)
            size = int(_reduce(size, "max"))
            if size < 0:
                continue
            value = local if local is not None else torch.zeros(size)
            setattr(obs, attr, _reduce(value.float(), "max"))
        state = obs.calibrator.state()
        ops = obs.calibrator.reduce_ops()
        merged = {k: _reduce(v, ops[k]) for k, v in state.items()}
        obs.calibrator = obs.new_calibrator()  # empty, same configuration: merging copies the reduced state
        obs.calibrator.merge_state(merged)
        if obs.range_hist is not None:
            _reduce_range_hist(obs.range_hist)


def _reduce_range_hist(hist: DyadicHistogram) -> None:
    """Exact: every rank grows its histogram to the highest top, then the counts add up."""
    top = int(_reduce(torch.tensor([hist.exp], dtype=torch.int64), "max"))
    if top != hist.exp:
        hist.grow_to(top)
    hist.hist, hist.neg = _reduce(hist.hist, "sum"), _reduce(hist.neg, "sum")
    hist.zeros = float(_reduce(torch.tensor([hist.zeros], dtype=torch.float64), "sum"))
    hist.max = float(_reduce(torch.tensor([hist.max], dtype=torch.float64), "max"))
    hist.changed()


def reduce_histograms_(histograms: dict[str, RangeHistogram]) -> None:
    if not is_distributed():
        return
    for n in sorted(histograms):
        histograms[n].counts = _reduce(histograms[n].counts, "sum")


def _pack(stats: Sequence[ErrorStats]) -> tuple[torch.Tensor, torch.Tensor]:
    sums = (
        torch.stack([s.to_tensor()[:-1] for s in stats]) if stats else torch.zeros(0, 8, dtype=torch.float64)
    )
    maxs = torch.tensor([s.max_abs_err for s in stats], dtype=torch.float64)
    return sums, maxs


def _reduce_stats(table: dict[Any, ErrorStats]) -> None:
    keys = _union_keys(list(table))
    stats = [table.get(k, ErrorStats()) for k in keys]
    sums, maxs = _pack(stats)
    sums, maxs = _reduce(sums, "sum"), _reduce(maxs, "max")
    table.clear()
    for i, k in enumerate(keys):
        table[k] = ErrorStats.from_tensor(torch.cat([sums[i], maxs[i : i + 1]]))


def _union_keys(keys: list[Any]) -> list[Any]:
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, sorted(keys, key=repr))
    return sorted({k for part in gathered for k in part}, key=repr)


def reduce_pass_(result: PassResult) -> None:
    """All-reduce a pass's accumulators; the first non-finite layer is the earliest over all ranks."""
    if not is_distributed():
        return
    for table in (result.iso, result.cum, result.out):
        _reduce_stats(table)  # type: ignore[arg-type]
    result.out_rel, result.out_weight, result.pred_weight = sum_floats(
        result.out_rel, result.out_weight, result.pred_weight
    )
    pred_keys = _union_keys(list(result.pred))
    pred = _reduce(torch.tensor([result.pred.get(k, 0.0) for k in pred_keys], dtype=torch.float64), "sum")
    result.pred.clear()
    result.pred.update(dict(zip(pred_keys, pred.tolist(), strict=True)))
    grad_keys = _union_keys(list(result.grad_max))
    grads = _reduce(
        torch.tensor([result.grad_max.get(k, 0.0) for k in grad_keys], dtype=torch.float64), "max"
    )
    result.grad_max.clear()
    result.grad_max.update(dict(zip(grad_keys, grads.tolist(), strict=True)))
    calls_keys = _union_keys(list(result.calls))
    calls = _reduce(
        torch.tensor([float(result.calls.get(k, 0)) for k in calls_keys], dtype=torch.float64), "sum"
    )
    result.calls.clear()
    result.calls.update({k: int(c) for k, c in zip(calls_keys, calls.tolist(), strict=True)})
    found: list[Any] = [None] * world_size()
    mine = (result.first_nonfinite_rank, result.first_nonfinite, result.nonfinite_upstream)
    dist.all_gather_object(found, mine)
    best = min((f for f in found if f[1] is not None), key=lambda f: f[0], default=(math.inf, None, []))
    result.first_nonfinite_rank, result.first_nonfinite, result.nonfinite_upstream = (
        best[0],
        best[1],
        list(best[2]),
    )


def sum_floats(*values: float) -> tuple[float, ...]:
    """The sums over all ranks of a few numbers (the values themselves when not distributed)."""
    if not is_distributed():
        return values
    return tuple(_reduce(torch.tensor(values, dtype=torch.float64), "sum").tolist())


def broadcast(value: T) -> T:
    """Rank 0's value on every rank (e.g. a user metric evaluated once)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
