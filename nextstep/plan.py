"""How much GPU memory generation needs, worked out from a config alone (no weights on disk).

The model is built on the meta device, so its parameter shapes are exact;
the bytes of each part follow from the load dtype and, for quantized decoder
linears, from torchao's storage layouts (`quantized_bytes`, checked against
really quantized models in tests/test_plan.py). The rest of the peak is
estimated from the shapes the generation code allocates (nextstep/sampling/):

- KV cache: layers x 2 x kv_heads x head_dim x slots x rows x bytes, with
  slots = prompt tokens + image tokens - 1 and rows = guidance groups x batch;
- prefill: the prompt rows through one decoder layer at a time (the larger of
  the attention and the MLP transients, scores counted as if materialised);
- decode step: the same for one token, plus the flow head's per-token work
  (every step's adaLN parameters for groups x batch rows) and the copy of the
  adaLN weights the fused sampler keeps;
- VAE decode: the decoder's largest feature maps, in float32, for up to
  `DECODE_CHUNK` images at a time (the cache is freed by then);
- load: with `quantize`, one decoder layer in the load dtype while it is
  quantized, and torchao's float32 temporaries (unquantized weights are
  assumed stored in the load dtype, so they load in place).

Eager weight-only int8 / fp8 matmuls dequantize one weight at a time; that
transient is counted. The allocator's own slack, the CUDA context and cuBLAS
workspaces are not in the peak: `CUDA_HEADROOM` is kept free when saying
which cards it fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import NextStepConfig
from .quantize import INT4_GROUP_SIZE, MODES, part_of
from .vae.config import VAEConfig

GIB = 2**30
# Left free on a card for the CUDA context (~0.5 GiB), cuBLAS workspaces and allocator fragmentation.
CUDA_HEADROOM = int(1.5 * GIB)
CARDS_GB = (12, 16, 24, 32, 40, 48, 80, 141)  # common card sizes; an "N GB" card holds about N GiB
PLAN_SIZE = 512  # image side the plan assumes unless told
PROMPT_TOKENS = 128  # prompt row length assumed (the official example's rows are ~60 tokens)
# torchao's int4 "tile_packed_to_4d" layout pads input features to a multiple of 1024 and output
# features to a multiple of 8, and stores a bfloat16 (scale, zero) pair per group and output.
INT4_PAD_IN, INT4_PAD_OUT = 1024, 8
# Bytes per output row of the other modes: int8 a float32 scale and (torchao's, on CUDA) an int8 zero
# point, fp8 a float32 scale.
ROW_BYTES = {"int8": 4 + 1, "fp8": 4}
CPU_INT8_ROW_BYTES = 4  # nextstep.quantize.int8_rows: the scale alone
# Measured (CPU, int8): quantizing a weight briefly holds two float32 copies of it.
QUANTIZE_TRANSIENT_BYTES = 2 * 4
PARTS = ("decoder_linears", "decoder_other", "embed_tokens", "lm_head", "image_projectors", "flow_head", "other")

# Full-size configurations, for planning without files. NextStepConfig's defaults are the
# NextStep-1-Large values (Qwen2.5-14B backbone, 157M flow head); the fields below are those of
# the published config excerpts (tests/fixtures/reference-tiny/large-config.partial.json and its
# README). -Edit and -Pretrain share the architecture. NextStep-1.1's vocabulary is assumed to be
# Qwen2.5-14B's, as in NextStep-1.
PRESETS: dict[str, dict[str, Any]] = {
    "NextStep-1-Large": dict(head_dim=128, latent_size=64, base_image_grid_size=32),
    "NextStep-1.1": dict(model_type="stepx_llama", head_dim=128, latent_size=64, base_image_grid_size=64,
                         rms_norm_eps=1e-5),
}


def preset(name: str) -> NextStepConfig | None:
    """The config of a preset name (any case; "-Edit" / "-Pretrain" are the Large one), else None."""
    wanted = name.lower().removesuffix("-edit").removesuffix("-pretrain")
    for key, fields in PRESETS.items():
        if key.lower() == wanted:
            return NextStepConfig.from_dict(dict(fields), source=f"preset {key}", strict=True)
    return None


# ---------------------------------------------------------------------- weights
def quantized_bytes(out_features: int, in_features: int, mode: str, device_type: str = "cuda") -> int:
    """Bytes of one (out, in) linear weight quantized with `mode` on a device of `device_type` (by
    torchao, or on the CPU by nextstep.quantize.int8_rows), scales and zero points included."""
    if mode == "int8" and device_type == "cpu":
        return out_features * (in_features + CPU_INT8_ROW_BYTES)
    if mode == "int4":
        rows = math.ceil(out_features / INT4_PAD_OUT) * INT4_PAD_OUT
        cols = math.ceil(in_features / INT4_PAD_IN) * INT4_PAD_IN
        return rows * cols // 2 + (cols // INT4_GROUP_SIZE) * rows * 2 * 2
    return out_features * in_features + out_features * ROW_BYTES[mode]


def parameter_bytes(model: nn.Module, dtype: torch.dtype, quantize: str | None = None,
                    device_type: str = "cuda") -> dict[str, int]:
    """Bytes per part of a NextStep (meta-device or real, unquantized) once loaded in `dtype` and,
    with `quantize`, with its decoder linears quantized on a `device_type` device; "total" sums
    them. Floating tensors take `dtype`, others keep theirs; a tied LM head counts once (under
    embed_tokens)."""
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"unknown quantization mode {quantize!r}; use one of {list(MODES)}")
    parts = dict.fromkeys(PARTS, 0)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # both skip shared tensors
        part = part_of(name)
        if part == "decoder_linears" and quantize is not None:
            parts[part] += quantized_bytes(t.shape[0], t.shape[1], quantize, device_type)
        else:
            parts[part] += t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    parts["total"] = sum(parts.values())
    return parts


def module_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    return sum(t.numel() * dtype.itemsize for t in [*module.parameters(), *module.buffers()])


# ---------------------------------------------------------------------- activations
def kv_cache_bytes(config: NextStepConfig, rows: int, slots: int, dtype: torch.dtype) -> int:
    """The static cache `generate_tokens` allocates: keys and values of every layer."""
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * slots * rows * dtype.itemsize


def layer_transient_bytes(config: NextStepConfig, rows: int, tokens: int, slots: int, dtype: torch.dtype) -> int:
    """The largest moment inside one decoder layer for `tokens` new positions of `rows` rows
    attending to `slots` cache slots: the residual stream, plus the larger of attention
    (normed input, q before and after RoPE, k and v before and after, the output and its
    projection, scores as if materialised) and the MLP (normed input, gate, up, their product)."""
    d, b = config.hidden_size, dtype.itemsize
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    scores = rows * config.num_attention_heads * tokens * slots * b
    attention = rows * tokens * (d + 2 * q + 4 * kv + q + d) * b + scores
    mlp = rows * tokens * (d + 3 * config.intermediate_size) * b
    return rows * tokens * d * b + max(attention, mlp)


def flow_head_bytes(config: NextStepConfig, rows: int, steps: int, dtype: torch.dtype) -> tuple[int, int]:
    """(kept for the whole call: the fused sampler's concatenated adaLN weights; per token: every
    step's adaLN parameters and their inputs for `rows` condition rows, and the step's hidden state)."""
    dim, depth = config.fm_head_dim, config.fm_head_layers
    mod_width = (3 * depth + 2) * dim
    kept = (mod_width * dim + mod_width) * dtype.itemsize
    per_token = (steps * rows * (mod_width + 2 * dim) + 4 * rows * dim) * dtype.itemsize
    return kept, per_token


def vae_decode_bytes(vae: VAEConfig, height: int, width: int, images: int) -> int:
    """The largest moment of the float32 VAE decoder on `images` images: walks its levels from the
    latent up. A ResnetBlock holds its input while norm, sigmoid and product of the same width
    live (4 x in, or in + 4 x out for the second half); an Upsample its input, the interpolated
    map and the convolution's output; the mid attention q, k, v and its output (no N x N matrix:
    PyTorch's fused kernels do not build one)."""
    f = 2 ** (len(vae.ch_mult) - 1)
    h, w = height // f, width // f
    c = vae.ch * vae.ch_mult[-1]
    peak = (vae.z_channels + c) * h * w

    def block(cin: int, cout: int, px: int) -> int:
        return px * max(4 * cin, cin + 4 * cout)

    peak = max(peak, block(c, c, h * w), 5 * c * h * w)  # mid: block, attention (x, q, k, v, out)
    for i in reversed(range(len(vae.ch_mult))):
        cout = vae.ch * vae.ch_mult[i]
        for _ in range(vae.num_res_blocks + 1):
            peak = max(peak, block(c, cout, h * w))
            c = cout
        if i != 0:
            peak = max(peak, c * h * w + 2 * c * (2 * h) * (2 * w))
            h, w = 2 * h, 2 * w
    peak = max(peak, 4 * c * h * w + vae.out_ch * h * w)  # norm_out, swish and conv_out at full size
    return peak * 4 * images


# ---------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    model: str
    settings: dict[str, Any]
    weights: dict[str, int]  # per part, "vae" and "total" included
    kv_cache_bytes: int
    activations: dict[str, int]  # per phase: what the phase adds on top of what is resident
    phases: dict[str, int]  # per phase: everything alive at its largest moment
    peak_bytes: int
    peak_phase: str
    headroom_bytes: int = CUDA_HEADROOM
    fits: list[int] = field(default_factory=list)  # card sizes (GB) that hold peak + headroom

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "settings": self.settings, "weights": self.weights,
                "kv_cache_bytes": self.kv_cache_bytes, "activations": self.activations, "phases": self.phases,
                "peak_bytes": self.peak_bytes, "peak_phase": self.peak_phase,
                "headroom_bytes": self.headroom_bytes, "fits_gb": self.fits,
                "does_not_fit_gb": [c for c in CARDS_GB if c not in self.fits]}


def plan_memory(config: NextStepConfig, vae: VAEConfig, *, height: int, width: int, batch: int, cfg: float,
                steps: int, dtype: torch.dtype = torch.bfloat16, quantize: str | None = None,
                prompt_tokens: int = PROMPT_TOKENS, name: str = "model") -> MemoryPlan:
    """The memory plan of text-to-image generation of `batch` images of `height` x `width` px."""
    # Imported here: the command line imports this module for its defaults before any model code.
    from .model import NextStep
    from .pipeline import DECODE_CHUNK
    from .vae import AutoencoderKL

    token_px = 2 ** (len(vae.ch_mult) - 1) * config.latent_patch_size
    problems = [f"{what} must be >= 1, got {v!r}" for what, v in (("batch", batch), ("steps", steps),
                                                                    ("prompt tokens", prompt_tokens)) if v < 1]
    if height < token_px or width < token_px or height % token_px or width % token_px:
        problems.append(f"size {width}x{height}: sides must be multiples of {token_px} px")
    if not cfg >= 1:
        problems.append(f"cfg must be >= 1, got {cfg!r}")
    if quantize == "int4" and dtype != torch.bfloat16:
        problems.append("int4 needs bfloat16 weights")
    inputs = {config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size}
    if quantize == "int4" and any(n % INT4_GROUP_SIZE for n in inputs):
        problems.append(f"int4 needs decoder input sizes divisible by {INT4_GROUP_SIZE}, "
                        f"this config has {sorted(inputs)}")
    if problems:
        raise ValueError("; ".join(problems))
    with torch.device("meta"):
        model, vae_model = NextStep(config), AutoencoderKL(vae)
    weights = parameter_bytes(model, dtype, quantize)
    total = weights.pop("total") + module_bytes(vae_model, torch.float32)
    weights.update(vae=module_bytes(vae_model, torch.float32), total=total)  # the VAE stays in float32

    groups = 2 if cfg != 1 else 1
    rows, n_tokens = groups * batch, (height // token_px) * (width // token_px)
    slots = prompt_tokens + n_tokens - 1
    b = dtype.itemsize
    kv = kv_cache_bytes(config, rows, slots, dtype)
    flow_kept, flow_token = flow_head_bytes(config, rows, steps, dtype)
    # Drawn up front: every token's noise (float32), and the sampled tokens as they accumulate.
    noise = n_tokens * (steps + 1) * batch * config.token_dim * 4
    tokens = n_tokens * batch * config.token_dim * b
    # Position tables, padding masks and the GQA-expanded attention mask of the prefill.
    tables = 2 * slots * config.head_dim * b + rows * slots
    group = config.num_attention_heads // config.num_key_value_heads
    largest_linear = max((t.numel() for n, t in model.named_parameters() if part_of(n) == "decoder_linears"),
                         default=0)
    dequantized = largest_linear * b if quantize in ("int8", "fp8") else 0
    # Loading with quantize holds one decoder layer in the load dtype while torchao quantizes it.
    loading = 0
    if quantize is not None and config.num_hidden_layers:
        loading = module_bytes(model.layers[0], dtype) + largest_linear * QUANTIZE_TRANSIENT_BYTES
    prefill_mask = rows * prompt_tokens * slots * (1 + group)
    state = kv + flow_kept + noise + tokens + tables
    activations = {
        "load": loading,
        "prefill": rows * prompt_tokens * config.hidden_size * b * 2 + prefill_mask
        + layer_transient_bytes(config, rows, prompt_tokens, slots, dtype) + dequantized,
        "decode": max(layer_transient_bytes(config, rows, 1, slots, dtype) + rows * group * slots, flow_token)
        + dequantized,
        "vae_decode": vae_decode_bytes(vae, height, width, min(batch, DECODE_CHUNK)),
    }
    phases = {"load": weights["total"] + activations["load"],
              "prefill": weights["total"] + state + activations["prefill"],
              "decode": weights["total"] + state + activations["decode"],
              "vae_decode": weights["total"] + tokens + activations["vae_decode"]}
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    settings = {"height": height, "width": width, "batch": batch, "cfg": cfg, "steps": steps,
                "dtype": str(dtype).removeprefix("torch."), "quantize": quantize, "prompt_tokens": prompt_tokens,
                "guidance_rows": rows, "image_tokens": n_tokens, "cache_slots": slots}
    return MemoryPlan(name, settings, weights, kv, activations, phases, peak, peak_phase,
                      fits=[c for c in CARDS_GB if peak + CUDA_HEADROOM <= c * GIB])


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a short table in GiB."""
    s = plan.settings

    def gib(n: int) -> str:
        return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:8.1f} MiB"

    weights_dtype = f"{s['dtype']}" + (f", decoder linears {s['quantize']}" if s["quantize"] else "")
    lines = [f"{plan.model}: {s['width']}x{s['height']}, batch {s['batch']}, cfg {s['cfg']:g} "
             f"({s['guidance_rows']} rows), {s['steps']} steps, prompt rows of {s['prompt_tokens']} tokens, "
             f"{s['image_tokens']} image tokens",
             f"weights ({weights_dtype}; VAE float32):"]
    lines += [f"  {part:<18}{gib(n)}" for part, n in plan.weights.items() if part != "total" and n]
    lines += [f"  {'total':<18}{gib(plan.weights['total'])}",
              f"KV cache ({s['cache_slots']} slots x {s['guidance_rows']} rows): {gib(plan.kv_cache_bytes).strip()}",
              "activations, and everything alive at the largest moment of each phase:"]
    lines += [f"  {phase:<18}{gib(plan.activations[phase])}   total {gib(total).strip()}"
              for phase, total in plan.phases.items()]
    fits = ", ".join(f"{c} GB" for c in plan.fits) or "none of the listed cards"
    lines += [f"peak: {gib(plan.peak_bytes).strip()} ({plan.peak_phase})",
              f"fits (peak + {plan.headroom_bytes / GIB:.1f} GiB for the CUDA context, workspaces and "
              f"fragmentation): {fits}"]
    return "\n".join(lines)
