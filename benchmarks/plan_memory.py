"""`nextstep plan`'s estimates beside measured memory, on the CPU (float32).

Each measurement runs in a fresh process that builds its model with random
weights, warms up, then records how far VmHWM (the kernel's resident-memory
high-water mark, reset first) rises above the resident memory before the step:

- generation: `generate_tokens` (prefill, then every image token with the flow
  head) for a mid-size config, against the plan's KV cache + the state the
  sampler keeps + the larger of the prefill and decode activations;
- VAE decode: the full-size (f8ch16) decoder at each size, against the plan's
  VAE figure.

Weights are not measured here: tests/test_plan.py checks those exactly,
quantized ones included. CPU kernels keep workspaces that a GPU's cuBLAS and
cuDNN keep elsewhere, so read the ratio as a sanity check, not a GPU figure.

    python benchmarks/plan_memory.py [--gen-sizes 128 256] [--vae-sizes 256 512] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MIB = 2**20
# A ~0.5 GB decoder: big enough that its transients stand out from the interpreter's noise.
MID = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=4, fm_head_dim=512, fm_head_layers=6, boi=4000, eoi=4001, image_placeholder_id=4002,
           pad_token_id_added=4003, bos_token_id=None, eos_token_id=None, max_position_embeddings=8192)


def rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def measure(step) -> int:
    """How far resident memory rises above its level before `step()` while it runs."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before, _ = rss()
    step()
    return rss()[1] - before


def child(kind: str, size: int, batch: int) -> dict:
    import torch

    from nextstep.config import NextStepConfig
    from nextstep.plan import plan_memory
    from nextstep.vae.config import VAEConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae_config = VAEConfig()
    if kind == "vae":
        from nextstep.vae import AutoencoderKL

        vae = AutoencoderKL(vae_config).eval()
        z = torch.randn(batch, vae_config.z_channels, size // 8, size // 8)
        with torch.inference_mode():
            vae.decode(z[:1, :, :4, :4])  # warm-up
            measured = measure(lambda: vae.decode(z))
        config = NextStepConfig.from_dict(dict(MID))
        plan = plan_memory(config, vae_config, height=size, width=size, batch=batch, cfg=3.0, steps=10,
                           dtype=torch.float32)
        return {"measured": measured, "planned": plan.activations["vae_decode"]}
    from nextstep.model import NextStep
    from nextstep.sampling import FlowSampler
    from nextstep.sampling.autoregressive import generate_tokens

    config = NextStepConfig.from_dict(dict(MID))
    model = NextStep(config).eval()
    prompt, steps, groups = 64, 10, 2
    n_tokens = (size // 16) ** 2
    sampler = FlowSampler("euler_maruyama", steps)
    ids = torch.randint(0, 4000, (groups * batch, prompt))
    mask = torch.ones_like(ids)

    def run(n: int) -> None:
        noise = torch.randn(n, sampler.noise_draws, batch, config.token_dim)
        generate_tokens(model, ids, mask, n, sampler, noise, [(3.0, 1.0)] * n, groups)

    run(2)  # warm-up
    measured = measure(lambda: run(n_tokens))
    plan = plan_memory(config, vae_config, height=size, width=size, batch=batch, cfg=3.0, steps=steps,
                       dtype=torch.float32, prompt_tokens=prompt)
    state = plan.phases["decode"] - plan.weights["total"] - plan.activations["decode"]
    planned = state + max(plan.activations["prefill"], plan.activations["decode"])
    return {"measured": measured, "planned": planned, "kv_cache": plan.kv_cache_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-sizes", type=int, nargs="+", default=[128, 256], help="image sides for generation")
    parser.add_argument("--vae-sizes", type=int, nargs="+", default=[256, 512], help="image sides for the VAE")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, size, batch = args.child
        print(json.dumps(child(kind, int(size), int(batch))))
        return
    print(f"{'what':<32}{'planned MiB':>12}{'measured MiB':>14}{'measured/planned':>18}")
    for kind, batch, sizes in (("generation", args.batch, args.gen_sizes), ("vae", 1, args.vae_sizes)):
        for size in sizes:
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(size), str(batch)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            label = f"{kind} {size}px batch {batch}"
            print(f"{label:<32}{r['planned'] / MIB:>12.0f}{r['measured'] / MIB:>14.0f}"
                  f"{r['measured'] / r['planned']:>18.2f}")


if __name__ == "__main__":
    main()
