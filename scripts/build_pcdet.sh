#!/usr/bin/env bash
# Builds the real OpenPCDet (for tests/test_pcdet_real.py and benchmarks/pcdet_forward.py) in its own
# folder W, outside the project, with a venv of its own: ../shared/PCDET-REAL.md's recipe as one script,
# since these machines are not kept between sessions.
#
#   bash scripts/build_pcdet.sh W SOURCE
#
# W: the folder to build in (W/OpenPCDet, W/venv, W/build-temp); SOURCE: an OpenPCDet checkout or bare
# git snapshot (e.g. the search tool's `fetch` of open-mmlab/OpenPCDet). Needs nvcc (/usr/local/cuda) to
# compile pcdet's CUDA ops, not a GPU: the network then runs on CPU up to the head outputs. 10 minutes
# on this project's 2-core machine (MAX_JOBS=2; PCDET-REAL.md saw 37 on a loaded one); a re-run skips what is done. Then: W/venv/bin/python scripts/pcdet_frames.py --openpcdet
# W/OpenPCDet --out FRAMES --link, and W/venv/bin/python -m pytest -m pcdet tests/test_pcdet_real.py.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: bash scripts/build_pcdet.sh W SOURCE   (W: build folder; SOURCE: OpenPCDet checkout or bare git dir)" >&2
    exit 2
fi
PROJECT=$(cd "$(dirname "$0")/.." && pwd)
W=$(mkdir -p "$1" && cd "$1" && pwd)
SOURCE=$(cd "$2" && pwd)
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "build_pcdet: no nvcc under $CUDA_HOME (set CUDA_HOME)" >&2; exit 2; }

# 1. the source (a bare git snapshot is exported; a checkout is copied)
if [ ! -f "$W/OpenPCDet/setup.py" ]; then
    mkdir -p "$W/OpenPCDet"
    if [ -f "$SOURCE/HEAD" ] && [ -d "$SOURCE/objects" ]; then  # a git directory (a snapshot's has no work tree)
        git --git-dir="$SOURCE" archive HEAD | tar -x -C "$W/OpenPCDet"
    else
        cp -a "$SOURCE/." "$W/OpenPCDet/"
    fi
fi

# 2. its own venv: the CUDA build of torch (the CPU build 2.13.0 cannot compile CUDA extensions), the
# project, and pcdet's imports (kornia 0.9 breaks pcdet/datasets/argo2; torchvision without its torch)
[ -x "$W/venv/bin/python" ] || python3 -m venv "$W/venv"
PIP=("$W/venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.14.1
"${PIP[@]}" -e "$PROJECT[dev,lidar,onnx]" spconv==2.3.8 torch==2.14.1  # dev: pytest, for test_pcdet_real
"${PIP[@]}" numpy easydict pyyaml numba tensorboardX scikit-image tqdm SharedArray pyquaternion ninja \
    opencv-python-headless av2 kornia==0.6.12 torch==2.14.1
"${PIP[@]}" --no-deps torchvision==0.29.1

# 3. pcdet's CUDA ops, built in place; CPATH: the cusparse.h etc. that ATen's CUDA headers include
SITE=$("$W/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
(cd "$W/OpenPCDet" && "$W/venv/bin/python" setup.py build_ext --inplace --build-temp "$W/build-temp")
echo "$W/OpenPCDet" > "$SITE/pcdet-dev.pth"

# 4. check: pcdet and its compiled ops import
"$W/venv/bin/python" - <<'EOF'
import importlib

import torch  # noqa: F401  (the ops link against torch's libraries: load them first)

import pcdet
ops = ["iou3d_nms.iou3d_nms_cuda", "roiaware_pool3d.roiaware_pool3d_cuda", "roipoint_pool3d.roipoint_pool3d_cuda",
       "pointnet2.pointnet2_stack.pointnet2_stack_cuda", "pointnet2.pointnet2_batch.pointnet2_batch_cuda",
       "bev_pool.bev_pool_ext", "ingroup_inds.ingroup_inds_cuda"]
for op in ops:
    importlib.import_module(f"pcdet.ops.{op}")
print(f"pcdet {pcdet.__version__} and its ops import")
EOF
