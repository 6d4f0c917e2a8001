"""The rule that chooses between a shapes-world stage and the one before it: training streams, never the benchmark.

`python -m nextstep.training.stream_rule --model EXPORT DEFAULTS.json [--model ...] --out RESULT.json`
samples each model once per prompt at the generation defaults it would ship with
(DEFAULTS.json, as `think_default` wrote them) on two streams drawn the way
training draws its data, for each seed of `--seeds`:

- the world stream (`think_default.measure` at the shipped defaults): `--world` samples, half
  captions and half edits, scored by the GRPO reward (partial credit for captions,
  pass or fail for edits);
- the category stream: `--captions` captions drawn as the benchmark's categories
  name colours (each category a sixth), scored the same way, with the pass rate of
  each category, and `off_palette`: the share of its captions without a colour word
  whose image shows an object of no palette colour (the benchmark's off-palette measure,
  which limits the rule).

The rule (`docs/self-cot.md`): among the models whose off-palette share is at most
`--max-off-palette` (the 1% the shapes model is held to), the one with the highest mean
of the two streams' rewards, averaged over the seeds, wins. The benchmark's prompt sets
are drawn from other seeds and are measured once, after the choice.

`--against RESULT.json` puts models an earlier run measured on the same streams (its `--out`)
into the choice without sampling them again: a new stage is judged against the recorded
stage it would replace. Beside the choice it prints every other model's rule minus the chosen
one's, seed by seed, since the streams are shared: differences that change sign from seed to
seed are within the streams' noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write
from ..pipeline import NextStepPipeline
from ..shapes.dataset import ShapesConfig, make_sample
from ..shapes.detector import detect
from ..shapes.grammar import parse_caption
from ..shapes.world import CATEGORIES
from .rewards import shapes_reward
from .think_default import load_at_defaults, measure

SEEDS = (1000, 2000, 3000)
WORLD, CAPTIONS, DARK_PROB = 1024, 768, 0.3  # samples per seed on each stream; dark scenes as in training


def category_stream(captions: int, seed: int, size: int, dark_prob: float) -> tuple[list[str], list[str]]:
    """`captions` captions named as the benchmark's categories name colours, and their categories."""
    config = ShapesConfig(size=size, seed=seed, colour_prob=None, dark_prob=dark_prob)
    samples = [make_sample(config, i) for i in range(captions)]
    return [s.caption for s in samples], [s.category for s in samples]


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def measure_seed(pipe: NextStepPipeline, seed: int, world: int, captions: int, dark_prob: float) -> dict[str, Any]:
    """One seed's numbers for one model: world stream (captions, edits) and category stream."""
    size = pipe.settings.hw[0]
    shipped = measure(pipe, world, seed, size, dark_prob, modes={"shipped": {}})["modes"]["shipped"]
    cat_captions, categories = category_stream(captions, seed, size, dark_prob)
    cat_images = [g[0] for g in pipe.generate(cat_captions, seeds=list(range(captions)))]
    cat_scores = shapes_reward(cat_images, cat_captions, [None] * captions)
    passed = {c: mean([float(s == 1.0) for s, k in zip(cat_scores, categories) if k == c]) for c in CATEGORIES}
    plain = [im for im, c in zip(cat_images, cat_captions) if all(o.colour is None for o in parse_caption(c).objects)]
    off_palette = mean([float(detect(im).off_palette) for im in plain])
    return {"world": shipped["reward"], "world_captions": shipped["reward_t2i"], "world_edits": shipped["reward_edits"],
            "category_reward": mean(cat_scores), "category_passed": mean(list(passed.values())),
            "off_palette": off_palette, "passed": passed}


def measure_model(export: Path, defaults: dict[str, Any], seeds: tuple[int, ...], world: int, captions: int,
                  dark_prob: float) -> dict[str, Any]:
    """Every seed's numbers and their means; `rule` is the number the choice compares."""
    pipe = load_at_defaults(export, defaults)
    per_seed = {str(seed): measure_seed(pipe, seed, world, captions, dark_prob) for seed in seeds}
    keys = [k for k in next(iter(per_seed.values())) if k != "passed"]
    result: dict[str, Any] = {k: mean([r[k] for r in per_seed.values()]) for k in keys}
    result["passed"] = {c: mean([r["passed"][c] for r in per_seed.values()]) for c in CATEGORIES}
    result["rule"] = rule_of(result)
    result["seeds"] = per_seed
    result["streams"] = streams(seeds, world, captions, dark_prob)
    return result


def streams(seeds: tuple[int, ...], world: int, captions: int, dark_prob: float) -> dict[str, Any]:
    """What makes two results comparable: the same prompts, drawn the same way."""
    return {"seeds": sorted(seeds), "world": world, "captions": captions, "dark_prob": dark_prob}


def load_recorded(path: Path, expected: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The results an earlier run wrote to `path`, refused unless measured on `expected`'s streams.

    Results recorded before the streams were written down (2026-12-06) were measured on the
    default counts; their seeds are read from the result itself.
    """
    recorded = json.loads(path.read_text())
    for name, r in recorded.items():
        theirs = r.get("streams") or streams(tuple(int(k) for k in r["seeds"]), WORLD, CAPTIONS, DARK_PROB)
        if theirs != expected:
            raise ValueError(f"{path}: {name!r} was measured on other streams ({theirs}) than this run's "
                             f"({expected}), so the two cannot be compared")
    return recorded


def rule_of(numbers: dict[str, Any]) -> float:
    """The number the choice compares: the mean of the two streams' rewards."""
    return (numbers["world"] + numbers["category_reward"]) / 2


def seed_rules(result: dict[str, Any]) -> dict[str, float]:
    """The rule of each seed alone."""
    return {seed: rule_of(r) for seed, r in result["seeds"].items()}


def against(results: dict[str, dict[str, Any]], chosen: str) -> list[str]:
    """One line per other model: its rule minus the chosen one's, overall and seed by seed."""
    mine = seed_rules(results[chosen])
    lines = []
    for name, r in results.items():
        if name != chosen:
            theirs = seed_rules(r)
            per_seed = " / ".join(f"{theirs[k] - mine[k]:+.4f}" for k in sorted(mine, key=int))
            lines.append(f"  {name}: {r['rule'] - results[chosen]['rule']:+.4f} (seeds {per_seed})")
    return lines


def choose(results: dict[str, dict[str, Any]], max_off_palette: float) -> str | None:
    """The rule's choice: the highest `rule` among the results whose `off_palette` is at most
    `max_off_palette`; None when no result is within it."""
    within = [name for name, r in results.items() if r["off_palette"] <= max_off_palette]
    return max(within, key=lambda name: results[name]["rule"]) if within else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs=2, action="append", required=True, metavar=("EXPORT", "DEFAULTS"),
                   help="a model folder and the generation_defaults.json it would ship with (repeat)")
    p.add_argument("--out", type=Path, required=True, help="where the measurements go (JSON)")
    p.add_argument("--against", type=Path, action="append", default=[], metavar="RESULT",
                   help="the --out of an earlier run on the same streams: its models join the choice unsampled")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="the streams' seeds")
    p.add_argument("--world", type=int, default=WORLD, help="world samples per seed, half captions, half edits")
    p.add_argument("--captions", type=int, default=CAPTIONS, help="category-stream captions per seed")
    p.add_argument("--dark-prob", type=float, default=DARK_PROB, help="share of dark scenes, as in training")
    p.add_argument("--max-off-palette", type=float, default=0.01,
                   help="a model with more off-palette images than this share is not chosen")
    args = p.parse_args(argv)
    if args.world < 2 or args.captions < 1:
        p.error(f"--world must be at least 2 and --captions at least 1, got {args.world} and {args.captions}")
    recorded: dict[str, Any] = {}
    for path in args.against:  # read before sampling, so a mismatch costs nothing
        try:
            recorded.update(load_recorded(path, streams(tuple(args.seeds), args.world, args.captions, args.dark_prob)))
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--against {path}: {e}")
    results: dict[str, Any] = {}
    for export, defaults in args.model:
        r = measure_model(Path(export), json.loads(Path(defaults).read_text()), tuple(args.seeds), args.world,
                          args.captions, args.dark_prob)
        name = f"{export} at {defaults}"  # one export may be measured at several defaults
        results[name] = r
        print(f"{name}: rule {r['rule']:.4f} = mean of world {r['world']:.4f} (captions {r['world_captions']:.3f}, "
              f"edits {r['world_edits']:.3f}) and category {r['category_reward']:.4f} "
              f"(passed {r['category_passed']:.3f}; " + ", ".join(f"{c} {v:.3f}" for c, v in r["passed"].items())
              + f"); off-palette without colour words {r['off_palette']:.4f}", flush=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1) + "\n"))
    measured = set(results)
    results.update({name: r for name, r in recorded.items() if name not in measured})
    chosen = choose(results, args.max_off_palette)
    if chosen is None:
        print(f"chosen by the rule: none (every model's off-palette share is above {args.max_off_palette})")
        return 0
    print(f"chosen by the rule: {chosen}" + ("" if chosen in measured else " (recorded)"))
    if len(results) > 1:
        print("the others' rule minus the chosen one's:", *against(results, chosen), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
