#!/usr/bin/env bash
# GPU checks for a lent CUDA machine: one line per check ("ok" or "FAILED: <last line of its output>"), about
# 5 minutes on one GPU. Run from the repository root after `make setup` (offline: tiny random models, data
# that ships with the packages, no pretrained weights):
#   bash benchmarks/gpu_check.sh
# `bash benchmarks/gpu_check.sh --rehearse` runs the same commands on the CPU without bf16 (which the CPU refuses;
# the MOS run that differs only by bf16 is skipped) and with ray.gpus=0, so a broken key or flag shows here
# before a GPU's limited time is spent on it.
# Checks: CUDA is visible; bf16 and gradient checkpointing on the language-model strategies; kill -9 and
# resume give identical scores on CUDA (its RNG state is checkpointed); MOS on a ViT-B/16 with random weights;
# bf16 autocast and torch.compile on a classifier strategy, bf16 on MOS (nproc=K needs K GPUs: not checked on one);
# `executor=ray ray.gpus=1`; the side-by-side LM throughput on CUDA (printed, not judged).
set -u
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PY:-.venv/bin/python}
CLI=${CLI:-.venv/bin/cl-bench}
OUT=$(mktemp -d /tmp/cl-bench-gpu-check.XXXX)
trap 'rm -rf "$OUT"' EXIT
failed=0
DEVICE=cuda BF16=strategy.bf16=true GPUS=1 BF16_LABEL="bf16 + "
if [ "${1:-}" = "--rehearse" ]; then DEVICE=cpu BF16= GPUS=0 BF16_LABEL=; fi

check() {  # check NAME COMMAND...: ok, or FAILED with the command's last output line
  local name=$1; shift
  local began=$SECONDS
  if output=$("$@" 2>&1); then
    printf 'ok      %-48s %4ss\n' "$name" $((SECONDS - began))
  else
    printf 'FAILED  %-48s %4ss  %s\n' "$name" $((SECONDS - began)) "$(printf '%s' "$output" | tail -n 1)"
    failed=$((failed + 1))
  fi
}

LM="scenario=instruct_toy model=tiny_llama device=$DEVICE progress=false strategy.batch_size=4 strategy.lr=0.01"
if [ $DEVICE = cuda ]; then
  check "CUDA visible" $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
  [ $failed -eq 0 ] || { echo "no CUDA device: nothing else to check"; exit 1; }
fi
for strategy in seqft seqlora hft loramoe coin_ema iv_guided conpet_static; do
  check "$strategy: ${BF16_LABEL}gradient checkpointing" $CLI run strategy=$strategy $LM $BF16 \
    strategy.gradient_checkpointing=true results_dir=$OUT/lm
done
check "seqlora: grad_accum=2 on $DEVICE" $CLI run strategy=seqlora $LM strategy.grad_accum=2 results_dir=$OUT/accum
check "resume identity on $DEVICE (instruction, 3 kills)" $PY benchmarks/resume_identity.py --family instruction \
  --kills 3 --device $DEVICE
check "resume identity on $DEVICE (class, 3 kills)" $PY benchmarks/resume_identity.py --family class --kills 3 \
  --device $DEVICE
check "MOS on ViT-B/16, random weights" $CLI run strategy=mos scenario=fmnist model=vit_b16_in21k \
  model.pretrained=false scenario.max_per_class=20 scenario.max_test_per_class=10 strategy.epochs=1 \
  strategy.crct_epochs=1 device=$DEVICE progress=false results_dir=$OUT/mos
[ -z "$BF16" ] || check "MOS on ViT-B/16: bf16 autocast" $CLI run strategy=mos scenario=fmnist model=vit_b16_in21k \
  model.pretrained=false scenario.max_per_class=20 scenario.max_test_per_class=10 strategy.epochs=1 \
  strategy.crct_epochs=1 $BF16 device=$DEVICE progress=false results_dir=$OUT/mos16
check "finetune: ${BF16_LABEL}torch.compile (classifier)" $CLI run strategy=finetune scenario=toy device=$DEVICE \
  $BF16 strategy.compile=true progress=false results_dir=$OUT/bf16
printf 'seeds: [0, 1]\nruns:\n  - strategy=finetune scenario=toy device=%s\n' $DEVICE > "$OUT/suite.yaml"
check "executor=ray ray.gpus=$GPUS" $CLI bench "$OUT/suite.yaml" executor=ray ray.gpus=$GPUS progress=false \
  results_dir=$OUT/ray
echo "--- LM throughput on $DEVICE (tiny_llama; cl-bench / plain, not judged here) ---"
$PY benchmarks/lm_throughput.py --model tiny_llama --device $DEVICE --steps 5 --rounds 3 --length 128 2>&1 \
  | grep -v -i warn || failed=$((failed + 1))
echo "$failed check(s) failed"
exit $((failed > 0))
