"""MACs of spconv layers: multiply-accumulates counted from spconv's rule book (the pairs of input and
output sites each kernel tap multiplied), for `--max-fp-macs` and the report's MACs column."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["rule_pairs", "sparse_macs"]


def rule_pairs(module: nn.Module, output: Any) -> int | None:
    """How many (input site, output site) pairs the sparse conv `module` multiplied to give `output` (a
    SparseConvTensor): its rule book's size, which spconv keeps under the layer's `indice_key`. The MACs
    are pairs x Cin x Cout. None where spconv kept no rule book (a layer without `indice_key`).

    The native algorithm (spconv's only one on CPU) stores pairs per kernel tap in ``indice_pair_num``;
    for submanifold convs only the taps before the centre (spconv's CPU kernel reuses tap i's count for
    its mirror kv-1-i, and the centre tap is every active site). The implicit-GEMM algorithm (CUDA) keeps
    a ``pair_fwd`` table [taps, outputs] with -1 where a tap meets no active site."""
    key = getattr(module, "indice_key", None)
    found = getattr(output, "indice_dict", None)
    if key is None or not isinstance(found, dict) or found.get(key) is None:
        return None
    data = found[key]
    counts = getattr(data, "indice_pair_num", None)
    if isinstance(counts, torch.Tensor):
        if not getattr(data, "is_subm", False):
            return int(counts.sum())
        center = counts.numel() // 2
        return 2 * int(counts[:center].sum()) + int(data.out_indices.shape[0])
    table = getattr(data, "pair_fwd", None)
    if isinstance(table, torch.Tensor):
        return int((table >= 0).sum())
    return None


def sparse_macs(
    module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], output: Any = None
) -> int:
    """For the whole batch (sparse tensors have no per-sample dim): rule-book pairs x Cin x Cout, exact
    where spconv kept the rule book in `output` (layers with an `indice_key`), else an upper bound, as if
    every active output site saw a full kernel of active inputs."""
    w = module.weight  # spconv layout [Cout, k..., Cin]
    pairs = rule_pairs(module, output)
    if pairs is not None:
        return pairs * w.shape[0] * w.shape[-1]  # type: ignore[index]
    return out_shape[0] * w.numel() if out_shape else 0  # type: ignore[union-attr]
