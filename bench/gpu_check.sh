#!/usr/bin/env bash
# The GPU checks CPUs cannot show, as one script for a session that has a device machine (estimated under 10 minutes on one
# H100/H200; not yet run). Prints everything; copies logs to $OUT when set. Record the figures in bench/README.md.
#   1. the CUDA tests (DPAP on the device matches the NumPy reference, ...)
#   2. DPAP throughput on CUDA vs the release-style NumPy loop, in the same run
#   3. the training step: samples/s, time split and MFU for vit_t / vit_s (bf16), eager and torch.compile, and
#      TransFace-S at batch 128 with the released float32 attention core and with the core in bf16
#   4. real training steps on CUDA, fp16 (GradScaler + fused AdamW) and bf16, with a resume (one GPU is a world
#      of one, so nccl itself needs a machine with 2+ GPUs: torchrun --nproc_per_node=2 ...)
#   5. IJB-C extraction on the GPU on the demo test set
set -euxo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -m pytest tests -q -k cuda 2>&1 | tee "$OUT/tests_cuda.log"
$PY bench/dpap.py --probs 0.2 1.0 2>&1 | tee "$OUT/dpap.log"
$PY bench/train_step.py --networks vit_t vit_s --batch-size 32 --steps 5 2>&1 | tee "$OUT/train_step_b32.log"
$PY bench/train_step.py --networks vit_s_dp005_mask_0 --batch-size 128 --num-classes 85742 --steps 5 \
    --attention float32 autocast 2>&1 | tee "$OUT/train_step_s_b128.log"
for amp in fp16 bf16; do
  torchrun --standalone --nproc_per_node=1 train.py --config configs/tiny_cpu.py --opts amp=$amp \
      output=/tmp/gpu_check_$amp num_epoch=1 save_all_states=true 2>&1 | tee "$OUT/train_$amp.log"
  torchrun --standalone --nproc_per_node=1 train.py --config configs/tiny_cpu.py --opts amp=$amp \
      output=/tmp/gpu_check_$amp num_epoch=2 resume=true 2>&1 | tee -a "$OUT/train_$amp.log"
done
[ -f demo_data/ijbc/meta/ijbc_face_tid_mid.txt ] || $PY tools/make_demo_data.py --out demo_data
$PY -c "import torch; from backbones import get_model; torch.save(get_model('vit_s_dp005_mask_0').state_dict(), '/tmp/gpu_check_s.pt')"
time $PY eval_ijbc.py --model-prefix /tmp/gpu_check_s.pt --image-path demo_data/ijbc --result-dir /tmp/gpu_check_eval \
    --network vit_s_dp005_mask_0 --device cuda --amp bf16 --batch-size 256 --num-workers 8 2>&1 | tee "$OUT/eval.log"
