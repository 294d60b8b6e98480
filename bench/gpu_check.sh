#!/usr/bin/env bash
# Full-size throughput check on one GPU machine (issue 8): JPEG decoders, the Multi-Similarity
# miner + loss (library pair vs DenseMultiSimilarity, with the host waits each makes), training
# input pipeline vs the train step, a Pitts250k-size evaluation, and the CUDA tests
# (tests/test_cuda.py). Each part has its own timeout (40 + 20 + 290 + 125 + 105 = 580 s,
# leaving ~20 s of the device tool's 600 s per command for the installs); prints a short
# table last.
#
#   bash bench/gpu_check.sh                 # from the repository root (or anywhere)
#
# The machine needs python3 with torch + torchvision + CUDA and no network. faiss-cpu and
# pytorch-metric-learning, when missing, are installed from wheel files in .whl/ at the
# repository root (the folder is gitignored: never commit wheels). Fetch them beforehand on a
# machine with network, from the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform manylinux1_x86_64 -d .whl faiss-cpu==1.15.1 pytorch-metric-learning==2.9.0
#
# Their dependencies (faiss-cpu: numpy, packaging; pytorch-metric-learning: numpy,
# scikit-learn, torch, tqdm; read with `unzip -p .whl/NAME-*.whl '*/METADATA' | grep
# ^Requires-Dist`) are all in the GPU image this project uses, so no other wheel is needed.
# (Match --python-version to that machine's python3.)
#
# Optional, for bench/jpeg_decoders.py's nvImageCodec rows (the GPU's hardware JPEG engines):
# wheels in .whl/nvimgcodec/, installed apart in /tmp/site_nvimgcodec (never on PYTHONPATH):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl/nvimgcodec \
#       nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.0.4.44
#
# (-cu13 and nvjpeg 13.0 for that machine's torch 2.11.0+cu130; ~29 MB, all wheels < 64 MiB.)
#
# Logs go to $OUT (if set) or /tmp/vprlib_gpu_check: decoders.log, loss.log, train.log, train.json,
# trace_gpu_2s.json.gz (named after the default path: a torch.profiler record of it, end to end: open it in
# ui.perfetto.dev), eval.log, tests.log.
# DRY_RUN=1 runs every part with --small instead (checks this script on a CPU machine; the
# CUDA tests skip there).
# PARTS="train tests" runs only those parts (default: "decoders loss train eval tests");
# TRAIN_MODES / EVAL_MODES replace the scripts' --modes (eval default here: "gpu,gpu:fp32",
# nvJPEG at bf16 and at extract_descriptors' default fp32).
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
LOGS=${OUT:-/tmp/vprlib_gpu_check}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import faiss, pytorch_metric_learning" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "faiss / pytorch-metric-learning missing and no wheels in $REPO/.whl (see header)"
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! python3 - <<'EOF'
import os, torch, torchvision
from torchvision.io import decode_jpeg, encode_jpeg
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"cuda {torch.cuda.is_available()}, cores {len(os.sched_getaffinity(0))}")
img = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
out = decode_jpeg([encode_jpeg(img)], device="cuda")[0]
print(f"nvJPEG batch decode works: {tuple(out.shape)} on {out.device}")
EOF
then
    if [ "${DRY_RUN:-0}" != 1 ]; then
        echo "no working CUDA + nvJPEG here: stopping (DRY_RUN=1 checks the script on a CPU)"
        exit 3
    fi
fi

PARTS=${PARTS:-decoders loss train eval tests}
wants() { [[ " $PARTS " == *" $1 "* ]]; }
TRAIN_ARGS=()
EVAL_ARGS=(--full --modes "${EVAL_MODES:-gpu,gpu:fp32}")
DECODER_ARGS=()
LOSS_ARGS=()
if [ "${DRY_RUN:-0}" = 1 ]; then
    TRAIN_ARGS=(--small)
    EVAL_ARGS=(--small --modes "${EVAL_MODES:-cpu,gpu:fp32}")
    DECODER_ARGS=(--small)
    LOSS_ARGS=(--small)
fi
if [ -n "${TRAIN_MODES:-}" ]; then
    TRAIN_ARGS+=(--modes "$TRAIN_MODES")
fi
if ls .whl/nvimgcodec/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site_nvimgcodec .whl/nvimgcodec/*.whl \
        && DECODER_ARGS+=(--site /tmp/site_nvimgcodec)
fi

status=0
if wants decoders; then
    echo "== JPEG decoders (torchvision CPU / nvJPEG, nvImageCodec backends when installed)"
    timeout 40 python3 bench/jpeg_decoders.py ${DECODER_ARGS[@]+"${DECODER_ARGS[@]}"} 2>&1 \
        | tee "$LOGS/decoders.log" || status=1
fi
if wants loss; then
    echo "== Multi-Similarity miner + loss: the library pair vs DenseMultiSimilarity"
    timeout 20 python3 bench/ms_loss.py ${LOSS_ARGS[@]+"${LOSS_ARGS[@]}"} 2>&1 \
        | tee "$LOGS/loss.log" || status=1
fi
if wants train; then
    echo "== training throughput (full size)"
    timeout 290 python3 bench/train_throughput.py ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} \
        --json "$LOGS/train.json" --trace "$LOGS" 2>&1 \
        | tee "$LOGS/train.log" || status=1
fi
if wants eval; then
    echo "== evaluation throughput (Pitts250k-test size)"
    timeout 125 python3 bench/eval_throughput.py "${EVAL_ARGS[@]}" 2>&1 \
        | tee "$LOGS/eval.log" || status=1
fi
if wants tests; then
    echo "== CUDA paths vs the CPU (tests/test_cuda.py; skipped where there is no GPU)"
    timeout 105 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 \
        | tee "$LOGS/tests.log" || status=1
fi

echo
echo "== summary (bench/RESULTS.md explains the columns)"
if wants decoders; then sed -n '/^decoder .*images\/s/,/^$/p' "$LOGS/decoders.log"; echo; fi
if wants loss; then sed -n '/^miner + loss/,/^ratio/p' "$LOGS/loss.log"; echo; fi
if wants train; then sed -n '/^path .*pipeline/,/^best:/p' "$LOGS/train.log"; echo; fi
if wants eval; then sed -n '/^path .*Pitts250k/,/^best:/p' "$LOGS/eval.log"; echo; fi
if wants tests; then tail -n 1 "$LOGS/tests.log"; fi
exit $status
