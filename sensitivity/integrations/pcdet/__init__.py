"""OpenPCDet (`pcdet`) adapter: build a detector from its config, load its checkpoint, calibrate on its dataset.

`pcdet` is imported lazily (`require_pcdet`): it is built from source with CUDA extensions, so
`import sensitivity` never needs it, and every entry point here fails in one line where it is missing.

What it does, with OpenPCDet's own functions wherever one exists:

- the config: `pcdet.config.cfg_from_yaml_file(path, copy.deepcopy(pcdet.config.cfg))` (a copy: the global
  `cfg` is left alone). OpenPCDet resolves `_BASE_CONFIG_` and `DATA_PATH` against the working directory
  (its `tools/` folder by convention); here they resolve against the working directory when the base
  configs are found there, else against the nearest folder above the config file where they are, so the
  CLI runs from anywhere (a relative config path itself is read from the caller's working directory). The
  dataset gets that folder's `DATA_PATH` as its `root_path`; one that does not exist is named in one line.
- the dataset: `pcdet.datasets.build_dataloader(..., dist=False, training=False)` (evaluation mode: no
  augmentation). `split` picks a name from the config's `DATA_SPLIT`: the evaluation split (``val`` in
  OpenPCDet's configs) as is; the training split by pointing the evaluation mode at it (`DATA_SPLIT` and,
  where present, `INFO_PATH`). Frames are taken evenly spaced over the split (nuScenes' 40-frame scenes
  would otherwise make up the whole calibration set), through a DataLoader with the dataset's own
  `collate_batch`. Without the dataset (`build_model`), `pcdet.datasets.DatasetTemplate` supplies what the
  network is built from (grid, ranges, point features), as OpenPCDet's `tools/demo.py` does.
- the network: `pcdet.models.build_network(model_cfg, num_class, dataset)`, then
  `load_params_from_file(filename, logger, to_cpu=True)`. `CenterHead.__init__` calls `.cuda()` on a tensor,
  which fails where CUDA is unavailable: while the network is built there (only then), `torch.Tensor.cuda`
  returns the tensor unchanged (`cuda_calls_stay_on_cpu`). The checkpoint is first read here with
  `weights_only=True` (a pickled object is refused unless `trust_pickle`), and every weight of the network
  must be in it: `load_params_from_file` only logs the ones it skips.
- the forward: `PcdetForward` (below) runs `module_list` and stops before box decoding and NMS (CUDA-only:
  on CPU tensors OpenPCDet's NMS kills the process with no Python error).
- the batches: `batch_to_torch`, the CPU counterpart of `pcdet.models.load_data_to_gpu` (CUDA-only).

Run against the real OpenPCDet CenterPoint (`cbgs_voxel0075_res3d_centerpoint.yaml`, built from source, on
real point clouds read by its own NuScenesDataset: `tests/test_pcdet_real.py`, marker ``pcdet``, where pcdet
imports); CI runs it against a stand-in with OpenPCDet's API names and the real network's traps around the
CenterPoint-shaped model of `sensitivity.demo.centerpoint` (`tests/test_pcdet.py`).
"""

from sensitivity.integrations.pcdet.availability import (
    INSTALL_DOCS,
    PcdetConfigError,
    PcdetUnavailableError,
    cuda_calls_stay_on_cpu,
    pcdet_available,
    require_pcdet,
)
from sensitivity.integrations.pcdet.batches import METADATA_KEYS, batch_to_torch, calibration_batches
from sensitivity.integrations.pcdet.dump import dump_batches
from sensitivity.integrations.pcdet.forward import DEFAULT_OUTPUTS, STOP_METHODS, PcdetForward
from sensitivity.integrations.pcdet.network import build_from_config, build_model

__all__ = [
    "DEFAULT_OUTPUTS",
    "INSTALL_DOCS",
    "METADATA_KEYS",
    "STOP_METHODS",
    "PcdetConfigError",
    "PcdetForward",
    "PcdetUnavailableError",
    "batch_to_torch",
    "build_from_config",
    "build_model",
    "calibration_batches",
    "cuda_calls_stay_on_cpu",
    "dump_batches",
    "pcdet_available",
    "require_pcdet",
]
