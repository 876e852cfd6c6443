#!/usr/bin/env bash
# Every GPU measurement of the benchmarks in one command, so that a short time on a GPU is enough:
#   cuDNN attention checked against the reference (forward and gradient, packed rows),
#   GPT-2 small training at sequence 1024 in bfloat16 (cuDNN and XLA attention; MFU against the
#   published dense bfloat16 peak), batch-1/8/32 decoding against the HBM-bandwidth bound, and
#   the gpt-tiny recipe's training loop against its bare step.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # JSON per measurement in OUT_DIR (default benchmarks/results/gpu)
#
# Needs jax with CUDA, flax, optax and orbax-checkpoint. On a machine that cannot install
# packages, set WHEELS to a folder of flax/optax/orbax-checkpoint wheels: they are used when the
# installed flax is older than this project needs.
set -uo pipefail
cd "$(dirname "$0")"
out=$(realpath -m "${1:-results/gpu}")
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH="$(realpath ..)${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${WHEELS:-}" ] && ! $python -c 'import flax, sys; sys.exit(tuple(map(int, flax.__version__.split(".")[:2])) < (0, 12))' 2>/dev/null; then
  $python -m pip install -q --no-deps --target /tmp/gpu-site "$WHEELS"/*.whl && export PYTHONPATH="/tmp/gpu-site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
$python -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'

step() { echo; echo "\$ $*"; "$@" 2>&1 | grep -vE "^(WARNING|I0000|E0000|W0000)"; }

step $python -m pytest -q -p no:cacheprovider ../tests/test_attention.py -k cudnn
gpt2="--preset gpt2-small --dtype bfloat16 --length 1024 --batch 16 --steps 10 --set dropout_rate=0 attention_dropout_rate=0"
step $python train_throughput.py $gpt2 --attention xla --out "$out/train_xla.json"
step $python train_throughput.py $gpt2 --attention cudnn --out "$out/train_cudnn.json"
# nanoGPT's vocabulary padded to a multiple of 64, and layers unrolled (no scan: faster, slower to compile)
step $python train_throughput.py $gpt2 vocab_size=50304 --attention cudnn --out "$out/train_cudnn_v50304.json"
step $python train_throughput.py $gpt2 vocab_size=50304 scan_layers=false --attention cudnn --remat none --out "$out/train_cudnn_v50304_unrolled.json"
# every activation kept (remat "none") against the default, which keeps only weight products
# and recomputes the rest: under scan the default was faster on an H100 (50 against 61 ms; on a CPU too),
# unrolled it was slower (54 against 46 ms: it recomputes cuDNN attention)
step $python train_throughput.py $gpt2 vocab_size=50304 --attention cudnn --remat none --out "$out/train_cudnn_v50304_remat_none.json"
step $python decode.py --models gpt2-small --dtype bfloat16 --batch-sizes 1 8 32 --out "$out/decode.json"
# The tiny recipes run 60-110 steps a second on an H100 (9-17 ms a step, far above their
# arithmetic): the bare compiled step against the whole loop says whether the step or the loop
# around it takes that time (needs the shakespeare data set in the cache: TRANSFORMER_CACHE)
step $python train_loop.py --experiment gpt-tiny --steps 300 --out "$out/train_loop_gpt_tiny.json"
