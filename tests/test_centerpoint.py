"""The CenterPoint-shaped model: OpenPCDet's names and contract, its training, and a scan end to end on
real voxelized LiDAR frames."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("spconv.pytorch", reason="the lidar extra (spconv) is not installed")

import spconv.pytorch as sp

from sensitivity import ScanOptions, scan
from sensitivity.apply import apply_policy
from sensitivity.demo import centerpoint as cp
from sensitivity.demo import centerpoint_train as cpt
from sensitivity.demo import pointclouds as pc
from sensitivity.integrations.spconv import cpu_bias_fallback, single_thread_if_sparse

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

HEADS = ("center", "center_z", "dim", "rot", "vel", "hm")
SPARSE_LAYERS = [
    "backbone_3d.conv_input.0",
    *(f"backbone_3d.conv1.{i}.conv{j}" for i in (0, 1) for j in (1, 2)),
    *(
        name
        for s in (2, 3, 4)
        for name in (
            f"backbone_3d.conv{s}.0.0",
            *(f"backbone_3d.conv{s}.{i}.conv{j}" for i in (1, 2) for j in (1, 2)),
        )
    ),
    "backbone_3d.conv_out.0",
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def centerpoint() -> cp.CenterPoint:
    """The trained model, from the persistent cache ($SENSITIVITY_CACHE or the user cache dir): about 35 s
    of training the first time, a fraction of a second afterwards."""
    return cpt.train_centerpoint()


@pytest.fixture(scope="session")
def frames() -> list[dict]:
    return cpt.lidar_batches(6)


def test_real_scans_read_with_numpy() -> None:
    las = pc.read_las(pc.data_dir() / pc.AERIAL_TILE)
    assert las.version == (1, 4) and las.point_format == 6 and len(las.xyz) == 25_408
    classes, counts = np.unique(las.classification, return_counts=True)
    assert dict(zip(classes.tolist(), counts.tolist(), strict=True)) == {
        2: 9808, 3: 158, 4: 724, 5: 10956, 6: 3737, 7: 25
    }  # fmt: skip
    tile = pc.load_aerial_tile()  # metres, ground at z = 0
    assert tile.extent == pytest.approx((18.285, 12.186), abs=1e-3)
    assert abs(float(np.median(tile.xyz[tile.classification == pc.GROUND, 2]))) < 1e-6
    assert 13.5 < float(tile.xyz[:, 2].max()) < 15.5  # the tallest trees
    post = pc.load_lamppost()
    assert post.shape == (1771, 3) and 5.5 < float(post[:, 2].max()) < 6.5


def test_module_tree_matches_openpcdet(centerpoint: cp.CenterPoint) -> None:
    mods = dict(centerpoint.named_modules())
    sparse = [
        n for n, m in mods.items() if type(m).__module__.startswith("spconv") and "Conv" in type(m).__name__
    ]
    assert sparse == SPARSE_LAYERS
    assert sum(type(mods[n]) is sp.SubMConv3d for n in sparse) == 17
    assert [n for n in sparse if type(mods[n]) is sp.SparseConv3d] == [
        "backbone_3d.conv2.0.0",
        "backbone_3d.conv3.0.0",
        "backbone_3d.conv4.0.0",
        "backbone_3d.conv_out.0",
    ]
    # bias=True in the SparseBasicBlocks only, as in OpenPCDet
    assert all((mods[n].bias is not None) == (".conv1" in n[12:] or ".conv2" in n[12:]) for n in sparse[1:])
    assert mods["backbone_3d.conv_input.0"].bias is None
    blocks = [n for n, m in mods.items() if n.startswith("backbone_2d") and type(m) is nn.Conv2d]
    assert blocks == [f"backbone_2d.blocks.{b}.{i}" for b in (0, 1) for i in (1, 4, 7, 10, 13, 16)]
    deblocks = [n for n, m in mods.items() if type(m) is nn.ConvTranspose2d]
    assert deblocks == ["backbone_2d.deblocks.0.0", "backbone_2d.deblocks.1.0"]
    head = [n for n, m in mods.items() if n.startswith("dense_head") and type(m) is nn.Conv2d]
    expected = ["dense_head.shared_conv.0"]
    for t in range(len(centerpoint.cfg.tasks)):
        for h in HEADS:
            expected += [f"dense_head.heads_list.{t}.{h}.0.0", f"dense_head.heads_list.{t}.{h}.1"]
    assert head == expected
    assert [type(m).__name__ for m in centerpoint.module_list] == [
        "MeanVFE",
        "VoxelResBackBone8x",
        "HeightCompression",
        "BaseBEVBackbone",
        "CenterHead",
    ]
    assert not any(True for _ in centerpoint.vfe.parameters())


def test_batch_dict_contract(centerpoint: cp.CenterPoint, frames: list[dict]) -> None:
    cfg = centerpoint.cfg
    batch = frames[0]
    v = batch["voxels"].shape[0]
    assert 10_000 < v < cfg.max_voxels  # real frames: ~19k active voxels
    assert batch["voxels"].shape == (v, cfg.max_points_per_voxel, 4)
    assert batch["voxel_coords"].shape == (v, 4) and batch["voxel_coords"].dtype == torch.int32
    assert (batch["voxel_coords"][:, 0] == 0).all() and batch["batch_size"] == 1
    coords = batch["voxel_coords"][:, 1:]
    assert (coords >= 0).all() and (coords < torch.tensor(cfg.sparse_shape)).all()
    keys = set(batch)
    with torch.no_grad():
        out = centerpoint(batch)
        pair = centerpoint(cp.make_batch([p for p in (_frame(0), _frame(1))], cfg))
        single = centerpoint(cp.make_batch([_frame(1)], cfg))
    assert set(batch) == keys  # the caller's dict is not mutated
    h, w = cfg.grid_size[1] // 8, cfg.grid_size[0] // 8
    assert [list(d) for d in out["pred_dicts"]] == [list(HEADS)] * len(cfg.tasks)
    assert out["pred_dicts"][0]["hm"].shape == (1, 2, h, w)
    assert out["pred_dicts"][1]["dim"].shape == (1, 3, h, w)
    assert centerpoint.dense_head.forward_ret_dict["pred_dicts"] is single["pred_dicts"]
    # batching two frames gives each frame's own maps
    for t in range(len(cfg.tasks)):
        for k in HEADS:
            torch.testing.assert_close(
                pair["pred_dicts"][t][k][1:], single["pred_dicts"][t][k], rtol=1e-4, atol=1e-4
            )


def _frame(i: int) -> np.ndarray:
    tile = pc.load_aerial_tile()
    yaw, center = cpt._calib_poses(2, tile)[i]
    return pc.frame_points(tile, yaw=yaw, center=center)[0]


def test_openpcdet_bias_convs_need_the_cpu_fallback(frames: list[dict]) -> None:
    raw = cp.build_centerpoint(cpu_bias_fallback=False)
    with pytest.raises(AssertionError, match="cpu don't support act and bias"), torch.no_grad():
        raw(frames[0])  # what OpenPCDet's own network does in eval mode on CPU
    with cpu_bias_fallback(raw), torch.no_grad():
        raw(frames[0])
    assert not raw.training


def test_training_quality_and_cache(centerpoint: cp.CenterPoint) -> None:
    meta = centerpoint.training_meta
    assert meta["trained"] and meta["train_seconds"] < 180
    held = meta["heldout"]
    # ground / non-ground per BEV cell: far better than always answering the majority
    assert held["accuracy.0.hm"] > held["majority.0.hm"] + 0.2
    assert held["r2.0.center_z"] > 0.5 and held["r2.0.dim"] > 0.5 and held["r2.0.hm"] > 0.2
    assert any("backbone_3d" in u for u in meta["untrained"]) and any(".vel" in u for u in meta["untrained"])
    start = time.perf_counter()
    again = cpt.train_centerpoint()
    assert time.perf_counter() - start < 10
    for k, v in centerpoint.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert cpt.cache_path().is_file()


def _clone(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return tuple(_clone(o) for o in obj)
    if hasattr(obj, "replace_feature"):
        return obj.replace_feature(obj.features.detach().clone())
    return obj.detach().clone() if isinstance(obj, torch.Tensor) else obj


def _divide(x: Any, s: torch.Tensor) -> Any:
    if hasattr(x, "replace_feature"):
        return x.replace_feature(x.features / s)
    return x / s.reshape(1, -1, *([1] * (x.dim() - 2)))


def test_scan_end_to_end_on_real_frames(centerpoint: cp.CenterPoint, frames: list[dict]) -> None:
    torch.set_num_threads(2)
    try:
        with single_thread_if_sparse(centerpoint):
            assert torch.get_num_threads() == 1
            # the thresholds policy with sq_margin 1: SmoothQuant wherever it helps the isolated error at all,
            # so the policy uses it on sparse layers (their folding is under test)
            opts = ScanOptions(outputs=("pred_dicts",), sq_margin=1.0, policy="thresholds")
            result = scan(centerpoint, frames, opts)
    finally:
        torch.set_num_threads(1)
    t = result.table
    names = list(t.index)
    assert names[: len(SPARSE_LAYERS)] == SPARSE_LAYERS  # execution order
    for task in range(2):
        for h in HEADS:
            assert f"dense_head.heads_list.{task}.{h}.1" in names
            assert f"dense_head.heads_list.{task}.{h}.0.0" in names
    assert set(t.loc[SPARSE_LAYERS, "type"]) == {"SubMConv3d", "SparseConv3d"}
    for col in ("iso_naive_rel_l1", "cum_naive_rel_l1", "iso_naive_sqnr_db", "cum_naive_sqnr_db"):
        values = t[col].to_numpy(dtype=float)
        assert all(math.isfinite(x) for x in values), col
    assert (t["iso_naive_nonfinite"] == 0).all() and (t["cum_naive_nonfinite"] == 0).all()
    sparse = t.loc[SPARSE_LAYERS]
    assert (sparse["iso_naive_rel_l1"] > 0).all() and (sparse["iso_naive_rel_l1"] < 0.2).all()
    assert (sparse["macs"] > 0).all()
    first = SPARSE_LAYERS[0]  # its quantized input is the FP input in both modes
    assert t.loc[first, "iso_naive_mse"] == t.loc[first, "cum_naive_mse"]
    if "iso_sq_rel_l1" in t:  # SmoothQuant candidates run on the sparse features too
        assert sparse["iso_sq_rel_l1"].notna().all()
    assert result.first_nonfinite is None
    comp = result.comparison.set_index("config")
    assert 0 < comp.loc["naive", "out_rel_l1"] < 0.2 and comp.loc["naive", "out_nonfinite"] == 0
    assert comp.loc["policy", "out_rel_l1"] <= comp.loc["naive", "out_rel_l1"]

    # the deployable model: BN folded into the sparse convs, and SmoothQuant's 1/s folded into the previous
    # sparse conv (through ReLU) where possible
    assert (sparse["decision"] == "smoothquant").sum() >= 10
    assert result.folded_bn.get("backbone_3d.conv1.0.conv1") == "backbone_3d.conv1.0.bn1"
    assert sparse["sq_fold"].astype(str).str.match(r"backbone_3d\.conv").any()
    unfolded = apply_policy(centerpoint, result.policy, result.quant_state, fold_smoothing=False)
    final = apply_policy(centerpoint, result.policy, result.quant_state)
    folds = {
        c: p for c, p in result.quant_state.sq_fold.items() if result.policy.method_for(c) == "smoothquant"
    }
    assert folds and any(p.startswith("backbone_3d.") for p in folds.values())
    seen: dict[str, tuple] = {}
    for producer in folds.values():
        unfolded.get_submodule(producer).register_forward_hook(  # clones: later ops may work in place
            lambda _m, a, o, _p=producer: seen.__setitem__(_p, (_clone(a), _clone(o)))
        )
    with torch.no_grad():
        want = result.quantized_model("policy")(frames[-1])["pred_dicts"]
        same = unfolded(frames[-1])["pred_dicts"]
        got = final(frames[-1])["pred_dicts"]
        fp_out = centerpoint(frames[-1])["pred_dicts"]
        for consumer, producer in folds.items():
            # on the same input, each folded producer emits its unfolded output divided by the consumer's
            # factors (its weight is snapped to its own grid first, so its codes do not change)
            args, out = seen[producer]
            layer = final.get_submodule(producer)
            if layer.smoother is not None and layer.smoother.folded:  # its own input arrives pre-divided
                args = (_divide(args[0], layer.smoother.scale), *args[1:])
            new = layer(*args)
            a = out.features if hasattr(out, "features") else out
            b = new.features if hasattr(new, "features") else new
            s = final.get_submodule(consumer).smoother.scale
            shape = [1, -1] if a.dim() == 2 else [1, -1] + [1] * (a.dim() - 2)
            torch.testing.assert_close(b * s.reshape(shape), a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    for t in range(2):
        for h in HEADS:
            assert torch.isfinite(got[t][h]).all()
            # the applied model without folding is exactly the model the scan measured
            torch.testing.assert_close(same[t][h], want[t][h], rtol=0, atol=0)
            # folded: the same quantization error, up to tie-flip noise (this model's random 3D backbone
            # amplifies a single flipped code into a visible change, so bound the error, not the difference)
            folded_err = (got[t][h] - fp_out[t][h]).abs().mean()
            unfolded_err = (want[t][h] - fp_out[t][h]).abs().mean()
            assert folded_err <= 1.5 * unfolded_err, (t, h, float(folded_err), float(unfolded_err))


def test_export_dense_part_to_onnx_and_sparse_scales_to_json(centerpoint, frames, tmp_path) -> None:
    """Sparse convs have no standard ONNX form: the BEV backbone + head go to ONNX (Q/DQ, checked in ONNX
    Runtime), the 21 spconv layers' int8 scales to JSON."""
    import json

    from sensitivity.cli import main

    model_path = tmp_path / "cp.pth"
    torch.save(centerpoint.state_dict(), model_path)
    calib = tmp_path / "frames.pt"
    torch.save(list(frames), calib)
    arch = "sensitivity.demo.centerpoint:build_centerpoint"
    out = tmp_path / "r"
    base = ["--arch", arch]
    assert (
        main(
            [
                "scan",
                str(model_path),
                *base,
                "--calib",
                str(calib),
                "--outputs",
                "pred_dicts",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert main(["apply", str(model_path), *base, "--policy", str(out / "policy.yaml"), "--onnx"]) == 0
    scales = json.loads((out / "sparse_scales.json").read_text())["layers"]
    assert set(scales) == set(SPARSE_LAYERS)
    first = scales[SPARSE_LAYERS[0]]
    assert first["weight_layout"] == "Cout,k...,Cin" and len(first["weight_scale"]) == len(
        first["weight_amax"]
    )
    check = json.loads((out / "export.json").read_text())
    # ORT computes Q/DQ as written (x / scale, like the torch model): conv summation order only
    assert check["max_abs_diff_qdq_reference"] <= 1e-4 * max(1.0, check["output_absmax"])
    assert check["verdict"] == "ok"
    import onnx

    graph = onnx.load(str(out / "model_quant.onnx")).graph
    assert graph.input[0].name == "input" and "task0.hm" in [o.name for o in graph.output]
    # module paths in node names, from the detector's own names (as in the policy and trtexec's flags)
    names = [n.name for n in graph.node]
    assert any(n.startswith("/dense_head/heads_list.0/hm/hm.1/") for n in names), names[-5:]
    assert any(n.startswith("/dense_head/shared_conv/shared_conv.0/") for n in names)
    convs = [n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert convs and all(n.startswith(("/backbone_2d/", "/dense_head/")) for n in convs), convs
    # BN folded into the ConvTranspose deblocks too (weight [Cin, Cout, k, k]: output channels on axis 1)
    assert "BatchNormalization" not in {n.op_type for n in graph.node}
    assert [n for n in names if "ConvTranspose" in n] == [
        f"/backbone_2d/deblocks.{i}/deblocks.{i}.0/ConvTranspose" for i in range(2)
    ]
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 2
