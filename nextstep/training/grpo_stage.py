"""`stage = "grpo"`: NextStep-GRPO as a stage kind of `nextstep train` (see `grpo.py` for the objective).

Each step: the step's prompts (captions of the shapes world, drawn with the
training seed: prompt j of step s is world sample s * P + j; with
`edit_fraction`, prompt j is instead, when a draw of (seed, step, j) says so,
sample s * P + j of the world's edits: a source image and an instruction) are
dealt to the ranks (rank r takes j = r, r + R, ...). Every prompt gets G
rollouts with the current policy (an edit's rows hold its source image where
the model's `source_image` setting says), whose noise comes from a seed of
(seed, step, j): a step's rollouts are a function of the seed, the step, the
prompt and the model only, so N ranks sample what one process does and a
resumed run what an uninterrupted one did. The rewards' group-normalised advantages then weight
one teacher-forced pass per rank (one forward and one backward, as FSDP
wants) over every rollout of that rank, at a random subset of the flow steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from ..pipeline import BATCH_IMAGES, NextStepPipeline
from ..sampling.requests import GenerationRequest
from ..settings import SEED_MODULUS
from ..shapes.dataset import ShapesConfig, make_sample
from ..shapes.grammar import parse_instruction
from ..shapes.renderer import render_image
from ..shapes.world import CATEGORIES, EDIT_OPS
from . import distributed as dist
from .grpo import (NO_GUIDANCE, THOUGHT_END, categorical_kl, clipped_objective, gaussian_kl, group_advantages,
                   token_log_probs)
from .rewards import checked_scores, load_reward
from .rollout import Rollout, rollout, transition_log_probs, transition_means
from .stages import StageContext, init_defaults, reference_model
from .supervised import draw_seed

EDIT_DRAW_BITS = 52  # a draw of (seed, step, j) as an exact float in [0, 1): this many bits of the seed


@dataclass(frozen=True)
class StepPrompt:
    """Prompt j of a step: a caption, or an edit instruction with its source image."""

    j: int
    text: str
    category: str = ""  # the shapes caption category ("" for a prompts file's lines and for edits)
    source: Image.Image | None = None  # an edit's source image
    edit_kind: str = ""  # an edit's kind, one of EDIT_OPS


class GRPOStage:
    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        config, env = ctx.config, ctx.env
        self.grpo = g = config.grpo
        defaults = init_defaults(config)
        self.pipe = NextStepPipeline(ctx.model, ctx.vae, ctx.tokenizer, defaults)
        own = self.pipe.settings
        if "source_image" not in defaults:  # a training export has no defaults file: edits go where training put them
            own = own.with_overrides(source_image=config.data.source_image)
        own = own.with_overrides(**g.rollout_settings)
        if g.policy == "thought":  # images drawn as at inference, after thoughts sampled from the whole vocabulary
            self.settings = own.with_overrides(think=True, text_temperature=g.thought_temperature, text_top_k=0,
                                               text_top_p=1.0)
        else:
            noise_level = own.noise_level if g.noise_level is None else g.noise_level
            self.settings = own.with_overrides(cfg=NO_GUIDANCE, cfg_img=NO_GUIDANCE, sampler=g.sampler,
                                               noise_level=noise_level, think=False)  # rollouts hold no thought
        self.reward = load_reward(g.reward)
        self.reference = reference_model(config, env.device) if g.kl_weight > 0 else None
        self.prompt_lines: list[str] = []
        if g.prompts:
            self.prompt_lines = [line.strip() for line in Path(g.prompts).read_text().splitlines() if line.strip()]
            if not self.prompt_lines:
                raise ValueError(f"grpo.prompts={g.prompts!r} holds no prompts")
        else:
            first = config.data.sources[0]
            dark_prob = first.dark_prob
            self.world = ShapesConfig(seed=config.seed, dark_prob=dark_prob,
                                      **({"colour_prob": None} if first.benchmark_colours else {}))
            if g.edit_fraction > 0:  # the sources are drawn at the rollouts' size: an edit keeps its size
                h, w = self.settings.hw
                if h != w:
                    raise ValueError(f"grpo.edit_fraction={g.edit_fraction} needs square rollouts (the shapes "
                                     f"world's images are square), got hw={self.settings.hw}")
                self.edit_world = ShapesConfig(size=h, seed=config.seed, edits=True, dark_prob=dark_prob)
        # The text head is never scored by the image policy: frozen, so that every trained parameter has
        # a gradient and optimizer state (a checkpoint's optimizer state must cover every parameter it trains).
        if g.policy == "image" and not ctx.model.config.tie_word_embeddings:
            ctx.model.lm_head.requires_grad_(False)
        self.forward_hidden = ctx.model.forward_hidden
        if env.distributed:  # run forward_hidden through FSDP's hooks (all-gather, gradient reduce-scatter)
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(ctx.trained, "forward_hidden")
            self.forward_hidden = ctx.trained.forward_hidden

    # ------------------------------------------------------------------ rollouts
    def is_edit(self, step: int, j: int) -> bool:
        """Whether prompt j of the step is an edit: a draw of (seed, step, j) below `edit_fraction`."""
        draw = draw_seed(self.ctx.config.seed, step, "edit", j) >> (63 - EDIT_DRAW_BITS)
        return draw / 2**EDIT_DRAW_BITS < self.grpo.edit_fraction

    def prompts(self, step: int) -> list[StepPrompt]:
        """Every prompt of the step (all ranks')."""
        P = self.grpo.prompts_per_step
        if self.prompt_lines:
            lines = self.prompt_lines
            return [StepPrompt(j, lines[(step * P + j) % len(lines)]) for j in range(P)]
        out = []
        for j in range(P):
            if self.is_edit(step, j):
                s = make_sample(self.edit_world, step * P + j)
                out.append(StepPrompt(j, s.instruction, source=render_image(s.source),
                                      edit_kind=parse_instruction(s.instruction).op))
            else:
                s = make_sample(self.world, step * P + j)
                out.append(StepPrompt(j, s.caption, s.category))
        return out

    def width(self, prompts: list[StepPrompt]) -> int:
        """The longest prompt row of `prompts`, in tokens."""
        return max(self.pipe.prompt_length(p.text, p.source, self.settings, plain=True) for p in prompts)

    def request(self, step: int, prompts: list[StepPrompt], width: int) -> GenerationRequest:
        """One batch of G rows per prompt, each prompt left-padded to `width` tokens (the step's
        longest prompt, whichever rank has it: a row's positions do not depend on the rank). Edit
        rows carry their source latents (`latents`, in row order); text-to-image rows none."""
        parts = []
        for p in prompts:
            seed = draw_seed(self.ctx.config.seed, step, "rollout", p.j) % SEED_MODULUS
            r = self.pipe.prepare(p.text, p.source, self.grpo.group_size, seed, self.settings, plain=True)
            pad = width - r.prompt_length
            ids = torch.nn.functional.pad(r.input_ids, (pad, 0), value=self.ctx.tokenizer.pad_id)
            mask = torch.nn.functional.pad(r.attention_mask, (pad, 0), value=0)
            parts.append(replace(r, input_ids=ids, attention_mask=mask))
        sources = [x for p in parts if p.latents is not None
                   for x in ([p.latents] if isinstance(p.latents, torch.Tensor) else p.latents)]
        # torch.cat also turns the VAE's inference-mode tensors into ones autograd may save.
        latents = torch.cat(sources) if sources else None
        return replace(parts[0], input_ids=torch.cat([p.input_ids for p in parts]),
                       attention_mask=torch.cat([p.attention_mask for p in parts]), latents=latents,
                       noise=torch.cat([p.noise for p in parts], dim=2))

    @torch.no_grad()
    def sample(self, request: GenerationRequest) -> Rollout:
        trained = self.ctx.trained
        sharded = hasattr(trained, "unshard")  # FSDP2: gather the root's own weights for the whole loop
        if sharded:
            # FSDP2 must see a forward of the root before any of a layer (it decides which is the root
            # then); the rollout calls the layers directly, so one tiny root pass goes first.
            ids = torch.full((1, 1), self.ctx.tokenizer.pad_id, device=self.ctx.env.device)
            self.forward_hidden(ids)
            trained.unshard()
        try:
            with self.ctx.autocast:
                return rollout(self.ctx.model, request)
        finally:
            if sharded:
                trained.reshard()

    def flow_steps(self, step: int, stochastic: list[int]) -> list[int]:
        """The step's random subset of the stochastic flow steps (the same on every rank)."""
        k = max(1, round(self.grpo.step_fraction * len(stochastic)))
        g = torch.Generator().manual_seed(draw_seed(self.ctx.config.seed, step, "flow-steps"))
        return sorted(stochastic[i] for i in torch.randperm(len(stochastic), generator=g)[:k].tolist())

    # ------------------------------------------------------------------ the step
    def accumulate_gradients(self, step: int) -> dict[str, float]:
        ctx, env, g = self.ctx, self.ctx.env, self.grpo
        everything = self.prompts(step)
        mine = everything[env.rank::env.world_size]
        if g.policy == "thought":
            return self.thought_gradients(step, mine)
        ro = self.sample(self.request(step, mine, self.width(everything)))
        images = self.pipe.decode_tokens(ro.tokens, ro.grid)
        rows = [p for p in mine for _ in range(g.group_size)]  # the prompt of each image
        scores = self.reward(images, [p.text for p in rows], [p.source for p in rows])
        rewards = torch.tensor(checked_scores(scores, len(images), g.reward))
        advantages, keep = group_advantages(rewards, g.group_size, g.reject_mean_above)
        steps = self.flow_steps(step, ro.stochastic)
        n_terms = ro.tokens.shape[1] * len(steps)  # per image
        kept = dist.sum_over_ranks({"kept": float(keep.sum())}, env)["kept"]

        sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "terms": float(keep.sum()) * n_terms}
        # Every rank always runs the pass (FSDP's collectives), with zero weights for dropped groups;
        # when every group is dropped the gradients are zero and AdamW's step only decays its moments.
        device = env.device
        with ctx.autocast:
            means = transition_means(ctx.model, self.forward_hidden, ro, steps)
        logp = transition_log_probs(means, ro, steps)
        old = ro.log_probs[:, :, [ro.stochastic.index(s) for s in steps]].to(device)
        objective, clipped = clipped_objective(logp, old, advantages.to(device)[:, None, None], g.clip_range)
        weight = keep.to(device, torch.float32)[:, None, None] / max(kept * n_terms, 1)
        loss = (objective * weight).sum()
        if self.reference is not None:
            with torch.no_grad(), ctx.autocast:
                ref_means = transition_means(self.reference, self.reference.forward_hidden, ro, steps)
            sigma = ro.sigmas(steps).to(device)[:, None]
            kl = (gaussian_kl(means, ref_means, sigma) * weight).sum()
            loss = loss + g.kl_weight * kl
            sums["kl"] = kl.item() * kept * n_terms  # summed over terms, like "clipped"
        (loss * env.world_size).backward()  # FSDP averages the ranks' gradients
        sums["loss"] = loss.item()
        sums["clipped"] = float((clipped & keep.to(device)[:, None, None]).sum())
        return self.reward_sums(sums, rows, rewards, keep, mine)

    def reward_sums(self, sums: dict[str, float], rows: list[StepPrompt], rewards: torch.Tensor,
                    keep: torch.Tensor, mine: list[StepPrompt]) -> dict[str, float]:
        """`sums` with the step's reward statistics: over all images, per category and per task."""
        g = self.grpo
        sums.update(samples=float(len(rows)), images=float(len(rows)), reward=float(rewards.sum()),
                    reward_sq=float(rewards.pow(2).sum()), groups=float(len(mine)),
                    rejected_groups=float(len(mine) - int(keep.sum()) // g.group_size))
        passed, values = (rewards == 1.0).tolist(), rewards.tolist()
        # Every key on every rank: the ranks sum them in one list.
        for kind, mask in [(cat, [p.category == cat for p in rows]) for cat in CATEGORIES] + [
                (f"edit_{op}", [p.edit_kind == op for p in rows]) for op in EDIT_OPS]:
            sums[f"n_{kind}"] = float(sum(mask))
            sums[f"pass_{kind}"] = float(sum(ok for ok, m in zip(passed, mask) if m))
        is_edit = [p.source is not None for p in rows]
        for task, mask in (("edits", is_edit), ("t2i", [not e for e in is_edit])):
            sums[f"n_{task}"] = float(sum(mask))
            sums[f"reward_{task}"] = float(sum(r for r, m in zip(values, mask) if m))
        return sums

    def thought_gradients(self, step: int, mine: list[StepPrompt]) -> dict[str, float]:
        """`policy = "thought"`: G thoughts per caption (image k of prompt j with seed (seed, step, j) + k,
        as `pipe.generate` seeds them), each image drawn after its thought and scored; the advantages
        weight the log-probabilities of the thoughts' tokens, recomputed in one teacher-forced pass."""
        ctx, g, s = self.ctx, self.grpo, self.settings
        G, pipe, device = g.group_size, self.pipe, ctx.env.device
        bases = [draw_seed(ctx.config.seed, step, "rollout", p.j) % SEED_MODULUS for p in mine]
        rows = [p for p in mine for _ in range(G)]
        prompt_rows = [pipe.thought_prompt(p.text, None, s) for p in rows]
        seeds = [(b + k) % SEED_MODULUS for b in bases for k in range(G)]
        was_training = ctx.model.training
        ctx.model.eval()
        written = pipe.write(prompt_rows, [None] * len(rows), seeds, s, pipe.special_ids, BATCH_IMAGES)
        texts = [pipe.thought_text(w) for w in written]
        images: list[Image.Image | None] = [None] * len(rows)
        for i, group, _ in pipe.iter_generate([p.text for p in mine], s, bases, G, batch_images=BATCH_IMAGES,
                                              thoughts=[texts[i * G:(i + 1) * G] for i in range(len(mine))]):
            images[i * G:(i + 1) * G] = group
        ctx.model.train(was_training)
        scores = self.reward(images, [p.text for p in rows], [None] * len(rows))
        rewards = torch.tensor(checked_scores(scores, len(rows), g.reward))
        advantages, keep = group_advantages(rewards, G, g.reject_mean_above)

        logp, logits, row_of = self.thought_log_probs(prompt_rows, written)
        kept = float(keep.sum())
        weight = (advantages.to(device) * keep.to(device))[row_of] / max(kept, 1.0)
        loss = -(weight * logp).sum()  # on-policy: one update per rollout, so the ratio is 1
        sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "terms": float(keep.to(device)[row_of].sum()),
                "thought_tokens": float(sum(map(len, written)))}
        if self.reference is not None:
            with torch.no_grad():
                _, ref, _ = self.thought_log_probs(prompt_rows, written, self.reference)
            per_token = keep.to(device)[row_of].float() / max(sums["terms"], 1.0)
            kl = (categorical_kl(logits, ref, g.thought_temperature) * per_token).sum()
            loss = loss + g.kl_weight * kl
            sums["kl"] = kl.item() * sums["terms"]
        loss.backward()
        sums["loss"] = loss.item()
        return self.reward_sums(sums, rows, rewards, keep, mine)

    def thought_log_probs(self, prompt_rows: list, written: list[list[int]], model: torch.nn.Module | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced log-probabilities of the thoughts `written` after `prompt_rows` (the policy's,
        or `model`'s): each row is its prompt + thought, right-padded, and the position before each
        token scores it (and, where the thought ended early, its end). Returns the log-probabilities
        (float32, one per token), the logits they came from and each token's row."""
        ctx, s = self.ctx, self.settings
        device, tokenizer = ctx.env.device, ctx.tokenizer
        forward_hidden = self.forward_hidden if model is None else model.forward_hidden
        lm_head = ctx.model.lm_head if model is None else model.lm_head
        encoded = [tokenizer.encode_row(r) for r in prompt_rows]
        sequences = [e + w for e, w in zip(encoded, written)]
        targets = [w + ([THOUGHT_END] if len(w) < s.thought_max_tokens else []) for w in written]
        width = max(map(len, sequences))
        input_ids = torch.tensor([q + [tokenizer.pad_id] * (width - len(q)) for q in sequences], device=device)
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in sequences], device=device)
        rows, positions = torch.tensor([(r, len(e) - 1 + t) for r, (e, y) in enumerate(zip(encoded, targets))
                                        for t in range(len(y))], device=device).T
        tokens = torch.tensor([t for y in targets for t in y], device=device)
        vocab = len(tokenizer)  # an official head is padded past the vocabulary: those ids are never written
        with ctx.autocast:
            logits = lm_head(forward_hidden(input_ids, mask)[rows, positions])[:, :vocab].float()
        return token_log_probs(logits, tokens, self.grpo.thought_temperature, self.pipe.special_ids), logits, rows

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums["images"]
        mean = sums["reward"] / n
        out = {"loss": sums["loss"], "reward_mean": mean,
               "reward_std": math.sqrt(max(sums["reward_sq"] / n - mean**2, 0.0)),
               "clip_fraction": sums["clipped"] / sums["terms"] if sums["terms"] else 0.0,
               "rejected_groups": sums["rejected_groups"], "groups": sums["groups"]}
        if self.reference is not None:
            out["kl"] = sums["kl"] / sums["terms"] if sums["terms"] else 0.0
        if "thought_tokens" in sums:
            out["thought_tokens"] = sums["thought_tokens"] / n  # per image
        for kind in [*CATEGORIES, *(f"edit_{op}" for op in EDIT_OPS)]:
            if sums[f"n_{kind}"]:
                out[f"pass_{kind}"] = sums[f"pass_{kind}"] / sums[f"n_{kind}"]
        for task in ("edits", "t2i"):
            if sums[f"n_{task}"]:
                out[f"reward_{task}"] = sums[f"reward_{task}"] / sums[f"n_{task}"]
        return out

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{record['reward_mean']:.3f}", "rejected": f"{record['rejected_groups']:.0f}"}

    def state_dict(self) -> list[dict]:
        return []  # a step's prompts and noise are functions of (seed, step): nothing to remember

    def load_state_dict(self, states: list[dict]) -> None:
        pass
