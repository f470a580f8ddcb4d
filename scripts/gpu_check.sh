#!/usr/bin/env bash
# Issue 14's GPU measurements in one device call: under 8 minutes on one
# H100/H200. Run from the repository root with a guided-diffusion checkout
# at ./reference (ignored; carry it), e.g. through the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=["reference"])
# Results go to $OUT (default build/gpu): one JSON per bench and a log.
# SMOKE=1 runs the same steps on the CPU at toy sizes (tests/test_bench.py),
# to check the plumbing where there is no GPU.
set -euo pipefail
OUT=${OUT:-build/gpu}
REF=${REF:-reference}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
bench() {  # name, then adm bench arguments
    local name=$1; shift
    echo "== adm bench $*" | tee -a "$OUT/log"
    "$PY" -m adm_lib.cli bench "$@" --quiet --json "$OUT/$name.json" \
        2>&1 | tee -a "$OUT/log"
}
if [[ ${SMOKE:-0} == 1 ]]; then
    tiny=(--set num_channels=32 --set channel_mult=1,2 --set num_res_blocks=1
          --set attention_resolutions=16 --set diffusion_steps=50
          --device cpu --batch 2 --rounds 1 --warmup 0 --sample-steps 2)
    against=()
    [[ -d $REF/guided_diffusion ]] && against=(--reference "$REF")
    bench demo demo "${tiny[@]}" "${against[@]}"
    exit 0
fi
"$PY" - <<'PY' | tee -a "$OUT/log"
import torch
print(torch.__version__, torch.cuda.get_device_name(0))
PY
# The fast-path tests that need a GPU, then the issue's targets: the
# released 64x64 model, batch 64, against the reference's own fp16 trainer.
"$PY" -m pytest -q -p no:cacheprovider tests/test_bench.py \
    tests/test_unet.py "tests/test_train.py::test_steps_never_sync_a_gpu" \
    2>&1 | tail -3 | tee -a "$OUT/log"
bench imagenet64 imagenet64 --batch 64 --sample-batch 256 --rounds 5 \
    --reference "$REF"
bench imagenet64_compiled imagenet64 --batch 64 --sample-batch 256 \
    --rounds 5 --set compile=true
bench cifar32 cifar32 --batch 128 --sample-batch 512 --reference "$REF"
# bf16 against fp32 over the same 1,000 steps of the demo's model: the loss
# curves that chapter 4 compares.
"$PY" scripts/precision_curves.py --steps 1000 --out "$OUT/precision" \
    --plot "$OUT/04_bf16_fp32.png" 2>"$OUT/precision.err" | tee -a "$OUT/log"
