"""Weight-only quantization of the decoder: torchao on GPUs (`pip install 'nextstep[quant]'`),
int8 on the CPU without it.

`load_model(..., quantize=MODE)` quantizes each linear weight of the decoder as
soon as it has been read, before the next tensor is read, so loading never
holds more than the quantized model plus one weight matrix in the load dtype
(and torchao's temporaries while it quantizes that matrix).

Modes (weight-only: activations and matmul outputs keep the load dtype):

- "int8": int8 weights with one float32 scale per output row, symmetric
  (`Int8WeightOnlyConfig` on CUDA). Runs wherever torch runs: CPU and CUDA,
  float32, bfloat16 and "bf16-mixed" (float32 weights, bf16 matmuls under
  autocast). The CPU needs no torchao: PyTorch has the fused int8-weight matmul
  (`torch._weight_int8pack_mm`), so the weights are rounded here (`int8_rows`)
  and the linear calls that kernel. torchao's own CPU path makes a
  full-precision copy of each weight on every call, and importing torchao
  loads `torch._dynamo` (+85 MiB resident), a sixth of what int8 saves on a
  1B model.
- "int4": 4-bit weights in groups of `INT4_GROUP_SIZE` along the input, with a
  bfloat16 scale and zero point per group (`Int4WeightOnlyConfig`, the
  "tile_packed_to_4d" layout of PyTorch's tinygemm kernel). That kernel is
  CUDA-only (compute capability >= 8.0) and takes bfloat16 weights; torchao has
  no int4 kernel for CPUs in its wheel, so int4 is refused there.
- "fp8": float8 (e4m3) weights with one float32 scale per output row
  (`Float8WeightOnlyConfig`; like int8, the weights are dequantized for each
  matmul). Taken only on GPUs with native fp8, compute capability >= 8.9 (Ada,
  Hopper); elsewhere int8 stores the same bytes, so fp8 is refused there.

What is quantized: the seven linear layers of every decoder layer (attention
q/k/v/o, MLP gate/up/down), which hold about 89% of a 14B model's weights;
their biases stay in the load dtype. What stays in the load dtype, and why:
the flow head (small, but it runs 20-50 times per image token and its errors
show directly in the pixels), the image in/out projectors (small, and on the
path of every image token), the token embeddings (a row gather, not a matmul:
nothing to speed up, and only a few rows are read per prompt), the LM head
(not used to generate images, only by the training loss), the RMSNorm gains
and the VAE. `weight_bytes` measures what each part really takes.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .errors import NextStepError

MODES = ("int8", "int4", "fp8")
# The linear layers of one decoder layer that a mode quantizes (names under `layers.<i>.`).
QUANTIZED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
INT4_GROUP_SIZE = 128  # input features per int4 scale/zero pair; must divide every quantized layer's input size
INT4_MIN_CAPABILITY = (8, 0)  # tinygemm's int4 kernel uses tensor cores from Ampere on
FP8_MIN_CAPABILITY = (8, 9)  # native float8 from Ada / Hopper on
INSTALL_HINT = "pip install 'nextstep[quant]'"

_LAYER_KEY = re.compile(r"layers\.(\d+)\.")


class QuantizationError(NextStepError, ValueError):
    """A quantization mode that is unknown, not installed, or not supported on this device and dtype."""


def layer_of(key: str) -> int | None:
    """The decoder layer index of a state-dict key ("layers.3.mlp.up_proj.weight" -> 3), else None."""
    m = _LAYER_KEY.match(key)
    return int(m.group(1)) if m else None


@contextmanager
def _quiet_import() -> Iterator[None]:
    # torchao logs a warning for each optional CUDA extension it cannot load (always, on a CPU
    # build of torch), and torch one for an enum torchao registers: noise for our users.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao(mode: str) -> Any:
    try:
        with _quiet_import():
            import torchao.quantization as q
    except ImportError as e:
        raise QuantizationError(f"quantize={mode!r} needs torchao, which is not installed ({e}): "
                                f"{INSTALL_HINT}") from None
    return q


def check_mode(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise QuantizationError naming the mode and the device if `mode` cannot run there with weights in `dtype`."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}; use one of {list(MODES)}")
    if not dtype.is_floating_point:
        raise QuantizationError(f"quantize={mode!r} needs floating-point weights, got {dtype}")
    if mode == "int8":
        return
    if device.type != "cuda":
        need = (f"CUDA with compute capability >= {'.'.join(map(str, FP8_MIN_CAPABILITY))}" if mode == "fp8"
                else "CUDA (torchao's int4 kernel has no CPU version)")
        raise QuantizationError(f"quantize={mode!r} is not supported on {device.type}: it needs {need}; "
                                f"use quantize='int8' there")
    capability = torch.cuda.get_device_capability(device)
    minimum = FP8_MIN_CAPABILITY if mode == "fp8" else INT4_MIN_CAPABILITY
    if capability < minimum:
        raise QuantizationError(
            f"quantize={mode!r} is not supported on {torch.cuda.get_device_name(device)} (compute capability "
            f"{capability[0]}.{capability[1]}): it needs >= {minimum[0]}.{minimum[1]}; use quantize='int8'")
    if mode == "int4" and dtype != torch.bfloat16:
        raise QuantizationError(f"quantize='int4' needs bfloat16 weights (its kernel's only dtype), got {dtype}; "
                                f"load with dtype='bf16'")


def _config(mode: str) -> Any:
    q = _torchao(mode)
    # set_inductor_config=False: torchao would otherwise change torch._inductor's global settings.
    if mode == "int8":
        return q.Int8WeightOnlyConfig(set_inductor_config=False)
    if mode == "fp8":
        return q.Float8WeightOnlyConfig(set_inductor_config=False)
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    return q.Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
                                  set_inductor_config=False)


def _heap_trimmer() -> Callable[[], None]:
    """glibc's malloc_trim(0), or nothing where there is none (macOS, musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def is_quantized_weight(key: str) -> bool:
    """Whether a state-dict key is the weight of a linear layer the modes quantize."""
    return layer_of(key) is not None and key.endswith(".weight") and \
        key.split(".", 2)[2].removesuffix(".weight") in QUANTIZED_LINEARS


def linear_quantizer(mode: str, device: torch.device, dtype: torch.dtype) -> Callable[[nn.Linear], None]:
    """A function that quantizes one linear layer's weight in place with `mode`; checks the mode
    and imports torchao now (where the mode needs it), so a bad choice fails before any weight is read."""
    check_mode(mode, device, dtype)
    cpu_int8 = mode == "int8" and device.type == "cpu"
    if not cpu_int8:
        config = _config(mode)
        quantize_ = _torchao(mode).quantize_
    # On the CPU, glibc keeps freed full-precision weights in its heaps, between the quantized
    # weights allocated since, so the process would grow towards the unquantized model's size:
    # hand the free pages back after every weight (1B model: load peak 2.1 -> 1.6 GB).
    release = _heap_trimmer() if device.type == "cpu" else (lambda: None)

    def quantize_linear(linear: nn.Linear) -> None:
        if mode == "int4" and linear.in_features % INT4_GROUP_SIZE:
            # torchao would silently leave such a layer in bf16; say so instead.
            raise QuantizationError(f"quantize='int4' needs input sizes divisible by {INT4_GROUP_SIZE}; "
                                    f"a linear layer has {linear.in_features}")
        if cpu_int8:
            q, scale = int8_rows(linear.weight.detach())
            linear.weight = nn.Parameter(q, requires_grad=False)
            linear.register_buffer(INT8_SCALE, scale)
            linear.forward = partial(_int8_cpu_linear, linear)
        else:
            with torch.no_grad():
                quantize_(linear, config, filter_fn=None)
        release()

    return quantize_linear


INT8_SCALE = "weight_scale"  # the buffer beside a CPU int8 linear's weight: float32, one per output row
INT8_CHUNK_ROWS = 256  # rows rounded at a time, so rounding a weight holds only a slice of it in float32


def int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 of a (out, in) weight: q = round(w / s) with s = max|row| / 127, so
    q * s[:, None] approximates w (what torchao's int8 weight-only config stores, without its
    all-zero zero points). Returns (q int8, s float32)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], INT8_CHUNK_ROWS):
        w = weight[start:start + INT8_CHUNK_ROWS].float()
        s = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        q[start:start + INT8_CHUNK_ROWS] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[start:start + INT8_CHUNK_ROWS] = s
    return q, scale


def _int8_cpu_linear(linear: nn.Linear, x: Tensor) -> Tensor:
    """An int8 linear on the CPU through PyTorch's fused int8-weight matmul, which reads the int8
    matrix as it multiplies: no full-precision copy of the weight per call."""
    if torch.is_autocast_enabled("cpu"):  # "bf16-mixed": the matmul runs in the autocast dtype, as F.linear's would
        x = x.to(torch.get_autocast_dtype("cpu"))
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch._weight_int8pack_mm(rows, linear.weight, getattr(linear, INT8_SCALE).to(x.dtype))
    if linear.bias is not None:
        y = y + linear.bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def quantize_model(model: nn.Module, mode: str) -> None:
    """Quantize the decoder layers of an already loaded NextStep in place (`load_model(..., quantize=)`
    does this while reading, which needs less memory)."""
    quantize_linear = linear_quantizer(mode, model.embed_tokens.weight.device, model.embed_tokens.weight.dtype)
    for name, module in list(model.named_modules()):
        if is_quantized_weight(name + ".weight"):
            quantize_linear(module)


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor's data takes; for a torchao quantized tensor, the sum of its inner tensors
    (int8/int4/fp8 data, scales, zero points)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def is_quantized(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a quantized weight (a torchao tensor subclass, or int8)."""
    return any(hasattr(type(p), "__tensor_flatten__") or p.dtype == torch.int8 for p in model.parameters())


def part_of(name: str) -> str:
    """Which part of a NextStep a parameter or buffer name belongs to (the parts of `weight_bytes`)."""
    if layer_of(name) is not None:
        linear, _, tensor = name.split(".", 2)[2].rpartition(".")
        quantizable = linear in QUANTIZED_LINEARS and tensor in ("weight", INT8_SCALE)
        return "decoder_linears" if quantizable else "decoder_other"
    for prefix, part in (("embed_tokens.", "embed_tokens"), ("lm_head.", "lm_head"),
                         ("image_in_projector.", "image_projectors"), ("image_out_projector.", "image_projectors"),
                         ("image_head.", "flow_head")):
        if name.startswith(prefix):
            return part
    return "other"  # the final norm and the sin-cos position table


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers per part, as they are in memory (a quantized
    weight counts its data, scales and zero points; a tied LM head is counted once, under
    embed_tokens). Parts: decoder_linears (the weights `quantize` acts on), decoder_other (their
    biases, the norms), embed_tokens, lm_head, image_projectors, flow_head, other; and total."""
    parts = dict.fromkeys(("decoder_linears", "decoder_other", "embed_tokens", "lm_head", "image_projectors",
                           "flow_head", "other"), 0)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:  # both skip shared tensors
        parts[part_of(name)] += tensor_bytes(t)
    parts["total"] = sum(parts.values())
    return parts
