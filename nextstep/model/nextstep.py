"""NextStep: a causal decoder over text tokens and continuous image tokens, with a flow-matching head.

Text positions are read out by `lm_head` (cross-entropy); a position whose next
token is an image token conditions the flow head, which learns that token's
velocity (MSE). Parameter and buffer names are the official ones, so official
checkpoints load as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..config import NextStepConfig
from .decoder import DecoderLayer, KVCache, RMSNorm, attention_mask, gqa_mask, rope_tables
from .flow_head import FlowHead
from .pos_embed import sincos_2d


def patchify(latents: Tensor, p: int) -> Tensor:
    """(B, C, H, W) latents -> (B, H/p * W/p, C*p*p) tokens in raster order, channel index c*p*p + i*p + j."""
    B, C, H, W = latents.shape
    x = latents.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwcpq", x).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: Tensor, p: int, h: int, w: int) -> Tensor:
    """Inverse of `patchify` for a grid of h x w tokens (any aspect ratio)."""
    B, n, D = tokens.shape
    if n != h * w:
        raise ValueError(f"unpatchify: {n} tokens do not make a {h}x{w} grid")
    C = D // (p * p)
    x = tokens.reshape(B, h, w, C, p, p)
    return torch.einsum("nhwcpq->nchpwq", x).reshape(B, C, h * p, w * p)


class LossOutput(NamedTuple):
    loss: Tensor
    lm_loss: Tensor
    im_loss: Tensor
    # The flow head's condition at every image token, in order (N, hidden); None without images.
    # A stage that holds the drawing compares them with a frozen model's (`[train] hold_images`).
    conditions: Tensor | None = None


class NextStep(nn.Module):
    def __init__(self, config: NextStepConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        # nn.Embedding's own N(0, 1) init, skipped on the meta device (`load_model`), where it runs
        # torch's Python reference kernel, whose first call imports torch._dynamo: 3 s of a cold start.
        embedding = torch.empty(config.vocab_size, d)
        if embedding.device.type != "meta":
            nn.init.normal_(embedding)
        self.embed_tokens = nn.Embedding(config.vocab_size, d, _weight=embedding)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.image_in_projector = nn.Linear(config.token_dim, d)
        self.image_out_projector = nn.Linear(d, d)
        self.image_head = FlowHead(config.token_dim, d, config.fm_head_dim, config.fm_head_layers,
                                   config.fm_head_batch_mul)
        g = config.base_image_grid_size
        self.register_buffer("gen_pos_embed", sincos_2d(d, g, g)[None], persistent=True)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Recompute each decoder layer in the backward pass instead of storing its activations.
        self.gradient_checkpointing = False

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Fresh weights for training from scratch: N(0, std) matrices and embeddings, zero biases,
        unit norm gains, and zero adaLN modulations and output layer in the flow head (so each
        residual block starts as the identity and the head predicts zero velocity)."""
        for name, values in self.initial_values(std, generator):
            self.get_parameter(name).copy_(values)

    @torch.no_grad()
    def initial_values(self, std: float = 0.02, generator: torch.Generator | None = None
                       ) -> Iterator[tuple[str, Tensor]]:
        """The values `init_weights` gives, one whole parameter at a time (name, values), in the
        order the random ones are drawn. A sharded trainer keeps its slice of each and so gets
        exactly what one process gets, never holding more than one whole tensor."""
        net = self.image_head.net
        zeroed = {id(m) for m in [b.adaLN_modulation[1] for b in net.res_blocks] + [
            net.final_layer.adaLN_modulation[1], net.final_layer.linear]}
        for prefix, module in self.named_modules():
            prefix = f"{prefix}." if prefix else ""
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                device = generator.device if generator is not None else weight.device
                values = torch.empty(weight.shape, dtype=weight.dtype, device=device)
                values.normal_(0.0, std, generator=generator)  # drawn even where zeroed: same stream
                yield f"{prefix}weight", values.zero_() if id(module) in zeroed else values
            elif isinstance(module, (nn.LayerNorm, RMSNorm)) and weight is not None:
                yield f"{prefix}weight", torch.ones(weight.shape, dtype=weight.dtype)
            else:
                continue
            if bias is not None:
                yield f"{prefix}bias", torch.zeros(bias.shape, dtype=bias.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ pieces
    def image_tokens(self, latents: Tensor | list[Tensor]) -> Tensor:
        """Latents (B, C, H, W), or a list of (1, C, h_i, w_i) of any sizes -> (N, token_dim), row-major."""
        p = self.config.latent_patch_size
        if isinstance(latents, Tensor):
            latents = [latents]
        return torch.cat([patchify(x, p).reshape(-1, self.config.token_dim) for x in latents])

    def embed(self, input_ids: Tensor, latents: Tensor | list[Tensor] | None = None) -> Tensor:
        """Token embeddings, with `image_in_projector(image tokens)` written into the placeholder slots."""
        embeds = self.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_placeholder_id
        n_slots = int(is_image.sum())
        if latents is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image placeholders but no latents were given")
            return embeds
        tokens = self.image_tokens(latents)
        if tokens.shape[0] != n_slots:
            raise ValueError(f"latents give {tokens.shape[0]} image tokens for {n_slots} placeholders")
        embeds = embeds.clone()
        embeds[is_image] = self.image_in_projector(tokens.to(embeds.dtype)).to(embeds.dtype)  # autocast: bf16 out
        return embeds

    def hidden_states(self, embeds: Tensor, input_pos: Tensor, key_valid: Tensor,
                      cache: KVCache | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Run the decoder; returns the final-normed hidden states (B, T, hidden).

        `input_pos` (T,) are the slots of `embeds` (and their RoPE positions);
        `key_valid` (B, L) marks the slots that are not padding, with L = T
        without a cache and L = cache.max_len with one. `rope` is the (cos, sin)
        of `input_pos` if already computed.
        """
        cos, sin = rope if rope is not None else rope_tables(
            input_pos, self.config.head_dim, self.config.rope_theta, embeds.dtype)
        groups = self.config.num_attention_heads // self.config.num_key_value_heads
        mask = gqa_mask(attention_mask(key_valid, input_pos), groups)
        x = embeds
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, input_pos)
        return self.norm(x)

    def forward_hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                       latents: Tensor | list[Tensor] | None = None) -> Tensor:
        """Hidden states of a whole (left- or right-padded) batch, no cache."""
        embeds = self.embed(input_ids, latents)
        T = input_ids.shape[1]
        key_valid = (attention_mask.bool() if attention_mask is not None
                     else torch.ones_like(input_ids, dtype=torch.bool))
        return self.hidden_states(embeds, torch.arange(T, device=input_ids.device), key_valid)

    # ------------------------------------------------------------------ training
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor,
        latents: Tensor | list[Tensor] | None = None,
        latents_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        condition_with_projector: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        context_noise: Tensor | list[Tensor] | None = None,
    ) -> LossOutput:
        """Training loss: lm_loss_weight * CE(text) + im_loss_weight * flow-matching MSE(image tokens).

        Position i predicts token i + 1. If token i + 1 is an image placeholder,
        hidden[i] conditions the flow head on that image token; otherwise
        lm_head(hidden[i]) is scored against labels[i + 1] (ignore_index -100).
        The head is conditioned through `image_out_projector`, as at inference
        (the 2025 reference skipped it when training: pass
        `condition_with_projector=False` to reproduce that).
        `latents_mask` (one 0/1 per image) drops images from the MSE.
        `generator`: one for all random draws, or one per image (see `FlowHead.loss`).
        `context_noise` (shaped like `latents`) is added to the images the decoder reads, not to
        the flow head's targets (see `nextstep.training.supervised.draw_context_noise`).
        """
        cfg = self.config
        hidden = self.forward_hidden(input_ids, attention_mask, self._seen(latents, context_noise))[:, :-1]
        next_is_image = input_ids[:, 1:] == cfg.image_placeholder_id
        next_labels = labels[:, 1:]

        text_h = hidden[~next_is_image]
        lm_loss = F.cross_entropy(self.lm_head(text_h).float(), next_labels[~next_is_image], ignore_index=-100)

        c = None
        if latents is None:
            im_loss = hidden.sum() * 0.0  # keeps every parameter in the graph (DDP/FSDP)
        else:
            c = hidden[next_is_image]
            if condition_with_projector:
                c = self.image_out_projector(c)
            target = self.image_tokens(latents).to(c.dtype)
            mask = None if latents_mask is None else self.image_token_mask(latents, latents_mask)
            im_loss = self.image_head.loss(target, c, mask, generator, self._tokens_per_image(latents))
        loss = cfg.lm_loss_weight * lm_loss + cfg.im_loss_weight * im_loss
        return LossOutput(loss, lm_loss, im_loss, c)

    @torch.no_grad()
    def image_conditions(self, input_ids: Tensor, attention_mask: Tensor | None, latents: Tensor | list[Tensor],
                         context_noise: Tensor | list[Tensor] | None = None) -> Tensor:
        """The flow head's condition at every image token (N, hidden), as `forward` computes it
        (through the projector), without any loss: a frozen model's, to compare against."""
        hidden = self.forward_hidden(input_ids, attention_mask, self._seen(latents, context_noise))[:, :-1]
        return self.image_out_projector(hidden[input_ids[:, 1:] == self.config.image_placeholder_id])

    @staticmethod
    def _seen(latents: Tensor | list[Tensor] | None, context_noise: Tensor | list[Tensor] | None
              ) -> Tensor | list[Tensor] | None:
        """The latents as the decoder reads them: with `context_noise` added, if given."""
        if context_noise is None or latents is None:
            return latents
        if isinstance(latents, Tensor):
            return latents + context_noise
        return [x + n for x, n in zip(latents, context_noise, strict=True)]

    def image_token_mask(self, latents: Tensor | list[Tensor], latents_mask: Tensor) -> Tensor:
        """`latents_mask` (one 0/1 per image) repeated over each image's tokens: (N,)."""
        counts = torch.tensor(self._tokens_per_image(latents), device=latents_mask.device)
        return latents_mask.reshape(-1).repeat_interleave(counts)

    def _tokens_per_image(self, latents: Tensor | list[Tensor]) -> list[int]:
        p2 = self.config.latent_patch_size ** 2
        items = [latents] if isinstance(latents, Tensor) else latents
        return [x.shape[-2] * x.shape[-1] // p2 for x in items for _ in range(x.shape[0])]
