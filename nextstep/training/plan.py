"""How much memory one rank of a training stage needs, from the config alone (`nextstep train CONFIG --plan`).

The model is built on the meta device, so parameter counts are exact. Per rank
of an FSDP2 job with N ranks (one process: N = 1, nothing sharded or gathered):

- parameters, gradients: float32, 1/N of the model each (the sharded master weights);
- optimizer: AdamW's two float32 moments, 1/N; with `cpu_offload` these three
  live in CPU memory instead of the device's;
- optimizer step: torch's multi-tensor AdamW holds one float32 scratch copy of
  the rank's parameters while it steps;
- gathered: the unsharded parameters in flight in `param_dtype` (the root's, the
  flow head's and two decoder layers: the one computing and the one prefetched),
  and in the backward pass those two layers' unsharded gradients plus their
  reduce-scatter input in `reduce_dtype`;
- activations of one micro-batch (batch / (N x grad_accum) samples): with
  checkpointing each layer keeps its float32 input and one layer at a time is
  recomputed; without, every layer keeps its own (`LAYER_SAVED`); plus the text
  logits (the cross entropy is float32) and the flow head's (batch_mul copies);
- runtime: the process itself (`RUNTIME_BYTES`: CUDA context, NCCL and cuBLAS
  workspaces; on the CPU the interpreter and torch) and the frozen float32 VAE.

The peak is the resident state plus the larger of the forward/backward transient
and the optimizer step's scratch. Text rows are assumed `TEXT_TOKENS` long.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import NextStepConfig
from ..plan import GIB, module_bytes, preset
from ..vae.config import VAEConfig
from .config import TrainConfig

TEXT_TOKENS = 128  # caption tokens per sample assumed by the plan (official captions are up to ~128)
VAE_DOWN = 8  # the f8 tokenizers: one latent per 8 x 8 pixels
# Per token and decoder layer, what autograd keeps (in units of the activation width): the normed
# inputs, q/k/v before and after RoPE, the attention output and its reshaped copy, and the MLP's
# gate, up, activation and product (4 x intermediate).
LAYER_SAVED = {"hidden": 7, "kv": 3, "intermediate": 4}
RUNTIME_BYTES = {"cuda": int(2.5 * GIB), "cpu": int(0.25 * GIB)}
# The flow head keeps about this many activations of its width per token copy and block.
FLOW_SAVED_PER_BLOCK = 8


@dataclass
class TrainingPlan:
    name: str
    ranks: int
    micro_batch: int
    tokens: int  # per sample
    device: str
    device_bytes: int
    rows: dict[str, int] = field(default_factory=dict)  # bytes per rank on the device
    cpu_rows: dict[str, int] = field(default_factory=dict)  # offloaded state, bytes per rank in CPU memory
    peak_bytes: int = 0

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device_bytes

    def table(self) -> str:
        lines = [(f"{self.name}: {self.ranks} rank(s) of {self.device_bytes / GIB:.0f} GiB ({self.device}), "
                  f"micro-batch {self.micro_batch} x {self.tokens} tokens per rank")]
        lines += [f"  {k:<34}{v / GIB:9.2f} GiB" for k, v in self.rows.items()]
        lines += [f"  {k + ' (CPU memory)':<34}{v / GIB:9.2f} GiB" for k, v in self.cpu_rows.items()]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {'peak per rank':<34}{self.peak_bytes / GIB:9.2f} GiB   {verdict} in "
                     f"{self.device_bytes / GIB:.0f} GiB")
        return "\n".join(lines)


def plan_model_config(config: TrainConfig) -> tuple[NextStepConfig, str]:
    """The config of the model the stage trains, and what it was read from. A stage continuing
    a run that does not exist yet is planned as NextStep-1-Large with its training-only fields."""
    if config.init_from:
        if Path(config.init_from, "config.json").is_file():
            return NextStepConfig.from_pretrained(config.init_from), config.init_from
        base = preset("NextStep-1-Large")
        fields = {**base.to_dict(), **config.model.config}
        return NextStepConfig.from_dict(fields, source="plan"), "NextStep-1-Large (init_from not there yet)"
    from .train import new_model_config

    tokenizer = config.model.tokenizer
    if tokenizer == "shapes" or Path(tokenizer, "tokenizer.json").is_file():
        return new_model_config(config), "the stage's [model]"
    base = preset("NextStep-1-Large").to_dict()  # its vocabulary; the stage's fields over it
    return NextStepConfig.from_dict({**base, **config.model.config}, source="plan"), \
        "NextStep-1-Large vocabulary (tokenizer not there yet)"


def sample_tokens(config: TrainConfig, model: NextStepConfig, text_tokens: int) -> int:
    """Sequence length of the longest sample the sources give: text plus image tokens (edits: two images)."""
    longest = 0
    for s in config.data.sources:
        side = s.size if s.kind == "shapes" else s.resolution
        images = 2 if s.edits or s.task == "edit" else 1
        longest = max(longest, images * (side // (VAE_DOWN * model.latent_patch_size)) ** 2)
    return longest + text_tokens


def flow_tokens(config: TrainConfig, model: NextStepConfig) -> int:
    """Image tokens per sample in the flow-matching loss: one image (an edit's source is not scored)."""
    return max((s.size if s.kind == "shapes" else s.resolution) // (VAE_DOWN * model.latent_patch_size)
               for s in config.data.sources) ** 2


def check_fits(config: TrainConfig, ranks: int, device: torch.device, model_config: NextStepConfig) -> TrainingPlan:
    """The stage's plan on this job's devices; a ConfigError with the table if it does not fit."""
    from ..errors import ConfigError

    plan = training_plan(config, ranks, device.type, device_memory(config, device), model_config=model_config)
    if not plan.fits:
        fitting = largest_micro_batch(config, ranks, device.type, plan.device_bytes, model_config)
        raise ConfigError(
            f"{config.source or 'training config'}: the memory plan needs {plan.peak_bytes / GIB:.1f} GiB per rank, "
            f"more than the {plan.device_bytes / GIB:.1f} GiB each rank has; a micro-batch of {fitting} would fit "
            f"(raise optim.grad_accum, add ranks, or set train.grad_checkpointing):\n{plan.table()}")
    return plan


def device_memory(config: TrainConfig, device: torch.device) -> int:
    """The memory one rank may use: `[distributed] device_memory_gib`, else the GPU's, else the
    machine's RAM shared by the ranks on it."""
    if config.distributed.device_memory_gib:
        return int(config.distributed.device_memory_gib * GIB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local)


def training_plan(config: TrainConfig, ranks: int, device_type: str = "cuda", device_bytes: int = 80 * GIB,
                  text_tokens: int = TEXT_TOKENS, model_config: NextStepConfig | None = None,
                  fsdp: bool | None = None) -> TrainingPlan:
    """Per-rank memory of the stage `config` on `ranks` ranks of `device_bytes` each (`fsdp`: whether
    the model is sharded, by default when there are several ranks)."""
    from ..model import NextStep
    from ..vae import AutoencoderKL

    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    name = "model"
    if model_config is None:
        model_config, name = plan_model_config(config)
    m, d = model_config, config.distributed
    h = m.hidden_size
    vae_folder = Path(config.model.vae or Path(config.init_from, "vae"))
    vae_config = VAEConfig.from_pretrained(vae_folder) if (vae_folder / "config.json").is_file() else VAEConfig()
    with torch.device("meta"):
        model, vae = NextStep(m), AutoencoderKL(vae_config)
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.layers[0].parameters()) if m.num_hidden_layers else 0
    head = sum(p.numel() for p in model.image_head.parameters())
    root = total - per_layer * m.num_hidden_layers - head
    sharded = ranks > 1 if fsdp is None else fsdp
    bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and device_type == "cuda")
    pd = 2 if sharded and d.param_dtype == "bf16" else 4
    rd = 2 if d.reduce_dtype == "bf16" else 4
    act = 2 if bf16 or pd == 2 else 4
    micro = max(1, config.data.batch_size // (ranks * config.optim.grad_accum))
    tokens = sample_tokens(config, m, text_tokens)
    n_tok = micro * tokens
    image_tok = micro * flow_tokens(config, m)

    state = {"parameters (fp32, sharded)": 4 * total // ranks, "gradients (fp32, sharded)": 4 * total // ranks,
             "optimizer (AdamW, 2 x fp32)": 8 * total // ranks}
    cpu_rows = {}
    if d.cpu_offload and device_type == "cuda":
        cpu_rows = state
        state = {}
    gathered = 0
    if sharded:
        gathered = (root + head + 2 * per_layer) * pd + 2 * per_layer * (pd + rd)
    kv = m.num_key_value_heads * m.head_dim
    layer_saved = act * (LAYER_SAVED["hidden"] * h + LAYER_SAVED["kv"] * kv
                         + LAYER_SAVED["intermediate"] * m.intermediate_size) + 2 * 4 * h
    if config.train.grad_checkpointing:
        decoder = n_tok * (m.num_hidden_layers * 4 * h + 2 * layer_saved)
    else:
        decoder = n_tok * m.num_hidden_layers * layer_saved
    logits = micro * text_tokens * m.vocab_size * (act + 4 + 4)
    flow = image_tok * m.fm_head_batch_mul * m.fm_head_layers * FLOW_SAVED_PER_BLOCK * m.fm_head_dim * act
    runtime = RUNTIME_BYTES["cuda" if device_type == "cuda" else "cpu"]
    rows = {**state,
            "gathered params + unsharded grads": gathered,
            f"activations ({'checkpointed' if config.train.grad_checkpointing else 'all kept'})": decoder,
            "text logits + flow head": logits + flow,
            "optimizer step scratch (fp32)": 0 if cpu_rows else 4 * total // ranks,
            "frozen VAE (fp32)": module_bytes(vae, torch.float32),
            "runtime (context, workspaces)": runtime}
    other = "activations (all kept)" if config.train.grad_checkpointing else "activations (checkpointed)"
    resident = sum(state.values()) + rows["frozen VAE (fp32)"] + runtime
    transient = gathered + decoder + logits + flow
    peak = resident + max(transient, rows["optimizer step scratch (fp32)"])
    # What the other activation choice would take, for comparison (not in the peak).
    alt_decoder = (n_tok * m.num_hidden_layers * layer_saved if config.train.grad_checkpointing
                   else n_tok * (m.num_hidden_layers * 4 * h + 2 * layer_saved))
    rows[f"({other}, for comparison)"] = alt_decoder
    return TrainingPlan(name, ranks, micro, tokens, device_type, device_bytes, rows, cpu_rows, peak)


def largest_micro_batch(config: TrainConfig, ranks: int, device_type: str, device_bytes: int,
                        model_config: NextStepConfig | None = None) -> int:
    """The largest per-rank micro-batch whose plan fits (0: not even one sample)."""
    from dataclasses import replace

    best, micro = 0, 1
    while micro <= config.data.batch_size:
        trial = replace(config, data=replace(config.data, batch_size=micro * ranks),
                        optim=replace(config.optim, grad_accum=1))
        if not training_plan(trial, ranks, device_type, device_bytes, model_config=model_config).fits:
            break
        best, micro = micro, micro * 2
    return best
