"""Reading and writing NextStep checkpoints in the official Hugging Face layout.

A model folder holds `config.json`, the tokenizer files and either
`model.safetensors` or shards listed in `model.safetensors.index.json`.
Loading builds the model on the meta device and moves each tensor in from its
shard, one at a time, so the weights are never held twice. On the CPU,
safetensors hands out tensors backed by a private memory map of each file,
so weights are paged in when first used: replace checkpoint files by rename
(as `save_model` does), never overwrite them in place while a model loaded
from them is alive.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import NextStepConfig
from ..errors import CheckpointError
from ..model import NextStep
from ..model.pos_embed import sincos_2d
from ..quantize import is_quantized, is_quantized_weight, layer_of, linear_quantizer
from .atomic import atomic_write

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MAX_SHARD_BYTES = 5 * 2**30  # the official checkpoints' shard size


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in shard order."""
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / INDEX}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{folder / INDEX}: 'weight_map' must map tensor names to shard file names")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    else:
        raise CheckpointError(f"{folder}: no {WEIGHTS} or {INDEX} found")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard listed in {INDEX} is missing")
    return files


def iter_safetensors(path: Path, device: torch.device, select: Callable[[str], bool] | None = None
                     ) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) from one safetensors file (only names `select` accepts, if given),
    naming the file if it is corrupt."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if select is None or select(key):
                    yield key, f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


# safetensors' dtype names (its format spec) -> torch dtypes.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_safetensors(path: Path, select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, CPU tensor) from one safetensors file in file order (only names `select`
    accepts, if given), each read into memory of its own. Unlike `iter_safetensors` nothing stays
    mapped: a tensor that is converted or quantized and dropped leaves no file pages in the
    process (a mapped file keeps every page it has read resident until it is unmapped, which is
    when the last tensor from it is freed)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes in a file of {size}")
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            base = 8 + header_len
            for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                if select is not None and not select(key):
                    continue
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"tensor {key!r} has unsupported dtype {info['dtype']!r}")
                dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], [int(n) for n in info["shape"]]
                begin, end = (int(n) for n in info["data_offsets"])
                nbytes = math.prod(shape) * dtype.itemsize
                if end - begin != nbytes or begin < 0 or base + end > size:
                    raise ValueError(f"tensor {key!r}: data_offsets {[begin, end]} do not fit its shape "
                                     f"{shape} of {info['dtype']} in a file of {size} bytes")
                data = torch.empty(nbytes, dtype=torch.uint8)
                f.seek(base + begin)
                if nbytes and f.readinto(memoryview(data.numpy())) != nbytes:
                    raise ValueError(f"tensor {key!r} is truncated")
                yield key, data.view(dtype).reshape(shape)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def _assign(model: nn.Module, key: str, value: Tensor, source: Path) -> None:
    """Replace parameter/buffer `key` (possibly on meta) by `value`, checking the shape."""
    module_name, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is None or (name not in module._parameters and name not in module._buffers):
        raise CheckpointError(f"{source}: unexpected tensor {key!r} (not a NextStep parameter)")
    current = module._parameters.get(name, module._buffers.get(name))
    if tuple(current.shape) != tuple(value.shape):
        raise CheckpointError(
            f"{source}: {key!r} has shape {tuple(value.shape)}, the config expects {tuple(current.shape)}")
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=current.requires_grad)
    else:
        module._buffers[name] = value


def load_model(folder: str | Path, device: torch.device, dtype: torch.dtype, *,
               strict_config: bool = False, quantize: str | None = None) -> NextStep:
    """Build NextStep from a model folder (config.json + safetensors weights). `strict_config`
    refuses config fields nextstep does not know (else they are warned about and kept).
    `quantize` ("int8", "int4", "fp8"; see nextstep/quantize.py) quantizes each linear weight of
    the decoder layers as soon as it is read, so the model is never whole in `dtype`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    # Checked (and torchao imported, where the mode needs it) before any weight is read.
    quantize_linear = None if quantize is None else linear_quantizer(quantize, device, dtype)
    config = NextStepConfig.from_pretrained(folder, strict=strict_config)
    with torch.device("meta"):
        model = NextStep(config)
    expected = set(model.state_dict().keys())
    tied = config.tie_word_embeddings
    if tied:
        expected.discard("lm_head.weight")
    loaded: set[str] = set()
    for path in weight_files(folder):
        tensors = iter_safetensors(path, device)
        if quantize_linear and device.type == "cpu":
            # The decoder layers' tensors are read into memory of their own and freed once quantized
            # (through the file's mapping, their pages would stay resident); the others are mapped
            # as without quantize, so pages never used (most embedding rows, the LM head) are never read.
            tensors = chain(read_safetensors(path, select=lambda k: layer_of(k) is not None),
                            iter_safetensors(path, device, select=lambda k: layer_of(k) is None))
        for key, tensor in tensors:
            if tied and key == "lm_head.weight":
                continue
            if key in loaded:
                raise CheckpointError(f"{path}: tensor {key!r} appears in more than one shard")
            _assign(model, key, tensor.to(dtype) if tensor.is_floating_point() else tensor, path)
            loaded.add(key)
            if quantize_linear and is_quantized_weight(key):
                quantize_linear(model.get_submodule(key.removesuffix(".weight")))
    missing = expected - loaded
    if "gen_pos_embed" in missing:
        # Some checkpoints omit the fixed sin-cos table; it is a function of the config.
        g = config.base_image_grid_size
        model._buffers["gen_pos_embed"] = sincos_2d(config.hidden_size, g, g)[None].to(device, dtype)
        missing.discard("gen_pos_embed")
    if missing:
        names = sorted(missing)
        raise CheckpointError(f"{folder}: checkpoint lacks {len(names)} tensors, e.g. {names[:5]}")
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def save_model(model: NextStep, folder: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES,
               config_updates: dict | None = None) -> None:
    """Write config.json and the weights (sharded with an index above `max_shard_bytes`).

    `config_updates` are written into the saved config.json only (the model's config is unchanged).
    """
    if is_quantized(model):
        raise CheckpointError("cannot save a quantized model (the official layout holds full-precision "
                              "weights): save the model loaded without quantize")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value.cpu()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(folder / WEIGHTS, lambda tmp: save_file(shards[0], tmp, metadata=meta))
        (folder / INDEX).unlink(missing_ok=True)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            atomic_write(folder / name, lambda tmp, s=shard: save_file(s, tmp, metadata=meta))
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(folder / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
        (folder / WEIGHTS).unlink(missing_ok=True)
    # Shards of an earlier save into this folder that the new layout does not use.
    kept = set(weight_map.values()) if len(shards) > 1 else set()
    for old in folder.iterdir():
        if SHARD_NAME.fullmatch(old.name) and old.name not in kept:
            old.unlink(missing_ok=True)
    save_config(model.config, folder, model.dtype, config_updates)


def save_config(config: NextStepConfig, folder: Path, dtype: torch.dtype, config_updates: dict | None = None) -> None:
    """Write `folder/config.json` for weights saved in `dtype` (`config_updates` go into the file only)."""
    config_dict = config.to_dict()
    # Like transformers, record the dtype the weights were written in (the live config is not changed).
    dtype_key = "dtype" if "dtype" in config_dict and "torch_dtype" not in config_dict else "torch_dtype"
    config_dict[dtype_key] = str(dtype).removeprefix("torch.")
    config_dict.update(config_updates or {})
    text = json.dumps(config_dict, indent=2) + "\n"
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text))


def load_language_model(model: NextStep, folder: str | Path) -> list[str]:
    """Initialise the decoder from a Qwen2 / Llama checkpoint folder (Hugging Face layout, e.g. Qwen2.5-14B).

    The official recipe starts NextStep-1 from Qwen2.5-14B: its `model.*` tensors
    become our decoder (the prefix dropped), `lm_head` stays `lm_head`. Shapes
    must match, except the vocabulary, where the rows both have are copied (the
    added image tokens keep their fresh initialisation). The image parts are
    untouched. Returns the names of our tensors the checkpoint did not provide.
    """
    folder = Path(folder)
    ours = dict(model.named_parameters())
    filled: set[str] = set()
    for path in weight_files(folder):
        for key, tensor in iter_safetensors(path, torch.device("cpu")):
            name = key.removeprefix("model.")
            if name not in ours or name.startswith(("image_", "gen_pos")):
                continue  # e.g. rotary caches, or tensors of other heads
            target = ours[name]
            with torch.no_grad():
                if name in ("embed_tokens.weight", "lm_head.weight") and tensor.shape[1:] == target.shape[1:]:
                    rows = min(tensor.shape[0], target.shape[0])
                    target[:rows].copy_(tensor[:rows])
                elif tensor.shape == target.shape:
                    target.copy_(tensor)
                else:
                    raise CheckpointError(f"{path}: {key!r} has shape {tuple(tensor.shape)}, "
                                          f"the model expects {tuple(target.shape)}")
            filled.add(name)
    return sorted(n for n in ours if n not in filled and not n.startswith("image_"))
