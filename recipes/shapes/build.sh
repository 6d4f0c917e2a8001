#!/usr/bin/env bash
# Regenerate the shipped shapes-world model from scratch, then evaluate and ship it.
#   bash recipes/shapes/build.sh        (from the repository root; resumable: rerun after an interruption)
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
nextstep train-vae recipes/shapes/vae.toml --resume
nextstep train-vae recipes/shapes/vae-decoder.toml --resume   # the same encoder, a sharper decoder
nextstep train-vae recipes/shapes/vae-dark.toml --resume      # then the whole VAE on half dark images
nextstep train-vae recipes/shapes/vae-dark-decoder.toml --resume  # and its decoder alone, longer
nextstep train-vae recipes/shapes/vae-dark-decoder-2.toml --resume  # a second pass of it
nextstep train-vae recipes/shapes/vae-dark-decoder-3.toml --resume  # and a third
done_stage() { [ -e "$(grep -m1 '^out_dir' "$1" | cut -d'"' -f2)/DONE" ]; }
for stage in recipes/shapes/{1..16}-*.toml; do   # stages 1-16 in order
    done_stage "$stage" || nextstep train "$stage" --resume
done
# A round of DPO: preference pairs of the previous stage's own samples (2048 captions and 2048 edits
# of the world, 4 images each, best against worst by the checker), then the stage.
dpo_round() {  # stage, the model it starts from, the prompts' seed, then flags for the caption pairs
    local stage=recipes/shapes/$1-dpo.toml from=runs/shapes/$2/export seed=$3 pairs=runs/shapes/$1-pairs
    shift 3
    done_stage "$stage" && return
    # sampled at the generation defaults the model ships with (a training export has none)
    cp recipes/shapes/generation_defaults.json "$from/"
    [ -e "$pairs-t2i/pairs.jsonl" ] || nextstep data preferences --model "$from" --out "$pairs-t2i" \
        --num 2048 --seed "$seed" --dark-prob 0.3 "$@" --overwrite
    edit_pairs "$from" "$pairs-edits" "$seed"
    nextstep train "$stage" --resume
}
edit_pairs() {  # the model, the folder of its pairs, the edits' seed
    [ -e "$2/pairs.jsonl" ] || nextstep data preferences --model "$1" --out "$2" \
        --num 2048 --seed "$3" --dark-prob 0.4 --edits --overwrite
}
# five rounds of DPO (17 to 21); round 21 draws its captions as the benchmark's categories name colours.
# 17-grpo and 17-plan are alternatives to stage 17 that are not shipped.
dpo_round 17 16-long-cycle 18
dpo_round 18 17-dpo 19
dpo_round 19 18-dpo 20
dpo_round 20 19-dpo 21
dpo_round 21 20-dpo 22 --benchmark-colours
# planning (self-CoT, docs/self-cot.md): stages 22 and 23 put a plan before the captions' images,
# then four rounds of DPO (24 to 27) on caption pairs drawn after the model's own greedy thoughts
for stage in recipes/shapes/22-plan.toml recipes/shapes/23-plan.toml; do
    done_stage "$stage" || nextstep train "$stage" --resume
done
for round in "24 23-plan 25" "25 24-dpo 26" "26 25-dpo 27" "27 26-dpo 28"; do
    dpo_round $round --benchmark-colours --think --text-temperature 0
done
# GRPO on the thoughts (the text head alone), its rollouts drawn at the generation defaults
cp recipes/shapes/generation_defaults.json runs/shapes/27-dpo/export/
done_stage recipes/shapes/28-thought-grpo.toml || nextstep train recipes/shapes/28-thought-grpo.toml --resume
# Two rounds of the text path trained on the previous stage's own thoughts that worked (4 per caption
# at temperature 1, each drawn at the generation defaults, the best image kept with its thought where
# the checker passes it), the drawing held; stage 30 is stage 29's file from stage 29, and stage 31
# a third round with a third caption set, of two coloured objects alone.
draw_thoughts() {  # stage, the model it starts from, the seeds of the caption sets (a third: color_attr)
    local stage=$1 from=runs/shapes/$2/export
    cp recipes/shapes/generation_defaults.json "$from/"
    for set in "bc 1536 $3 --benchmark-colours" "world 1024 $4" \
               ${5:+"cattr 1536 $5 --benchmark-colours --categories color_attr"}; do
        set -- $set
        local name=$1 num=$2 seed=$3
        shift 3
        [ -e "runs/shapes/$stage-thoughts-$name/manifest.jsonl" ] || nextstep data thoughts \
            --model "$from" --out "runs/shapes/$stage-thoughts-$name" --num "$num" -n 4 \
            --seed "$seed" --dark-prob 0.3 --think --text-temperature 1.0 "$@" --overwrite
    done
}
thought_round() {  # draw_thoughts' arguments, then the stage that trains on them
    done_stage "recipes/shapes/$1-thought-rft.toml" && return
    draw_thoughts "$@"
    nextstep train "recipes/shapes/$1-thought-rft.toml" --resume
}
thought_round 29 28-thought-grpo 31 32
thought_round 30 29-thought-rft 33 34
thought_round 31 30-thought-rft 35 36 37
# A fourth round, its examples drawn by stage 31 with the dark-trained VAE's decoder after its three
# passes alone (the same encoder, so the same latents): stage 31 as v21 shipped it.
[ -e runs/shapes/31-dec3/export/model.safetensors ] || python -m nextstep.training.ship \
    runs/shapes/31-thought-rft/export runs/shapes/31-dec3/export --vae runs/shapes/vae-dark-dec3/export \
    --defaults recipes/shapes/generation_defaults.json --card nextstep/assets/shapes/MODEL_CARD.md
thought_round 32 31-dec3 38 39 40
# Stage 32 grown to twice its depth (each new layer silent at first), trained on edits and its own
# thought examples
[ -d runs/shapes/32-grown ] || python -m nextstep.training.grow runs/shapes/32-thought-rft/export runs/shapes/32-grown
done_stage recipes/shapes/33-deeper.toml || nextstep train recipes/shapes/33-deeper.toml --resume
# and for a second, longer cycle on the same mixture
done_stage recipes/shapes/34-longer.toml || nextstep train recipes/shapes/34-longer.toml --resume
# and for a third, longer again and with more of it edits
done_stage recipes/shapes/35-edits-longer.toml || nextstep train recipes/shapes/35-edits-longer.toml --resume
# and for a fourth, a tenth of it fresh captions of the world with their true plans
done_stage recipes/shapes/36-fourth-cycle.toml || nextstep train recipes/shapes/36-fourth-cycle.toml --resume
# and for a fifth, its thought examples drawn afresh by stage 36
done_stage recipes/shapes/37-fifth-cycle.toml || {
    draw_thoughts 37 36-fourth-cycle 41 42 43
    nextstep train recipes/shapes/37-fifth-cycle.toml --resume
}
# and stage 37 with edits at 80% of the rows and half the learning rate (stage 39's file, which
# stage 46 inherits), reading thought examples drawn by stage 37, each whose image shows another plan
# that fits its caption relabelled with that plan, so that every thought it trains on is one its
# image shows. (Stage 39, the same on the examples as drawn, shipped before it; it feeds nothing here.)
done_stage recipes/shapes/46-polish-relabelled.toml || {
    draw_thoughts 38 37-fifth-cycle 44 45 46
    [ -e runs/shapes/38-thoughts-cattr/manifest-relabelled.jsonl ] || python -m \
        nextstep.training.thought_examples --relabel --overwrite runs/shapes/38-thoughts-{bc,world,cattr}/manifest.jsonl
    nextstep train recipes/shapes/46-polish-relabelled.toml --resume
}
# then a round of DPO on its own edits alone (its captions pass 0.98 of the time, its edits 0.86; a
# second round, stage 48, was turned down)
done_stage recipes/shapes/47-edits-dpo.toml || {
    cp recipes/shapes/generation_defaults.json runs/shapes/46-polish-relabelled/export/
    edit_pairs runs/shapes/46-polish-relabelled/export runs/shapes/47-pairs-edits 49
    nextstep train recipes/shapes/47-edits-dpo.toml --resume
}
# whether it thinks by default, for captions and for edits apart, chosen on a training stream, with
# the sampler of sampler-cps.json (chosen on the training streams: python -m nextstep.training.stream_rule)
final=runs/shapes/47-edits-dpo   # the stage that ships
defaults=$final/generation_defaults.json
cp recipes/shapes/generation_defaults.json $final/export/
[ -e "$defaults" ] || python -m nextstep.training.think_default $final/export \
    --defaults recipes/shapes/generation_defaults.json recipes/shapes/sampler-cps.json --prompts 1024 \
    --out $final/think_default.json --write "$defaults"
# ship it with that decoder, keeping the model card that ships with it (the only copy in the
# repository; update its scores after the evaluations below)
python -m nextstep.training.ship $final/export nextstep/assets/shapes \
    --vae runs/shapes/vae-dark-dec3/export \
    --defaults "$defaults" --card nextstep/assets/shapes/MODEL_CARD.md
nextstep eval shapes --out runs/shapes/eval-shapes   # the shipped model, as a user gets it
nextstep eval edits --out runs/shapes/eval-edits
echo "built in $(( ($(date +%s) - start) / 60 )) minutes"
