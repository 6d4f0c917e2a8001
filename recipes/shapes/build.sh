#!/usr/bin/env bash
# Regenerate the shipped shapes-world model from scratch, then evaluate and ship it.
#   bash recipes/shapes/build.sh        (from the repository root; resumable: rerun after an interruption)
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
nextstep train-vae recipes/shapes/vae.toml --resume
nextstep train-vae recipes/shapes/vae-decoder.toml --resume   # the same encoder, a sharper decoder
nextstep train-vae recipes/shapes/vae-dark.toml --resume      # then the whole VAE on half dark images
for stage in recipes/shapes/{1..16}-*.toml; do   # stages 1-16 in order (17, DPO, GRPO or plans, is not shipped)
    [ -e "$(grep -m1 '^out_dir' "$stage" | cut -d'"' -f2)/DONE" ] || nextstep train "$stage" --resume
done
# ship stage 16 (on the dark-trained VAE, which its export carries), keeping the model card that
# ships with it (the only copy in the repository; update its scores after the evaluations below)
python -m nextstep.training.ship runs/shapes/16-long-cycle/export nextstep/assets/shapes \
    --defaults recipes/shapes/generation_defaults.json --card nextstep/assets/shapes/MODEL_CARD.md
nextstep eval shapes --out runs/shapes/eval-shapes   # the shipped model, as a user gets it
nextstep eval edits --out runs/shapes/eval-edits
echo "built in $(( ($(date +%s) - start) / 60 )) minutes"
