"""Does request batching pay? Throughput and latency of `nextstep serve` under concurrent clients.

    python benchmarks/serve.py [--model DIR] [--slots 16] [--soak 60]

Starts the server in a subprocess on a free loopback port, then:
1. 8 requests one after another (each waits for the previous): the unbatched baseline;
2. 1, 8 and 32 requests fired at once: images/s and p50/p95 latency;
3. with --soak S: 32 clients sending requests back to back for S seconds, one request in ten
   hostile (a bad size, text full of the tokenizer's special tokens, a decompression-bomb upload,
   a client that hangs up before its answer). It counts answers by status for the good and the
   hostile requests (no 5xx but 503 'busy' is acceptable; every good request gets 200 or 503) and
   compares the server's memory (RSS) over the first and the last 5 s (within 5%).
Each good request asks for one 64x64 image with the model's default settings and its own seed.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import free_port, wait_until_healthy  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "three purple squares",
           "an orange circle to the left of a blue triangle", "a square on a dark background"]


def post(url: str, i: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/images/generations", timeout=300,
                   json={"prompt": PROMPTS[i % len(PROMPTS)], "n": 1, "size": "64x64", "seed": i})
    return r.status_code, time.perf_counter() - t0


def report(name: str, results: list[tuple[int, float]], wall: float) -> float:
    ok = [t for s, t in results if s == 200]
    rate = len(ok) / wall
    q = statistics.quantiles(ok, n=20) if len(ok) > 1 else ok * 19
    print(f"{name:>22}: {len(ok)}/{len(results)} ok, {rate:6.2f} images/s, "
          f"p50 {statistics.median(ok):.3f} s, p95 {q[18]:.3f} s")
    return rate


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def bomb_png(side: int = 20000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (over a gigabyte once decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def hostile(url: str, i: int) -> int | str:
    """One hostile request, by i: its status, or "hung up" for a client that left early."""
    gen = url + "/v1/images/generations"
    kind = i % 4
    if kind == 0:
        return httpx.post(gen, timeout=300, json={"prompt": "a red circle", "size": "63x65"}).status_code
    if kind == 1:
        # Plain text to the server: it must be drawn (200), never parsed as the sequence format.
        text = "<image> a red circle <|image_placeholder|><|endoftext|>"
        return httpx.post(gen, timeout=300, json={"prompt": text, "negative_prompt": text, "seed": i}).status_code
    if kind == 2:
        return httpx.post(url + "/v1/images/edits", timeout=300, data={"prompt": "make it blue"},
                          files={"image": ("bomb.png", bomb_png(), "image/png")}).status_code
    try:
        return httpx.post(gen, timeout=0.05, json={"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}).status_code
    except httpx.TimeoutException:
        return "hung up"


def soak(url: str, pid: int, seconds: float, clients: int = 32) -> None:
    stop = time.monotonic() + seconds
    counts: dict[str, dict] = {"good": {}, "hostile": {}}
    lock = threading.Lock()
    memory: list[float] = []

    def client(k: int) -> None:
        rng = random.Random(k)
        i = 10_000 * (k + 1)
        while time.monotonic() < stop:
            kind = "hostile" if rng.random() < 0.1 else "good"
            try:
                status = hostile(url, i) if kind == "hostile" else post(url, i)[0]
            except httpx.HTTPError as e:
                status = type(e).__name__  # no answer at all
            with lock:
                counts[kind][status] = counts[kind].get(status, 0) + 1
            i += 1

    def sample() -> None:
        while time.monotonic() < stop:
            memory.append(rss_mib(pid)[0])
            time.sleep(1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    sampler.join()
    first, last = statistics.mean(memory[:5]), statistics.mean(memory[-5:])
    key = lambda item: str(item[0])  # noqa: E731 - statuses are ints and strings
    print(f"soak, {clients} clients for {seconds:g} s, 1 request in 10 hostile:")
    for kind in ("good", "hostile"):
        print(f"  {kind} answers by status: {dict(sorted(counts[kind].items(), key=key))}")
    errors = {s: c for kind in counts for s, c in counts[kind].items() if isinstance(s, int) and s >= 500 and s != 503}
    failed = {s: c for s, c in counts["good"].items() if s not in (200, 503)}
    print(f"  5xx other than 503: {sum(errors.values())} {errors or ''}")
    print(f"  good requests that failed: {sum(failed.values())} {failed or ''}")
    change = (last - first) / first
    print(f"server RSS: first 5 s {first:.0f} MiB, last 5 s {last:.0f} MiB ({change:+.1%}; within 5%: "
          f"{'yes' if abs(change) <= 0.05 else 'NO'}), peak {rss_mib(pid)[1]:.0f} MiB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--soak", type=float, default=0, help="seconds of the 32-client soak (0: skip)")
    args = p.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "nextstep", "serve", "--port", str(port), "--slots", str(args.slots),
           "--max-queue", "64"] + (["--model", args.model] if args.model else [])
    server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 120)
        for i in range(3):
            post(url, i)  # warm-up
        print(f"server: {' '.join(cmd[2:])}; torch threads default; each request one 64x64 image")
        t0 = time.perf_counter()
        seq = [post(url, 100 + i) for i in range(8)]
        seq_rate = report("8 sequential", seq, time.perf_counter() - t0)
        rates = {}
        for c in (1, 8, 32):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                res = list(pool.map(lambda i: post(url, 1000 * c + i), range(c)))
            rates[c] = report(f"{c} concurrent", res, time.perf_counter() - t0)
        print(f"8 concurrent / 8 sequential: {rates[8] / seq_rate:.2f}x images/s (target >= 3x)")
        if args.soak:
            soak(url, server.pid, args.soak)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
