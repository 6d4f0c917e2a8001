#!/usr/bin/env bash
# Regenerate the shipped shapes-world model from scratch, then evaluate and ship it.
#   bash recipes/shapes/build.sh        (from the repository root; resumable: rerun after an interruption)
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
nextstep train-vae recipes/shapes/vae.toml --resume
nextstep train recipes/shapes                     # stages 1-6 in order; stops before the DPO stage
final=runs/shapes/6-edit-order/export
nextstep eval shapes --model "$final" --out runs/shapes/eval-shapes
nextstep eval edits --model "$final" --out runs/shapes/eval-edits
python -m nextstep.training.ship "$final" nextstep/assets/shapes \
    --defaults recipes/shapes/generation_defaults.json --card recipes/shapes/MODEL_CARD.md
echo "built in $(( ($(date +%s) - start) / 60 )) minutes"
