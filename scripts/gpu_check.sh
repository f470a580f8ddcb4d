#!/usr/bin/env bash
# Every GPU measurement in one device call, about 5 minutes on one H100.
# Run from the repository root with a guided-diffusion checkout at
# ./reference (ignored; carry it), e.g. through the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=["reference"],
#       timeout_s=600)
#
# Each step runs on its own under `timeout`, so a step that fails or
# overruns loses only itself, and the whole run ends within BUDGET seconds
# (default 540, inside the device's 10 minutes a command): a step that
# would start with under MIN_STEP seconds left is skipped. Without the
# checkout only the two steps that time the reference are skipped; without
# a GPU (SIZE=full) every step after `env` is. Every status is recorded.
# ONLY="precision imagenet64_compiled" runs those steps alone (and env),
# to run again what a first call lost.
#
# Results, at the top of OUT (default build/gpu): gpu_check.json (every
# step's status, exit code, seconds and numbers; rewritten after each
# step), gpu_check.log (every step's full output) and 04_bf16_fp32.png.
# All else goes under BUILD (default build/gpu-steps).
#
# SIZE=toy runs the same steps, by the same commands, at toy sizes on the
# CPU (tests/test_scripts.py): only the sizes and the device change, and
# torch.compile is turned off there (a cold compile takes minutes on a CPU).
#
# Expected seconds on one H100, printed up front: from the H100 baselines
# of ../shared/baselines (a 64x64 training step at batch 64: 0.42 s for the
# reference's fp16 trainer, 0.41 s ours eager, 0.22 s compiled; sampling
# 597 images x NFE/s for the reference, 423 ours), times each step's work,
# plus about 10 s a process to start Python and CUDA:
#   env          10  start torch and CUDA
#   tests        30  start pytest; three training steps of a toy model
#   imagenet64   70  (1 + 3 rounds) x (0.83 s of training steps for both,
#                    256 x 5 NFE sampled: 5.2 s for both) = 24 s, ~15 s
#                    building two 296M-parameter models, ~15 s of cuDNN's
#                    autotuning in the first rounds (baseline warm-up 9.2 s)
#   cifar32      30  the same at 11M parameters and 3.5 GFLOP an image
#                    (1/60 of the 64x64 model's): rounds of well under 1 s
#   precision    75  2 x 1,000 steps of the demo's 0.9M model at batch 32,
#                    launch-bound: ~1,400 operators a step (counted on
#                    the CPU), ~20 ms eager, plus two runs' setup
#   imagenet64_compiled  60  a cold compile (baseline warm-up 14.6 s; allow
#                    three times that) and 5 steps of 0.22 s; last, since
#                    its compile time is the least certain
# The sampler's rate per NFE does not depend on the number of steps, so 5
# sampling steps measure what 25 did, in a fifth of the time.
set -uo pipefail
SIZE=${SIZE:-full}
OUT=${OUT:-build/gpu}
BUILD=${BUILD:-build/gpu-steps}
REF=${REF:-reference}
BUDGET=${BUDGET:-540}
MIN_STEP=${MIN_STEP:-10}
ONLY=${ONLY:-}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
LC_NUMERIC=C  # EPOCHREALTIME with a decimal point

# The tests that need a GPU (the others run on any CPU). They need no book
# tooling: --confcutdir keeps the root conftest.py (jupytext, nbformat,
# nbval: the chapters' tests) out.
TESTS=(tests/test_train.py::test_steps_never_sync_a_gpu
       tests/test_diffusion.py::test_the_bound_never_syncs_a_gpu
       tests/test_inception.py::test_resize_never_syncs_a_gpu)

case $SIZE in
    full)
        device=cuda
        i64=(--batch 64 --sample-batch 256 --rounds 3 --warmup 1
             --sample-steps 5)
        c32=(--batch 128 --sample-batch 512 --rounds 3 --warmup 1
             --sample-steps 5)
        compiled=(--batch 64 --rounds 3 --warmup 2)
        curves=(--steps 1000 --batch 32 --window 100) ;;
    toy)
        device=cpu
        tiny=(--set num_channels=32 --set channel_mult=1,2
              --set num_res_blocks=1 --set attention_resolutions=8
              --set diffusion_steps=50 --set image_size=16)
        i64=("${tiny[@]}" --batch 2 --sample-batch 2 --rounds 1 --warmup 0
             --sample-steps 2)
        c32=("${i64[@]}")
        compiled=("${tiny[@]}" --batch 2 --rounds 1 --warmup 0)
        curves=(--steps 4 --batch 2 --window 2)
        # One thread: toy sizes gain nothing from more, and spinning
        # threads crawl on a busy CPU.
        export TORCH_COMPILE_DISABLE=1 OMP_NUM_THREADS=1 ;;
    *)
        echo "gpu_check: SIZE=$SIZE: expected full or toy" >&2
        exit 2 ;;
esac

# Each step: its name, expected seconds on one H100, its timeout, and what
# it needs besides a working torch (the env step).
plan=(
    "env 10 60 -"
    "tests 30 120 -"
    "imagenet64 70 180 reference"
    "cifar32 30 90 reference"
    "precision 75 180 -"
    "imagenet64_compiled 60 240 -"
)

command_of() {  # step $1's command, into the array cmd
    local bench=("$PY" -m adm_lib.cli bench --device "$device" --quiet
                 --json "$BUILD/$1.json")
    case $1 in
        env) cmd=("$PY" "$BUILD/env_check.py" "$SIZE" "$REF"
                  "$BUILD/env.json") ;;
        # -n 0: in one process, not the two workers of pyproject's
        # addopts, which take seconds to start for three tests.
        tests) cmd=("$PY" -m pytest -q -n 0 -p no:cacheprovider
                    --confcutdir=tests "${TESTS[@]}") ;;
        imagenet64) cmd=("${bench[@]}" imagenet64 "${i64[@]}"
                         --reference "$REF") ;;
        cifar32) cmd=("${bench[@]}" cifar32 "${c32[@]}" --reference "$REF") ;;
        precision) cmd=("$PY" scripts/precision_curves.py "${curves[@]}"
                        --device "$device" --out "$BUILD/precision"
                        --plot "$OUT/04_bf16_fp32.png"
                        --json "$BUILD/precision.json" --quiet) ;;
        imagenet64_compiled) cmd=("${bench[@]}" imagenet64 "${compiled[@]}"
                                  --set compile=true --train-only) ;;
    esac
}

mkdir -p "$OUT" "$BUILD"
LOG=$OUT/gpu_check.log
: >"$LOG"
: >"$BUILD/steps.tsv"
rm -f "$OUT/gpu_check.json" "$OUT/04_bf16_fp32.png"
rm -rf "$BUILD/precision"  # its runs would resume, not start again

cat >"$BUILD/env_check.py" <<'PY'
"""The machine: torch, the GPU, the checkout; fails with SIZE=full and no GPU."""
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

import adm_lib.bench  # noqa: F401 (the package and its dependencies import)

size, ref, path = sys.argv[1:4]
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpu": None,
        "reference": Path(ref, "guided_diffusion",
                          "gaussian_diffusion.py").is_file()}
for package in ("numpy", "pytest", "triton"):
    try:
        info[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
        info[package] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": p.name, "memory_gib": p.total_memory / 2**30,
                   "capability": f"{p.major}.{p.minor}",
                   "multiprocessors": p.multi_processor_count}
Path(path).write_text(json.dumps(info, indent=1) + "\n")
print(json.dumps(info, indent=1))
if size == "full" and info["gpu"] is None:
    sys.exit("gpu_check: PyTorch sees no GPU; SIZE=toy runs the steps on "
             "the CPU")
PY

cat >"$BUILD/collect.py" <<'PY'
"""Gather the steps' statuses and results into one JSON; print a summary."""
import json
import sys
from pathlib import Path

build, out, size, budget, plan, final = sys.argv[1:7]
steps = []
for line in (Path(build) / "steps.tsv").read_text().splitlines():
    name, status, code, start, end, expected, limit, reason = \
        line.split("\t")
    step = {"name": name, "status": status,
            "exit_code": int(code) if code else None,
            "seconds": round(float(end) - float(start), 2),
            "expected_h100_s": int(expected),
            "timeout_s": int(limit) if limit else None}
    if reason:
        step["reason"] = reason
    log = Path(build, f"{name}.log").read_text(errors="replace").split("\n")
    lines = [x for x in log if x.strip()]
    if lines:
        step["last_line"] = lines[-1].strip()
    result = Path(build, f"{name}.json")
    if result.is_file():
        try:
            step["result"] = json.loads(result.read_text())
        except ValueError as err:
            step["result_error"] = f"{result}: {err}"
    steps.append(step)
report = {"size": size, "budget_s": int(budget),
          "plan": [dict(zip(("name", "expected_h100_s", "timeout_s"),
                            (n, int(e), int(t))))
                   for n, e, t, _ in (p.split() for p in plan.split(";"))],
          "steps": steps}
tmp = Path(out, "gpu_check.json.tmp")
tmp.write_text(json.dumps(report, indent=1) + "\n")
tmp.replace(Path(out, "gpu_check.json"))


def numbers(step: dict) -> str:
    """The step's headline numbers."""
    r = step.get("result")
    if step["status"] != "ok" or not isinstance(r, dict):
        return step.get("reason") or step.get("last_line", "")
    if "windows" in r:  # precision curves
        worst = max(abs(w["gap"] / w["se"]) for w in r["windows"])
        return f"largest |bf16 - fp32| gap: {worst:.2f} standard errors"
    if "train" not in r:  # env
        gpu = r.get("gpu") or {}
        return f"torch {r['torch']}, {gpu.get('name', 'no GPU')}"
    parts = []
    for workload, unit in (("train", "img/s"), ("sample", "img x NFE/s")):
        if workload in r:
            entry = r[workload]
            text = f"{workload} {entry['adm_lib']['rate']:.1f} {unit}"
            if "ratio" in entry:
                text += f" ({entry['ratio']:.2f}x the reference's)"
            parts.append(text)
    return ", ".join(parts)


if final == "final":
    print("\n| step | status | seconds (expected on one H100) | numbers |")
    print("| --- | --- | --- | --- |")
    for s in steps:
        print(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} "
              f"({s['expected_h100_s']}) | {numbers(s)} |")
PY

collect() {  # gpu_check.json from the steps so far; "final": and a summary
    (IFS=";"; "$PY" "$BUILD/collect.py" "$BUILD" "$OUT" "$SIZE" "$BUDGET" \
        "${plan[*]}" "${1:-}") 2>&1 | tee -a "$LOG"
}

deadline=$(( ${EPOCHREALTIME%.*} + BUDGET ))
have_ref=
[[ -f $REF/guided_diffusion/gaussian_diffusion.py ]] && have_ref=1
{
    echo "gpu_check SIZE=$SIZE, budget $BUDGET s; reference checkout: $(
        [[ -n $have_ref ]] && echo "$REF" ||
        echo "none at $REF, so the steps that need it are skipped")"
    echo "expected seconds on one H100 (timeout):"
    total=0
    for entry in "${plan[@]}"; do
        read -r name expect cap needs <<<"$entry"
        printf '  %-20s %4d  (%d)%s\n' "$name" "$expect" "$cap" \
            "$([[ $needs == - ]] || echo "  needs the $needs")"
        total=$(( total + expect ))
    done
    echo "  total ~$total s"
} | tee -a "$LOG"

env_failed=
failures=0
for entry in "${plan[@]}"; do
    read -r name expect cap needs <<<"$entry"
    command_of "$name"
    : >"$BUILD/$name.log"
    rm -f "$BUILD/$name.json"
    start=$EPOCHREALTIME left=$(( deadline - ${EPOCHREALTIME%.*} ))
    code= limit= reason=
    if [[ -n $env_failed ]]; then
        status=skipped reason="the env step failed"
    elif [[ -n $ONLY && $name != env && " $ONLY " != *" $name "* ]]; then
        status=skipped reason="not in ONLY"
    elif [[ $needs == reference && -z $have_ref ]]; then
        status=skipped reason="no guided-diffusion checkout at $REF"
    elif (( left < MIN_STEP )); then
        status=skipped reason="under $MIN_STEP s left of the $BUDGET s budget"
    else
        limit=$(( cap < left ? cap : left ))
        echo "== $name (expected ${expect} s on one H100, timeout ${limit} s):" \
            "${cmd[*]}" | tee -a "$LOG"
        # timeout signals the step's whole process group (compile workers
        # too); -k: a step that ignores the signal is killed 10 s later.
        timeout -k 10 "$limit" "${cmd[@]}" 2>&1 |
            tee -a "$LOG" "$BUILD/$name.log"
        code=${PIPESTATUS[0]}
        case $code in
            0) status=ok ;;
            124|137) status=timeout ;;
            *) status=failed ;;
        esac
    fi
    [[ $status == ok || $status == skipped ]] || failures=$(( failures + 1 ))
    [[ $name == env && $status != ok ]] && env_failed=1
    echo "== $name: $status${code:+, exit $code}${reason:+: $reason}" |
        tee -a "$LOG"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$code" \
        "$start" "$EPOCHREALTIME" "$expect" "$limit" "$reason" \
        >>"$BUILD/steps.tsv"
    collect
done
collect final
echo "results: $OUT/gpu_check.json, $LOG" | tee -a "$LOG"
(( failures == 0 ))
