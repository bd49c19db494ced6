"""The OpenPCDet adapter (`sensitivity.integrations.pcdet`) and its CLI (`scan --pcdet-cfg`, `pcdet-dump`).

CONTRACT TESTS, NOT PCDET SUPPORT: OpenPCDet cannot be installed on these machines (built from source with
CUDA), so `pcdet` is played by a small stand-in registered in `sys.modules` for the duration of a test. It
mimics only the OpenPCDet API names the adapter calls, after OpenPCDet's own code: `pcdet.config.cfg` /
`cfg_from_yaml_file` (with `_BASE_CONFIG_` resolved from the working directory), `pcdet.datasets`
(`DatasetTemplate`, `build_dataloader` returning (dataset, dataloader, sampler), `collate_batch` making numpy
batch_dicts with `frame_id`, `metadata` and `calib` objects), `pcdet.models.build_network` and a detector
with `module_list`, `global_step`, `load_params_from_file(filename, logger, to_cpu)`, a `.cuda()` call at
build time and a CenterHead whose eval forward decodes boxes (`generate_predicted_boxes`) - which, like
`post_processing`, raises here: on CPU the real NMS kills the process. Inside is the CenterPoint-shaped model
of `sensitivity.demo.centerpoint` (OpenPCDet's module names), fed real voxelized LiDAR frames. What passes
here is the adapter's side of the contract; the real OpenPCDet is not exercised.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("spconv.pytorch", reason="the lidar extra (spconv) is not installed")

from sensitivity.cli import main
from sensitivity.demo import centerpoint as cp
from sensitivity.demo import centerpoint_train as cpt
from sensitivity.integrations import pcdet as adapter
from sensitivity.prepare import find_targets

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

ARCH = "sensitivity.demo.centerpoint:build_centerpoint"
VAL_FRAMES = 6


# ------------------------------------------------------------------------------------ the stand-in
class EasyDict(dict):
    """The part of `easydict.EasyDict` OpenPCDet's config code relies on: attribute access, nested dicts."""

    def __init__(self, d: dict | None = None, **kwargs: Any) -> None:
        super().__init__()
        for key, value in {**(d or {}), **kwargs}.items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, dict) and not isinstance(value, EasyDict):
            value = EasyDict(value)
        elif isinstance(value, list):
            value = [EasyDict(v) if isinstance(v, dict) and not isinstance(v, EasyDict) else v for v in value]
        super().__setitem__(key, value)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def update(self, other: Any = None, **kwargs: Any) -> None:  # type: ignore[override]
        for key, value in dict(other or {}, **kwargs).items():
            self[key] = value


def merge_new_config(config: EasyDict, new_config: dict) -> EasyDict:
    """pcdet.config.merge_new_config: `_BASE_CONFIG_` is opened relative to the working directory."""
    if "_BASE_CONFIG_" in new_config:
        with open(new_config["_BASE_CONFIG_"]) as f:
            config.update(EasyDict(yaml.safe_load(f)))
    for key, val in new_config.items():
        if not isinstance(val, dict):
            config[key] = val
            continue
        if key not in config:
            config[key] = EasyDict()
        merge_new_config(config[key], val)
    return config


def cfg_from_yaml_file(cfg_file: str, config: EasyDict) -> EasyDict:
    with open(cfg_file) as f:
        merge_new_config(config=config, new_config=yaml.safe_load(f))
    return config


class Calibration:
    """A KITTI-style calibration object in the batch: not plain data (dropped by pcdet-dump)."""

    def __init__(self, frame: str) -> None:
        self.frame = frame


class DatasetTemplate(torch.utils.data.Dataset):
    """pcdet.datasets.DatasetTemplate: the geometry the network is built from, and `collate_batch`."""

    def __init__(self, dataset_cfg=None, class_names=None, training=True, root_path=None, logger=None):
        self.dataset_cfg, self.class_names, self.training, self.logger = (
            dataset_cfg,
            class_names,
            training,
            logger,
        )
        self.root_path = Path(root_path) if root_path is not None else Path(dataset_cfg.DATA_PATH)
        self.mode = "train" if training else "test"
        self.point_cloud_range = np.array(dataset_cfg.POINT_CLOUD_RANGE, dtype=np.float32)
        vox = next(p for p in dataset_cfg.DATA_PROCESSOR if p.NAME == "transform_points_to_voxels")
        self.voxel_size = vox.VOXEL_SIZE
        extent = self.point_cloud_range[3:] - self.point_cloud_range[:3]
        self.grid_size = np.round(extent / np.array(self.voxel_size)).astype(np.int64)
        self.depth_downsample_factor = None

    def __len__(self) -> int:
        return 0

    def __getstate__(self) -> dict[str, Any]:
        """OpenPCDet's own: the copy has no logger, so copying a copy raises KeyError: 'logger'."""
        d = dict(self.__dict__)
        del d["logger"]
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)

    @staticmethod
    def collate_batch(batch_list: list[dict], _unused: bool = False) -> dict[str, Any]:
        merged: dict[str, list] = {}
        for sample in batch_list:
            for key, val in sample.items():
                merged.setdefault(key, []).append(val)
        ret: dict[str, Any] = {}
        for key, val in merged.items():
            if key in ("voxels", "voxel_num_points"):
                ret[key] = np.concatenate(val, axis=0)
            elif key in ("points", "voxel_coords"):
                ret[key] = np.concatenate(
                    [np.pad(c, ((0, 0), (1, 0)), constant_values=i) for i, c in enumerate(val)]
                )
            else:
                ret[key] = np.stack(val, axis=0) if key != "metadata" else np.array(val, dtype=object)
        ret["batch_size"] = len(batch_list)
        return ret


class Point2VoxelCPU:
    """spconv's CPU voxel generator (a pybind object): it cannot be pickled, hence not deep-copied."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("cannot pickle 'spconv.core_cc.csrc.sparse.all.ops_cpu3d.Point2VoxelCPU' object")


class StandInDataset(DatasetTemplate):
    """A dataset class named in DATA_CONFIG.DATASET: frames listed in INFO_PATH[mode], as OpenPCDet's
    (info files that do not exist are skipped, as NuScenesDataset does); the first frame read makes the
    voxel generator, as OpenPCDet's DataProcessor does."""

    def __init__(self, dataset_cfg, class_names, training=True, root_path=None, logger=None, total_epochs=0):
        super().__init__(dataset_cfg, class_names, training, root_path, logger)
        self.split = dataset_cfg.DATA_SPLIT[self.mode]
        self.infos: list[str] = []
        for info in dataset_cfg.INFO_PATH[self.mode]:
            if (self.root_path / info).exists():
                self.infos += json.loads((self.root_path / info).read_text())

    def __len__(self) -> int:
        return len(self.infos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if getattr(self, "voxel_generator", None) is None:
            self.voxel_generator = Point2VoxelCPU()
        with np.load(self.root_path / self.infos[index]) as f:
            frame = {k: f[k] for k in f.files}
        name = Path(self.infos[index]).stem
        return {
            **frame,
            "gt_boxes": np.zeros((2, 8), dtype=np.float32),
            "frame_id": name,
            "metadata": {"token": name},
            "calib": Calibration(name),
        }


def build_dataloader(dataset_cfg, class_names, batch_size, dist, root_path=None, workers=4, seed=None,
                     logger=None, training=True, merge_all_iters_to_one_epoch=False, total_epochs=0):  # fmt: skip
    dataset = {"StandInDataset": StandInDataset}[dataset_cfg.DATASET](
        dataset_cfg=dataset_cfg, class_names=class_names, root_path=root_path, training=training,
        logger=logger, total_epochs=total_epochs,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         shuffle=training, collate_fn=dataset.collate_batch)  # fmt: skip
    return dataset, loader, None


class StandInCenterHead(cp.CenterHead):
    """OpenPCDet's CenterHead.forward in eval mode: raw maps to forward_ret_dict, then box decoding + NMS."""

    def forward(self, data_dict: dict[str, Any]) -> dict[str, Any]:
        x = self.shared_conv(data_dict["spatial_features_2d"])
        pred_dicts = [head(x) for head in self.heads_list]
        self.forward_ret_dict["pred_dicts"] = pred_dicts
        if not self.training or self.predict_boxes_when_training:
            data_dict["final_box_dicts"] = self.generate_predicted_boxes(data_dict["batch_size"], pred_dicts)
        return data_dict

    def generate_predicted_boxes(self, batch_size: int, pred_dicts: list) -> list:
        raise AssertionError("stand-in: box decoding and NMS reached (the real NMS exits the process on CPU)")


class StandInCenterPoint(cp.CenterPoint):
    """Detector3DTemplate's API around the CenterPoint-shaped model."""

    module_list = None  # OpenPCDet keeps a plain list (the demo model has a property)

    def __init__(self, model_cfg: EasyDict, num_class: int, dataset: DatasetTemplate) -> None:
        config = cp.CenterPointConfig(
            point_cloud_range=tuple(dataset.point_cloud_range.tolist()),
            voxel_size=tuple(dataset.voxel_size),
            tasks=tuple(tuple(t) for t in model_cfg.DENSE_HEAD.CLASS_NAMES_EACH_HEAD),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            super().__init__(config)
        self.register_buffer("global_step", torch.LongTensor(1).zero_())
        self.dataset = dataset  # Detector3DTemplate keeps it (and so reaches it on every deep copy)
        self.dense_head.__class__ = StandInCenterHead
        self.dense_head.predict_boxes_when_training = False
        self.dense_head.class_id_mapping = torch.arange(num_class).cuda()  # as CenterHead.__init__ does
        self.module_list = [
            self.vfe,
            self.backbone_3d,
            self.map_to_bev_module,
            self.backbone_2d,
            self.dense_head,
        ]
        self.eval()

    def forward(self, batch_dict: dict[str, Any]) -> Any:
        for module in self.module_list:
            batch_dict = module(batch_dict)
        return self.post_processing(batch_dict)

    def post_processing(self, batch_dict: dict[str, Any]) -> Any:
        raise AssertionError("stand-in: post_processing reached (the real NMS exits the process on CPU)")

    def load_params_from_file(self, filename, logger, to_cpu=False, pre_trained_path=None):
        if not os.path.isfile(filename):
            raise FileNotFoundError
        checkpoint = torch.load(
            filename, map_location=torch.device("cpu") if to_cpu else None, weights_only=True
        )
        disk, state = checkpoint["model_state"], self.state_dict()
        update = {k: v for k, v in disk.items() if k in state and state[k].shape == v.shape}
        state.update(update)
        self.load_state_dict(state)
        for key in state:
            if key not in update:
                logger.info("Not updated weight %s", key)


def build_network(model_cfg: EasyDict, num_class: int, dataset: DatasetTemplate) -> StandInCenterPoint:
    return {"CenterPoint": StandInCenterPoint}[model_cfg.NAME](
        model_cfg=model_cfg, num_class=num_class, dataset=dataset
    )


def load_data_to_gpu(batch_dict: dict) -> None:
    raise AssertionError("stand-in: load_data_to_gpu is CUDA-only; the adapter must not call it")


def _register_standin(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EasyDict(ROOT_DIR="/nonexistent/OpenPCDet", LOCAL_RANK=0)
    parts = {
        "pcdet": {},
        "pcdet.config": {"cfg": config, "cfg_from_yaml_file": cfg_from_yaml_file},
        "pcdet.datasets": {"DatasetTemplate": DatasetTemplate, "build_dataloader": build_dataloader},
        "pcdet.models": {"build_network": build_network, "load_data_to_gpu": load_data_to_gpu},
    }
    modules = {}
    for name, attrs in parts.items():
        module = ModuleType(name)
        module.__dict__.update(attrs)
        modules[name] = module
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("config", "datasets", "models"):
        setattr(modules["pcdet"], name, modules[f"pcdet.{name}"])


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def frames() -> list[dict[str, Any]]:
    """Real voxelized frames (torch batch_dicts of one frame each)."""
    return cpt.lidar_batches(VAL_FRAMES)


def _write_tree(root: Path, frames: list[dict[str, Any]]) -> tuple[Path, Path]:
    """OpenPCDet's layout: tools/cfgs/{dataset_configs,models}/*.yaml, data/<dataset>/; returns (cfg, ckpt)."""
    model_cfg = cp.CenterPointConfig()
    tools, data = root / "OpenPCDet" / "tools", root / "OpenPCDet" / "data" / "standin"
    (tools / "cfgs" / "dataset_configs").mkdir(parents=True)
    (tools / "cfgs" / "standin_models").mkdir(parents=True)
    (data / "frames").mkdir(parents=True)
    names = []
    for i, batch in enumerate(frames):
        name = f"frames/{i:06d}.npz"
        np.savez(data / name, voxels=batch["voxels"].numpy(), voxel_coords=batch["voxel_coords"][:, 1:].numpy(),
                 voxel_num_points=batch["voxel_num_points"].numpy())  # fmt: skip
        names.append(name)
    (data / "infos_val.json").write_text(json.dumps(names))
    (data / "infos_train.json").write_text(json.dumps(names[:2]))
    dataset_cfg = {
        "DATASET": "StandInDataset",
        "DATA_PATH": "../data/standin",
        "POINT_CLOUD_RANGE": list(model_cfg.point_cloud_range),
        "DATA_SPLIT": {"train": "train", "test": "val"},
        "INFO_PATH": {"train": ["infos_train.json"], "test": ["infos_val.json"]},
        "DATA_PROCESSOR": [
            {"NAME": "mask_points_and_boxes_outside_range", "REMOVE_OUTSIDE_BOXES": True},
            {"NAME": "transform_points_to_voxels", "VOXEL_SIZE": list(model_cfg.voxel_size),
             "MAX_POINTS_PER_VOXEL": 10, "MAX_NUMBER_OF_VOXELS": {"train": 40000, "test": 40000}},
        ],
    }  # fmt: skip
    (tools / "cfgs" / "dataset_configs" / "standin_dataset.yaml").write_text(
        yaml.safe_dump(dataset_cfg, sort_keys=False)
    )
    classes = [list(t) for t in model_cfg.tasks]
    cfg = {
        "CLASS_NAMES": [c for t in classes for c in t],
        "DATA_CONFIG": {"_BASE_CONFIG_": "cfgs/dataset_configs/standin_dataset.yaml"},
        "MODEL": {
            "NAME": "CenterPoint",
            "DENSE_HEAD": {"NAME": "CenterHead", "CLASS_NAMES_EACH_HEAD": classes,
                           "POST_PROCESSING": {"NMS_CONFIG": {"NMS_TYPE": "nms_gpu"}}},
        },
    }  # fmt: skip
    cfg_path = tools / "cfgs" / "standin_models" / "centerpoint.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    state = {**cp.build_centerpoint().state_dict(), "global_step": torch.LongTensor([1234])}
    ckpt = root / "checkpoint_epoch_20.pth"
    torch.save(
        {"model_state": state, "optimizer_state": {}, "epoch": 20, "it": 0, "version": "pcdet+standin"}, ckpt
    )
    return cfg_path, ckpt


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frames: list[dict]) -> tuple[Path, Path]:
    """The stand-in `pcdet` importable, its config tree written, the working directory elsewhere (not
    tools/); returns (config, checkpoint)."""
    _register_standin(monkeypatch)
    cfg, ckpt = _write_tree(tmp_path, frames)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cfg, ckpt


def _targets() -> list[str]:
    return find_targets(cp.build_centerpoint())


# --------------------------------------------------------------------------------- the adapter
def test_wrapper_keeps_openpcdet_names_and_stops_before_boxes(standin, frames) -> None:
    cfg, ckpt = standin
    model, loader = adapter.build_from_config(cfg, ckpt, max_batches=2)
    detector = model.detector
    assert isinstance(detector, StandInCenterPoint)
    assert [n for n, _ in model.named_modules()][1:] == [n for n, _ in detector.named_modules()][1:]
    assert list(model.state_dict()) == list(detector.state_dict())
    assert int(model.global_step) == 1234  # the checkpoint's buffers too
    assert model.module_order == ("vfe", "backbone_3d", "map_to_bev_module", "backbone_2d", "dense_head")
    demo = cp.build_centerpoint()
    assert [n for n, _ in model.named_modules()][1:] == [n for n, _ in demo.named_modules()][1:]
    assert {"backbone_3d.conv_input.0", "dense_head.heads_list.0.hm.1", "backbone_2d.deblocks.0.0"} <= set(
        find_targets(model)
    )

    batches = adapter.calibration_batches(loader)
    assert len(batches) == 2 and [b["frame_id"].tolist() for b in batches] == [["000000"], ["000005"]]
    with torch.no_grad():
        out = model(batches[0])
        ref = demo(frames[0])["pred_dicts"]
    assert "generate_predicted_boxes" not in model.dense_head.__dict__  # the stop is undone
    assert "final_box_dicts" not in out and "spatial_features_2d" in out
    assert len(out["pred_dicts"]) == len(ref) == 2
    for got, want in zip(out["pred_dicts"], ref, strict=True):
        assert list(got) == ["center", "center_z", "dim", "rot", "vel", "hm"]
        for key in got:
            assert torch.allclose(got[key], want[key], atol=1e-5), key
    with pytest.raises(AssertionError, match="NMS reached"):
        detector(dict(batches[0]))  # its own forward does reach box decoding, where the real one dies


def test_batch_to_torch_matches_load_data_to_gpu_on_cpu() -> None:
    calib = Calibration("a")
    batch = {
        "voxels": np.ones((3, 10, 4), dtype=np.float32),
        "voxel_coords": np.zeros((3, 4), dtype=np.int32),
        "voxel_num_points": np.array([1, 2, 3], dtype=np.int32),
        "images": np.zeros((2, 5, 7, 3), dtype=np.uint8),
        "image_shape": np.array([[5, 7], [5, 7]], dtype=np.int64),
        "frame_id": np.array(["a", "b"]),
        "calib": np.array([calib, calib], dtype=object),
        "names": np.array(["car", "ped"]),
        "batch_size": 2,
    }
    out = adapter.batch_to_torch(batch)
    assert out["voxel_coords"].dtype == torch.float32 and out["voxel_num_points"].dtype == torch.float32
    assert out["images"].shape == (2, 3, 5, 7) and out["images"].dtype == torch.float32
    assert out["image_shape"].dtype == torch.int32
    assert out["frame_id"] is batch["frame_id"] and out["calib"] is batch["calib"]
    assert out["names"] is batch["names"] and out["batch_size"] == 2
    assert isinstance(batch["voxels"], np.ndarray)  # a new dict: the caller's is not converted in place


@pytest.mark.skipif(torch.cuda.is_available(), reason="the .cuda() patch applies only without CUDA")
def test_cuda_calls_stay_on_cpu_only_inside() -> None:
    with adapter.cuda_calls_stay_on_cpu():
        t = torch.arange(3)
        assert t.cuda() is t
    assert "cuda" not in torch.Tensor.__dict__
    with pytest.raises((AssertionError, RuntimeError)):
        torch.arange(3).cuda()


# ---------------------------------------------------------------------------------- the CLI
def test_scan_with_pcdet_cfg_end_to_end(standin, tmp_path: Path) -> None:
    cfg, ckpt = standin
    out = tmp_path / "report"
    exclude = tmp_path / "exclude.yaml"  # a user's exclusions, in OpenPCDet's names
    exclude.write_text(
        "version: 1\nexclude:\n  - layer: dense_head.heads_list.*.hm.1\n    reason: research notes\n"
    )
    argv = ["scan", str(ckpt), "--pcdet-cfg", str(cfg), "--batches", "4", "--exclude", str(exclude)]
    assert main([*argv, "--out", str(out), "-q"]) == 0
    table = pd.read_csv(out / "layers.csv", index_col=0)
    assert sorted(table.index) == sorted(_targets())  # OpenPCDet's names, every layer up to the head outputs
    assert {
        "dense_head.heads_list.0.hm.1",
        "dense_head.heads_list.1.hm.0.0",
        "backbone_3d.conv_input.0",
    } <= set(table.index)
    info = json.loads((out / "scan.json").read_text())
    assert info["calibration"]["batches"] == 4
    assert "pred_dicts" in json.dumps(info)  # the default --outputs
    assert "dense_head.heads_list.1.hm.1" in (out / "policy.yaml").read_text()
    fp = set(table.index[table["decision"] == "fp"])
    user = {f"dense_head.heads_list.{t}.hm.1" for t in (0, 1)}
    assert user <= fp and all(table.loc[n, "reason"] == "listed in the user's exclusion file" for n in user)
    # policy v2 spends the default FP budget (10% of the layers) where the output error is largest
    budget = math.ceil(0.1 * len(table))
    assert 0 < len(fp - user) <= budget
    assert all("output error" in table.loc[n, "reason"] for n in fp - user)
    # the output probes reach every layer, the sparse ones through spconv's CPU backward
    sparse = table.index[table["type"].isin(["SubMConv3d", "SparseConv3d"])]
    assert len(sparse) > 2 and table["out_err_source"].str.startswith("probe").all()
    assert table.loc[sparse, "out_naive_err"].notna().all() and (table.loc[sparse, "out_naive_err"] > 0).all()


def test_pcdet_dump_then_scan_without_the_standin(
    standin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    cfg, ckpt = standin
    dump = tmp_path / "calib"
    assert main(["pcdet-dump", "--cfg", str(cfg), "--batches", "4", "--out", str(dump)]) == 0
    assert "wrote 4 batches of the val split" in capsys.readouterr().out
    files = sorted(dump.glob("*.pt"))
    assert [f.name for f in files] == [f"batch_{i:05d}.pt" for i in range(4)]
    manifest = json.loads((dump / "pcdet_dump.json").read_text())
    assert manifest["frame_ids"] == ["000000", "000002", "000003", "000005"]  # evenly spaced over 6 frames
    assert manifest["dropped_keys"] == ["calib"]
    batch = torch.load(files[0], weights_only=True)[0]
    assert batch["frame_id"] == ["000000"] and batch["metadata"] == [{"token": "000000"}]
    assert batch["voxel_coords"].dtype == torch.float32 and batch["voxel_coords"].shape[1] == 4
    assert batch["batch_size"] == 1 and batch["gt_boxes"].shape == (1, 2, 8)
    # an existing folder is kept unless --overwrite
    assert main(["pcdet-dump", "--cfg", str(cfg), "--batches", "2", "--out", str(dump)]) == 2
    assert len(list(dump.glob("*.pt"))) == 4

    # the network from the config (no dataset read), the batches from the dump, only the head layers
    out = tmp_path / "from-dump"
    args = ["--calib", str(dump), "--only", "dense_head.**", "--no-smoothquant", "-q"]
    assert main(["scan", str(ckpt), "--pcdet-cfg", str(cfg), *args, "--out", str(out)]) == 0
    pcdet_layers = pd.read_csv(out / "layers.csv", index_col=0)

    # later, without OpenPCDet: the CenterPoint-shaped factory on the dumped batches
    monkeypatch.setitem(sys.modules, "pcdet", None)
    plain = tmp_path / "centerpoint.pth"
    torch.save({"model_state": cp.build_centerpoint().state_dict()}, plain)
    out2 = tmp_path / "without-pcdet"
    assert (
        main(["scan", str(plain), "--arch", ARCH, *args, "--outputs", "pred_dicts", "--out", str(out2)]) == 0
    )
    demo_layers = pd.read_csv(out2 / "layers.csv", index_col=0)
    assert list(demo_layers.index) == list(pcdet_layers.index)
    assert sorted(demo_layers.index) == sorted(t for t in _targets() if t.startswith("dense_head."))
    # the same weights and batches: the same measurements
    pd.testing.assert_series_equal(pcdet_layers["iso_naive_rel_l1"], demo_layers["iso_naive_rel_l1"])


def test_split_selection_and_checkpoint_checks(
    standin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    cfg, ckpt = standin
    _, loader = adapter.build_from_config(cfg, ckpt, split="train")
    assert [b["frame_id"].tolist() for b in loader] == [["000000"], ["000001"]]  # INFO_PATH['train']
    assert main(["scan", str(ckpt), "--pcdet-cfg", str(cfg), "--calib-split", "trainval", "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert "--calib-split trainval is not in centerpoint.yaml's DATA_SPLIT: train (train), val (test)" in err
    assert len(err.splitlines()) == 1

    state = torch.load(ckpt, weights_only=True)["model_state"]
    del state["dense_head.heads_list.1.hm.1.weight"]
    partial = tmp_path / "partial.pth"
    torch.save({"model_state": state}, partial)
    assert main(["scan", str(partial), "--pcdet-cfg", str(cfg), "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the network of centerpoint.yaml: 1 of the network's" in err
    assert "dense_head.heads_list.1.hm.1.weight" in err and len(err.splitlines()) == 1

    # --batch-size counts frames per batch with --pcdet-cfg: 1 unless given
    seen: list[dict] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        raise adapter.PcdetConfigError("recorded")

    monkeypatch.setattr(adapter, "build_from_config", record)
    assert main(["scan", str(ckpt), "--pcdet-cfg", str(cfg), "--out", "r"]) == 2
    assert (
        main(
            ["scan", str(ckpt), "--pcdet-cfg", str(cfg), "--batch-size", "2", "--batches", "3", "--out", "r"]
        )
        == 2
    )
    assert [(k["split"], k["batch_size"], k["max_batches"]) for k in seen] == [("val", 1, 16), ("val", 2, 3)]
    capsys.readouterr()

    for extra, message in (
        (["--arch", ARCH], "--pcdet-cfg builds the network from the OpenPCDet config"),
        (["--calib", "x.pt", "--calib-split", "train"], "--calib and --calib-split both choose"),
    ):
        assert main(["scan", str(ckpt), "--pcdet-cfg", str(cfg), *extra, "--out", "r"]) == 2
        assert message in capsys.readouterr().err
    assert not Path("r").exists()


# ---------------------------------------------------------------------------- without pcdet
def test_without_pcdet_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "pcdet", None)  # not importable, installed or not
    cfg, ckpt = tmp_path / "cfg.yaml", tmp_path / "ckpt.pth"
    for argv in (
        ["scan", str(ckpt), "--pcdet-cfg", str(cfg), "--out", str(tmp_path / "r")],
        ["pcdet-dump", "--cfg", str(cfg), "--out", str(tmp_path / "d")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "OpenPCDet (pcdet) cannot be imported" in err and adapter.INSTALL_DOCS in err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "d").exists()
    assert not adapter.pcdet_available()


def test_broken_pcdet_build_and_plain_scan_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _register_standin(monkeypatch)
    monkeypatch.setitem(sys.modules, "pcdet.models", None)  # e.g. its CUDA extensions fail to load
    with pytest.raises(adapter.PcdetUnavailableError, match=r"\(ModuleNotFoundError: .*pcdet.models"):
        adapter.require_pcdet()
    # without --pcdet-cfg: --calib is required, --calib-split needs --pcdet-cfg
    assert main(["scan", "m.pth", "--arch", ARCH, "--out", str(tmp_path / "r")]) == 2
    assert "missing option --calib" in capsys.readouterr().err
    assert (
        main(["scan", "m.pth", "--calib", "c.pt", "--calib-split", "train", "--out", str(tmp_path / "r")])
        == 2
    )
    assert "--calib-split chooses an OpenPCDet dataset split: it needs --pcdet-cfg" in capsys.readouterr().err


# ------------------------------------------------- the real network's traps (found on real OpenPCDet)
def test_deep_copies_share_the_dataset_and_copy_the_network(standin) -> None:
    """OpenPCDet's detector keeps its dataset: a copy of a copy of it raises KeyError: 'logger' (its
    __getstate__ drops the logger), and once a frame is read it holds an unpicklable voxel generator. The
    scan deep-copies the model (FP reference, quantized models): the wrapper copies the network only."""
    import copy

    cfg, ckpt = standin
    model, loader = adapter.build_from_config(cfg, ckpt, max_batches=1)
    batch = adapter.calibration_batches(loader, 1)[0]  # the dataset now holds its voxel generator
    dataset = model.detector.dataset
    with pytest.raises(TypeError, match="cannot pickle"):
        copy.deepcopy(dataset)
    twice = copy.deepcopy(copy.deepcopy(model))
    assert twice.detector.dataset is dataset and twice.detector is not model.detector
    assert twice.dense_head is not model.dense_head and twice.detector.dense_head is twice.dense_head
    w = twice.get_parameter("dense_head.heads_list.0.hm.1.weight")
    assert w is not model.get_parameter("dense_head.heads_list.0.hm.1.weight")
    assert torch.equal(w, model.get_parameter("dense_head.heads_list.0.hm.1.weight"))
    with torch.no_grad():
        torch.testing.assert_close(twice(batch)["pred_dicts"], model(batch)["pred_dicts"], rtol=0, atol=0)

    plain = adapter.build_model(cfg, ckpt)  # on a DatasetTemplate with a logger: the KeyError case
    copy.deepcopy(copy.deepcopy(plain))
    with pytest.raises(KeyError, match="logger"):
        copy.deepcopy(copy.deepcopy(plain.detector.dataset))


def test_relative_config_from_the_openpcdet_root(standin, tmp_path: Path, monkeypatch, capsys) -> None:
    """The README's `--pcdet-cfg tools/cfgs/...` from the OpenPCDet root: the path is resolved before the
    adapter changes into tools/ (where OpenPCDet resolves _BASE_CONFIG_), not after."""
    _, ckpt = standin
    monkeypatch.chdir(tmp_path / "OpenPCDet")
    rel = "tools/cfgs/standin_models/centerpoint.yaml"
    model = adapter.build_model(rel, ckpt)
    assert model.module_order[-1] == "dense_head"
    assert Path.cwd() == tmp_path / "OpenPCDet"  # the working directory is restored
    out = tmp_path / "dump-rel"
    assert main(["pcdet-dump", "--cfg", rel, "--batches", "2", "--out", str(out)]) == 0, capsys.readouterr()
    assert json.loads((out / "pcdet_dump.json").read_text())["config"] == str(tmp_path / "OpenPCDet" / rel)


def test_apply_with_pcdet_cfg(standin, tmp_path: Path, capsys) -> None:
    """apply --pcdet-cfg builds the network as scan --pcdet-cfg does (no --arch factory needed): from the
    scan's quant state, or recalibrated on --calib / --calib-split; ONNX node names carry dense_head."""
    import onnx

    cfg, ckpt = standin
    out = tmp_path / "report"
    args = ["--pcdet-cfg", str(cfg), "--batches", "2", "--only", "backbone_2d.**", "--only", "dense_head.**"]
    assert main(["scan", str(ckpt), *args, "--no-smoothquant", "--out", str(out), "-q"]) == 0
    base = ["apply", str(ckpt), "--pcdet-cfg", str(cfg), "--policy", str(out / "policy.yaml")]
    assert main([*base, "--onnx"]) == 0
    printed = capsys.readouterr().out
    assert "parity ok" in printed
    check = json.loads((out / "export.json").read_text())
    assert check["verdict"] == "ok" and check["ok"]
    graph = onnx.load(str(out / "model_quant.onnx")).graph
    names = [n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert (
        "/dense_head/heads_list.1/hm/hm.1/Conv" in names
        and "/dense_head/shared_conv/shared_conv.0/Conv" in names
    )
    assert all(n.startswith(("/backbone_2d/", "/dense_head/")) for n in names)
    assert "BatchNormalization" not in {n.op_type for n in graph.node}  # deblocks' BNs folded too
    saved = torch.load(out / "model_quant.pt", weights_only=True)
    assert "dense_head.heads_list.0.hm.1" in json.dumps(saved.get("layers", saved), default=str)

    # recalibrated: on a pcdet-dump folder, or on the dataset's frames
    dump = tmp_path / "calib"
    assert main(["pcdet-dump", "--cfg", str(cfg), "--batches", "2", "--out", str(dump)]) == 0
    for extra in (["--calib", str(dump)], ["--calib-split", "train", "--batches", "2"]):
        folder = tmp_path / f"applied-{extra[0].strip('-')}"
        assert main([*base, *extra, "--out", str(folder)]) == 0, capsys.readouterr().err
        assert (folder / "model_quant.pt").is_file()
    capsys.readouterr()
    for extra, message in (
        (["--arch", ARCH], "--pcdet-cfg builds the network from the OpenPCDet config"),
        (["--calib", str(dump), "--calib-split", "train"], "--calib and --calib-split both choose"),
    ):
        assert main([*base, *extra, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1
    plain = ["apply", str(ckpt), "--arch", ARCH, "--policy", str(out / "policy.yaml"), "--calib-split", "val"]
    assert main([*plain, "--out", str(tmp_path / "x")]) == 2
    assert "--calib-split chooses an OpenPCDet dataset split: it needs --pcdet-cfg" in capsys.readouterr().err


def test_user_setup_errors_are_one_line(standin, tmp_path: Path, capsys) -> None:
    """Where the user's OpenPCDet set-up is at fault: one red line, exit 2, no report, no traceback."""
    cfg, ckpt = standin
    other = tmp_path / "pointpillar.pth"  # a checkpoint of another network
    weights = {
        "vfe.pfn_layers.0.linear.weight": torch.zeros(64, 10),
        "backbone_2d.blocks.0.1.weight": torch.zeros(64, 64, 3, 3),
    }
    torch.save({"model_state": weights, "epoch": 80}, other)
    data = tmp_path / "OpenPCDet" / "data" / "standin"
    infos = data / "infos_val.json"
    pcdet_cfg = ["--pcdet-cfg", str(cfg)]
    cases: list[tuple[list[str], str, Any]] = [
        (
            ["--pcdet-cfg", str(tmp_path / "no.yaml")],
            f"OpenPCDet config not found: {tmp_path / 'no.yaml'}",
            None,
        ),
        (pcdet_cfg, "the checkpoint pointpillar.pth does not fit the network of centerpoint.yaml: ", other),
        (pcdet_cfg, "has no frames: its info file", infos.unlink),
        (
            pcdet_cfg,
            "OpenPCDet's dataset cannot read a frame: FileNotFoundError",
            lambda: infos.write_text(json.dumps(["frames/missing.npz"])),
        ),
        (
            pcdet_cfg,
            f"the dataset folder of centerpoint.yaml does not exist: {data} (DATA_PATH ../data/standin from ",
            lambda: data.rename(data.parent / "x"),
        ),
    ]
    for i, (args, message, setup) in enumerate(cases):
        model = ckpt
        if isinstance(setup, Path):
            model = setup
        elif setup is not None:
            setup()
        out = tmp_path / f"r{i}"
        assert main(["scan", str(model), *args, "--out", str(out), "-q"]) == 2, message
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert not out.exists()
    # the same checks in apply and pcdet-dump
    assert main(["apply", str(other), "--pcdet-cfg", str(cfg), "--policy", str(tmp_path / "p.yaml")]) == 2
    assert "does not fit the network of centerpoint.yaml" in capsys.readouterr().err
    assert main(["pcdet-dump", "--cfg", str(cfg), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "the dataset folder of centerpoint.yaml does not exist: " in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("where", ["config", "base"])
@pytest.mark.parametrize("bomb", ["laughs", "recursive"])
def test_a_yaml_bomb_config_is_refused_before_openpcdet_reads_it(
    standin, tmp_path: Path, where: str, bomb: str, capsys
) -> None:
    """A config (or its _BASE_CONFIG_) whose aliases expand to billions of values, or to a recursive
    structure, is one line and exit 2 at once: OpenPCDet's own YAML reader has no bound and would hang."""
    cfg, ckpt = standin
    levels = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))
    text = "l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + levels if bomb == "laughs" else "a: &a [*a]\n"
    if where == "config":
        target = cfg
        target.write_text(text + cfg.read_text())
    else:
        base = cfg.parent / "bomb_base.yaml"
        base.write_text(text)
        cfg.write_text(f"_BASE_CONFIG_: {base}\n" + cfg.read_text())
    out = tmp_path / "report"
    assert main(["scan", str(ckpt), "--pcdet-cfg", str(cfg), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "through YAML anchors and aliases" in err
    assert not out.exists()
