#!/usr/bin/env bash
# The CPU tables of benchmarks/README.md (2 threads). Run from the repository root.
# 1. ViT-S/16 at batch 16 in every mode, next to Hugging Face transformers' ViT of the same size;
# 2. every family's small model in the main CPU modes;
# 3. agreement of every mode with fp32 on the digits test set, with trained models.
set -eu
OUT=${OUT:-benchmarks/results}
vitlab benchmark vit_small_patch16_224 --batch-size 16 --threads 2 --repeats 15 --latency-repeats 20 \
    --modes eager bf16 bf16-amp compile compile-bf16 int8 onnx --reference hf hf-eager --output "$OUT/cpu_vit_small.md"
vitlab benchmark vit_tiny_patch16_224 vit_small_patch16_224 deit_small_patch16_224 swin_tiny_patch4_window7_224 \
    pvt_v2_b0 cait_xxs24_224 crossvit_9_240 --batch-size 16 --threads 2 --repeats 7 --latency-repeats 10 \
    --modes eager bf16 compile-bf16 int8 onnx --output "$OUT/cpu_models.md"
PYTHONPATH=src python benchmarks/agreement.py --digits-epochs 25 --vit-s-epochs 1 --modes eager bf16 bf16-amp compile-bf16 int8 onnx \
    --repeats 3 --output "$OUT/agreement_cpu.md"
