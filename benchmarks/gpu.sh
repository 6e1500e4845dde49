#!/usr/bin/env bash
# One command for a GPU machine (not run on the project's CPU-only machine yet):
#   bash benchmarks/gpu.sh            # or: PYTHON=.venv/bin/python bash benchmarks/gpu.sh
# 1. benchmarks/erm_architectures.py (issue 13) at 64 and 128 px, bf16 autocast,
#    channels_last, every default model, 2 seeds, with the plain-training reference;
# 2. benchmarks/unlearn_vs_retrain.py on resnet18 and resnet50. That script has no size /
#    precision flags: it runs at 32 px in fp32 (its own defaults).
# 3. benchmarks/ktp_speed.py (issue 18): a KTP epoch against a training epoch on the GPU
#    (float32 and bf16 training references, interleaved): the default (bf16 student where
#    the GPU supports it; NCHW: channels_last="auto" takes NHWC on CPUs only), a float32
#    student, the pre-issue-18 recipe, and the NHWC student (channels_last=True) against
#    NHWC training: whether "auto" should take NHWC on GPUs too (32 px; CUDA peak memory
#    in its table).
# Everything lands in benchmarks/results/gpu/ (one folder per run, logs next to results).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; \
print(torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"

for size in 64 128; do
  "$PYTHON" benchmarks/erm_architectures.py --size "$size" --seeds 0 1 --epochs 16 \
      --mixed-precision bf16 --channels-last --threads 8 \
      --results "$OUT" --out "erm_architectures_${size}px" 2>&1 | tee "$OUT/erm_architectures_${size}px.log"
done

for model in resnet18 resnet50; do
  mkdir -p "$OUT/unlearn_vs_retrain_$model"
  "$PYTHON" benchmarks/unlearn_vs_retrain.py --model "$model" --epochs 16 --threads 8 \
      --out "$OUT/unlearn_vs_retrain_$model" 2>&1 | tee "$OUT/unlearn_vs_retrain_$model.log"
done
"$PYTHON" benchmarks/ktp_speed.py --models test_resnet,resnet18,resnet50 \
    --epochs test_resnet=16,resnet18=8,resnet50=8 --train-epochs 2 --threads 8 \
    --recipes "min_steps 200;default;default, student float32;default, student NHWC" \
    --out "$OUT" --name ktp_speed 2>&1 | tee "$OUT/ktp_speed.log"
echo "results in $OUT"
