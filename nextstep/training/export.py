"""Writing the official layout from a sharded model, one tensor at a time.

`save_model` needs the whole state in one process; at the official scale that is
a 14B float32 model on rank 0's CPU. Here every tensor is gathered on its own
(`DTensor.full_tensor`, a collective every rank takes part in), rank 0 streams
its bytes into the safetensors file it belongs to and drops it before the next
one: the header is written first (names, shapes and offsets are known from the
model's structure), then the data. Peak memory is the largest tensor plus a
fixed overhead, not the model. Files are written under temporary names and
renamed into place; the shard layout (5 GiB files plus an index) is
`save_model`'s, so both load alike.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import Tensor, nn

from ..io.atomic import atomic_write
from ..io.checkpoint import INDEX, MAX_SHARD_BYTES, SHARD_NAME, WEIGHTS, save_config
from ..model import NextStep
from ..text import TextTokenizer
from ..vae import AutoencoderKL
from .distributed import Env

# safetensors' names of the dtypes a NextStep state holds.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


def gathered(value: Tensor) -> Tensor:
    """The whole tensor of a sharded parameter (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def export_sharded(trained: nn.Module, model: NextStep, vae: AutoencoderKL, tokenizer: TextTokenizer,
                   folder: Path, env: Env, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write the official model folder (weights, config.json, tokenizer, VAE in `vae/`) from the
    sharded `trained`. A collective: every rank calls it; rank 0 writes."""
    folder = Path(folder)
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    state = trained.state_dict()  # shards (DTensors) and buffers: nothing is gathered yet
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards = plan_shards(state, max_shard_bytes)
    names = [WEIGHTS] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, keys in zip(names, shards):
        entries = [(k, state[k]) for k in keys]
        if env.is_main:
            atomic_write(folder / name, lambda tmp, e=entries: write_streamed(tmp, e))
        else:
            for _, value in entries:
                gathered(value)  # rank 0's gather needs every rank
    if not env.is_main:
        return
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        atomic_write(folder / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
        (folder / WEIGHTS).unlink(missing_ok=True)
    else:
        (folder / INDEX).unlink(missing_ok=True)
    for old in folder.iterdir():  # shards of an earlier export that this layout does not use
        if SHARD_NAME.fullmatch(old.name) and old.name not in names:
            old.unlink(missing_ok=True)
    dtype = next(iter(state.values())).dtype
    save_config(model.config, folder, dtype, {"vae_name_or_path": "vae"})
    tokenizer.save_pretrained(folder)
    vae.save_pretrained(folder / "vae")


def plan_shards(state: dict[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most `max_shard_bytes` (a larger tensor alone), in
    state order: `save_model`'s grouping."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def safetensors_header(entries: list[tuple[str, Tensor]]) -> bytes:
    """The 8-byte length plus JSON header of a safetensors file holding `entries` in this order."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, value in entries:
        if value.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: cannot write dtype {value.dtype} to safetensors")
        nbytes = value.numel() * value.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def write_streamed(path: str | os.PathLike, entries: list[tuple[str, Tensor]]) -> None:
    """Write a safetensors file of `entries` (sharded or whole tensors), gathering one at a time."""
    with open(path, "wb") as f:
        f.write(safetensors_header(entries))
        for _, value in entries:
            whole = gathered(value).detach().to("cpu").contiguous()
            f.write(whole.reshape(-1).view(torch.uint8).numpy().data)
            del whole
