"""`nextstep data ...`: make training data. `nextstep data shapes` writes the shapes world to disk;
`nextstep data preferences` makes DPO preference pairs from a model's own samples;
`nextstep data thoughts` keeps the thoughts after which a model drew its captions right (self-CoT examples)."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..io.atomic import atomic_write
from .common import (add_model_args, add_settings_args, add_think_args, check_positive, check_seed, command_group,
                     load_pipeline, settings_from_args)

if TYPE_CHECKING:
    from ..shapes.dataset import ShapesConfig

FORMATS = ("folder", "webdataset")


def _probability(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}") from None
    if not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return p


def _add_world_args(parser: argparse.ArgumentParser) -> None:
    """The options of which samples of the world are drawn, shared by `data shapes` and `data preferences`."""
    parser.add_argument("--colour-prob", type=_probability, default=0.5,
                        help="chance that an object phrase names its colour (default 0.5)")
    parser.add_argument("--benchmark-colours", action="store_true",
                        help="name colours exactly as the benchmark categories do (overrides --colour-prob)")
    parser.add_argument("--dark-prob", type=_probability, default=0.2,
                        help="chance of a dark background (default 0.2)")
    parser.add_argument("--categories", nargs="+", default=None, metavar="CATEGORY",
                        help="caption categories to draw from (default: all six)")


def _world(args: argparse.Namespace, size: int) -> ShapesConfig:
    """The world the options above describe."""
    from ..shapes.dataset import ShapesConfig
    from ..shapes.world import CATEGORIES

    return ShapesConfig(size=size, seed=args.seed, edits=args.edits, categories=tuple(args.categories or CATEGORIES),
                        colour_prob=None if args.benchmark_colours else args.colour_prob, dark_prob=args.dark_prob)


def _add_self_sample_args(parser: argparse.ArgumentParser, prompts: str, per_prompt: str) -> None:
    """The options of `data preferences` and `data thoughts`, which sample a model on world prompts."""
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--num", type=int, required=True, help=f"number of {prompts}")
    parser.add_argument("-n", "--num-images", type=int, default=4, help=f"{per_prompt} (default 4)")
    parser.add_argument("--seed", type=int, default=0, help=f"world seed of the {prompts}, and first generation "
                                                            "seed (default 0)")
    parser.add_argument("--reward", default="shapes", help="'shapes' or module:function, as in [grpo] reward "
                                                           "(default shapes)")
    _add_world_args(parser)
    parser.add_argument("--batch-size", type=int, default=16, help=f"{prompts} per model call (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    add_model_args(parser)


def register(sub: argparse._SubParsersAction) -> None:
    data_sub = command_group(sub, "data", "make training data (the shapes world)", "Make training data.",
                             "data_command", "WHAT")
    s = data_sub.add_parser(
        "shapes", help="render the synthetic shapes world",
        description="Render N seeded samples of the shapes world (see shapes-world.md): captioned images, "
                    "or with --edits (source, instruction, target) triplets. Sample k depends only on "
                    "(--seed, k, the mixture options). folder: DIR/*.png plus DIR/manifest.jsonl, one "
                    "line per sample with file, caption, labels (edits: source, instruction, target, "
                    "labels). webdataset: DIR/shapes-NNNNNN.tar shards with KEY.png, KEY.txt, KEY.json "
                    "(edits: KEY.source.png, KEY.target.png, KEY.instruction.txt, KEY.json).")
    s.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    s.add_argument("--num", type=int, required=True, help="number of samples")
    s.add_argument("--size", type=int, default=64, help="canvas side in pixels, a multiple of 16 (default 64)")
    s.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    s.add_argument("--edits", action="store_true", help="write editing triplets instead of captioned images")
    s.add_argument("--format", choices=FORMATS, default="folder", help="folder (PNGs + manifest.jsonl) or "
                   "webdataset (tar shards); default folder")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default 1000)")
    _add_world_args(s)
    s.add_argument("--overwrite", action="store_true", help="replace data already in --out")
    s.set_defaults(run=run_shapes)

    p = data_sub.add_parser(
        "preferences", help="DPO preference pairs from a model's own samples, judged by the shapes checker",
        description="Draw N prompts of the shapes world (captions, or with --edits rendered source scenes and "
                    "instructions), sample -n images for each with the model, score them with --reward (default: "
                    "the shapes checker, partial credit for captions) and pair the best against the worst image "
                    "of every prompt whose scores differ. Writes OUT/images/*.png and OUT/pairs.jsonl (one line "
                    "per pair: prompt, chosen, rejected, source for edits, thought with --think, scores, seeds), the "
                    "file a `stage = \"dpo\"` config names in [dpo] pairs. Prompt i's images come from seeds "
                    "seed + i*n + k.")
    _add_self_sample_args(p, "prompts", "images sampled per prompt")
    p.add_argument("--edits", action="store_true", help="edit instructions on rendered sources instead of captions")
    p.add_argument("--chosen", choices=("best", "truth"), default="best",
                   help="best: a prompt's best sample over its worst, where their scores differ; truth: the "
                        "rendered true image over its worst sample, where that fails (-n may be 1); default best")
    add_settings_args(p, edit=True)
    add_think_args(p, edit=False)  # with --edits, --think is the edits' setting
    p.set_defaults(run=run_preferences)

    t = data_sub.add_parser(
        "thoughts", help="self-CoT training examples: the thoughts after which a model drew its captions right",
        description="Draw N captions of the shapes world; for each, the model writes -n thoughts (at "
                    "--text-temperature) and draws an image after each, --reward scores them (default: the "
                    "shapes checker), and the best image scoring at least --min-score is kept with its "
                    "thought. Writes OUT/images/*.png and OUT/manifest.jsonl (file, caption, plan, score, seed, "
                    "category), a text-to-image manifest that a kind = \"files\" data source reads; see "
                    "docs/self-cot.md. Caption i's images come from seeds seed + i*n + k.")
    _add_self_sample_args(t, "captions", "thoughts (one image each) per caption")
    t.add_argument("--min-score", type=float, default=1.0, help="the least reward a kept image has (default 1: "
                                                                "every check of its caption holds)")
    t.add_argument("--shows-thought", action="store_true",
                   help="keep only images that show their thought (the shapes detector's colours, shapes and cells)")
    add_settings_args(t, edit=False)
    add_think_args(t, edit=False)
    t.set_defaults(run=run_thoughts, edits=False)


def run_shapes(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.webdataset import ShardWriter
    from ..shapes.dataset import make_sample
    from ..shapes.renderer import render_image

    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    config = _world(args, args.size)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    existing = [p.name for p in out.glob("*")] if out.is_dir() else []
    if existing and not args.overwrite:
        raise ValueError(f"--out {out} is not empty ({len(existing)} entries); pass --overwrite to write into it")
    out.mkdir(parents=True, exist_ok=True)

    width = max(6, len(str(args.num - 1)))
    writer = ShardWriter(out, "shapes", args.shard_size) if args.format == "webdataset" else None
    lines: list[str] = []
    bar = tqdm(total=args.num, unit="sample", disable=not sys.stderr.isatty())  # quiet in scripts
    for k in range(args.num):
        sample = make_sample(config, k)
        key = f"{k:0{width}d}"
        target_png = _png(render_image(sample.scene))
        if sample.is_edit:
            files = {"source.png": _png(render_image(sample.source)), "target.png": target_png}
            text = {"instruction": sample.instruction}
            labels = {"source": sample.source.labels(), "target": sample.scene.labels()}
        else:
            files = {"png": target_png}
            text = {"caption": sample.caption}
            labels = sample.scene.labels()
        if writer is not None:
            meta = {**text, "labels": labels, **({"category": sample.category} if sample.category else {})}
            txt_ext = "instruction.txt" if sample.is_edit else "txt"
            writer.write(key, {**files, txt_ext: next(iter(text.values())), "json": json.dumps(meta)})
        else:
            names = {}
            for ext, data in files.items():
                name = f"{key}.{ext}"
                atomic_write(out / name, lambda tmp, d=data: Path(tmp).write_bytes(d))
                names[ext] = name
            if sample.is_edit:
                line = {"source": names["source.png"], "instruction": sample.instruction,
                        "target": names["target.png"], "labels": labels}
            else:
                line = {"file": names["png"], "caption": sample.caption, "labels": labels,
                        "category": sample.category}
            lines.append(json.dumps(line))
        bar.update(1)
    bar.close()
    if writer is not None:
        writer.close()
        print(writer.pattern())
    else:
        atomic_write(out / "manifest.jsonl", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
        print(out / "manifest.jsonl")
    return 0


def run_preferences(args: argparse.Namespace) -> int:
    from ..io.images import load_rgb
    from ..settings import SEED_MODULUS
    from ..shapes.dataset import make_sample
    from ..shapes.grammar import parse_instruction
    from ..shapes.renderer import render_image
    from ..training.preferences import PAIR_FILE, make_pairs
    from ..training.rewards import load_reward

    check_positive(**{"--num": args.num, "-n": args.num_images, "--batch-size": args.batch_size})
    if args.num_images < 2 and args.chosen == "best":
        raise ValueError(f"-n must be >= 2 (a pair is the best and the worst of a prompt's images; with "
                         f"--chosen truth, 1 will do), got {args.num_images}")
    check_seed(args.seed)
    out = _output_folder(args, PAIR_FILE)
    reward = load_reward(args.reward)
    pipe = load_pipeline(args)
    settings = settings_from_args(pipe, args)
    if args.edits and args.think is not None:  # --think asks for the kind of prompt drawn
        settings = settings.with_overrides(think_edits=args.think)
    config = _world(args, _square_side(settings))
    samples = [make_sample(config, k) for k in range(args.num)]
    n = args.num_images
    seeds = [(args.seed + i * n) % SEED_MODULUS for i in range(args.num)]
    if args.edits:
        prompts = [s.instruction for s in samples]
        # Through a PNG, as a user's source file would come in.
        sources = [load_rgb(_png(render_image(s.source))) for s in samples]
        extra = [{"kind": parse_instruction(s.instruction).op} for s in samples]
    else:
        prompts, sources = [s.caption for s in samples], None
        extra = [{"category": s.category} for s in samples]
    # A sample's scene is its caption's image, or an edit's target.
    truths = [load_rgb(_png(render_image(s.scene))) for s in samples] if args.chosen == "truth" else None
    summary = make_pairs(pipe, prompts, seeds, n, settings, reward, out, sources, extra,
                         batch_images=args.batch_size * n, progress=sys.stderr.isatty(), truths=truths)
    skipped = f", {summary['empty_thoughts']} skipped for an empty thought" if summary["empty_thoughts"] else ""
    print(f"{summary['pairs']} pairs from {summary['prompts']} prompts ({summary['images']} images, mean score "
          f"{summary['mean_score']:.3f}, {summary['perfect']:.1%} perfect{skipped}): {summary['file']}")
    return 0


def run_thoughts(args: argparse.Namespace) -> int:
    from ..settings import SEED_MODULUS
    from ..shapes.dataset import make_sample
    from ..shapes.plan import image_agrees_with_thought
    from ..training.rewards import load_reward
    from ..training.thought_examples import EXAMPLES_FILE, make_thought_examples

    check_positive(**{"--num": args.num, "-n": args.num_images, "--batch-size": args.batch_size})
    check_seed(args.seed)
    out = _output_folder(args, EXAMPLES_FILE)
    reward = load_reward(args.reward)
    pipe = load_pipeline(args)
    settings = settings_from_args(pipe, args).with_overrides(think=True)
    samples = [make_sample(_world(args, _square_side(settings)), k) for k in range(args.num)]
    n = args.num_images
    summary = make_thought_examples(
        pipe, [s.caption for s in samples], [(args.seed + i * n) % SEED_MODULUS for i in range(args.num)], n,
        settings, reward, out, args.min_score, [{"category": s.category} for s in samples],
        batch_images=args.batch_size * n, progress=sys.stderr.isatty(),
        agrees=image_agrees_with_thought if args.shows_thought else None)
    print(f"{summary['examples']} examples from {summary['prompts']} captions ({summary['images']} images, mean "
          f"score {summary['mean_score']:.3f}): {summary['file']}")
    return 0


def _output_folder(args: argparse.Namespace, file: str) -> Path:
    """`--out`, refused if it is a file or already holds `file` (unless --overwrite)."""
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if (out / file).exists() and not args.overwrite:
        raise ValueError(f"--out {out} already holds {file}; pass --overwrite to replace it")
    return out


def _square_side(settings) -> int:
    height, width = settings.hw
    if height != width:
        raise ValueError(f"the shapes world is square, but the size is {width}x{height}: give a square size")
    return height


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
