"""TrainConfig: one stage of a training recipe, read from a TOML file.

A recipe is a folder of stage files run in order, each starting from the
previous stage's exported model (`init_from`). Every key is checked when the
file is read, before any compute: unknown keys, impossible values, missing
paths and a batch that does not split across the ranks fail with a message
naming them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..devices import TRAINING_PRECISIONS
from ..errors import ConfigError
from ..settings import GenerationSettings
from ..text import SOURCE_IMAGE_PLACES
from .config_file import build, read_toml
from .grpo import GRPOSection

STAGES = ("pretrain", "mixed", "anneal", "sft", "dpo", "grpo")
SOURCE_KINDS = ("shapes", "files")
SCHEDULES = ("constant", "cosine")  # the learning-rate schedules of nextstep.training.optim
# Keys of earlier versions: old -> where it is now.
RENAMED = {"sample_size": "train.sample_settings.hw = [S, S]", "sample_cfg": "train.sample_settings.cfg",
           "sample_steps": "train.sample_settings.num_sampling_steps"}


# NextStepConfig fields that only shape training (no parameter depends on them), so a stage may
# change them for a model it continues from `init_from`.
TRAINING_ONLY_FIELDS = ("fm_head_batch_mul", "lm_loss_weight", "im_loss_weight")


@dataclass
class ModelSection:
    """A new model (used when `init_from` is empty): NextStepConfig overrides plus its parts.
    With `init_from`, `config` may set only `TRAINING_ONLY_FIELDS`."""

    tokenizer: str = "shapes"  # a folder with tokenizer.json, or "shapes" to build the shapes-world BPE
    # A VAE folder (official layout). With init_from it replaces that model's VAE: the stage
    # continues the model on another VAE's latents (e.g. a fine-tuned encoder).
    vae: str = ""
    lm_init: str = ""  # optional: a Qwen2 / Llama folder (e.g. Qwen2.5-14B) to start the decoder from
    config: dict[str, Any] = field(default_factory=dict)  # NextStepConfig fields


@dataclass
class BlendSection:
    """Start from a blend of two runs of one model (a "model soup", often better than either):
    (1 - weight) * init_from + weight * path. Same checks as `ship --blend`."""

    path: str = ""  # another export of init_from's model (same config, tokenizer and latent space)
    weight: float = 0.0  # in (0, 1)


@dataclass
class DataSource:
    kind: str = "shapes"  # "shapes" (the synthetic world) or "files" (folder / jsonl / webdataset)
    weight: float = 1.0  # share of the batches drawn from this source
    size: int = 64  # shapes: image side
    edits: bool = False  # shapes: editing triplets instead of captions
    dark_prob: float = 0.2  # shapes: the share of scenes (edits: sources) on a dark background
    # shapes: the share of samples whose row holds the plan of the image (edits: of the target) between
    # the text and the image block, the thought of self-CoT (docs/self-cot.md)
    plan_prob: float = 0.0
    # shapes: two-object captions name first the object that the image's tokens reach first (row by
    # row), so the decoder knows which object it starts; either order describes the scene
    raster_order: bool = False
    # shapes: captions name colours as the benchmark's categories do (`color_attr` both objects',
    # `colors` the one object's, the others none; `nextstep data preferences --benchmark-colours`)
    # instead of each object's colour with chance 0.5
    benchmark_colours: bool = False
    path: str = ""  # files: folder, manifest or shard pattern
    resolution: int = 256  # files: bucket base resolution
    task: str = "t2i"  # files: "t2i" or "edit"


@dataclass
class DataSection:
    sources: list[DataSource] = field(default_factory=lambda: [DataSource()])
    batch_size: int = 16  # global, over all ranks and accumulation steps
    num_workers: int = 0
    caption_dropout: float = 0.1
    source_image: str = "first"  # edits: where an instruction without <image> gets its source ("first"/"last")
    edit_thought_tokens: int = 0  # edit rows' plans padded with [PAD] to this many tokens (docs/self-cot.md); 0: none
    edit_source_after_thought: bool = False  # planned edit rows repeat their source after the plan (docs/self-cot.md)


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    schedule: str = "constant"  # or "cosine"
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0
    grad_accum: int = 1

    def problems(self) -> list[str]:
        """What is wrong with this [optim] table, one 'optim.KEY=VALUE (why)' item per problem."""
        problems = []
        if not self.lr > 0:
            problems.append(f"optim.lr={self.lr} (must be > 0)")
        if self.schedule not in SCHEDULES:
            problems.append(f"optim.schedule={self.schedule!r} (constant or cosine)")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                problems.append(f"optim.{name}={getattr(self, name)} (must be >= 0)")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"optim.min_lr_ratio={self.min_lr_ratio} (must be in [0, 1])")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"optim.betas={list(self.betas)} (two numbers in [0, 1))")
        if self.grad_accum < 1:
            problems.append(f"optim.grad_accum={self.grad_accum} (must be >= 1)")
        return problems


@dataclass
class TrainSection:
    # "auto": bf16 autocast on GPU, fp32 on CPU; or "fp32" / "bf16" (fp32 on CPUs without native bf16)
    precision: str = "auto"
    grad_checkpointing: bool = False
    log_every: int = 1
    checkpoint_every: int = 100
    keep_last: int = 3
    # Largest std of the Gaussian noise added to each generated image's tokens where the decoder
    # reads them (not to the flow head's targets); each image draws its std from U[0, context_noise].
    # It keeps the decoder from reading an object's colour off faint traces in the tokens before it
    # (the VAE's receptive field spreads them there) instead of from the caption. 0: off.
    context_noise: float = 0.0
    sample_every: int = 0  # 0: only at the end
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle", "two blue squares"])
    # How the sample grids are drawn: GenerationSettings overrides (e.g. {hw = [64, 64]});
    # unset ones are the model's defaults (nextstep/settings.py).
    sample_settings: dict[str, Any] = field(default_factory=dict)
    tensorboard: bool = True
    # The parameters this stage trains, by name or name prefix (["lm_head"], ["layers.5", "norm"]);
    # the rest stay frozen (no gradient, no optimizer state). Empty: all of them.
    trainable: list[str] = field(default_factory=list)
    # Supervised stages: > 0 replaces the flow-matching loss by this weight times the mean squared
    # distance between the flow head's conditions and those of the frozen `init_from` model, on the
    # same batch (the drawing held while the text path learns, e.g. to write plans). 0: off.
    hold_images: float = 0.0


@dataclass
class DpoSection:
    """`stage = "dpo"` (nextstep/training/dpo.py): preference pairs instead of `[data] sources`;
    `data.batch_size` counts pairs."""

    # JSONL pair file: prompt, chosen, rejected (image paths), optional source (edits). A list of files
    # is read as one set, in order (e.g. caption pairs and edit pairs from two `nextstep data preferences`).
    pairs: str | list[str] = ""
    # How sharply the loss rewards the policy's error gap over the reference's: Diffusion-DPO's
    # SD1.5 value (5000) with its factor 1/2 folded in.
    beta: float = 2500.0
    # Weight of the policy's plain flow-matching error on the chosen images, added to the DPO loss
    # (an SFT term, as RPO adds one to DPO): it keeps the chosen images likely while the pair's
    # margin grows. 0 is plain Diffusion-DPO.
    sft_weight: float = 0.0

    @property
    def pair_files(self) -> list[str]:
        """`pairs` as a list of files."""
        return [self.pairs] if isinstance(self.pairs, str) else list(self.pairs)

    def problems(self, stage: str) -> list[str]:
        """What is wrong with this [dpo] table for a stage of kind `stage`."""
        if stage != "dpo":
            return [] if self == DpoSection() else [f"[dpo] is set but stage={stage!r} does not read it"]
        problems = []
        if not self.pair_files or not all(self.pair_files):
            problems.append("dpo.pairs is empty (the preference file: see docs/post-training.md)")
        for path in filter(None, self.pair_files):
            if not Path(path).is_file():
                problems.append(f"dpo.pairs={path!r} does not exist (make one with `nextstep data preferences`)")
        if not 0 < self.beta < float("inf"):
            problems.append(f"dpo.beta={self.beta} (must be a number > 0)")
        if not 0 <= self.sft_weight < float("inf"):
            problems.append(f"dpo.sft_weight={self.sft_weight} (must be a number >= 0)")
        return problems


FSDP_DTYPES = ("fp32", "bf16")  # `[distributed] param_dtype` / `reduce_dtype`


@dataclass
class DistributedSection:
    """How a torchrun job shards the model with FSDP2 (a single process ignores it; its numerics
    are `[train] precision`). The sharded parameters, and so the optimizer's master weights, stay
    float32 whatever is chosen here."""

    param_dtype: str = "fp32"  # the all-gathered parameters the layers compute with: "fp32" or "bf16"
    reduce_dtype: str = "fp32"  # the gradients' reduce-scatter across ranks: "fp32" or "bf16"
    # Keep sharded parameters, gradients and optimizer state in CPU memory (the step runs there).
    cpu_offload: bool = False
    # For `--plan`: the memory of one device in GiB (0: the device's own, or 80 without a GPU).
    device_memory_gib: float = 0.0

    def problems(self) -> list[str]:
        """What is wrong with this [distributed] table, one 'distributed.KEY=VALUE (why)' item each."""
        problems = [f"distributed.{name}={getattr(self, name)!r} (one of {list(FSDP_DTYPES)})"
                    for name in ("param_dtype", "reduce_dtype") if getattr(self, name) not in FSDP_DTYPES]
        if not self.device_memory_gib >= 0:
            problems.append(f"distributed.device_memory_gib={self.device_memory_gib} (must be >= 0)")
        return problems


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    stage: str = "pretrain"
    steps: int = 1000
    seed: int = 0
    init_from: str = ""  # previous stage's exported model folder; empty: a new model from [model]
    init_blend: BlendSection = field(default_factory=BlendSection)  # optional, with init_from
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    dpo: DpoSection = field(default_factory=DpoSection)  # stage = "dpo" only
    grpo: GRPOSection = field(default_factory=GRPOSection)  # stage = "grpo" only
    source: str = field(default="", repr=False)  # the file it was read from (not a TOML key)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        raw = read_toml(path)
        if "source" in raw:
            raise ConfigError(f"{path}: 'source' is not a config key (it records the file a config came from)")
        moved = [f"train.{old} is now {new}" for old, new in RENAMED.items() if old in raw.get("train", {})]
        if moved:
            raise ConfigError(f"{path}: " + "; ".join(moved))
        config = build(cls, raw)
        config.source = str(path)
        return config

    def check(self, world_size: int = 1) -> None:
        """Everything that can be checked before any compute."""
        where = self.source or "training config"
        if self.stage not in STAGES:
            raise ConfigError(f"{where}: stage={self.stage!r}; choose one of {STAGES}")
        problems = []
        for name, value in [("steps", self.steps), ("data.batch_size", self.data.batch_size),
                            ("train.log_every", self.train.log_every),
                            ("train.checkpoint_every", self.train.checkpoint_every),
                            ("train.keep_last", self.train.keep_last)]:
            if value < 1:
                problems.append(f"{name}={value} (must be >= 1)")
        if not 0 <= self.train.context_noise < float("inf"):
            problems.append(f"train.context_noise={self.train.context_noise} (must be a number >= 0)")
        elif self.train.context_noise and self.stage in ("dpo", "grpo"):
            problems.append(f"train.context_noise={self.train.context_noise} (stage={self.stage!r} reads clean "
                            "tokens: its log-probabilities or errors are compared with another pass; set 0)")
        if not 0 <= self.train.hold_images < float("inf"):
            problems.append(f"train.hold_images={self.train.hold_images} (must be a number >= 0)")
        elif self.train.hold_images and (self.stage in ("dpo", "grpo") or not self.init_from):
            problems.append(f"train.hold_images={self.train.hold_images} (holds the drawing of init_from: a "
                            "supervised stage with init_from)")
        if not all(isinstance(p, str) and p.strip(".") for p in self.train.trainable):
            problems.append(f"train.trainable={self.train.trainable!r} (parameter names or prefixes, "
                            "such as \"lm_head\")")
        try:  # checked against the official defaults; the model's size is filled in when sampling
            GenerationSettings().with_overrides(**self.train.sample_settings)
        except (TypeError, ValueError) as e:
            problems.append(f"train.sample_settings: {e}")
        problems += self.optim.problems()
        problems += self.distributed.problems()
        problems += self.dpo.problems(self.stage)
        problems += self._grpo_problems(world_size)
        if self.stage == "dpo" and not self.init_from:
            problems.append("stage='dpo' needs init_from (the model to improve, kept frozen as the reference)")
        if self.train.precision not in TRAINING_PRECISIONS:
            problems.append(f"train.precision={self.train.precision!r} (auto, fp32 or bf16)")
        if not 0 <= self.data.caption_dropout < 1:
            problems.append(f"data.caption_dropout={self.data.caption_dropout} (must be in [0, 1))")
        if self.data.source_image not in SOURCE_IMAGE_PLACES:
            problems.append(f"data.source_image={self.data.source_image!r} (first or last)")
        if self.data.edit_thought_tokens < 0:
            problems.append(f"data.edit_thought_tokens={self.data.edit_thought_tokens} (must be >= 0; 0: unpadded)")
        if self.data.edit_source_after_thought and self.data.edit_thought_tokens:
            problems.append("data.edit_source_after_thought and data.edit_thought_tokens both set (choose one way "
                            "to keep a planned edit's target at its source's distance)")
        per_step = world_size * self.optim.grad_accum
        if per_step >= 1 and self.data.batch_size % per_step:
            problems.append(f"data.batch_size={self.data.batch_size} is not divisible by "
                            f"{world_size} ranks x {self.optim.grad_accum} accumulation steps")
        if not self.data.sources:
            problems.append("data.sources is empty")
        for i, s in enumerate(self.data.sources):
            if s.kind not in SOURCE_KINDS:
                problems.append(f"data.sources[{i}].kind={s.kind!r} (one of {SOURCE_KINDS})")
            if s.kind == "shapes" and (s.size < 16 or s.size % 16):
                problems.append(f"data.sources[{i}].size={s.size} (a multiple of 16)")
            if s.kind == "files" and not _exists(s.path):
                problems.append(f"data.sources[{i}].path={s.path!r} does not exist")
            if s.kind == "shapes" and not 0 <= s.dark_prob <= 1:
                problems.append(f"data.sources[{i}].dark_prob={s.dark_prob} (must be in [0, 1])")
            if not 0 <= s.plan_prob <= 1:
                problems.append(f"data.sources[{i}].plan_prob={s.plan_prob} (must be in [0, 1])")
            elif s.plan_prob and s.kind != "shapes":
                problems.append(f"data.sources[{i}].plan_prob={s.plan_prob} (only shapes sources have plans; "
                                f"kind={s.kind!r})")
            for option in ("raster_order", "benchmark_colours"):
                if getattr(s, option) and (s.kind != "shapes" or s.edits):
                    problems.append(f"data.sources[{i}].{option} (only for shapes captions, not "
                                    f"{'edits' if s.kind == 'shapes' else repr(s.kind)})")
            if not s.weight > 0:
                problems.append(f"data.sources[{i}].weight={s.weight} (must be > 0)")
        if self.init_from:
            if not Path(self.init_from).is_dir():
                problems.append(f"init_from={self.init_from!r} does not exist (run the previous stage first)")
            fixed = sorted(set(self.model.config) - set(TRAINING_ONLY_FIELDS))
            if fixed:
                problems.append(f"model.config sets {fixed}, which the init_from model fixes; a stage that "
                                f"continues a model may only set {list(TRAINING_ONLY_FIELDS)}")
        if self.init_blend.path or self.init_blend.weight:
            b = self.init_blend
            if not self.init_from:
                problems.append("init_blend needs init_from (it blends init_from with init_blend.path)")
            if not Path(b.path).is_dir():
                problems.append(f"init_blend.path={b.path!r} does not exist")
            if not 0 < b.weight < 1:
                problems.append(f"init_blend.weight={b.weight} (must be between 0 and 1, exclusive)")
        if not self.init_from:
            if self.model.tokenizer != "shapes" and not (Path(self.model.tokenizer) / "tokenizer.json").is_file():
                problems.append(f"model.tokenizer={self.model.tokenizer!r} has no tokenizer.json")
            if self.model.lm_init and not Path(self.model.lm_init).is_dir():
                problems.append(f"model.lm_init={self.model.lm_init!r} does not exist")
        # A new model needs a VAE; a continued one may switch to another (`[model] vae`).
        if (self.model.vae or not self.init_from) and not Path(self.model.vae, "config.json").is_file():
            problems.append(f"model.vae={self.model.vae!r} is not a VAE folder (run its VAE stage first)")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))

    def _grpo_problems(self, world_size: int) -> list[str]:
        if self.stage != "grpo":
            return [] if self.grpo == GRPOSection() else [f"[grpo] is set but stage={self.stage!r} does not read it"]
        problems = self.grpo.problems()
        if not self.init_from:
            problems.append("stage='grpo' needs init_from (the model to improve; with grpo.kl_weight also the "
                            "frozen reference)")
        if world_size >= 1 and self.grpo.prompts_per_step % world_size:
            problems.append(f"grpo.prompts_per_step={self.grpo.prompts_per_step} is not divisible by "
                            f"{world_size} ranks")
        if self.grpo.policy == "thought":
            if not self.train.trainable:
                problems.append("grpo.policy='thought' needs train.trainable, the parts the thoughts' log-"
                                "probabilities train (e.g. [\"lm_head\"]: a given thought is then drawn as before)")
            if world_size > 1:
                problems.append(f"grpo.policy='thought' runs in one process ({world_size} ranks requested)")
        first = self.data.sources[0] if self.data.sources else None
        if self.grpo.prompts:
            if not Path(self.grpo.prompts).is_file():
                problems.append(f"grpo.prompts={self.grpo.prompts!r} does not exist (a text file, one prompt a line)")
        elif first is None or first.kind != "shapes" or first.edits:
            problems.append("stage='grpo' without grpo.prompts draws its prompts from data.sources[0], which "
                            "must be a text-to-image shapes source (kind = \"shapes\", edits = false)")
        try:
            GenerationSettings().with_overrides(**self.grpo.rollout_settings)
        except (TypeError, ValueError) as e:
            problems.append(f"grpo.rollout_settings: {e}")
        return problems


def _exists(path: str) -> bool:
    """A local path (or, for shard patterns and URLs, something that may exist: checked by the loader)."""
    if not path:
        return False
    if "://" in path or "{" in path:
        return True
    return Path(path).exists()

