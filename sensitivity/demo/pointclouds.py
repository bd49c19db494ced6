"""Real LiDAR point clouds for the LiDAR demo and tests, read with numpy, and spconv voxelization.

Data (copied into ``tests/data/pointclouds/``, see its README for sources and licences):

- ``file_with_both_wkt_and_geotiff_vlrs.las.gz``: an airborne LiDAR tile from laspy's test data (gzip of
  the original LAS 1.4 file, point format 6): 25,408 points over 18.3 x 12.2 m, NAD83(2011) Nebraska
  State Plane in US survey feet, with ASPRS classes ground (2), low / medium / high vegetation (3-5),
  building (6) and noise (7). `load_aerial_tile()` returns it in metres, ground-relative.
- ``lamppost.pcd``: a terrestrial scan of a lamppost (1,771 points, PCL's tutorial data shipped in Debian's
  python3-pcl); a small real sparse pattern for the sparse-vs-dense convolution checks.

The LAS reader is a few lines of numpy (the header is fixed-layout, point records are fixed-size) rather
than a laspy dependency: laspy needs lazrs for the .laz files anyway, and we only read uncompressed LAS.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sensitivity.errors import SensitivityError

__all__ = [
    "DATA_ENV",
    "FOOT_US_M",
    "LasPoints",
    "PointCloudDataError",
    "data_dir",
    "frame_points",
    "load_aerial_tile",
    "load_lamppost",
    "read_las",
    "read_pcd",
    "voxelize",
]

#: Folder holding the point-cloud files (default: the repository's ``tests/data/pointclouds``).
DATA_ENV = "SENSITIVITY_POINTCLOUDS"
#: The US survey foot, the tile's horizontal and vertical unit (its WKT: UNIT["Foot_US", 0.3048006...]).
FOOT_US_M = 1200.0 / 3937.0
AERIAL_TILE = "file_with_both_wkt_and_geotiff_vlrs.las.gz"
LAMPPOST = "lamppost.pcd"

# ASPRS classes of the tile
GROUND, LOW_VEG, MED_VEG, HIGH_VEG, BUILDING, NOISE = 2, 3, 4, 5, 6, 7


class PointCloudDataError(SensitivityError):
    """A point-cloud file is missing or not in a format this reader handles."""


def data_dir() -> Path:
    """``$SENSITIVITY_POINTCLOUDS`` if set, else ``tests/data/pointclouds`` of the source checkout."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "tests" / "data" / "pointclouds"


def _data_file(name: str) -> Path:
    path = data_dir() / name
    if not path.is_file():
        raise PointCloudDataError(
            f"point-cloud file {path} not found: the LiDAR demo reads the scans in the repository's "
            f"tests/data/pointclouds (or the folder in ${DATA_ENV}); see the README there for their sources"
        )
    return path


# ------------------------------------------------------------------------------------------------ LAS
@dataclass(frozen=True)
class LasPoints:
    """Points of a LAS file: coordinates in file units (scale and offset applied), per-point attributes."""

    xyz: np.ndarray  # float64 [N, 3]
    intensity: np.ndarray  # uint16 [N]
    classification: np.ndarray  # uint8 [N] (ASPRS codes)
    return_number: np.ndarray  # uint8 [N]
    number_of_returns: np.ndarray  # uint8 [N]
    version: tuple[int, int]
    point_format: int


# point format -> record length without extra bytes
_BASE_LEN = {0: 20, 1: 28, 2: 26, 3: 34, 4: 57, 5: 63, 6: 30, 7: 36, 8: 38, 9: 59, 10: 67}


def read_las(path: str | os.PathLike[str]) -> LasPoints:
    """Read an uncompressed LAS 1.0-1.4 file (point formats 0-10; ``.gz`` transparently) with numpy.

    Compressed LAZ files are refused with a clear error (they need lazrs / LASzip)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[:4] != b"LASF":
        raise PointCloudDataError(f"{path} is not a LAS file (no LASF signature)")
    major, minor = raw[24], raw[25]
    offset = struct.unpack_from("<I", raw, 96)[0]
    fmt_byte = raw[104]
    if fmt_byte & 0xC0:
        raise PointCloudDataError(
            f"{path} is LAZ-compressed: decompress it first (e.g. laszip or laspy+lazrs)"
        )
    fmt = fmt_byte & 0x3F
    if fmt not in _BASE_LEN:
        raise PointCloudDataError(f"{path}: unsupported LAS point format {fmt}")
    rec_len = struct.unpack_from("<H", raw, 105)[0]
    count = struct.unpack_from("<I", raw, 107)[0]
    if count == 0 and (major, minor) >= (1, 4):
        count = struct.unpack_from("<Q", raw, 247)[0]
    if rec_len < _BASE_LEN[fmt] or offset + count * rec_len > len(raw):
        raise PointCloudDataError(f"{path} is truncated or its header is inconsistent")
    scale = np.array(struct.unpack_from("<3d", raw, 131))
    origin = np.array(struct.unpack_from("<3d", raw, 155))
    rec = np.frombuffer(raw, dtype=np.uint8, count=count * rec_len, offset=offset).reshape(count, rec_len)
    xyz = rec[:, :12].copy().view("<i4").astype(np.float64) * scale + origin
    intensity = rec[:, 12:14].copy().view("<u2")[:, 0]
    if fmt < 6:
        returns = rec[:, 14]
        return_number, number_of_returns = returns & 0x07, (returns >> 3) & 0x07
        classification = rec[:, 15] & 0x1F
    else:
        returns = rec[:, 14]
        return_number, number_of_returns = returns & 0x0F, returns >> 4
        classification = rec[:, 16].copy()
    return LasPoints(
        xyz=xyz,
        intensity=intensity.copy(),
        classification=classification.astype(np.uint8),
        return_number=return_number.astype(np.uint8),
        number_of_returns=number_of_returns.astype(np.uint8),
        version=(major, minor),
        point_format=fmt,
    )


# ------------------------------------------------------------------------------------------------ PCD
def read_pcd(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Fields of an ASCII or binary PCD v0.7 file, e.g. ``{"x": ..., "y": ..., "z": ...}`` (float64).

    ``binary_compressed`` (LZF) is refused: none of the files used here needs it."""
    path = Path(path)
    data = path.read_bytes()
    header: dict[str, list[str]] = {}
    pos = 0
    while True:
        end = data.index(b"\n", pos)
        line = data[pos:end].decode("ascii").strip()
        pos = end + 1
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        header[key.upper()] = values
        if key.upper() == "DATA":
            break
    fields = header["FIELDS"]
    sizes = [int(s) for s in header["SIZE"]]
    types = header["TYPE"]
    counts = [int(c) for c in header.get("COUNT", ["1"] * len(fields))]
    n = int(header["POINTS"][0])
    kind = header["DATA"][0].lower()
    names = [f"{f}_{i}" if c > 1 else f for f, c in zip(fields, counts, strict=True) for i in range(c)]
    if kind == "ascii":
        table = np.loadtxt(data[pos:].decode("ascii").splitlines(), dtype=np.float64, ndmin=2)
        if table.shape != (n, len(names)):
            raise PointCloudDataError(f"{path}: expected {n} x {len(names)} values, got {table.shape}")
        return {name: table[:, i] for i, name in enumerate(names)}
    if kind == "binary":
        dtype = np.dtype(
            [
                (f, f"<{ {'F': 'f', 'I': 'i', 'U': 'u'}[t] }{s}", (c,) if c > 1 else ())
                for f, s, t, c in zip(fields, sizes, types, counts, strict=True)
            ]
        )
        arr = np.frombuffer(data, dtype=dtype, count=n, offset=pos)
        return {f: arr[f].astype(np.float64) for f in fields}
    raise PointCloudDataError(f"{path}: PCD DATA {kind!r} is not supported (ascii and binary only)")


# ---------------------------------------------------------------------------------------- the scans
@dataclass(frozen=True)
class AerialTile:
    """The classified airborne tile in metres: x, y from the tile's min corner, z above its median ground."""

    xyz: np.ndarray  # float32 [N, 3], metres
    intensity: np.ndarray  # float32 [N], 0..1 (raw / 65535)
    classification: np.ndarray  # uint8 [N], ASPRS codes

    @property
    def extent(self) -> tuple[float, float]:
        return float(self.xyz[:, 0].max()), float(self.xyz[:, 1].max())


def load_aerial_tile() -> AerialTile:
    """The laspy tile (25,408 real points, ASPRS-classified), converted from US survey feet to metres."""
    las = read_las(_data_file(AERIAL_TILE))
    xyz = las.xyz * FOOT_US_M
    ground_z = np.median(xyz[las.classification == GROUND, 2])
    xyz = xyz - np.array([xyz[:, 0].min(), xyz[:, 1].min(), ground_z])
    return AerialTile(
        xyz=xyz.astype(np.float32),
        intensity=(las.intensity.astype(np.float32) / 65535.0),
        classification=las.classification,
    )


def load_lamppost() -> np.ndarray:
    """PCL's lamppost scan, float32 [1771, 3] in metres, shifted to start at the origin."""
    fields = read_pcd(_data_file(LAMPPOST))
    xyz = np.stack([fields["x"], fields["y"], fields["z"]], axis=1)
    return (xyz - xyz.min(axis=0)).astype(np.float32)


def frame_points(
    tile: AerialTile,
    *,
    yaw: float,
    center: tuple[float, float],
    keep: float = 1.0,
    flip_y: bool = False,
    region: tuple[float, float] | None = None,
    exclude: tuple[float, float] | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One "frame": the tile's points seen from a virtual sensor at `center`, rotated by `yaw`.

    Returns (points [M, 4] float32 = x, y, z, intensity in the frame; ASPRS class [M]). `region` keeps
    only tile points with x in [lo, hi), `exclude` drops those (a train / held-out split by area);
    `keep` < 1 drops points at random (`rng`), as a sparser sensor would; `flip_y` mirrors the frame
    (a standard LiDAR augmentation).
    """
    xyz, cls, inten = tile.xyz, tile.classification, tile.intensity
    mask = np.ones(len(xyz), dtype=bool)
    if region is not None:
        mask &= (xyz[:, 0] >= region[0]) & (xyz[:, 0] < region[1])
    if exclude is not None:
        mask &= (xyz[:, 0] < exclude[0]) | (xyz[:, 0] >= exclude[1])
    if keep < 1.0:
        assert rng is not None
        mask &= rng.random(len(xyz)) < keep
    xyz, cls, inten = xyz[mask], cls[mask], inten[mask]
    c, s = math.cos(yaw), math.sin(yaw)
    dx, dy = xyz[:, 0] - center[0], xyz[:, 1] - center[1]
    x, y = c * dx - s * dy, s * dx + c * dy
    if flip_y:
        y = -y
    pts = np.stack([x, y, xyz[:, 2], inten], axis=1).astype(np.float32)
    return pts, cls


# ---------------------------------------------------------------------------------------- voxelize
def voxelize(
    points: np.ndarray | torch.Tensor,
    voxel_size: tuple[float, float, float],
    point_cloud_range: tuple[float, float, float, float, float, float],
    max_points_per_voxel: int = 10,
    max_voxels: int = 60000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """spconv's `PointToVoxel` on CPU: (voxels [V, P, C], coords [V, 3] as (z, y, x) int32, num_points [V]).

    Points outside `point_cloud_range` (x, y, z min then max) are dropped; a voxel keeps its first
    `max_points_per_voxel` points, as OpenPCDet's voxelization does."""
    from sensitivity.integrations.spconv import require_spconv

    require_spconv()
    from spconv.pytorch.utils import PointToVoxel

    pts = torch.as_tensor(np.asarray(points, dtype=np.float32))
    gen = PointToVoxel(
        vsize_xyz=list(voxel_size),
        coors_range_xyz=list(point_cloud_range),
        num_point_features=pts.shape[1],
        max_num_voxels=max_voxels,
        max_num_points_per_voxel=max_points_per_voxel,
    )
    voxels, coords, num_points = gen(pts)
    return voxels.clone(), coords.clone().int(), num_points.clone().int()
