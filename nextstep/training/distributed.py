"""One process or many: the few places where training differs under torchrun.

Single process: plain module, checkpoints as one safetensors file (`CheckpointManager.save`).
Under `torchrun --nproc_per_node N -m nextstep train CONFIG` (gloo on CPU,
NCCL on GPUs, multi-node by torchrun's usual flags): the model is built on the
meta device and sharded with FSDP2 before any rank allocates it (`sharding.py`:
every decoder layer, the flow head and the root; `[distributed]` mixed precision),
the export is written tensor by tensor from the shards (`export.py`), and
checkpoints are saved with `torch.distributed.checkpoint` (DCP): each rank
writes its own shards into `step_N/sharded/`, rank 0 adds `meta.json` and renames
the folder into place. Multi-node runs need `out_dir` on a filesystem every node
sees.

Changing the number of ranks on resume. Both formats load on any number of
ranks: DCP reshards the model and optimizer itself, and a single-process file
is read whole and distributed with `set_state_dict`. What is per rank in
`meta.json` (data position, torch RNG) is handled so:

- data positions: rank r of R reads epoch positions r, r+R, r+2R, ... of the
  shapes stream and of folder/JSONL item lists, so the positions the R old
  ranks consumed are mapped to global positions and dealt back out to the new
  ranks (exact: no sample repeated or skipped). WebDataset positions are per
  shard, so every new rank gets the union. A position saved while ranks were in
  different epochs cannot be moved and fails with a message (resume with the old
  rank count).
- the torch RNG is restored only on the same rank count; training draws nothing
  from it (its random draws come from per-sample generators, see `train.py`).
"""

from __future__ import annotations

import base64
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn

from ..data.stream import DataError, DoneSet
from ..model import NextStep
from .checkpoint import SHARDED, TENSORS, CheckpointManager, flatten_optimizer, unflatten_optimizer
from .config import DistributedSection

logger = logging.getLogger("nextstep.training")


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


def requested_world_size() -> int:
    """The number of ranks torchrun started (1 without torchrun); known before joining the group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup() -> Env:
    """Join the process group torchrun describes in the environment, if any."""
    world = requested_world_size()
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
        # Leaving without a barrier lets a rank exit while gloo still has work in flight
        # with it, which aborts the other rank now and then ("terminate called ...").
        tdist.barrier()
        tdist.destroy_process_group()


def wrap(model: NextStep, env: Env, section: DistributedSection | None = None) -> nn.Module:
    """FSDP2-shard the model across ranks (see `sharding.shard`); as is on one process, or if
    `build_parts` already built it sharded (from the meta device).

    With the default `[distributed]` the parameters stay fp32 (bf16 comes from autocast, as on
    one process), so the sharded run computes what the single-process run does.
    """
    from .sharding import is_sharded, shard

    if not env.distributed or is_sharded(model):
        return model
    return shard(model, section or DistributedSection(), env.device)


def sum_over_ranks(values: dict[str, float], env: Env) -> dict[str, float]:
    if not env.distributed:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=env.device)
    tdist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def gather_objects(obj: Any, env: Env) -> list[Any]:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    tdist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], Any], env: Env) -> Any:
    """`fn()` computed on rank 0 and sent to every rank (so all ranks take the same decision)."""
    if not env.distributed:
        return fn()
    box = [fn() if env.is_main else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------- checkpoints


def save_checkpoint(ckpts: CheckpointManager, step: int, trained: nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], data_position: list[dict], env: Env) -> None:
    """Checkpoint `step`: model and optimizer, `meta` (JSON), and every rank's data position and torch RNG.

    A collective under torchrun: every rank must call it.
    """
    ranks = gather_objects({"data": data_position, "torch_rng": _encode_rng(torch.get_rng_state())}, env)
    meta = {**meta, "world_size": env.world_size, "ranks": ranks}
    if not env.distributed:
        opt_tensors, opt_rest = flatten_optimizer(optimizer.state_dict())
        model_tensors = {f"model.{k}": v for k, v in trained.state_dict().items()}
        ckpts.save(step, {**model_tensors, **opt_tensors}, {**meta, "optimizer": opt_rest})
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if env.is_main:
        ckpts.begin(step)
    tdist.barrier()  # the empty temporary folder exists before anyone writes into it
    model_state, optim_state = get_state_dict(trained, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=ckpts.tmp_path(step) / SHARDED)
    tdist.barrier()  # every rank's shard file is complete before rank 0 lists and renames the folder
    if env.is_main:
        ckpts.commit(step, meta)
    tdist.barrier()  # nobody goes on (or exits) before the checkpoint is in place


def load_checkpoint(ckpts: CheckpointManager, trained: nn.Module, optimizer: torch.optim.Optimizer,
                    env: Env) -> dict[str, Any] | None:
    """Load the newest whole checkpoint (either format, saved by any number of ranks) into `trained`
    and `optimizer`; returns its meta, or None if there is none. Damaged ones are skipped with a warning."""
    for step in on_main(ckpts.steps, env):
        meta = on_main(lambda step=step: _checked(ckpts, step), env)
        if isinstance(meta, str):
            if env.is_main:
                logger.warning("checkpoint at step %d is damaged, using an earlier one: %s", step, meta)
            continue
        if TENSORS in meta["files"]:
            try:
                tensors, _ = ckpts.load(step)
            except ValueError as e:
                logger.warning("checkpoint at step %d is damaged, using an earlier one: %s", step, e)
                continue
            _set_full_state(trained, optimizer, tensors, meta)
        else:
            _load_sharded(trained, optimizer, ckpts.path(step) / SHARDED)
        if meta["world_size"] == env.world_size:
            torch.set_rng_state(_decode_rng(meta["ranks"][env.rank]["torch_rng"]))
        else:
            logger.info("checkpoint of step %d was saved by %d ranks, resumed on %d: data positions re-dealt",
                        step, meta["world_size"], env.world_size)
        return meta
    return None


def _checked(ckpts: CheckpointManager, step: int) -> dict[str, Any] | str:
    try:
        return ckpts.check(step)
    except ValueError as e:
        return str(e)


def _set_full_state(trained: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor],
                    meta: dict[str, Any]) -> None:
    """Load a single-process checkpoint (whole tensors) into a plain or an FSDP-sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    by_index = unflatten_optimizer(tensors, meta["optimizer"])
    # The file keys optimizer state by parameter index (torch's format); set_state_dict wants
    # parameter names. The optimizer was built from trained.parameters(), in this order.
    names = [name for name, _ in trained.named_parameters()]
    optim_state = {"state": {names[i]: s for i, s in by_index["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                    for g in by_index["param_groups"]]}
    set_state_dict(trained, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def _load_sharded(trained: nn.Module, optimizer: torch.optim.Optimizer, folder: os.PathLike) -> None:
    """Load a DCP checkpoint, resharding it to this run's ranks (works without a process group too)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # get_state_dict gives the tensors to load into (sharded like this run; it first creates the
    # optimizer's state with a zero-learning-rate step, which leaves the weights as they are).
    model_state, optim_state = get_state_dict(trained, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():  # without a process group DCP warns that it loads in one process: we know
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder, no_dist=not tdist.is_initialized())
    set_state_dict(trained, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _encode_rng(state: Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_rng(text: str) -> Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


# ---------------------------------------------------------------------- data positions

# Loaders whose rank r of R reads epoch positions r, r+R, r+2R, ... as its slots 0, 1, 2, ...
STRIDED = ("ShapesDataset", "FolderDataset", "JsonlDataset")
# Loaders whose slots are positions inside named shards, whichever rank reads them.
PER_SHARD = ("ShardDataset",)


def data_position(meta: dict[str, Any], env: Env) -> list[dict]:
    """This rank's position in every data source, re-dealt if the checkpoint had another rank count."""
    ranks = meta["ranks"]
    if len(ranks) == env.world_size:
        return ranks[env.rank]["data"]
    by_source = zip(*(r["data"] for r in ranks))
    return [reshard_position(list(states), env.rank, env.world_size) for states in by_source]


def reshard_position(states: list[dict], rank: int, world: int) -> dict:
    """One source's position for `rank` of `world`, from the positions its old ranks saved (in rank order)."""
    first = states[0]
    kind = first.get("kind")
    if len({s["epoch"] for s in states}) > 1:
        raise DataError(f"the {kind} data position was saved with the {len(states)} ranks in different epochs "
                        f"({[s['epoch'] for s in states]}); resume with {len(states)} ranks")
    if kind in STRIDED:
        done = {}
        for unit in sorted({u for s in states for u in s["done"]}):
            sets = [DoneSet.from_dict(s["done"][unit]) if unit in s["done"] else DoneSet() for s in states]
            done[unit] = _deal(*_to_global(sets), rank, world).to_dict()
        sizes: dict[str, int] = {}  # these loaders record no unit sizes (they know their length)
    elif kind in PER_SHARD:
        done = {}
        for unit in sorted({u for s in states for u in s["done"]}):
            sets = [DoneSet.from_dict(s["done"][unit]) for s in states if unit in s["done"]]
            union = DoneSet(max(d.prefix for d in sets), [i for d in sets for i in d.extra])
            done[unit] = union.to_dict()
        sizes = {u: n for s in states for u, n in s["sizes"].items()}
    else:
        raise DataError(f"cannot move a {kind} data position to another number of ranks; "
                        f"resume with {len(states)} ranks")
    # Counters are totals over the ranks: the new rank 0 carries them.
    stats: dict[str, int] = {}
    for s in states:
        for reason, n in s["stats"].items():
            stats[reason] = stats.get(reason, 0) + n
    consumed = sum(s["consumed"] for s in states)
    return {**first, "rank": rank, "world_size": world, "done": done, "sizes": sizes,
            "consumed": consumed if rank == 0 else 0, "stats": stats if rank == 0 else {}}


def _to_global(sets: list[DoneSet]) -> tuple[int, set[int]]:
    """Old ranks' consumed slots -> (P, extra): every global position below P, plus `extra`."""
    world = len(sets)
    below = min(r + world * d.prefix for r, d in enumerate(sets))
    extra: set[int] = set()
    for r, d in enumerate(sets):
        first_at_or_above = max(0, -(-(below - r) // world))
        extra.update(r + world * i for i in range(first_at_or_above, d.prefix))
        extra.update(r + world * i for i in d.extra)
    return below, extra


def _deal(below: int, extra: set[int], rank: int, world: int) -> DoneSet:
    """The slots of `rank` of `world` whose global positions are consumed."""
    prefix = max(0, -(-(below - rank) // world))
    return DoneSet(prefix, [(g - rank) // world for g in extra if g >= rank and (g - rank) % world == 0])


# ---------------------------------------------------------------------- the whole model


def full_model(trained: nn.Module, model: NextStep, env: Env, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> NextStep | None:
    """The whole, unsharded model, for export and samples.

    One process: `model` itself (`device` and `dtype` are ignored). Under torchrun
    (a collective: every rank must call it): rank 0 gets a copy of the full weights
    on `device` in `dtype`, the other ranks None.
    """
    if not env.distributed:
        return model
    from torch.distributed.tensor import DTensor

    # Gathered one tensor at a time and cast at once: rank 0 holds the model in `dtype` plus one
    # float32 tensor, never the float32 model.
    state: dict[str, Tensor] = {}
    for name, value in trained.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        if env.is_main:
            state[name] = whole.detach().to(device, dtype if whole.is_floating_point() else whole.dtype)
        del whole
    if not env.is_main:
        return None
    with torch.device("meta"):
        full = NextStep(model.config)
    full.load_state_dict(state, strict=not model.config.tie_word_embeddings, assign=True)
    if model.config.tie_word_embeddings:
        full.lm_head.weight = full.embed_tokens.weight
    return full
