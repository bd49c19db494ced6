"""How the held-out batches are cut into pieces: one piece's stored tensors (every target layer's FP output,
kept until the quantized pass of the same piece compares against it, and with output probes their
gradients) must fit a memory budget, so memory grows with one piece, never with the batch size."""

from __future__ import annotations

from collections.abc import Sequence

from sensitivity.io.batches import Batch, batch_len, split_batch
from sensitivity.prepare import LayerInfo

__all__ = [
    "held_pieces",
    "kept_budget_mb",
    "over_budget",
    "probe_copies",
    "probe_pieces",
    "probes_that_fit",
    "sample_mb",
    "split_copies",
    "verify_copies",
]

#: what a piece stores per layer output beside the FP outputs when the output probes run: their
#: gradients (a bfloat16 copy per probe at each layer's output; at its input only the probes before the
#: last wait, also in bfloat16, for the input variants' products: at most one float32 copy per probe in
#: all, counted as one) and the autograd forward's saved activations (about two copies)
_PROBE_COPIES_EXTRA = 2


def probe_copies(probes: int) -> int:
    """Copies of every layer output one piece holds: the FP outputs, and with `probes` > 0 the probes'
    gradients and autograd's saved activations."""
    return 1 + (probes + _PROBE_COPIES_EXTRA if probes else 0)


def split_copies(probes: int) -> int:
    """Copies of every layer output a piece holds when its probes ran on smaller pieces of it
    (`probe_pieces`): the FP outputs and the probes' gradients; the autograd forward's tensors are gone by
    the time the piece's own FP pass runs (no probes: the FP outputs alone)."""
    return 1 + probes


def verify_copies(layers: Sequence[LayerInfo], budget_mb: float, probes: int) -> int:
    """Copies of every layer output the pieces of the reference and the verification passes are sized for,
    so that verifying holds no more than the probed measure pass did: the measure stage's own pieces
    (`split_copies`: the same batch sizes, so no larger temporaries either; on YOLOv8n shapes the verifying
    pass at twice the batch had been the scan's peak), unless one sample's probe pass alone exceeded the
    budget (ResNet-50 shapes, a LiDAR frame): that pass held more than any piece within the budget does,
    and the verification keeps its larger, faster pieces (1, as without probes)."""
    if not probes or budget_mb <= 0 or sample_mb(layers) * probe_copies(probes) > budget_mb:
        return 1
    return split_copies(probes)


def probes_that_fit(budget_mb: float, sample_mb: float) -> int:
    """The most probes whose `probe_copies` of one sample's layer outputs (`sample_mb`) fit `budget_mb`
    (below 1 where not even one does)."""
    return int(budget_mb // sample_mb) - probe_copies(1) + 1


def kept_budget_mb(layers: Sequence[LayerInfo], budget_mb: float, probes: int) -> float:
    """What the exact checks may keep of the FP layer outputs (`KeptOutputs`): what a piece of the probe
    pass held beyond what a verification pass holds itself (a piece is one sample at least), so the scan's
    peak memory does not grow. Nothing where the pieces fit `budget_mb` (edge models: there a kept output
    saves little); most of it for a LiDAR frame whose layer outputs alone exceed the budget, less the FP
    outputs that frame's probe pass no longer holds (`over_budget`: they are computed again)."""
    one = sample_mb(layers)
    held = one * probe_copies(probes)
    if probes and one > budget_mb > 0:
        held -= one
    return max(budget_mb, held) - max(budget_mb, one)


def sample_mb(layers: Sequence[LayerInfo]) -> float:
    """MiB of every target layer's float32 output for one sample (all its calls), from the shapes the
    calibration pass recorded (dim 0 is the batch); 0 when a shape is unknown."""
    if not layers or not all(li.out_shape for li in layers):
        return 0.0
    per_sample = 0.0
    for li in layers:
        numel = 1
        for d in li.out_shape[1:]:
            numel *= d
        per_sample += 4.0 * numel * max(li.calls, 1)
    return per_sample / 2**20


def over_budget(layers: Sequence[LayerInfo], piece: Batch, budget_mb: float) -> bool:
    """Whether one piece's target layer outputs alone exceed `budget_mb`: a piece that could not be cut
    smaller (one sample: a LiDAR frame), whose probes' forward then keeps fewer of them."""
    return budget_mb > 0 and sample_mb(layers) * max(batch_len(piece) or 1, 1) > budget_mb


def _micro_batch(layers: Sequence[LayerInfo], batch: Batch, budget_mb: float) -> int:
    """Samples per piece so that one piece's stored FP outputs (every target layer's, kept until the
    quantized pass of the same piece) stay within `budget_mb`; 0 = do not split."""
    n = batch_len(batch)
    per_sample = sample_mb(layers)
    if not n or budget_mb <= 0 or per_sample <= 0:
        return 0
    fits = int(budget_mb // per_sample)
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


def probe_pieces(layers: Sequence[LayerInfo], piece: Batch, budget_mb: float, probes: int) -> list[Batch]:
    """`piece` (cut to `split_copies`) cut again into the pieces whose autograd forward and probe gradients
    (`probe_copies`) fit `budget_mb`: each runs the probes alone, and the piece's FP pass then runs whole
    (one pass over a bigger batch: small batches cost far more per sample on CPU)."""
    return split_batch(
        piece, _micro_batch(layers, piece, budget_mb / probe_copies(probes) if budget_mb > 0 else 0.0)
    )
