"""The model of a torchrun job, built so that no rank ever holds it whole.

The model is created on the meta device (shapes, no memory), each decoder
layer, the flow head's network and then the root are handed to FSDP2's
`fully_shard`, and only then is memory allocated: `to_empty` gives every rank
its own rows of each parameter (FSDP2 shards dim 0 as `torch.chunk` does). The
rows are then filled in place:

- a fresh run draws every parameter whole, in the order and with the seeded
  generator a single process uses (`NextStep.initial_values`), and keeps its
  rows: the same initial weights as one process, at most one whole tensor held;
- a continued run (`init_from`) reads only its rows of each tensor from the
  export's safetensors shards (`safe_open(...).get_slice`);
- the official stage 1 starts the decoder from a Qwen2 checkpoint the same way
  (`load_language_model_rows`, the rules of `io.checkpoint.load_language_model`).

A DCP checkpoint (`--resume`) is then loaded shard to shard by `distributed.load_checkpoint`.
`[distributed]` sets FSDP2's mixed precision (the sharded float32 parameters are the
optimizer's master weights; all-gathers in `param_dtype`, reduce-scatters in
`reduce_dtype`) and optional CPU offload. Every function here also takes a plain,
unsharded model (a single process), where a rank's rows are all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .. import devices
from ..config import NextStepConfig
from ..errors import CheckpointError
from ..io.checkpoint import weight_files
from ..model import NextStep
from ..model.pos_embed import sincos_2d
from .config import DistributedSection

logger = logging.getLogger("nextstep.training")


def fsdp_kwargs(section: DistributedSection, device: torch.device) -> dict:
    """`fully_shard` keyword arguments for `[distributed]`: the mixed-precision and offload policies."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    param_dtype = devices.resolve("cpu", section.param_dtype)[1]
    reduce_dtype = devices.resolve("cpu", section.reduce_dtype)[1]
    offload = section.cpu_offload and device.type == "cuda"
    if section.cpu_offload and not offload:
        logger.info("distributed.cpu_offload: the model already lives in CPU memory; nothing to offload")
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
            "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}


def shard(model: NextStep, section: DistributedSection, device: torch.device) -> NextStep:
    """FSDP2-shard `model` in place (on the meta device or materialised): every decoder layer, the
    flow head's network (called by `FlowHead.loss`, not through forward), then the root."""
    from torch.distributed.fsdp import fully_shard

    kwargs = fsdp_kwargs(section, device)
    for layer in model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model.image_head.net, **kwargs)
    fully_shard(model, **kwargs)
    return model


def build_sharded(config: NextStepConfig, section: DistributedSection, device: torch.device) -> NextStep:
    """A sharded NextStep whose rank-local rows are allocated but not yet filled (see `initialise`,
    `load_rows`); its buffers are computed. Needs the process group."""
    with torch.device("meta"):
        model = NextStep(config)
    shard(model, section, device)
    offloaded = section.cpu_offload and device.type == "cuda"
    model.to_empty(device="cpu" if offloaded else device)
    set_buffers(model, device)
    return model


def set_buffers(model: NextStep, device: torch.device) -> None:
    """The model's only buffer, the fixed sin-cos table (to_empty leaves it uninitialised)."""
    g, d = model.config.base_image_grid_size, model.config.hidden_size
    model.gen_pos_embed = sincos_2d(d, g, g)[None].to(device)


def local_rows(param: Tensor) -> tuple[Tensor, int]:
    """This rank's part of `param`: (its local tensor, the global index of its first row).

    FSDP2 splits dim 0 as `torch.chunk` does: ceil(n / ranks) rows each, the last ranks fewer
    (or none). A plain tensor is all rows, from 0.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param.data, 0
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"expected a parameter sharded on dim 0, got placements {param.placements}")
    ranks, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
    n = param.shape[0]
    per_rank = -(-n // ranks)
    start = min(rank * per_rank, n)
    local = param.to_local()
    if local.shape[0] != min(per_rank, n - start):
        raise ValueError(f"rank {rank} of {ranks} holds {local.shape[0]} rows of {n}, expected "
                         f"{min(per_rank, n - start)}")
    return local, start


@torch.no_grad()
def initialise(model: NextStep, generator: torch.Generator, std: float = 0.02) -> None:
    """Fill this rank's rows with what `model.init_weights(std, generator)` gives one process."""
    for name, values in model.initial_values(std, generator):
        local, start = local_rows(model.get_parameter(name))
        local.copy_(values[start:start + local.shape[0]])


@torch.no_grad()
def load_rows(model: NextStep, folder: Path) -> None:
    """Fill this rank's rows of every parameter from the model folder's safetensors files, reading
    only those rows. Raises CheckpointError naming a missing, unexpected or misshapen tensor."""
    tied = model.config.tie_word_embeddings
    expected = {name for name, _ in model.named_parameters()}
    loaded: set[str] = set()
    for path in weight_files(folder):
        for key, rows in _slices(path):
            if key == "gen_pos_embed" or (tied and key == "lm_head.weight"):
                continue  # the buffer is a function of the config (`set_buffers`); a tied head is the embedding
            if key not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {key!r} (not a NextStep parameter)")
            if key in loaded:
                raise CheckpointError(f"{path}: tensor {key!r} appears in more than one shard")
            _fill(model.get_parameter(key), rows, key, path, rows.get_shape())
            loaded.add(key)
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")


@torch.no_grad()
def load_language_model_rows(model: NextStep, folder: str | Path) -> list[str]:
    """`io.checkpoint.load_language_model` for a sharded model: each rank reads only its rows of
    the Qwen2 / Llama tensors. Returns the names of our tensors the checkpoint did not provide."""
    folder = Path(folder)
    ours = dict(model.named_parameters())
    filled: set[str] = set()
    for path in weight_files(folder):
        for key, rows in _slices(path):
            name = key.removeprefix("model.")
            if name not in ours or name.startswith(("image_", "gen_pos")):
                continue  # e.g. rotary caches, or tensors of other heads
            shape, target = list(rows.get_shape()), tuple(ours[name].shape)
            # The vocabulary may differ: the rows both have are copied (the added image tokens keep
            # their fresh initialisation).
            if name in ("embed_tokens.weight", "lm_head.weight") and tuple(shape[1:]) == target[1:]:
                shape[0] = min(shape[0], target[0])
            elif tuple(shape) != target:
                raise CheckpointError(f"{path}: {key!r} has shape {tuple(shape)}, the model expects {target}")
            _fill(ours[name], rows, key, path, shape, partial=True)
            filled.add(name)
    return sorted(n for n in ours if n not in filled and not n.startswith("image_"))


def _slices(path: Path):
    """(name, safetensors slice) of every tensor of one file, naming the file if it is corrupt."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_slice(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def _fill(param: Tensor, rows, key: str, path: Path, shape: list[int], partial: bool = False) -> None:
    """Copy this rank's rows of the file's tensor `rows` (of `shape`, maybe fewer rows than `param`
    when `partial`) into `param`."""
    if not partial and tuple(shape) != tuple(param.shape):
        raise CheckpointError(f"{path}: {key!r} has shape {tuple(shape)}, the config expects {tuple(param.shape)}")
    local, start = local_rows(param)
    end = min(start + local.shape[0], shape[0])
    if end > start:
        local[:end - start].copy_(rows[start:end].to(local.dtype))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
