#!/usr/bin/env bash
# The GPU benchmarks in one command, for a machine that has PyTorch with CUDA but maybe not the rest:
# wheels in .whl/ (diffusers, peft, bitsandbytes, ...) are installed to /tmp/site first.
#   bash tests/bench/gpu_session.sh PART...     (OUT=folder to pack the results there)
# PART: headline-sd15, headline-sdxl, engine-sd15, engine-sd15-b1, engine-sdxl, steps, compile, compile-sd15, profile, profile-sdxl,
#       profile-casts, encode, small-cards, small-cards-sd15, graphs-sd15; tests/bench/results/gpu/NOTES.md says what each found.
# Each part's log and JSON go to tests/bench/results/, packed after each part into $OUT/results.tgz
# (when OUT is set); a part stopped by its time limit does not stop the next.
set -u
cd "$(dirname "$0")/../.."
LOGS=tests/bench/results
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$LOGS/gpu.txt"
$PY -c "import torch, diffusers, peft, transformers, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" | tee -a "$LOGS/gpu.txt"
part() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    echo "exit $? after $((SECONDS - t0)) s"
    grep -v -E "Loading|it/s\]|warn" "$LOGS/$name.log" | tail -n 14
    [ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" -C "$LOGS" .
}
for p in "$@"; do
    case $p in
        engine-sd15) part engine-sd15 330 $PY tests/bench/bench_engine_gpu.py --cases sd15-8gb-b1,sd15-8gb-b4,sd15-12gb-b4 ;;
        engine-sd15-b1) part engine-sd15-b1 150 $PY tests/bench/bench_engine_gpu.py --cases sd15-8gb-b1 ;;
        # issue 20's headline, first when device time is short (at most 9 minutes, not yet timed on a GPU): the engine
        # eager and compiled against the diffusers reference step, SD 1.5 then SDXL
        headline-sd15) part headline-sd15 240 $PY tests/bench/bench_engine_gpu.py --steps 100 --reference sd15-8gb-b1 \
                           --cases sd15-8gb-b1,sd15-8gb-b1-compiled ;;
        headline-sdxl) part headline-sdxl 300 $PY tests/bench/bench_engine_gpu.py --steps 60 --reference sdxl-12gb-b1 \
                           --cases sdxl-12gb-b1,sdxl-12gb-b1-compiled ;;
        engine-sdxl) part engine-sdxl 330 $PY tests/bench/bench_engine_gpu.py --cases sdxl-12gb-b1,sdxl-24gb-b1 \
                         --steps 60 --reference sdxl-12gb-b1 ;;
        steps) part steps 180 $PY tests/bench/bench_gpu.py --steps 30 ;;
        compile) part compile-tiny 90 $PY tests/bench/check_compile.py --device cuda --family tiny ;;
        profile) part profile-8gb 200 $PY tests/bench/profile_step.py --preset sd15-8gb --peft-casts --compile ;;
        profile-sdxl) part profile-sdxl 120 $PY tests/bench/profile_step.py --family sdxl --preset sdxl-12gb ;;
        launches) part launches-sd15 200 $PY tests/bench/profile_step.py --preset sd15-8gb --before
                  part launches-sdxl 240 $PY tests/bench/profile_step.py --family sdxl --preset sdxl-12gb --before ;;
        profile-casts) part profile-casts 90 $PY tests/bench/profile_step.py --preset sd15-8gb --peft-casts ;;
        compile-sd15) part compile-sd15 220 $PY tests/bench/check_compile.py --device cuda --family sd15 ;;
        # issue 20: CUDA graphs (torch.compile mode reduce-overhead): gradients over 3 steps, steps/s against eager
        graphs-sd15) part graphs-sd15 240 $PY tests/bench/check_compile.py --device cuda --family sd15 \
                         --mode reduce-overhead ;;
        encode) part encode 100 $PY tests/bench/bench_encode_cost.py --device cuda --steps 20 ;;
        # issue 19: peak allocated/reserved per phase and steps/s of the small-card presets against sdxl-12gb
        small-cards) part small-cards 420 $PY tests/bench/bench_engine_gpu.py --steps 60 --reference none \
                         --cases sdxl-12gb-b1,sdxl-6gb-b1,sdxl-min-b1,sdxl-12gb-fp8-b1 ;;
        small-cards-sd15) part small-cards-sd15 200 $PY tests/bench/bench_engine_gpu.py --steps 100 --reference none \
                              --cases sd15-8gb-b1,sd15-4gb-b1 ;;
    esac
done
