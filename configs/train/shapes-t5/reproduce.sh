#!/usr/bin/env bash
# The shapes model of configs/train/shapes/reproduce.sh with a T5 text encoder instead of CLIP:
# the same data (make-shapes, same hold-outs, seed 1), the same frozen VAE, the same U-Net
# config and training flags; only the text encoder differs. A frozen random T5 encoder the size
# of the shipped CLIP one (2 layers, width 64, gated-GELU feed-forward 256 wide: text_encoder.json)
# over a word-level SentencePiece vocabulary of the captions (tokenizer/, made by
# make_tokenizer.py), padded to 77 tokens like CLIP's, so that the U-Net attends over as many
# text states of the same width (its cross_attention_dim 64 = d_model: no encoder_hid_proj).
#
#   bash configs/train/shapes-t5/reproduce.sh [WORK_DIR] [VAE_DIR]
#
# WORK_DIR defaults to target/shapes-t5-model; VAE_DIR to the shipped model's VAE
# (models/shapes-32/vae), so the comparison with the CLIP model is not confounded by a second
# VAE (configs/train/shapes/reproduce.sh trains that one). About 45 minutes on a 2-core CPU.
# A killed step continues with the same command plus --resume. Then the evaluation matrix:
#
#   bash configs/train/shapes-t5/eval.sh WORK_DIR/pipeline WORK_DIR/data WORK_DIR
set -euo pipefail
cd "$(dirname "$0")/../../.."
export RAYON_NUM_THREADS=1
work="${1:-target/shapes-t5-model}"
vae="${2:-models/shapes-32/vae}"
shapes=configs/train/shapes
cfg=configs/train/shapes-t5

bash "$shapes/make-data.sh" "$work/data"

cargo xtask train-unet --data "$work/data" --vae "$vae" --config "$shapes/unet.json" \
    --text-encoder-config "$cfg/text_encoder.json" --tokenizer "$cfg/tokenizer" \
    --scheduler-config "$shapes/scheduler_config.json" --out "$work/pipeline" \
    --batch-size 16 --steps 5000 --learning-rate 1e-3 --text-encoder-lr 0 \
    --lr-schedule cosine --warmup-steps 100 --unet-fp16 --text-encoder-fp16 \
    --checkpoint-every 1250 --seed 0
