#!/usr/bin/env bash
# The shapes dataset every shapes recipe trains on (configs/train/shapes/reproduce.sh, and
# configs/train/shapes-t5/reproduce.sh, whose comparison needs the very same data): 10,000
# captioned 32×32 images. The held-out combinations never appear in training;
# `cargo xtask eval-shapes` prompts for exactly them.
#
#   bash configs/train/shapes/make-data.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../../.."
cargo xtask make-shapes --out "$1" --count 10000 --size 32 --seed 1 \
    --holdout colour=red,shape=triangle \
    --holdout colour=green,shape=circle \
    --holdout colour=blue,shape=square \
    --holdout colour=yellow,shape=triangle \
    --holdout shape=circle,position=top-right \
    --holdout shape=square,position=bottom-left \
    --holdout shape=triangle,position=center \
    --holdout colour=orange,background=black
