#!/usr/bin/env bash
# The GPU checks of issues 15 (item 11: synthesis on the trainer's device) and 20 (synthesis speed on a
# GPU), as one script for a lent GPU machine (the `device` tool; docs/gpu.md has the figures it gave):
#   1. tests/test_gpu.py: the `gpu` trainer preset, every engine on the GPU, bf16-mixed synthesis;
#   2. one task boundary of experiment=abd_cifar100_10t at its settings (ResNet-32, 10 classes, the
#      generator's 10k steps at batch 128, fp32), training cut to 2 epochs and CIFAR-100 replaced by a
#      random-pixel stand-in of its shape (no network there: benchmarks/stand_in_data.py); the run is
#      stopped once results.json holds the boundary's record (engine device, wall_s);
#   3. benchmarks.synthesis_speed --device cuda (each engine at precision 32 and bf16-mixed, channels_last);
#   4. the same boundary with inversion.generator.precision=bf16-mixed (2000 steps: compare per step);
#   5. the compiled arms of synthesis_speed for the generator (last: compiling takes the longest).
# Usage: OUT=<folder> bash benchmarks/device_check.sh   (no installed package needed: PYTHONPATH is set;
# a folder .devsite with hydra/omegaconf/antlr4 copied from .venv supplies what that machine lacks).
# Time limits per step: T_TESTS, T_BOUNDARY (430 s: 10k steps take ~6 min on an H200), T_SPEED,
# T_BOUNDARY_BF16, T_COMPILE; 0 skips the step.
set -u
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .devsite ] && export PYTHONPATH="$PWD/.devsite:$PYTHONPATH"
PY=${PY:-python3}
DEV=${DEV:-cuda} TRAINER=${TRAINER:-gpu}  # DEV=cpu TRAINER=cpu EXTRA=... SPEED="--steps 1 --rounds 1 --batch 16": a dry run
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a SPEED <<< "${SPEED:---steps 20 --rounds 5 --batch 256}"
say() { echo "[device_check $(date +%T)] $*"; }

say "1. machine"
nvidia-smi -L || true
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"

on() { [ "${1:-1}" != 0 ]; }  # a step whose T_* limit is 0 is skipped

say "2. tests/test_gpu.py"
on "${T_TESTS:-}" && timeout "${T_TESTS:-150}" $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15

boundary() {  # <name> <seconds> <overrides...>: run abd_cifar100_10t until its first boundary is recorded
  local name=$1 limit=$2; shift 2
  local dir=/tmp/device_check_$name
  timeout "$limit" $PY -m cl_inversion experiment=abd_cifar100_10t "trainer=$TRAINER" trainer.max_epochs=2 \
    dataset._target_=benchmarks.stand_in_data.cifar100_shaped logger=none trainer.enable_progress_bar=false \
    checkpoint=false overwrite=true "hydra.run.dir=$dir" "${EXTRA[@]}" "$@" > "/tmp/$name.log" 2>&1 &
  local pid=$!
  while kill -0 $pid 2>/dev/null; do
    if grep -q '"inversion"' "$dir/results.json" 2>/dev/null; then kill $pid; break; fi
    sleep 2
  done
  wait $pid
  grep -v "^\s*$" "/tmp/$name.log" | tail -12
  if [ -f "$dir/results.json" ]; then
    cp "$dir/results.json" "$OUT/$name.json"
    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print('BOUNDARY', sys.argv[2], json.dumps({k: v for k, v in (r.get('inversion') or [{}])[0].items() if k != 'notes'}))" "$dir/results.json" "$name"
  fi
}

say "3. boundary of abd_cifar100_10t, synthesis fp32"
on "${T_BOUNDARY:-}" && boundary boundary_fp32 "${T_BOUNDARY:-430}"

say "4. synthesis_speed on cuda (precision 32 and bf16-mixed arms)"
on "${T_SPEED:-}" && timeout "${T_SPEED:-150}" $PY -m benchmarks.synthesis_speed --device "$DEV" "${SPEED[@]}" \
  > "$OUT/synthesis_speed.json" 2> /tmp/synthesis_speed.err && { tail -3 /tmp/synthesis_speed.err; tail -c 2000 "$OUT/synthesis_speed.json"; }

say "5. boundary of abd_cifar100_10t, synthesis bf16-mixed, 2000 steps"
on "${T_BOUNDARY_BF16:-}" && boundary boundary_bf16 "${T_BOUNDARY_BF16:-90}" inversion.generator.precision=bf16-mixed inversion.generator.steps=2000

say "6. synthesis_speed compiled arms on cuda"
on "${T_COMPILE:-}" && timeout "${T_COMPILE:-150}" $PY -m benchmarks.synthesis_speed --device "$DEV" "${SPEED[@]}" \
  --engines generator --compile --only none > "$OUT/synthesis_speed_compile.json" 2> /tmp/compile.err
[ -f /tmp/compile.err ] && tail -3 /tmp/compile.err && tail -c 2000 "$OUT/synthesis_speed_compile.json"
say "done"
