#!/usr/bin/env bash
# Build the five-stage shapes-world model from nothing, ship it to nextstep/assets/shapes, then evaluate it as a user gets it.
#   bash recipes/shapes-next/build.sh (from the repository root; resumable: rerun after an interruption)
# Every stage's wall minutes go to runs/shapes/build-times.tsv, with the CPU they ran on.
set -euo pipefail
recipe="$(dirname "$0")"
cd "$recipe/../.."
recipe="${recipe#"$PWD"/}"
mkdir -p runs/shapes
bf16=$(python -c 'from nextstep.devices import cpu_has_native_bf16 as f; print(", native bf16" if f() else "")')
cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores$bf16"
timed() {  # timed NAME COMMAND...: run a stage and record its wall minutes
    local t0=$SECONDS
    "${@:2}"
    awk -v n="$1" -v s=$((SECONDS - t0)) -v c="$cpu" 'BEGIN { printf "%s\t%.1f\t%s\n", n, s / 60, c }' \
        >> runs/shapes/build-times.tsv
}
[ -e runs/shapes/vae/export/config.json ] || timed vae nextstep train-vae "$recipe/vae.toml" --resume
for stage in "$recipe"/[1-5]-*.toml; do
    [ "$(basename "$stage")" = 5-dpo.toml ] && continue   # the alternative post-training stage
    out=$(grep -m1 '^out_dir' "$stage" | cut -d'"' -f2)
    [ -e "$out/DONE" ] || timed "$(basename "$stage" .toml)" nextstep train "$stage" --resume
done
# Think by default or not: decided on a stream of training prompts (nextstep/training/think_default.py).
[ -e runs/shapes/generation_defaults.json ] || timed think-default python -m nextstep.training.think_default \
    runs/shapes/5-grpo/export --defaults "$recipe/generation_defaults.json" \
    --out runs/shapes/think-choice.json --write runs/shapes/generation_defaults.json
python -m nextstep.training.ship runs/shapes/5-grpo/export nextstep/assets/shapes \
    --defaults runs/shapes/generation_defaults.json --card nextstep/assets/shapes/MODEL_CARD.md
cat runs/shapes/build-times.tsv
for set in 0 1 2; do   # the three prompt sets of the model card
    nextstep eval shapes --seed $set --out runs/shapes/eval-shapes-$set
    nextstep eval edits --seed $set --out runs/shapes/eval-edits-$set
done
