#!/usr/bin/env bash
# Regenerate the shipped shapes-world model from scratch, then evaluate and ship it.
#   bash recipes/shapes/build.sh        (from the repository root; resumable: rerun after an interruption)
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
nextstep train-vae recipes/shapes/vae.toml --resume
nextstep train-vae recipes/shapes/vae-decoder.toml --resume   # the same encoder, a sharper decoder
nextstep train-vae recipes/shapes/vae-dark.toml --resume      # then the whole VAE on half dark images
done_stage() { [ -e "$(grep -m1 '^out_dir' "$1" | cut -d'"' -f2)/DONE" ]; }
for stage in recipes/shapes/{1..16}-*.toml; do   # stages 1-16 in order
    done_stage "$stage" || nextstep train "$stage" --resume
done
# five rounds of DPO (17 to 21), each on preference pairs of the previous stage's own samples
# (2048 captions and 2048 edits of the world, 4 images each, best against worst by the checker;
# round 21 draws its captions as the benchmark's categories name colours);
# 17-grpo and 17-plan are alternatives to stage 17 that are not shipped
# (22-plan and 23-plan, planning from stage 21, are not built either: docs/self-cot.md)
for round in "17 16-long-cycle 18" "18 17-dpo 19" "19 18-dpo 20" "20 19-dpo 21" "21 20-dpo 22"; do
    set -- $round   # stage, the model it starts from, the prompts' seed
    stage=recipes/shapes/$1-dpo.toml
    if ! done_stage "$stage"; then
        # sampled at the generation defaults the model ships with (a training export has none)
        cp recipes/shapes/generation_defaults.json "runs/shapes/$2/export/"
        for kind in t2i edits; do
            out=runs/shapes/$1-pairs-$kind
            [ -e "$out/pairs.jsonl" ] && continue
            if [ $kind = edits ]; then extra="--edits --dark-prob 0.4"; else extra="--dark-prob 0.3"; fi
            if [ $kind = t2i ] && [ "$1" -ge 21 ]; then extra="$extra --benchmark-colours"; fi
            nextstep data preferences --model "runs/shapes/$2/export" --out "$out" --num 2048 --seed "$3" $extra --overwrite
        done
        nextstep train "$stage" --resume
    fi
done
# ship stage 21 (on the dark-trained VAE, which its export carries), keeping the model card that
# ships with it (the only copy in the repository; update its scores after the evaluations below)
python -m nextstep.training.ship runs/shapes/21-dpo/export nextstep/assets/shapes \
    --defaults recipes/shapes/generation_defaults.json --card nextstep/assets/shapes/MODEL_CARD.md
nextstep eval shapes --out runs/shapes/eval-shapes   # the shipped model, as a user gets it
nextstep eval edits --out runs/shapes/eval-edits
echo "built in $(( ($(date +%s) - start) / 60 )) minutes"
