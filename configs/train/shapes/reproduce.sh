#!/usr/bin/env bash
# Reproduces the embedded default model (models/shapes-32/) from nothing but this repository:
# the synthetic dataset, the VAE, then the U-Net with its (frozen, random) text encoder.
#
#   bash configs/train/shapes/reproduce.sh [WORK_DIR] [VAE_DIR]   (default: target/shapes-model)
#
# With VAE_DIR (e.g. models/shapes-32/vae) the VAE is not trained: the U-Net trains on that one,
# as the README's "CLIP retrained" model did beside the T5 one (configs/train/shapes-t5/).
#
# About 55 minutes on a 2-core CPU (measured: VAE 11 min, U-Net 38 min, evaluation 3 min).
# Every step is deterministic for its seed; a killed step continues with the same command plus
# --resume. The finished pipeline is WORK_DIR/pipeline; copy it to models/<name>/ and write
# <name> into models/DEFAULT to embed it, and run `cargo xtask fixtures e2e` to refresh
# diffusers' images of the default model, which the parity tests compare ltd-gen against.
set -euo pipefail
cd "$(dirname "$0")/../../.."
# One thread: as fast as two for models this small (measured), unaffected by other work on the
# machine, and the same float rounding on every machine.
export RAYON_NUM_THREADS=1
work="${1:-target/shapes-model}"
vae="${2:-}"
cfg=configs/train/shapes

# The synthetic dataset, with its held-out combinations (make-data.sh).
bash "$cfg/make-data.sh" "$work/data"

# Object pixels, and the background pixels next to them, weigh 8×: a small shape is a few
# percent of the image, and an unweighted loss lets its colour and outline blur into the
# background. A short run turns small shapes into blobs in the VAE itself, which no U-Net can
# undo (eval-shapes' "VAE reconstructions" row: 74% of shapes read right for the previous
# 800-step VAE, 100% for this one).
if [ -z "$vae" ]; then
    vae="$work/vae"
    cargo xtask train-vae --data "$work/data" --config "$cfg/vae.json" --out "$vae" \
        --batch-size 16 --steps 2400 --learning-rate 2e-3 --lr-schedule cosine --warmup-steps 50 \
        --l1-weight 1 --mse-weight 1 --kl-weight 1e-6 --object-weight 8 --object-margin 1 \
        --checkpoint-every 800 --seed 0
fi

# The text encoder stays at its seeded random initialisation (--text-encoder-lr 0): trained
# from scratch it keeps only the words the U-Net already uses (at 1e-3 it collapsed; at 1e-4
# with uniform timesteps the position words drifted together), while a frozen random one keeps
# every word apart. With it, plain uniform timesteps learn position as well as shape (the README
# compares the recipes we tried).
cargo xtask train-unet --data "$work/data" --vae "$vae" --config "$cfg/unet.json" \
    --text-encoder-config "$cfg/text_encoder.json" \
    --scheduler-config "$cfg/scheduler_config.json" --out "$work/pipeline" \
    --batch-size 16 --steps 5000 --learning-rate 1e-3 --text-encoder-lr 0 \
    --lr-schedule cosine --warmup-steps 100 --unet-fp16 --text-encoder-fp16 \
    --checkpoint-every 1250 --seed 0

cargo xtask eval-shapes --model "$work/pipeline" --data "$work/data" --out "$work/eval"
