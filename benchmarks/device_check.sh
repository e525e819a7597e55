#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (the `device` tool; docs/gpu.md has the figures it gave):
#   1. tests/test_gpu.py: the `gpu` trainer preset, every engine on the GPU, bf16-mixed synthesis, the
#      compiled steps and the captured whole steps (`cuda_graph`) against eager;
#   2. benchmarks.synthesis_speed --device cuda --compile, pixel and generator, 100 steps a run: eager,
#      graphed (`cuda_graph: true`), graphed+bf16-mixed, compiled, compiled+graphed (what the defaults run on a
#      long boundary), bf16-mixed, compile time apart (cold), and each CIFAR preset's boundary by arm;
#   3. one task boundary of experiment=abd_cifar100_10t at its settings (ResNet-32, 10 classes, the
#      generator's 10k steps at batch 128, fp32, `compile: auto` and `cuda_graph: auto`: compiled and
#      captured on CUDA), training cut to 2 epochs
#      and CIFAR-100 replaced by a random-pixel stand-in of its shape (no network there:
#      benchmarks/stand_in_data.py); the run is stopped once results.json holds the boundary's record;
#   4. the same boundary eager (`compile=false cuda_graph=false`), 2000 steps: compare per step;
#   5. the first boundary of experiment=pmi_cifar100_10t (stand-in data, 2 epochs), its results.json record.
# Usage: OUT=<folder> bash benchmarks/device_check.sh   (no installed package needed: PYTHONPATH is set;
# a folder .devsite with hydra/omegaconf/antlr4 copied from .venv supplies what that machine lacks).
# Time limits per step in seconds: T_TESTS (150), T_SPEED (180), T_BOUNDARY (240) — together one 10-minute
# call — and T_BOUNDARY_EAGER, T_PMI (off unless given); 0 skips a step.
set -u
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .devsite ] && export PYTHONPATH="$PWD/.devsite:$PYTHONPATH"
PY=${PY:-python3}
DEV=${DEV:-cuda} TRAINER=${TRAINER:-gpu}  # DEV=cpu TRAINER=cpu EXTRA=... SPEED="--steps 1 --rounds 1 --batch 16": a dry run
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a SPEED <<< "${SPEED:---steps 100 --rounds 2 --engines pixel generator --only graphed graphed+bf16-mixed compiled compiled+graphed bf16-mixed}"
say() { echo "[device_check $(date +%T)] $*"; }

say "1. machine"
nvidia-smi -L || true
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"

on() { [ "${1:-1}" != 0 ]; }  # a step whose T_* limit is 0 is skipped

say "2. tests/test_gpu.py"
on "${T_TESTS:-}" && timeout "${T_TESTS:-150}" $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15

boundary() {  # <name> <seconds> <experiment> <overrides...>: run an experiment until its first boundary is recorded
  local name=$1 limit=$2 experiment=$3; shift 3
  local dir=/tmp/device_check_$name
  rm -rf "$dir"  # a stale results.json would end the wait at once
  timeout "$limit" $PY -m cl_inversion "experiment=$experiment" "trainer=$TRAINER" trainer.max_epochs=2 \
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
    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print('BOUNDARY', sys.argv[2], json.dumps((r.get('inversion') or [{}])[0]))" "$dir/results.json" "$name"
  fi
}

say "3. synthesis_speed on cuda: eager, graphed, compiled, compiled+graphed, bf16; compile time apart"
if on "${T_SPEED:-}"; then
  timeout "${T_SPEED:-180}" $PY -m benchmarks.synthesis_speed --device "$DEV" --compile "${SPEED[@]}" \
    > "$OUT/synthesis_speed.json" 2> /tmp/synthesis_speed.err
  tail -3 /tmp/synthesis_speed.err; tail -c 3000 "$OUT/synthesis_speed.json"
fi

say "4. boundary of abd_cifar100_10t, 10k generator steps, compile: auto, cuda_graph: auto"
on "${T_BOUNDARY:-}" && boundary boundary_auto "${T_BOUNDARY:-240}" abd_cifar100_10t

say "5. boundary of abd_cifar100_10t eager, 2000 steps"
on "${T_BOUNDARY_EAGER:-0}" && boundary boundary_eager "$T_BOUNDARY_EAGER" abd_cifar100_10t \
  inversion.generator.compile=false inversion.generator.cuda_graph=false inversion.generator.steps=2000

say "6. first boundary of pmi_cifar100_10t"
on "${T_PMI:-0}" && boundary boundary_pmi "$T_PMI" pmi_cifar100_10t
say "done"
