#!/usr/bin/env bash
# The GPU tables of benchmarks/README.md: vitlab against timm (random weights) on one GPU.
# Needs timm. Writes $OUT/gpu.md (eager / bf16 / bf16-amp / fp16, every model) and
# $OUT/gpu_compile.md (torch.compile, ViT-S/16). Run from the repository root.
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=${PYTHONPATH:-src}
MODELS="vit_tiny_patch16_224 vit_small_patch16_224 deit_small_patch16_224 swin_tiny_patch4_window7_224 pvt_v2_b0 cait_xxs24_224 crossvit_9_240"
python -m vitlab.cli benchmark $MODELS --device cuda --batch-size 64 --modes eager bf16 bf16-amp fp16 \
    --reference timm --repeats 20 --latency-repeats 30 --output "$OUT/gpu.md"
python -m vitlab.cli benchmark vit_small_patch16_224 --device cuda --batch-size 64 --modes compile compile-bf16 \
    --reference timm --repeats 20 --latency-repeats 0 --output "$OUT/gpu_compile.md"
