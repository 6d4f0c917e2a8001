"""Why does an edit drawn after a thought fail? Test the copy-distance explanation.

    python research/thought_edits.py --model DIR [--cases N] [--seed S]

A model trained with `source_image = "last"` (instruction, source block, target
block) redraws the source almost unchanged when a thought sits between the
source and the target (docs/shapes-model-notes.md, "Planning on the shipped
model"). The explanation offered there: it copies source token k to target token
k at a fixed distance, and the thought moves that distance. If so, stating the
source again after the thought (instruction, source, thought, source, target)
restores the distance and the edits should come back; the model never saw that
layout in training, so this is a probe, not a feature.

For N edit cases of the training stream (seed S, never the benchmark's), the
script makes one image per case in several ways and prints the edit checker's
pass rate: no thought; a greedy thought (the pipeline's layout); both without
guidance; the target's true plan (what training put there) as the thought; the
sampled thoughts with the source block repeated after them. The unconditional
rows are the pipeline's in every case (no thought).

Measured on stage 17-plan (shipped to a scratch folder with the recipe's
defaults), N = 128, seed 1000, AMD EPYC, 2026-12-02:

| how | pass rate |
|---|---|
| no thought | 0.617 |
| greedy thought | 0.016 |
| no thought, no guidance (cfg 1, cfg_img 1) | 0.492 |
| greedy thought, no guidance | 0.102 |
| the target's true plan as the thought | 0.023 |
| greedy thought, then the source again | 0.070 |

So the copy-distance explanation is at most a small part: restoring the distance
brings back 0.05 of the 0.60 lost. Neither is the thought's content the cause (the
true plan fails alike). Guidance makes it worse (0.10 -> 0.02 where it lifts 0.49
-> 0.62 without a thought), so the unconditional rows, which carry no thought, pull
the image away. And the model never learnt these rows well: teacher-forced on 64
stream edits that all carry their plan, its image loss on the targets is 0.071
against 0.048 for the same rows without the plan (the same flow noise and times;
a one-off measurement, not in this script). 2000 steps with half of the edits
planned were not enough for the second layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nextstep.pipeline import NextStepPipeline
from nextstep.prepare import RequestBuilder
from nextstep.shapes.checker import check_edit
from nextstep.shapes.dataset import ShapesConfig, make_sample
from nextstep.shapes.plan import plan_text
from nextstep.shapes.renderer import render_image
from nextstep.text import image_block


def restate_source_after_thought(pipe: NextStepPipeline) -> None:
    """Make `pipe` end every conditional edit row that carries a thought with the source block again."""
    original = RequestBuilder.prompt_rows

    def prompt_rows(self, captions, images, n, s, plain=False, thoughts=None):
        rows, row_images, groups = original(self, captions, images, n, s, plain, thoughts)
        if thoughts is None or images is None:
            return rows, row_images, groups
        n_cond = len(captions) * n
        # Each conditional row gets a second block of its own source; its latents follow the first's.
        for i in range(n_cond):
            rows[i] = (*rows[i], image_block(*self._grid(row_images[i])))
        doubled = [im for im in row_images[:n_cond] for _ in range(2)]
        return rows, doubled + row_images[n_cond:], groups

    pipe.prompt_rows = prompt_rows.__get__(pipe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a shipped folder of a model trained to plan")
    ap.add_argument("--cases", type=int, default=128)
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args()
    pipe = NextStepPipeline.from_pretrained(args.model, device="cpu")
    config = ShapesConfig(size=pipe.settings.hw[0], seed=args.seed, edits=True, dark_prob=0.3)
    cases = [make_sample(config, i) for i in range(args.cases)]
    sources = [render_image(c.source) for c in cases]
    instructions = [c.instruction for c in cases]
    seeds = list(range(len(cases)))

    def run(settings, batch_images: int = 16) -> tuple[float, list[str]]:
        """The pass rate of one image per case, and the thoughts."""
        images, thoughts = [None] * len(cases), [""] * len(cases)
        for i, group, texts in pipe.iter_generate(instructions, settings, seeds, images=sources,
                                                  batch_images=batch_images):
            images[i], thoughts[i] = group[0], texts[0]
        passed = sum(check_edit(src, im, p).passed for src, im, p in zip(sources, images, instructions))
        return passed / len(cases), thoughts

    print(f"no thought: {run(pipe.settings.with_overrides(think=False))[0]:.3f}", flush=True)
    thinking = pipe.settings.with_overrides(think=True, text_temperature=0.0)
    rate, thoughts = run(thinking)
    print(f"thought, then target: {rate:.3f}", flush=True)
    for k in range(3):
        print(f"  {instructions[k]!r} -> {thoughts[k]!r}")
    unguided = dict(cfg=1.0, cfg_img=1.0)
    print(f"no thought, no guidance: {run(pipe.settings.with_overrides(think=False, **unguided))[0]:.3f}", flush=True)
    print(f"thought, no guidance: {run(thinking.with_overrides(**unguided))[0]:.3f}", flush=True)
    # The true plan of each target (what training put there) in place of the sampled thought.
    plans = [plan_text(c.scene) for c in cases]
    sampled = pipe.write_thoughts

    def true_plans(prompts, images, seeds_, n, s, batch_size):  # called once, with every case in order
        return [[plan] * n for plan in plans]

    pipe.write_thoughts = true_plans
    print(f"true plan, then target: {run(thinking)[0]:.3f}", flush=True)
    pipe.write_thoughts = sampled
    restate_source_after_thought(pipe)
    rate, again = run(thinking, batch_images=1)  # one request per call: merging assumes one source block per row
    print(f"thought, source again, target: {rate:.3f} (same thoughts: {again == thoughts})", flush=True)


if __name__ == "__main__":
    main()
