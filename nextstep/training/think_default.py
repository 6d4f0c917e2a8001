"""Choose whether a shapes-world model thinks by default, on the training stream, not the benchmark.

`python -m nextstep.training.think_default EXPORT --defaults D.json [MORE.json] --out CHOICE.json --write W.json`
draws `--prompts` samples of the shapes world exactly as training draws them
(`make_sample`, half captions and half edits, seeded by `--seed`: a stream of the
training distribution, never the benchmark's prompt sets), makes one image per
prompt at the generation defaults `D.json` in each mode of `MODES` (no thinking;
thoughts sampled at temperature 1; greedy thoughts), and scores each image with
the GRPO reward (`rewards.shapes_reward`: the fraction of a caption's checks that
hold, or the edit checker's pass). Text to image and edits are chosen apart
(`think` and `think_edits`: a model may draw better after a plan for one and not
the other): for each kind the mode with the highest mean reward on its half
wins, a tie going to the earlier mode (no thinking is the cheapest); the edits
choose among the modes whose thoughts are sampled as the captions' winner's
(the text_* settings are shared). CHOICE.json records the numbers; W.json is
D.json with the winners' settings, the file to ship. Further files after D.json
override its keys in order (a recipe's later choice, such as the sampler).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..devices import preferred_cpu_dtype
from ..io.atomic import atomic_write
from ..pipeline import NextStepPipeline
from ..shapes.dataset import ShapesConfig, make_sample
from ..shapes.renderer import render_image
from .rewards import shapes_reward

# The candidates, cheapest first: each is a set of generation settings over the defaults.
MODES: dict[str, dict[str, Any]] = {
    "no_think": {"think": False, "think_edits": False},
    "think": {"think": True, "think_edits": True, "text_temperature": 1.0},
    "think_greedy": {"think": True, "think_edits": True, "text_temperature": 0.0},
}


def load_at_defaults(export: Path, defaults: dict[str, Any]) -> NextStepPipeline:
    """A model on the CPU at the generation defaults `defaults` (a generation_defaults.json's content),
    in the dtype a user of this CPU gets (bf16-mixed only where bf16 is native)."""
    dtype = preferred_cpu_dtype(defaults.get("cpu_dtype"))
    pipe = NextStepPipeline.from_pretrained(export, dtype=dtype, device="cpu")
    pipe.settings = pipe.settings.with_overrides(**{k: v for k, v in defaults.items() if k != "cpu_dtype"})
    return pipe


def world_stream(prompts: int, seed: int, size: int, dark_prob: float) -> tuple[list[str], list, list]:
    """The training stream `measure` scores: the first half of `prompts` world captions, then world
    edits as (captions, edit cases, their rendered source images)."""
    captions = ShapesConfig(size=size, seed=seed, dark_prob=dark_prob)
    edits = ShapesConfig(size=size, seed=seed, edits=True, dark_prob=dark_prob)
    t2i = [make_sample(captions, i).caption for i in range(prompts - prompts // 2)]
    cases = [make_sample(edits, i) for i in range(prompts // 2)]
    return t2i, cases, [render_image(c.source) for c in cases]


def measure(pipe: NextStepPipeline, prompts: int, seed: int, size: int, dark_prob: float,
            modes: dict[str, dict[str, Any]] = MODES) -> dict[str, Any]:
    """Mean reward, pass rate and time per image of every mode (name -> settings over the pipeline's)
    on `prompts` world samples, and the winner (the highest reward; a tie goes to the earlier mode)."""
    t2i, cases, sources = world_stream(prompts, seed, size, dark_prob)
    result: dict[str, Any] = {"prompts": prompts, "seed": seed, "modes": {}}
    for name, overrides in modes.items():
        s = pipe.settings.with_overrides(**overrides)
        t0 = time.perf_counter()
        images = [g[0] for g in pipe.generate(t2i, s, seeds=list(range(len(t2i))))]
        images += [g[0] for g in pipe.generate([c.instruction for c in cases], s,
                                               seeds=list(range(len(cases))), images=sources)]
        seconds = time.perf_counter() - t0
        scores = shapes_reward(images, t2i + [c.instruction for c in cases], [None] * len(t2i) + sources)
        half = len(t2i)
        row: dict[str, Any] = {"settings": overrides}
        for part, part_scores in (("", scores), ("_t2i", scores[:half]), ("_edits", scores[half:])):
            n = max(len(part_scores), 1)
            row["reward" + part] = sum(part_scores) / n
            row["passed" + part] = sum(x == 1.0 for x in part_scores) / n
        row["seconds_per_image"] = seconds / len(scores)
        result["modes"][name] = row
    scored = result["modes"]
    result["chosen"] = max(scored, key=lambda m: (scored[m]["reward"], -list(modes).index(m)))
    return result


def choose(result: dict[str, Any], modes: dict[str, dict[str, Any]] = MODES) -> dict[str, Any]:
    """The mode of each kind from `measure`'s result (see the module doc): {"t2i": name, "edits":
    name, "settings": the generation settings they make together}."""
    rows, names = result["modes"], list(modes)

    def best(part: str, allowed: list[str]) -> str:
        return max(allowed, key=lambda m: (rows[m][f"reward_{part}"], -names.index(m)))

    def text(m: str) -> dict[str, Any]:
        return {k: v for k, v in modes[m].items() if k.startswith("text_")}

    t2i = best("t2i", names)
    clash = [m for m in names if modes[t2i]["think"] and modes[m]["think_edits"] and text(m) != text(t2i)]
    edits = best("edits", [m for m in names if m not in clash])
    thinking = t2i if modes[t2i]["think"] else edits
    settings = {"think": modes[t2i]["think"], "think_edits": modes[edits]["think_edits"], **text(thinking)}
    return {"t2i": t2i, "edits": edits, "settings": settings}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="a finished run's export folder")
    p.add_argument("--defaults", type=Path, nargs="+", required=True,
                   help="generation_defaults.json the model will ship with; more files override its keys in order")
    p.add_argument("--out", type=Path, required=True, help="where the measurements go (JSON)")
    p.add_argument("--write", type=Path, required=True, help="the defaults with the chosen mode's settings (JSON)")
    p.add_argument("--prompts", type=int, default=128, help="world samples, half captions, half edits")
    p.add_argument("--seed", type=int, default=1000, help="the world stream's seed")
    p.add_argument("--dark-prob", type=float, default=0.3, help="share of dark scenes, as in training")
    args = p.parse_args(argv)
    if args.prompts < 2:
        p.error(f"--prompts must be at least 2, got {args.prompts}")
    defaults = {k: v for path in args.defaults for k, v in json.loads(path.read_text()).items()}
    pipe = load_at_defaults(args.export, defaults)
    result = measure(pipe, args.prompts, args.seed, pipe.settings.hw[0], args.dark_prob)
    result["chosen"] = choose(result)
    chosen = {**defaults, **result["chosen"]["settings"]}
    for path, data in ((args.out, result), (args.write, chosen)):
        atomic_write(path, lambda tmp, d=data: Path(tmp).write_text(json.dumps(d, indent=2) + "\n"))
    for name, r in result["modes"].items():
        print(f"{name:>12}: reward {r['reward']:.3f} (captions {r['reward_t2i']:.3f}, edits {r['reward_edits']:.3f}), "
              f"passed {r['passed']:.3f}, {r['seconds_per_image']:.3f} s per image")
    picked = result["chosen"]
    print(f"chosen: text to image {picked['t2i']}, edits {picked['edits']}: {picked['settings']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
