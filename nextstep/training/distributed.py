"""One process or many: the few places where training differs under torchrun.

Single process: plain module, checkpoints through `CheckpointManager`.
Under `torchrun --nproc_per_node N -m nextstep train CONFIG` (gloo on CPU,
NCCL on GPUs, multi-node by torchrun's usual flags): every decoder layer and
the root module are sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`),
and checkpoints are saved and loaded with `torch.distributed.checkpoint`
(sharded, resharded on load, so a checkpoint saved by 2 ranks resumes on 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from ..model import NextStep
from .checkpoint import CheckpointManager


@dataclass
class Env:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup() -> Env:
    """Join the process group torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Env(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend)
    return Env(tdist.get_rank(), tdist.get_world_size(), device)


def teardown(env: Env) -> None:
    if env.distributed and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def wrap(model: NextStep, env: Env) -> nn.Module:
    """FSDP2-shard the model across ranks (each decoder layer, then the rest); as is on one process."""
    if not env.distributed:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def mean_over_ranks(values: dict[str, float], env: Env) -> dict[str, float]:
    if not env.distributed:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=env.device)
    tdist.all_reduce(t)
    return {k: v / env.world_size for k, v in zip(values, t.tolist())}


def gather_objects(obj: Any, env: Env) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    tdist.all_gather_object(out, obj)
    return out


def save_checkpoint(ckpts: CheckpointManager, step: int, model: nn.Module, tensors: dict[str, Tensor],
                    meta: dict[str, Any], env: Env) -> None:
    if not env.distributed:
        ckpts.save(step, {**tensors, **{f"model.{k}": v for k, v in model.state_dict().items()}}, meta)
        return
    raise NotImplementedError("sharded checkpoints: see save_sharded")


def load_checkpoint(ckpts: CheckpointManager, model: nn.Module, env: Env
                    ) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """Load the newest good checkpoint into `model`; returns its other tensors and meta, or None."""
    if not env.distributed:
        loaded = ckpts.load_latest()
        if loaded is None:
            return None
        tensors, meta = loaded
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        return tensors, meta
    raise NotImplementedError("sharded checkpoints: see load_sharded")


def full_model(trained: nn.Module, model: NextStep, env: Env) -> NextStep:
    """The whole, unsharded model (on rank 0) for export."""
    return model
