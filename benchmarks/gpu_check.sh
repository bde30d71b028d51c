#!/usr/bin/env bash
# Every GPU check in one run of under 10 minutes on one CUDA GPU (H100/H200): the tests marked `gpu`,
# then the GPU figures: decode rate (PyAV, torchcodec on the CPU, NVDEC), flow (DIS on N CPU
# processes, RAFT small/large batched in fp32 and bf16 with the bf16 end-point error), extraction
# end to end vs the model alone with GPU utilisation (appearance, motion with RAFT, both),
# torchrun extraction, fine-tuning with K = 24 (the benchmark, and torchrun with nccl where
# the machine has more than one GPU), and `extract --engine ray`: a GPU model actor fed by CPU
# decode tasks against the local engine and the model alone (when Ray is installed there).
#
#   bash benchmarks/gpu_check.sh --prepare   # on a machine with PyPI: fill .gpu/ (git-ignored)
#   bash benchmarks/gpu_check.sh [LOG_DIR]   # on the GPU machine, from the repository root
#
# --prepare puts into .gpu/ what a bare GPU machine with PyTorch lacks (about 62 MB): wheels of
# PyAV, zarr and its codecs, and torchcodec for CPython 3.12 (the versions this environment uses),
# and a copy of the real clips (../shared is not beside the repository there). The check installs
# the wheels into a temporary folder, and lets torchcodec load PyAV's own FFmpeg libraries when
# the system has none. Each step has a time limit; a failed step is reported and the next runs.
# The log (LOG_DIR/gpu_check.log, default $OUT or /tmp) holds every figure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    rm -rf .gpu/wheels && mkdir -p .gpu/wheels .gpu/videos
    ver() { "$PY" -m pip show "$1" | awk '/^Version:/{print $2}'; }
    specs=()
    for pkg in av zarr numcodecs donfig google-crc32c torchcodec; do
        v=$(ver "$pkg")
        [[ -n "$v" ]] || { echo "$pkg is not installed here; install the project first" >&2; exit 2; }
        specs+=("$pkg==${v%%+*}")
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels "${specs[@]}"
    cp ../shared/data/videos/*.mp4 ../shared/data/videos/*.avi .gpu/videos/
    # Ray Data with its dependencies, for the --engine ray step (about 150 MB; skipped when the
    # download fails: the step then reports that Ray is missing)
    rv=$(ver ray)
    if [[ -n "$rv" ]]; then
        mkdir -p .gpu/ray-wheels
        "$PY" -m pip download -q --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d .gpu/ray-wheels "ray[data]==${rv}" ||
            { echo "ray wheels not downloaded; the ray step will be skipped" >&2; rm -rf .gpu/ray-wheels; }
    fi
    du -sh .gpu
    exit 0
fi

LOG_DIR=${1:-${OUT:-/tmp}}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d /tmp/framepool-gpu.XXXX)
FAILED=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, report, go on
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit} s) ==="
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s ==="
    [[ $rc -eq 0 ]] || FAILED+=("$name (exit $rc)")
}

# ------------------------------------------------------------------------------ environment
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
        .gpu/wheels/*.whl
    export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if compgen -G ".gpu/ray-wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-compile --no-cache-dir --target "$WORK/ray-site" \
        .gpu/ray-wheels/*.whl && export PYTHONPATH="$PYTHONPATH:$WORK/ray-site"
fi
if [[ -d .gpu/videos ]]; then
    VIDEOS=$PWD/.gpu/videos
else
    VIDEOS=$(cd .. && pwd)/shared/data/videos
fi
export FRAMEPOOL_TEST_VIDEOS=$VIDEOS
# torchcodec needs FFmpeg's shared libraries under their usual names; PyAV ships its own copy
if ! "$PY" -c "from torchcodec.decoders import VideoDecoder" 2>/dev/null; then
    AVLIBS=$("$PY" -c "import av, pathlib; print(pathlib.Path(av.__file__).parents[1] / 'av.libs')")
    mkdir -p "$WORK/ffmpeg"
    for f in "$AVLIBS"/lib{avcodec,avdevice,avfilter,avformat,avutil,swresample,swscale}-*.so.*; do
        base=$(basename "$f")
        name=${base%%-*}
        major=$(echo "$base" | sed -E 's/.*\.so\.([0-9]+).*/\1/')
        ln -sf "$f" "$WORK/ffmpeg/$name.so.$major"
    done
    export LD_LIBRARY_PATH="$WORK/ffmpeg:$AVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
NGPU=$(nvidia-smi -L | wc -l)
"$PY" - <<'EOF'
import torch
from extractor.decode_torchcodec import torchcodec_problem
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
problem = torchcodec_problem()
if problem is None:
    from torchcodec._core import ops
    print(f"torchcodec loads (FFmpeg {ops.ffmpeg_major_version})")
else:
    print(f"torchcodec: {problem}")
EOF

# ------------------------------------------------------------------------------ tests
# (the GPU tests live in tests/extractor; collecting the service's tests would need its packages)
step "GPU tests" 120 "$PY" -m pytest -q -m gpu -rs -s -p no:cacheprovider tests/extractor

# ------------------------------------------------------------------------------ figures
step "decode rate" 45 "$PY" benchmarks/decode.py --videos "$VIDEOS" --device cuda --repeats 1 \
    --threads 1
step "flow: DIS on N processes, RAFT batched fp32/bf16" 75 "$PY" benchmarks/flow.py \
    --videos "$VIDEOS" --device cuda --pairs 480 --processes 1,4,8,16 --raft-pairs 512 --batch 32
step "extract: appearance, motion (RAFT small bf16), both vs the model alone" 110 \
    "$PY" benchmarks/extract.py --videos "$VIDEOS" --device cuda --arch resnet101 --frames 2500 \
    --naive-frames 0 --batch-size 256 --workers 12 --repeats 1 --model-batches 8 --flow raft \
    --raft-model small --flow-dtype bfloat16
step "extract: appearance, 4 x the clips" 50 "$PY" benchmarks/extract.py --videos "$VIDEOS" \
    --device cuda --arch resnet101 --frames 2500 --loops 4 --naive-frames 0 --batch-size 256 \
    --workers 12 --repeats 1 --model-batches 8 --streams appearance

# torchrun: extraction sharded over ranks (one GPU: two ranks share cuda:0; no process group)
step "torchrun extract, 2 ranks" 50 "$PY" -m torch.distributed.run --standalone \
    --nproc-per-node 2 -m api.cli extract "$VIDEOS" --store "$WORK/store.zarr" --weights random \
    --arch resnet101 --device cuda:0 --batch-size 128 --decode-workers 6 --streams appearance --no-progress

# fine-tuning with K = 24: seconds per epoch (benchmark), then the CLI under torchrun (nccl when
# this machine has several GPUs, one rank per GPU: NCCL refuses two ranks on one GPU)
step "finetune benchmark K=1,24" 60 "$PY" benchmarks/finetune.py --clips "$VIDEOS"/*.mp4 \
    --arch resnet101 --videos 8 --max-frames 96 --periods 1,24 --modes compute --epochs 1 \
    --device cuda
{ echo "path,label"; for f in "$VIDEOS"/*; do echo "$f,${f##*/}" | sed -E 's/,(..)_.*/,\1/'; done; } \
    >"$WORK/labels.csv"
step "torchrun finetune K=24 on $NGPU GPU(s)" 50 "$PY" -m torch.distributed.run --standalone \
    --nproc-per-node "$NGPU" -m api.cli finetune --videos "$VIDEOS" --labels "$WORK/labels.csv" \
    --out "$WORK/ft" --period 24 --epochs 2 --weights random --arch resnet101 --max-frames 96 \
    --device cuda

# Ray Data engine: one GPU model actor fed by CPU decode tasks (12 of them) on this machine,
# against the local engine and against the model alone (frames/s of each, peak RSS by process)
if "$PY" -c "import ray.data" 2>/dev/null; then
    step "extract --engine ray: GPU actor + CPU decode tasks vs local vs the model alone" 240 \
        "$PY" benchmarks/extract.py --engine ray --videos "$VIDEOS" --device cuda \
        --arch resnet101 --frames 2500 --streams appearance --batch-size 256 --workers 12 \
        --worker-counts 0 --repeats 1 --model-batches 8
else
    echo "=== extract --engine ray: skipped (Ray Data is not installed here) ==="
fi

echo
if [[ ${#FAILED[@]} -eq 0 ]]; then
    echo "gpu_check: every step passed"
else
    printf 'gpu_check: failed: %s\n' "${FAILED[@]}"
fi
rm -rf "$WORK"
[[ ${#FAILED[@]} -eq 0 ]]
