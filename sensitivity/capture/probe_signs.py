"""The output probes' random signs, drawn from the data's own content, and the scalar whose gradient is one
probe at every layer.

Per sample where the piece is a batch of samples: a sample gets the same signs whichever piece, part or rank
it is scanned in, so the output-referred estimates do not depend on how `--stored-mb` cuts the held-out
batches (nor on torchrun's shards). Per piece otherwise (a dict batch, an output whose dim 0 is not the
batch): the piece's content still fixes them."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from sensitivity.capture.outputs import OutputEnergy
from sensitivity.io.batches import Batch, batch_tensors, split_batch

__all__ = ["ProbeSigns", "probe_loss"]


def _generator(seed: int, batch: Batch) -> torch.Generator:
    """A generator seeded from `seed` and the batch's content (the first 4096 values of each tensor, with
    where it sits and its shape)."""
    h = hashlib.sha256(str(seed).encode())
    for where, t in batch_tensors(batch, "batch"):
        flat = t.detach().reshape(-1)
        head = flat[:4096].to("cpu", torch.float64) if t.is_floating_point() else flat[:4096].cpu().double()
        h.update(f"{where}{tuple(t.shape)}".encode() + head.numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "little") & (2**63 - 1))


class ProbeSigns:
    """One piece's source of probe signs: a generator per sample where the piece splits into samples
    (`split_batch`: a tensor, or tensors sharing dim 0), one for the piece otherwise. A one-sample piece's
    generator is its sample's, so the same sample draws the same signs alone or within a larger piece."""

    def __init__(self, seed: int, batch: Batch) -> None:
        self.piece = _generator(seed, batch)
        samples = split_batch(batch, 1)  # one per sample, or the batch whole where it does not split
        self.samples = [_generator(seed, s) for s in samples] if len(samples) > 1 else None

    def draw(self, y: Tensor) -> Tensor:
        """±1 in y's shape and dtype: each sample's row from its own generator where y's dim 0 is the
        piece's samples, else all from the piece's."""
        if self.samples is not None and y.dim() > 0 and y.shape[0] == len(self.samples):
            codes = torch.stack([torch.randint(0, 2, y.shape[1:], generator=g) for g in self.samples])
        else:
            codes = torch.randint(0, 2, y.shape, generator=self.piece)
        return codes.to(device=y.device, dtype=y.dtype).mul_(2).sub_(1)


def probe_loss(
    flat: dict[str, Tensor], signs: ProbeSigns, energy: OutputEnergy | None = None
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
        term = (signs.draw(y) * y).sum() / norm
        loss = term if loss is None else loss + term
    return loss
