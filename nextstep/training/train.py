"""`nextstep train CONFIG`: one stage of NextStep training, a straight loop from top to bottom.

A stage kind (`stages.py`) supplies each step's forward and backward passes and
its metrics: the supervised stages (`supervised.py`: CE(text) + flow-matching
MSE on data batches) or post-training (`grpo_stage.py`). The loop does the
rest: AdamW, warm-up then a constant or cosine learning rate, gradient clipping (`optim.py`, as for the VAE)
and accumulation, bf16 autocast on GPU and fp32 on CPU unless asked
(`devices.training_autocast_dtype`). Every step appends a line to
`RUN/metrics.jsonl` (`metrics.py`); checkpoints hold the model, optimizer, RNG, data
position and step, so `--resume` continues exactly where a run stopped (on
the CPU the resumed losses are bit-identical to an uninterrupted run's).
Under torchrun the model is sharded with FSDP2 (see `distributed.py`).

N ranks compute what one process does with the same global batch (up to
float rounding): each stage kind averages its loss over the whole global batch
and draws its random numbers as functions of the samples, never of the rank.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from PIL import Image
from tqdm.auto import tqdm

from .. import devices
from ..config import NextStepConfig
from ..errors import ConfigError
from ..io import load_model
from ..io.atomic import atomic_write
from ..io.checkpoint import load_language_model
from ..model import NextStep
from ..pipeline import NextStepPipeline
from ..shapes.tokenizer import shapes_tokenizer
from ..text import TextTokenizer
from ..vae import AutoencoderKL
from . import distributed as dist
from . import export as exporting
from . import sharding
from .blend import blend_into
from .checkpoint import CheckpointManager
from .config import TrainConfig
from .metrics import MetricsLog, refuse_to_overwrite
from .optim import adamw, clip_gradients, set_learning_rate
from .plan import check_fits
from .stages import StageContext, init_defaults, make_stage

logger = logging.getLogger("nextstep.training")


# ---------------------------------------------------------------------- parts


def new_tokenizer(config: TrainConfig) -> TextTokenizer:
    return (shapes_tokenizer() if config.model.tokenizer == "shapes"
            else TextTokenizer.from_pretrained(config.model.tokenizer))


def new_model_config(config: TrainConfig, tokenizer: TextTokenizer | None = None) -> NextStepConfig:
    """The config of a new model (no `init_from`): `[model] config` over the tokenizer's ids."""
    tokenizer = tokenizer or new_tokenizer(config)
    vocab = math.ceil(len(tokenizer) / 64) * 64  # padded like the official vocabularies
    fields = dict(vocab_size=vocab, boi=tokenizer.boi_id, eoi=tokenizer.eoi_id,
                  image_placeholder_id=tokenizer.placeholder_id, pad_token_id_added=tokenizer.pad_id,
                  bos_token_id=None, eos_token_id=tokenizer.tokenizer.token_to_id("<|endoftext|>"),
                  vae_name_or_path="vae", **config.model.config)
    return NextStepConfig.from_dict(fields, source=f"{config.source} [model]", strict=True)


def build_parts(config: TrainConfig, device: torch.device, env: dist.Env | None = None
                ) -> tuple[NextStep, TextTokenizer, AutoencoderKL]:
    """The model to train (the previous stage's export, or a new one), its tokenizer and frozen VAE.

    Under torchrun (`env` with several ranks) the model comes back FSDP2-sharded, built from the
    meta device so that no rank ever holds it whole (`sharding.py`), with the initial weights one
    process would have. (`init_blend` still blends whole models, then shards them.)
    """
    sharded = env is not None and env.distributed and not config.init_blend.path
    if config.init_from:
        folder = Path(config.init_from)
        model_config = NextStepConfig.from_pretrained(folder)
        if config.model.config:  # training-only fields (TrainConfig refuses any other)
            model_config = replace(model_config, **config.model.config)
            model_config.validate(f"{config.source} [model]")
        if env is not None:  # a run whose memory plan exceeds the device is refused before building
            check_fits(config, env.world_size, device, model_config)
        if sharded:
            model = sharding.build_sharded(model_config, config.distributed, device)
            sharding.load_rows(model, folder)  # each rank reads only its rows
        else:
            model = load_model(folder, device, torch.float32).train()
            if config.model.config:  # training-only fields (TrainConfig refuses any other)
                model.config = replace(model.config, **config.model.config)
                model.config.validate(f"{config.source} [model]")
                model.image_head.batch_mul = model.config.fm_head_batch_mul
        tokenizer = TextTokenizer.from_pretrained(folder)
        trained_on = folder / (model.config.vae_name_or_path or "vae")
        vae_dir = Path(config.model.vae) if config.model.vae else trained_on  # `[model] vae`: a new image tokenizer
    else:
        tokenizer = new_tokenizer(config)
        vae_dir = trained_on = Path(config.model.vae)
        model_config = new_model_config(config, tokenizer)
        if env is not None:
            check_fits(config, env.world_size, device, model_config)
        torch.manual_seed(config.seed)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        if sharded:
            model = sharding.build_sharded(model_config, config.distributed, device)
            sharding.initialise(model, generator)  # the draws of one process; each rank keeps its rows
        else:
            model = NextStep(model_config).to(device)
            model.init_weights(generator=generator)
        if config.model.lm_init:  # the official recipe starts the decoder from Qwen2.5-14B
            load_lm = sharding.load_language_model_rows if sharded else load_language_model
            missing = load_lm(model, config.model.lm_init)
            if missing:
                logger.warning("model.lm_init left %d decoder tensors freshly initialised, e.g. %s",
                               len(missing), missing[:3])
    vae = AutoencoderKL.from_pretrained(vae_dir, device=device, dtype=torch.float32,
                                        family=model.config.family).requires_grad_(False)
    if vae.config.z_channels != model.config.latent_channels:
        raise ValueError(f"VAE {vae_dir} has {vae.config.z_channels} latent channels, "
                         f"the model {model.config.latent_channels}")
    if config.init_blend.path:
        # The two blended runs must share the latent space init_from was trained on (not a new `vae`'s).
        own = vae if vae_dir == trained_on else AutoencoderKL.from_pretrained(trained_on, family=model.config.family)
        blend_into(model, tokenizer, own, Path(config.init_blend.path), config.init_blend.weight)
    return model, tokenizer, vae


def train_only(model: nn.Module, trainable: list[str]) -> None:
    """Freeze every parameter of `model` but those named, or under a prefix named, in `trainable`."""
    def under(name: str, prefix: str) -> bool:
        p = prefix.strip(".")
        return name == p or name.startswith(p + ".")

    names = [n for n, _ in model.named_parameters()]
    for prefix in trainable:
        if not any(under(n, prefix) for n in names):
            parts = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"train.trainable: {prefix!r} names no parameter of the model (its parts: "
                              f"{', '.join(parts)})")
    for n, param in model.named_parameters():
        param.requires_grad_(any(under(n, prefix) for prefix in trainable))


def save_samples(model: NextStep, vae: AutoencoderKL, tokenizer: TextTokenizer, config: TrainConfig,
                 path: Path) -> None:
    """A row of images for the fixed sample prompts, as one PNG."""
    t = config.train
    was_training = model.training
    model.eval()
    pipe = NextStepPipeline(model, vae, tokenizer, init_defaults(config))
    settings = pipe.settings.with_overrides(**config.train.sample_settings)
    images = [im for group in pipe.generate(t.sample_prompts, settings, [config.seed] * len(t.sample_prompts))
              for im in group]
    model.train(was_training)
    h, w = settings.hw
    grid = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        grid.paste(im, (i * w, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


# ---------------------------------------------------------------------- the loop


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run one stage; returns the exported model folder (official layout)."""
    config.check(dist.requested_world_size())  # before joining the ranks or building anything
    out = Path(config.out_dir)
    refuse_to_overwrite(out, resume)  # before joining too: no rank has written anything yet
    env = dist.setup()
    device = env.device
    ckpts = CheckpointManager(out, config.train.keep_last)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, vae = build_parts(config, device, env)  # sharded under torchrun
    autocast_dtype = devices.training_autocast_dtype(device, config.train.precision)
    autocast = devices.autocast(device, autocast_dtype)
    if config.train.grad_checkpointing:
        model.gradient_checkpointing = True
    if config.train.trainable:
        train_only(model, config.train.trainable)
    trained = dist.wrap(model, env, config.distributed)

    # What differs between stage kinds (data or rollouts, loss, metrics): see `stages.py`.
    stage = make_stage(StageContext(config, env, model, trained, tokenizer, vae, autocast))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{config.source or 'training config'}: stage={config.stage!r} trains none of "
                          f"train.trainable={config.train.trainable} (this stage kind freezes some parts itself)")
    o = config.optim
    optimizer = adamw(trained.parameters(), o)
    sample_dtype = autocast_dtype or torch.float32  # of rank 0's copy under torchrun

    start = 0
    if resume:
        meta = dist.load_checkpoint(ckpts, trained, optimizer, env)
        if meta is not None:
            stage.load_state_dict(dist.data_position(meta, env))
            start = meta["step"]
            logger.info("resumed from step %d", start)
    log = MetricsLog(out, start, config.train.tensorboard) if env.is_main else None

    trained.train()
    progress = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not env.is_main,
                    desc=f"{config.stage}")
    for step in progress:
        t0 = time.perf_counter()
        lr = set_learning_rate(optimizer, o, step, config.steps)
        sums = stage.accumulate_gradients(step)  # the step's forward and backward passes
        grad_norm = clip_gradients(trained.parameters(), o)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        sums = dist.sum_over_ranks(sums, env)
        if env.is_main and (done % config.train.log_every == 0 or done == config.steps):
            record = {"step": done, **stage.metrics(sums), "lr": lr, "grad_norm": float(grad_norm),
                      "samples_per_s": sums["samples"] / (time.perf_counter() - t0)}
            log.write(record)
            progress.set_postfix(stage.postfix(record))
        if done % config.train.checkpoint_every == 0 or done == config.steps:
            meta = {"stage": config.stage}
            dist.save_checkpoint(ckpts, done, trained, optimizer, meta, stage.state_dict(), env)
        if config.train.sample_every and done % config.train.sample_every == 0:
            full = dist.full_model(trained, model, env, device, sample_dtype)  # all ranks take part
            if env.is_main:
                save_samples(full, vae, tokenizer, config, out / "samples" / f"step_{done:08d}.png")

    export = out / "export"
    if env.distributed:
        # Written tensor by tensor, never the whole model on one rank (`export.py`). The final
        # samples come from the export, read by rank 0 in the sampling dtype once the optimizer
        # state (saved in the last checkpoint) is freed.
        exporting.export_sharded(trained, model, vae, tokenizer, export, env)
        optimizer.state.clear()
        final_model = load_model(export, device, sample_dtype) if env.is_main else None
    else:
        final_model = model
        NextStepPipeline(model.eval(), vae, tokenizer).save_pretrained(export)
    if env.is_main:
        save_samples(final_model.eval(), vae, tokenizer, config, out / "samples" / "final.png")
        atomic_write(out / "DONE", lambda tmp: Path(tmp).write_text(f"{config.steps}\n"))
    if log is not None:
        log.close()
    dist.teardown(env)
    return export
