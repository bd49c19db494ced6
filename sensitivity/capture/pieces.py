"""How the held-out batches are cut into pieces: one piece's stored tensors (every target layer's FP output,
kept until the quantized pass of the same piece compares against it, and with output probes their
gradients) must fit a memory budget, so memory grows with one piece, never with the batch size."""

from __future__ import annotations

from collections.abc import Sequence

from sensitivity.io.batches import Batch, batch_len, split_batch
from sensitivity.prepare import LayerInfo

__all__ = ["held_pieces"]


def _micro_batch(layers: Sequence[LayerInfo], batch: Batch, budget_mb: float) -> int:
    """Samples per piece so that one piece's stored FP outputs (every target layer's, kept until the
    quantized pass of the same piece) stay within `budget_mb`; 0 = do not split. Uses the output shapes the
    calibration pass recorded (per sample: dim 0 is the batch)."""
    n = batch_len(batch)
    if not n or budget_mb <= 0 or not layers or not all(li.out_shape for li in layers):
        return 0
    per_sample = 0.0
    for li in layers:
        numel = 1
        for d in li.out_shape[1:]:
            numel *= d
        per_sample += 4.0 * numel * max(li.calls, 1)
    fits = int(budget_mb * 2**20 // max(per_sample, 1.0))
    return 0 if fits >= n else max(1, fits)


def held_pieces(
    layers: Sequence[LayerInfo],
    batches: Sequence[Batch],
    budget_mb: float,
    first_index: int = 0,
    copies: int = 1,
) -> list[tuple[int, Batch]]:
    """(batch index, piece) for the held-out batches cut so that one piece's stored tensors (`copies` per
    layer output: FP outputs, probe gradients) fit `budget_mb` (0: whole batches)."""
    if not batches:
        return []
    micro = _micro_batch(layers, batches[0], budget_mb / max(copies, 1) if budget_mb > 0 else 0.0)
    return [(first_index + i, piece) for i, b in enumerate(batches) for piece in split_batch(b, micro)]
