#!/usr/bin/env bash
# The GPU checks of one lent device session, in one call (see README "Time and memory"):
#   the GPU-only tests, the image bench (float32 and bf16, plus a profile), atlas steps eager vs
#   CUDA graph, a short timed atlas training whose atlas then feeds the video bench.
# Expects: python3 with torch+CUDA; wheels for missing packages in .whl/ (optional); the shared
# data (davis/car-turn, images/horse.jpg) under $TEXT2LIVE_SHARED_DATA (default ../shared/data).
# Writes logs under $OUT (default ./gpu_out). NLA_MINUTES sets the atlas training budget.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
DATA=${TEXT2LIVE_SHARED_DATA:-../shared/data}; CAR=$DATA/davis/car-turn
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
step() {  # a titled step: its stdout, the last lines of its stderr (no progress bars), its exit status
    echo "== $1"; shift
    "$@" 2>/tmp/step_err.txt; local rc=$?
    tr '\r' '\n' </tmp/step_err.txt | grep -v 'it/s\]\|s/it\]\|^ *$' | tail -n 8
    cat /tmp/step_err.txt >>"$OUT/stderr.txt"; echo "rc=$rc"
}

step "GPU tests" timeout 240 python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_gpu.py \
    tests/test_optim.py tests/test_nla_training.py
IMAGE="timeout 150 python3 bench/bench_image.py --size 512 --steps ${IMAGE_STEPS:-40}"
step "image 512 float32, fast_path (the GPU default)" $IMAGE --precision off --profile "$OUT/profile_image.txt"
step "image 512 float32, cuDNN" $IMAGE --precision off fast_path=false
step "image 512 bf16, fast_path" $IMAGE --precision auto
step "image 512 float32, fast_path, the madgrad package" $IMAGE --precision off --madgrad-package
if [ -z "${SKIP_NLA_STEP:-}" ]; then
    step "atlas steps, eager vs graph" timeout 200 python3 bench/bench_nla_step.py --video "$CAR/frames" \
        --masks "$CAR/masks" --resx 768 --resy 432 --batches 10000 40000 --steps 200 --work /tmp/flow
fi
step "atlas training ${NLA_MINUTES:-2.5} min" timeout 400 python3 bench/bench_nla.py --video "$CAR/frames" --masks "$CAR/masks" \
    --resx 768 --resy 432 --minutes "${NLA_MINUTES:-2.5}" --log_minutes 0.5 --work /tmp/flow --save /tmp/atlas \
    iters_num="${NLA_ITERS:-20000}"
step "video car-turn_winter, fast_path" timeout 200 python3 bench/bench_video.py --atlas /tmp/atlas --video "$CAR/frames" \
    --steps 15 --profile "$OUT/profile_video.txt"
step "video car-turn_winter, cuDNN" timeout 200 python3 bench/bench_video.py --atlas /tmp/atlas --video "$CAR/frames" \
    --steps 15 fast_path=false
