"""benchmarks/gpu.py at a tiny size on the CPU, so the GPU script cannot rot between GPU runs.

It runs every part of the script (building the model on the meta device, per-token timings, image
timings, eager and compiled through `CompiledLoop`, the bandwidth bound) and checks that the compiled
loop gives the eager tokens. Compiled with `aot_eager` (Inductor would take minutes here).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_gpu_benchmark_runs_at_a_tiny_size_on_the_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    torch._dynamo.reset()
    gpu.main(["--tiny", "--device", "cpu", "--size", "32", "--batches", "1", "--steps", "3", "--repeats", "2",
              "--eager-tokens", "4", "--backend", "aot_eager", "--bandwidth", "20"])
    torch._dynamo.reset()
    out = capsys.readouterr().out
    rows = {m.group(1): m.group(0).split() for m in re.finditer(r"^\s*(eager|compiled)\s+1\s.*$", out, re.M)}
    assert set(rows) == {"eager", "compiled"}, out
    for cells in rows.values():
        decoder_ms, head_ms, image_s, _, bound_s = map(float, cells[2:7])
        assert decoder_ms > 0 and head_ms > 0 and image_s > 0 and bound_s > 0
        assert abs(float(cells[7].rstrip("x")) / (image_s / bound_s) - 1) < 0.02
    diff = float(re.search(r"compiled vs eager tokens, batch 1: max abs difference (\S+)", out).group(1))
    assert diff <= 1e-5, out
    assert "'flow head': [('euler_maruyama', 3, None, 1, 2)]" in out  # one graph (batch 1, CFG), no eager fallback
