"""Token sampling speed of a full-size NextStep-1-Large, randomly initialised, against the memory-bandwidth bound.

    python benchmarks/gpu.py                       # on a GPU: bf16, 512x512, batch 1 and 8, CFG 7.5, 28 steps
    python benchmarks/gpu.py --tiny --device cpu   # the same script at a tiny size (tests/test_gpu_benchmark.py)

Nothing is downloaded: the model is built on the meta device and given random weights on the target
device (about 30 GB in bf16). Measures, eager and compiled (`CompiledLoop`: CUDA graphs on a GPU):
the decoder's one-token step and the flow head's whole per-token integration (ms per token), then the
image tokens of one 512x512 image (1024 tokens) at batch 1 and 8 with CFG. The compile warm-up is
reported apart. The bound: every weight a token reads (the decoder once, the head's modulation once
and its MLPs once per flow step), divided by the device's memory bandwidth. The VAE decode is not
included (milliseconds at this size). Eager image times are measured over `--eager-tokens` tokens and
scaled to the image (the per-token cost is flat with a static cache); compiled ones over the full image.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from nextstep import NextStep, NextStepConfig
from nextstep.model import KVCache
from nextstep.model.decoder import rope_tables
from nextstep.plan import preset
from nextstep.sampling import FlowSampler
from nextstep.sampling.autoregressive import decode_one_token, generate_tokens, prefill
from nextstep.sampling.compiled import CompiledLoop

# Peak memory bandwidth in GB/s by device name (vendor figures), for the bound; --bandwidth overrides.
BANDWIDTH_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
                 "A100": 1555, "L40S": 864, "L4": 300, "RTX 4090": 1008}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, fm_head_dim=32, fm_head_layers=2,
            max_position_embeddings=2048, boi=500, eoi=501, image_placeholder_id=502, pad_token_id_added=503,
            bos_token_id=None, eos_token_id=None)
PROMPT_TOKENS = 64  # a typical caption with the official positive prompt


def build(config: NextStepConfig, device: torch.device, dtype: torch.dtype, seed: int) -> NextStep:
    """The model with N(0, 0.02) weights (norm gains 1), materialised directly in `dtype` on `device`."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = NextStep(config)
    finally:
        torch.set_default_dtype(saved)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "_ln" in name):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        model.gen_pos_embed.zero_()
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def weight_bytes_per_token(model: NextStep, steps: int) -> dict[str, int]:
    """Bytes of weights one token reads: decoder layers once, head modulation once, head MLPs per step."""
    def size(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    net = model.image_head.net
    head_step = size(p for b in net.res_blocks for p in [*b.mlp.parameters(), *b.in_ln.parameters()])
    head_step += size([*net.input_proj.parameters(), *net.final_layer.linear.parameters()])
    head_once = size(p for b in net.res_blocks for p in b.adaLN_modulation.parameters())
    head_once += size([*net.final_layer.adaLN_modulation.parameters(), *net.cond_embed.parameters()])
    decoder = size([*model.layers.parameters(), *model.norm.parameters(), *model.image_in_projector.parameters(),
                    *model.image_out_projector.parameters()])
    return {"decoder": decoder, "head": head_once + steps * head_step}


def per_token(model: NextStep, rows: int, groups: int, sampler: FlowSampler, cfg: float,
              compiled: CompiledLoop | None, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median ms of one decoder step and of one token's flow integration at `rows` decoder rows."""
    cfg_ = model.config
    dtype = model.embed_tokens.weight.dtype
    n = repeats + 3
    max_len = PROMPT_TOKENS + n
    if compiled is not None:
        cache, key_valid, rope = compiled.cache(model, rows, max_len)
        decode = compiled.decode
        prepared = compiled.sampler(model, sampler)
    else:
        cache = KVCache(cfg_, rows, max_len, device, dtype)
        key_valid = torch.zeros(rows, max_len, dtype=torch.bool, device=device)
        rope = rope_tables(torch.arange(max_len, device=device), cfg_.head_dim, cfg_.rope_theta, dtype)
        decode = decode_one_token
        prepared = sampler.prepare(model.image_head.net, device)
    key_valid[:, :PROMPT_TOKENS] = True
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg_.boi, (rows, PROMPT_TOKENS), device=device, generator=g)
    with torch.no_grad():
        h = prefill(model, model.embed(ids), key_valid, cache, rope)
        slots = torch.arange(PROMPT_TOKENS, max_len, device=device)
        embed = torch.randn(rows, cfg_.hidden_size, device=device, dtype=dtype, generator=g)
        step = iter(range(n))

        def one_step() -> Tensor:
            k = next(step)
            return decode(model, embed, slots[k: k + 1], key_valid, cache, rope)

        decode_s = timed(one_step, device, n)[3:]
        c = model.image_out_projector(h)
        noise = torch.randn(sampler.noise_draws, rows // groups, cfg_.token_dim, device=device, generator=g)
        head_s = timed(lambda: prepared.sample(c, noise, groups, cfg), device, n)[3:]
    return 1e3 * statistics.median(decode_s), 1e3 * statistics.median(head_s)


def image_seconds(model: NextStep, batch: int, groups: int, n_tokens: int, measured_tokens: int,
                  sampler: FlowSampler, cfg: float, compiled: CompiledLoop | None, device: torch.device
                  ) -> tuple[float, Tensor]:
    """Seconds for the image tokens of `batch` images (measured over `measured_tokens`, scaled to
    `n_tokens`), and the tokens (for eager/compiled agreement)."""
    cfg_ = model.config
    rows = groups * batch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg_.boi, (rows, PROMPT_TOKENS), generator=g).to(device)
    mask = torch.ones_like(ids)
    noise = torch.randn(measured_tokens, sampler.noise_draws, batch, cfg_.token_dim, generator=g)
    sync(device)
    t0 = time.perf_counter()
    tokens = generate_tokens(model, ids, mask, measured_tokens, sampler, noise, [(cfg, 1.0)] * measured_tokens,
                             groups, compiled=compiled)
    sync(device)
    return (time.perf_counter() - t0) * n_tokens / measured_tokens, tokens.float().cpu()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) or float32 (default on CPU)")
    ap.add_argument("--tiny", action="store_true", help="a tiny config instead of NextStep-1-Large (for tests)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (tokens = (size/16)^2)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--steps", type=int, default=28, help="flow steps per token (official: 28)")
    ap.add_argument("--eager-tokens", type=int, default=64, help="tokens measured per eager image (scaled up)")
    ap.add_argument("--repeats", type=int, default=20, help="timed tokens for the per-token figures")
    ap.add_argument("--backend", default=None, help="torch.compile backend (default: Inductor; CUDA graphs on CUDA)")
    ap.add_argument("--bandwidth", type=float, default=None, help="GB/s (default: by device name)")
    ap.add_argument("--skip-compiled", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = preset("NextStep-1-Large")
    if args.tiny:
        config = NextStepConfig.from_dict({**config.to_dict(), **TINY})
    n_tokens = (args.size // (8 * config.latent_patch_size)) ** 2
    sampler = FlowSampler("euler_maruyama", args.steps)
    groups = 2 if args.cfg != 1 else 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bandwidth = args.bandwidth or next((v for k, v in BANDWIDTH_GBS.items() if k in name), None)
    model = build(config, device, dtype, seed=0)
    weights = weight_bytes_per_token(model, args.steps)
    print(f"{datetime.date.today()}  device {name}, torch {torch.__version__}, {dtype}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params ({'tiny' if args.tiny else 'Large'})")
    print(f"{args.size}x{args.size}: {n_tokens} tokens, cfg {args.cfg}, {args.steps} steps; weights read per token: "
          f"decoder {weights['decoder'] / 1e6:.1f} MB, head {weights['head'] / 1e6:.1f} MB")

    modes: dict[str, CompiledLoop | None] = {"eager": None}
    if not args.skip_compiled:
        modes["compiled"] = CompiledLoop(device, backend=args.backend)
    rows, tokens_by_mode = [], {}
    for mode, compiled in modes.items():
        warm0 = time.perf_counter()
        for b in args.batches:  # the warm-up: every shape measured below compiles here
            per_token(model, groups * b, groups, sampler, args.cfg, compiled, 1, device)
            image_seconds(model, b, groups, n_tokens, 2, sampler, args.cfg, compiled, device)
        warm = time.perf_counter() - warm0
        for b in args.batches:
            dec_ms, head_ms = per_token(model, groups * b, groups, sampler, args.cfg, compiled, args.repeats, device)
            measured = n_tokens if compiled is not None else min(n_tokens, args.eager_tokens)
            secs, tokens = image_seconds(model, b, groups, n_tokens, measured, sampler, args.cfg, compiled, device)
            tokens_by_mode[(mode, b)] = tokens[:, : min(measured, args.eager_tokens)]
            bound = (weights["decoder"] + weights["head"]) / (bandwidth * 1e9) * n_tokens if bandwidth else None
            rows.append([mode, b, f"{dec_ms:.2f}", f"{head_ms:.2f}", f"{secs:.3g}", f"{secs / b:.3g}",
                         f"{bound:.3g}" if bound else "-", f"{secs / bound:.2f}x" if bound else "-", f"{warm:.1f}"])
    header = ["mode", "batch", "decoder ms/tok", "head ms/tok", "image s", "s/image", "bound s", "vs bound",
              "warm-up s"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
    if bandwidth:
        print(f"bound = weight bytes per token x tokens / {bandwidth:.0f} GB/s (batch-independent while weight-bound)")
    else:
        print("bound: unknown bandwidth for this device (pass --bandwidth GB/s)")
    for b in args.batches:
        if ("compiled", b) in tokens_by_mode:
            diff = (tokens_by_mode[("compiled", b)] - tokens_by_mode[("eager", b)]).abs().max().item()
            print(f"compiled vs eager tokens, batch {b}: max abs difference {diff:.2e}")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    for compiled in modes.values():
        if compiled is not None:
            print(f"compiled shapes: {compiled.shapes}")


if __name__ == "__main__":
    main()
