"""The output probes' random signs: drawn per piece from the piece's own content (a batch gets the same probes
whichever rank or position it has), and the scalar whose gradient is one probe at every layer."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from sensitivity.capture.outputs import OutputEnergy
from sensitivity.io.batches import Batch, batch_tensors

__all__ = ["piece_generator", "probe_loss"]


def probe_loss(
    flat: dict[str, Tensor], gen: torch.Generator, energy: OutputEnergy | None = None
) -> Tensor | None:
    """Σ_o rᵀ y_o / sqrt(E_o) with random signs r (E_o: the output's energy over all held-out batches; the
    piece's own ‖y_o‖ without one): its gradient is one probe (None: nothing to differentiate)."""
    loss: Tensor | None = None
    for key, y in flat.items():
        if not y.requires_grad or not y.is_floating_point():
            continue
        scale = energy.scale(key) if energy is not None else None
        norm = scale if scale is not None else float(y.detach().double().norm())
        if not norm > 0.0 or norm == float("inf"):
            continue
        r = torch.randint(0, 2, y.shape, generator=gen).to(device=y.device, dtype=y.dtype).mul_(2).sub_(1)
        term = (r * y).sum() / norm
        loss = term if loss is None else loss + term
    return loss


def piece_generator(seed: int, batch: Batch) -> torch.Generator:
    """The probes' random signs for one piece, drawn from the piece's content: a batch gets the same probes
    whichever rank or position it has (torchrun shards reproduce the single-process scan)."""
    h = hashlib.sha256(str(seed).encode())
    for where, t in batch_tensors(batch, "batch"):
        flat = t.detach().reshape(-1)
        head = flat[:4096].to("cpu", torch.float64) if t.is_floating_point() else flat[:4096].cpu().double()
        h.update(f"{where}{tuple(t.shape)}".encode() + head.numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "little") & (2**63 - 1))
