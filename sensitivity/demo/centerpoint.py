"""A CenterPoint-shaped LiDAR detector (OpenPCDet's module tree and names), trained on a real scan.

Model
    `CenterPoint` mirrors OpenPCDet's nuScenes CenterPoint (``cbgs_voxel0075_res3d_centerpoint``) module
    for module, narrower and on a smaller grid so that it runs in well under a second on one CPU thread:

    - ``vfe``: MeanVFE (no weights): mean of each voxel's points.
    - ``backbone_3d``: VoxelResBackBone8x in spconv: ``conv_input.0`` (SubMConv3d, no bias),
      ``conv{1..4}.{i}.conv{1,2}`` (SubMConv3d in SparseBasicBlocks, ``bias=True`` as in OpenPCDet),
      ``conv{2,3,4}.0.0`` (strided SparseConv3d), ``conv_out.0`` (SparseConv3d (3,1,1) / (2,1,1)).
    - ``map_to_bev_module``: HeightCompression (dense, then C·D channels).
    - ``backbone_2d``: BaseBEVBackbone, Conv2d ``blocks.{0,1}.{1,4,7,10,13,16}``, ConvTranspose2d
      ``deblocks.{0,1}.0``.
    - ``dense_head``: CenterHead, ``shared_conv.0`` then per task N ``heads_list.N.<head>.0.0`` (3x3) and
      ``heads_list.N.<head>.1`` (3x3 to the head's outputs) for center, center_z, dim, rot, vel, hm.

    Input: an OpenPCDet ``batch_dict`` (``voxels`` [V, P, 4] = x, y, z, intensity; ``voxel_coords`` [V, 4]
    = batch, z, y, x; ``voxel_num_points`` [V]; ``batch_size``). Output: a new dict (the input is not
    mutated) with OpenPCDet's intermediate keys and ``pred_dicts``: per task a dict of BEV maps
    [B, out, H, W] before post-processing; scan it with ``outputs=("pred_dicts",)``.

    Sizes (OpenPCDet's in brackets): 3D widths 16/32/64/128 as there, so 256 BEV channels as there; 2D
    widths 32/64 (128/256), upsample 64/64 (256/256), shared conv 32 (64); grid [41, 128, 128] at
    0.15 x 0.15 x 0.4 m ([41, 1440, 1440] at 0.075 x 0.075 x 0.2 m), so 16 x 16 BEV maps (180 x 180). Two
    tasks, hm classes (ground, non_ground) and (vegetation, building), instead of nuScenes' six.

Training and the frames it uses: `sensitivity.demo.centerpoint_train`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sensitivity.demo import pointclouds as pc
from sensitivity.integrations.spconv import add_cpu_bias_fallback_, require_spconv

spconv = require_spconv()  # SpconvUnavailableError naming the `lidar` extra when missing

__all__ = ["HEAD_ORDER", "CenterPoint", "CenterPointConfig", "build_centerpoint", "make_batch"]

log = logging.getLogger(__name__)

#: CenterHead's heads, in OpenPCDet's order (HEAD_ORDER, then hm), with their output channels
HEAD_ORDER: tuple[tuple[str, int], ...] = (("center", 2), ("center_z", 1), ("dim", 3), ("rot", 2), ("vel", 2))


@dataclass(frozen=True)
class CenterPointConfig:
    """Geometry and widths; OpenPCDet's nuScenes values are in the module docstring."""

    point_cloud_range: tuple[float, float, float, float, float, float] = (-9.6, -9.6, -1.0, 9.6, 9.6, 15.0)
    voxel_size: tuple[float, float, float] = (0.15, 0.15, 0.4)
    max_points_per_voxel: int = 10
    max_voxels: int = 40000
    num_point_features: int = 4
    channels_3d: tuple[int, int, int, int] = (16, 32, 64, 128)
    layer_nums: tuple[int, int] = (5, 5)
    layer_strides: tuple[int, int] = (1, 2)
    num_filters: tuple[int, int] = (32, 64)
    upsample_strides: tuple[int, int] = (1, 2)
    num_upsample_filters: tuple[int, int] = (64, 64)
    shared_conv_channel: int = 32
    tasks: tuple[tuple[str, ...], ...] = (("ground", "non_ground"), ("vegetation", "building"))

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Voxels along x, y, z."""
        r, v = self.point_cloud_range, self.voxel_size
        return tuple(round((r[i + 3] - r[i]) / v[i]) for i in range(3))  # type: ignore[return-value]

    @property
    def sparse_shape(self) -> list[int]:
        """spconv spatial shape (z, y, x), one extra z plane as in OpenPCDet."""
        gx, gy, gz = self.grid_size
        return [gz + 1, gy, gx]

    @property
    def bev_cell_m(self) -> float:
        return self.voxel_size[0] * 8


# ------------------------------------------------------------------------------------------ modules
class MeanVFE(nn.Module):
    """OpenPCDet's MeanVFE: each voxel's feature is the mean of its points (padding slots are zeros)."""

    def forward(self, batch_dict: dict[str, Any]) -> dict[str, Any]:
        voxels, num = batch_dict["voxels"], batch_dict["voxel_num_points"]
        normalizer = torch.clamp_min(num.view(-1, 1), min=1.0).type_as(voxels)
        batch_dict["voxel_features"] = (voxels.sum(dim=1) / normalizer).contiguous()
        return batch_dict


def _bn1d(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=1e-3, momentum=0.01)


class SparseBasicBlock(spconv.SparseModule):
    """OpenPCDet's SparseBasicBlock: two SubMConv3d (``bias=True``, before BatchNorm) and a residual."""

    def __init__(self, channels: int, indice_key: str) -> None:
        super().__init__()
        self.conv1 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=True, indice_key=indice_key)
        self.bn1 = _bn1d(channels)
        self.relu = nn.ReLU()
        self.conv2 = spconv.SubMConv3d(channels, channels, 3, padding=1, bias=True, indice_key=indice_key)
        self.bn2 = _bn1d(channels)

    def forward(self, x: Any) -> Any:
        identity = x
        out = self.conv1(x)
        out = out.replace_feature(self.relu(self.bn1(out.features)))
        out = self.conv2(out)
        out = out.replace_feature(self.bn2(out.features))
        out = out.replace_feature(self.relu(out.features + identity.features))
        return out


def _down_block(c_in: int, c_out: int, padding: int | tuple[int, int, int], key: str) -> nn.Module:
    """OpenPCDet's post_act_block(conv_type='spconv'): strided SparseConv3d, BatchNorm, ReLU."""
    return spconv.SparseSequential(
        spconv.SparseConv3d(c_in, c_out, 3, stride=2, padding=padding, bias=False, indice_key=key),
        _bn1d(c_out),
        nn.ReLU(),
    )


class VoxelResBackBone8x(nn.Module):
    """OpenPCDet's VoxelResBackBone8x (21 spconv layers: 17 SubMConv3d, 4 SparseConv3d)."""

    def __init__(self, cfg: CenterPointConfig) -> None:
        super().__init__()
        c1, c2, c3, c4 = cfg.channels_3d
        self.sparse_shape = cfg.sparse_shape
        self.conv_input = spconv.SparseSequential(
            spconv.SubMConv3d(cfg.num_point_features, c1, 3, padding=1, bias=False, indice_key="subm1"),
            _bn1d(c1),
            nn.ReLU(),
        )
        self.conv1 = spconv.SparseSequential(SparseBasicBlock(c1, "res1"), SparseBasicBlock(c1, "res1"))
        self.conv2 = spconv.SparseSequential(
            _down_block(c1, c2, 1, "spconv2"), SparseBasicBlock(c2, "res2"), SparseBasicBlock(c2, "res2")
        )
        self.conv3 = spconv.SparseSequential(
            _down_block(c2, c3, 1, "spconv3"), SparseBasicBlock(c3, "res3"), SparseBasicBlock(c3, "res3")
        )
        self.conv4 = spconv.SparseSequential(
            _down_block(c3, c4, (0, 1, 1), "spconv4"),
            SparseBasicBlock(c4, "res4"),
            SparseBasicBlock(c4, "res4"),
        )
        self.conv_out = spconv.SparseSequential(
            spconv.SparseConv3d(
                c4, c4, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False, indice_key="spconv_down2"
            ),
            _bn1d(c4),
            nn.ReLU(),
        )
        self.num_point_features = c4

    def forward(self, batch_dict: dict[str, Any]) -> dict[str, Any]:
        x = spconv.SparseConvTensor(
            features=batch_dict["voxel_features"],
            indices=batch_dict["voxel_coords"].int(),
            spatial_shape=self.sparse_shape,
            batch_size=int(batch_dict["batch_size"]),
        )
        x = self.conv_input(x)
        x_conv1 = self.conv1(x)
        x_conv2 = self.conv2(x_conv1)
        x_conv3 = self.conv3(x_conv2)
        x_conv4 = self.conv4(x_conv3)
        batch_dict["encoded_spconv_tensor"] = self.conv_out(x_conv4)
        batch_dict["encoded_spconv_tensor_stride"] = 8
        batch_dict["multi_scale_3d_features"] = {
            "x_conv1": x_conv1,
            "x_conv2": x_conv2,
            "x_conv3": x_conv3,
            "x_conv4": x_conv4,
        }
        return batch_dict


class HeightCompression(nn.Module):
    """OpenPCDet's HeightCompression: the sparse volume made dense, depth folded into channels."""

    def forward(self, batch_dict: dict[str, Any]) -> dict[str, Any]:
        dense = batch_dict["encoded_spconv_tensor"].dense()
        n, c, d, h, w = dense.shape
        batch_dict["spatial_features"] = dense.view(n, c * d, h, w)
        batch_dict["spatial_features_stride"] = batch_dict["encoded_spconv_tensor_stride"]
        return batch_dict


def _bn2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class BaseBEVBackbone(nn.Module):
    """OpenPCDet's BaseBEVBackbone: two strided Conv2d stacks, each upsampled and concatenated."""

    def __init__(self, cfg: CenterPointConfig, in_channels: int) -> None:
        super().__init__()
        c_in = [in_channels, *cfg.num_filters[:-1]]
        self.blocks = nn.ModuleList()
        self.deblocks = nn.ModuleList()
        for i, (c, stride) in enumerate(zip(cfg.num_filters, cfg.layer_strides, strict=True)):
            layers: list[nn.Module] = [
                nn.ZeroPad2d(1),
                nn.Conv2d(c_in[i], c, 3, stride=stride, padding=0, bias=False),
                _bn2d(c),
                nn.ReLU(),
            ]
            for _ in range(cfg.layer_nums[i]):
                layers += [nn.Conv2d(c, c, 3, padding=1, bias=False), _bn2d(c), nn.ReLU()]
            self.blocks.append(nn.Sequential(*layers))
            up, c_up = cfg.upsample_strides[i], cfg.num_upsample_filters[i]
            self.deblocks.append(
                nn.Sequential(nn.ConvTranspose2d(c, c_up, up, stride=up, bias=False), _bn2d(c_up), nn.ReLU())
            )
        self.num_bev_features = sum(cfg.num_upsample_filters)

    def forward(self, data_dict: dict[str, Any]) -> dict[str, Any]:
        x = data_dict["spatial_features"]
        ups = []
        for block, deblock in zip(self.blocks, self.deblocks, strict=True):
            x = block(x)
            ups.append(deblock(x))
        data_dict["spatial_features_2d"] = torch.cat(ups, dim=1)
        return data_dict


class SeparateHead(nn.Module):
    """OpenPCDet's SeparateHead: per head, Conv-BN-ReLU (``.0``) then a 3x3 Conv to its outputs (``.1``)."""

    def __init__(self, channels: int, heads: dict[str, int], init_bias: float = -2.19) -> None:
        super().__init__()
        self.head_names = tuple(heads)
        for name, out in heads.items():
            fc = nn.Sequential(
                nn.Sequential(
                    nn.Conv2d(channels, channels, 3, padding=1, bias=False), _bn2d(channels), nn.ReLU()
                ),
                nn.Conv2d(channels, out, 3, padding=1, bias=True),
            )
            if name == "hm":
                nn.init.constant_(fc[-1].bias, init_bias)
            else:
                for m in fc.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
            self.add_module(name, fc)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: getattr(self, name)(x) for name in self.head_names}


class CenterHead(nn.Module):
    """OpenPCDet's CenterHead up to the raw per-head maps (no box decoding, no NMS: CUDA-only there)."""

    def __init__(self, cfg: CenterPointConfig, in_channels: int) -> None:
        super().__init__()
        c = cfg.shared_conv_channel
        self.shared_conv = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1, bias=False), _bn2d(c), nn.ReLU()
        )
        self.heads_list = nn.ModuleList(
            SeparateHead(c, {**dict(HEAD_ORDER), "hm": len(classes)}) for classes in cfg.tasks
        )
        self.forward_ret_dict: dict[str, Any] = {}

    def forward(self, data_dict: dict[str, Any]) -> dict[str, Any]:
        x = self.shared_conv(data_dict["spatial_features_2d"])
        pred_dicts = [head(x) for head in self.heads_list]
        self.forward_ret_dict = {"pred_dicts": pred_dicts}
        data_dict["pred_dicts"] = pred_dicts
        return data_dict


class CenterPoint(nn.Module):
    """The CenterPoint-shaped detector (see the module docstring); `module_list` runs in OpenPCDet's order."""

    def __init__(self, cfg: CenterPointConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or CenterPointConfig()
        self.vfe = MeanVFE()
        self.backbone_3d = VoxelResBackBone8x(self.cfg)
        self.map_to_bev_module = HeightCompression()
        gz = self.cfg.sparse_shape[0]
        for pad in (1, 1, 0):  # conv2..conv4: kernel 3, stride 2 in z (conv4 pads only x and y)
            gz = (gz + 2 * pad - 3) // 2 + 1
        gz = (gz - 3) // 2 + 1  # conv_out: kernel 3, stride 2, no padding in z
        self.backbone_2d = BaseBEVBackbone(self.cfg, self.cfg.channels_3d[3] * gz)
        self.dense_head = CenterHead(self.cfg, self.backbone_2d.num_bev_features)
        #: provenance of the weights (set by `train_centerpoint`): what was trained, how well, what was not
        self.training_meta: dict[str, Any] = {"trained": False}

    @property
    def module_list(self) -> list[nn.Module]:
        return [self.vfe, self.backbone_3d, self.map_to_bev_module, self.backbone_2d, self.dense_head]

    def forward(self, batch_dict: dict[str, Any]) -> dict[str, Any]:
        batch_dict = dict(batch_dict)  # OpenPCDet updates the caller's dict; the scan reuses its batches
        for module in self.module_list:
            batch_dict = module(batch_dict)
        return batch_dict


def build_centerpoint(cfg: CenterPointConfig | None = None, cpu_bias_fallback: bool = True) -> CenterPoint:
    """Factory for ``--arch sensitivity.demo.centerpoint:build_centerpoint``: the architecture in eval mode,
    random weights (load the state dict `train_centerpoint` caches, or call that, for trained ones).

    `cpu_bias_fallback` installs `add_cpu_bias_fallback_`, without which the SparseBasicBlock convs
    (``bias=True``, as in OpenPCDet) fail in eval mode on CPU, as OpenPCDet's own network does."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CenterPoint(cfg)
    if cpu_bias_fallback:
        add_cpu_bias_fallback_(model)
    return model.eval()


# --------------------------------------------------------------------------------------------- data
def make_batch(frames: Sequence[np.ndarray], cfg: CenterPointConfig | None = None) -> dict[str, Any]:
    """An OpenPCDet batch_dict from point arrays [N, 4] (x, y, z, intensity), voxelized with spconv."""
    cfg = cfg or CenterPointConfig()
    voxels, coords, nums = [], [], []
    for b, pts in enumerate(frames):
        v, c, n = pc.voxelize(
            pts, cfg.voxel_size, cfg.point_cloud_range, cfg.max_points_per_voxel, cfg.max_voxels
        )
        voxels.append(v)
        coords.append(F.pad(c, (1, 0), value=b))
        nums.append(n)
    return {
        "voxels": torch.cat(voxels),
        "voxel_coords": torch.cat(coords),
        "voxel_num_points": torch.cat(nums),
        "batch_size": len(frames),
    }
