#!/usr/bin/env bash
# The evaluation matrix of the CLIP-vs-T5 comparison, for any shapes model folder: the 60
# held-out prompts of `cargo xtask eval-shapes` (its defaults: 25 DDIM steps, seeds 0–59) at
# guidance 1, 7.5 and 15,
#
#   eval-plain/            no limiter (plus the VAE-reconstruction ceiling row)
#   eval-threshold/        Imagen dynamic thresholding, $THRESHOLD (default 0.995,1: diffusers')
#   eval-mimic/            the latent-aware limiter at 7.5 (guidance 15 only: it limits
#                          guidance above its own scale and is a no-op at or below it)
#   eval-mimic-threshold/  both, guidance 15
#
#   bash configs/train/shapes-t5/eval.sh MODEL_DIR DATA_DIR OUT_DIR
#
# DATA_DIR is the make-shapes folder the model was trained on (its shapes.json names the
# hold-outs). Each folder gets table.md, report.json and one image grid per guidance scale;
# OUT_DIR/eval-summary.md collects the tables. About 10 minutes on a 2-core CPU. XTASK may name
# a prebuilt release xtask binary to run instead of `cargo xtask` (e.g. while a build of this
# checkout would change it under a running evaluation).
set -euo pipefail
model="$(realpath "$1")"
data="$(realpath "$2")"
mkdir -p "$3"
out="$(realpath "$3")"
threshold="${THRESHOLD:-0.995,1}"
cd "$(dirname "$0")/../../.."
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"

run() {
    local name="$1"
    shift
    ${XTASK:-cargo xtask} eval-shapes --model "$model" --data "$data" --out "$out/$name" "$@"
}
run eval-plain --guidance 1,7.5,15
run eval-threshold --guidance 1,7.5,15 --dynamic-threshold "$threshold" --reconstructions 0
run eval-mimic --guidance 15 --mimic-guidance 7.5 --reconstructions 0
run eval-mimic-threshold --guidance 15 --mimic-guidance 7.5 --dynamic-threshold "$threshold" \
    --reconstructions 0

{
    echo "# eval-shapes of $model"
    for name in eval-plain eval-threshold eval-mimic eval-mimic-threshold; do
        printf '\n## %s\n\n' "$name"
        cat "$out/$name/table.md"
    done
} > "$out/eval-summary.md"
cat "$out/eval-summary.md"
