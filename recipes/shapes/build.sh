#!/usr/bin/env bash
# Regenerate the shipped shapes-world model from scratch, then evaluate and ship it.
#   bash recipes/shapes/build.sh        (from the repository root; resumable: rerun after an interruption)
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
nextstep train-vae recipes/shapes/vae.toml --resume
nextstep train-vae recipes/shapes/vae-decoder.toml --resume   # the same encoder, a sharper decoder
nextstep train recipes/shapes                     # stages 1-12 in order; stops before the DPO stage
# ship 0.7 x stage 12 + 0.3 x stage 11, with the fine-tuned decoder
python -m nextstep.training.ship runs/shapes/12-edits-heavy/export nextstep/assets/shapes \
    --blend runs/shapes/11-edits-more/export 0.3 --vae runs/shapes/vae-dec/export \
    --defaults recipes/shapes/generation_defaults.json --card recipes/shapes/MODEL_CARD.md
nextstep eval shapes --out runs/shapes/eval-shapes   # the shipped model, as a user gets it
nextstep eval edits --out runs/shapes/eval-edits
echo "built in $(( ($(date +%s) - start) / 60 )) minutes"
