"""Kept FP outputs of real spconv layers: an exact check serves the sparse layers whose input (active sites
and features) is the FP one, bit-identical to one that runs them, and runs a sparse layer whose features
differ in one bit or whose sites differ."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("spconv.pytorch", reason="the lidar extra (spconv) is not installed")

import spconv.pytorch as sp

from sensitivity.capture.kept import KeptOutputs
from sensitivity.integrations import spconv as _spconv_support  # noqa: F401  (registers the sparse layers)
from tests.capture.test_kept import kept_setup

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

SHAPE = [8, 16, 16]  # z, y, x


class SparseTrunk(nn.Module):
    """Two submanifold convs sharing a rule book, a strided sparse conv, then a dense BEV head: what a
    CenterPoint's exact check runs in FP before the head layer it quantizes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = sp.SubMConv3d(4, 16, 3, padding=1, indice_key="s")
        self.mid = sp.SubMConv3d(16, 16, 3, padding=1, indice_key="s")
        self.down = sp.SparseConv3d(16, 16, 3, stride=2, padding=1, indice_key="d")
        self.head = nn.Conv2d(16 * 4, 8, 3, padding=1)

    def forward(self, batch: dict) -> dict:
        x = sp.SparseConvTensor(batch["features"], batch["indices"], SHAPE, 1)
        h = self.stem(x)
        h = self.mid(h.replace_feature(F.relu(h.features)))
        h = self.down(h.replace_feature(F.relu(h.features)))
        dense = h.dense()  # [1, 16, 4, 8, 8]
        return {"out": self.head(dense.reshape(1, -1, *dense.shape[3:]))}


def _frame(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(SHAPE[0] * SHAPE[1] * SHAPE[2], generator=g)[:300]
    z, rest = flat // (SHAPE[1] * SHAPE[2]), flat % (SHAPE[1] * SHAPE[2])
    idx = torch.stack([torch.zeros_like(z), z, rest // SHAPE[2], rest % SHAPE[2]], 1).int()
    return {"features": torch.randn(len(idx), 4, generator=g), "indices": idx}


def _sites():  # type: ignore[no-untyped-def]
    return ((z, y, x) for z in range(SHAPE[0]) for y in range(SHAPE[1]) for x in range(SHAPE[2]))


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # spconv's CPU kernels race with several threads (CENTERPOINT.md)


def _setup():  # type: ignore[no-untyped-def]
    return kept_setup(SparseTrunk, [_frame(i) for i in range(3)], 2)


def test_exact_checks_serve_sparse_layers_bit_identically() -> None:
    prep, qmodel, names, naive, ref = _setup()
    plain = {n: ref.alone(qmodel, names, n, naive[n]) for n in names}
    ref.keep_layer_outputs(prep.model, 64.0)
    assert ref.kept is not None and {"mid", "down"} <= set(ref.kept.names)
    for n in names:
        ref.kept.hits = ref.kept.misses = 0
        assert ref.alone(qmodel, names, n, naive[n]) == plain[n] > 0.0
        if n == "head":  # the whole sparse trunk is served (the quantized head is not: it runs)
            assert ref.kept.misses == 0 and ref.kept.hits == len(set(ref.kept.names) - {"head"}) >= 2
        if n == "mid":  # a quantized sparse layer: the one before it is served, the one after it runs
            assert ref.kept.hits >= 1 and ref.kept.misses >= 1
    assert {n: ref.alone(qmodel, names, n, naive[n]) for n in names} == plain  # nothing kept was overwritten


def test_a_sparse_layer_whose_features_or_sites_differ_runs() -> None:
    prep, qmodel, names, _, ref = _setup()
    kept = KeptOutputs.record(prep.model, prep.layers, ref.pieces, 1, 64.0)
    layer = qmodel.get_submodule("mid")
    call = kept.pieces[0]["mid"][0]
    with kept.serving(qmodel, set(names)) as serving:
        serving.piece(0)
        assert torch.equal(layer(call.x.replace_feature(call.x.features.clone())).features, call.out.features)
        assert kept.hits == 1
        feats = call.x.features.clone()
        feats.view(-1)[5] = torch.nextafter(feats.view(-1)[5], torch.tensor(float("inf")))
        serving.piece(0)
        layer(call.x.replace_feature(feats))
        assert kept.misses == 1
        moved = call.x.indices.clone()  # one site moved to a free one, the same features
        taken = {tuple(r) for r in moved[:, 1:].tolist()}
        moved[0, 1:] = torch.tensor(next(s for s in _sites() if s not in taken))
        other = sp.SparseConvTensor(call.x.features.clone(), moved, SHAPE, 1)
        serving.piece(0)
        layer(other)
        assert kept.misses == 2 and kept.hits == 1
