"""Intra-op threads for the token loop, chosen by the size of its work.

A token costs a few hundred small operations (the decoder step, then the flow head's steps). On the
CPU each one is a parallel region when torch uses several threads, and when those matmuls are small
the fork/join costs as much as the arithmetic: one thread is as fast on a quiet machine, and on a busy
one every region waits for a descheduled thread (bench configuration, batch 1, one core kept busy by
another process: 0.79 s -> 3.24 s per image with two threads). So the loop runs on one thread when its
largest per-token matmul is small, and keeps torch's setting when there is enough work to share.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Multiply-adds of the largest per-token matmul below which the token loop runs on one thread. On the
# 2-core bench machine batch 1 with CFG (2 rows x 256 x 768 = 0.4M) is as fast on one thread as on two,
# and batch 4 (8 rows, 1.6M) is about 1.2x faster on two when the machine is quiet.
SINGLE_THREAD_MACS = 1_000_000


def token_loop_threads(rows: int, hidden_size: int, intermediate_size: int, device: torch.device) -> int | None:
    """Threads for a token loop over `rows` decoder rows, or None to keep torch's setting."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        return None
    return 1 if rows * hidden_size * max(hidden_size, intermediate_size) < SINGLE_THREAD_MACS else None


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to `threads` (None: unchanged), restored after."""
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
