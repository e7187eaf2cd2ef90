"""Data parallelism over ``torch.distributed`` processes launched by ``torchrun``.

Capture, probe fitting and the intervention sweeps call these helpers; launched without
``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment and no process group) every one of them
is a no-op: rank 0 of a world of 1, and nothing is initialised or communicated.

Under ``torchrun --nproc_per_node N`` the process group is created on first use (gloo on the
CPU, NCCL when the process has a GPU), work is dealt round-robin by index (:func:`split`), and
results are combined with :func:`all_reduce_sum` (float64) or :func:`all_gather`.

>>> world_size(), rank(), is_main()        # a plain process
(1, 0, True)
>>> split(5, "shards")                     # a world of 1 owns everything
[0, 1, 2, 3, 4]
>>> [a.tolist() for a in all_reduce_sum([np.arange(3.0)])]
[[0.0, 1.0, 2.0]]
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from jaxtyping import Float

__all__ = [
    "world_size",
    "rank",
    "local_rank",
    "is_distributed",
    "is_main",
    "init",
    "barrier",
    "all_reduce_sum",
    "all_gather",
    "check_same",
    "split",
    "owns",
    "main_first",
    "local_device",
    "alone",
]

T = TypeVar("T")

# Collectives wait for the slowest rank (e.g. rank 0 done with its shards, rank 1 still
# capturing), so the timeout must outlast a whole run; a crashed rank is torn down by torchrun.
TIMEOUT = datetime.timedelta(hours=float(os.environ.get("SP_DIST_TIMEOUT_HOURS", "24")))
_alone: contextvars.ContextVar[bool] = contextvars.ContextVar("surprise_probe_alone", default=False)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def world_size() -> int:
    """Number of processes (``WORLD_SIZE`` from torchrun, or the initialised group); 1 otherwise."""
    if _alone.get():
        return 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (``RANK`` from torchrun); 0 when not distributed."""
    if _alone.get():
        return 0
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0) if world_size() > 1 else 0


def local_rank() -> int:
    """Rank on this node (``LOCAL_RANK``): which of the node's GPUs this process uses."""
    return _env_int("LOCAL_RANK", 0) if world_size() > 1 else 0


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and in a plain process): the rank that writes shared files and prints."""
    return rank() == 0


def local_device(device: str) -> str:
    """Map a bare ``"cuda"`` to this rank's GPU (``cuda:LOCAL_RANK``) when distributed.

    >>> local_device("cpu"), local_device("cuda")     # a plain process
    ('cpu', 'cuda')
    """
    if device == "cuda" and is_distributed():
        return f"cuda:{local_rank()}"
    return device


def init() -> None:
    """Create the process group if launched by torchrun and not done yet (no-op otherwise).

    Backend: NCCL when this process has a GPU, else gloo. Needs ``MASTER_ADDR``/``MASTER_PORT``
    (set by torchrun).
    """
    if not is_distributed() or dist.is_initialized():
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {', '.join(missing)} not set; "
            "launch with torchrun (e.g. torchrun --nproc_per_node 2 ...) or unset WORLD_SIZE"
        )
    backend = "gloo"
    if torch.cuda.is_available() and torch.cuda.device_count() > local_rank():
        backend = "nccl"
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=TIMEOUT)


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        init()
        dist.barrier()


def all_reduce_sum(arrays: Sequence[np.ndarray]) -> list[Float[np.ndarray, "..."]]:
    """Element-wise float64 sums over ranks, one collective for all ``arrays`` (packed flat).

    Every rank gets the same sums. Shapes must agree across ranks. Not distributed: float64
    copies of the inputs.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    if not is_distributed():
        return [a.copy() for a in arrays]
    init()
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    tensor = torch.from_numpy(flat).to(_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    summed = tensor.cpu().numpy()
    out, start = [], 0
    for a in arrays:
        out.append(summed[start : start + a.size].reshape(a.shape).copy())
        start += a.size
    return out


def all_gather(value: T) -> list[T]:
    """Every rank's (picklable) ``value``, in rank order; ``[value]`` when not distributed."""
    if not is_distributed():
        return [value]
    init()
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def _broadcast(value: T) -> T:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same(value: dict, what: str) -> None:
    """Raise ``ValueError`` on every rank unless all ranks hold the same ``value`` (a small dict).

    Used at the start of a distributed run so ranks that were given different inputs fail at
    once, naming the keys that differ, instead of writing a mixed store.
    """
    if not is_distributed():
        return
    canonical = json.dumps(value, sort_keys=True, default=str)
    values = all_gather(canonical)
    if len(set(values)) == 1:
        return
    parsed = [json.loads(v) for v in values]
    keys = sorted({k for p in parsed for k in p})
    differ = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in parsed}) > 1]
    shown = "; ".join(
        f"{key}: " + ", ".join(f"rank {r} {str(p.get(key))[:24]}" for r, p in enumerate(parsed)) for key in differ[:3]
    )
    raise ValueError(
        f"ranks disagree about the {what} ({shown}); every rank must be launched with the same "
        "model, inputs and options"
    )


def split(n_items: int, what: str, allow_idle: bool = False) -> list[int]:
    """Indices of the items this rank owns: ``rank, rank + world, ...`` (deterministic).

    Raises ``ValueError`` (on every rank alike) when there are fewer items than ranks, unless
    ``allow_idle`` (then the ranks beyond the items own nothing and only wait for the others).
    """
    world = world_size()
    if n_items < world and not allow_idle:
        raise ValueError(
            f"{n_items} {what} cannot be split over {world} ranks (each rank needs at least one); "
            f"launch at most {n_items} processes (torchrun --nproc_per_node / --nnodes)"
            + (" or use a smaller shard_size" if "shard" in what else "")
        )
    return list(range(rank(), n_items, world))


def owns(index: int) -> bool:
    """Whether item ``index`` is this rank's under :func:`split`'s round-robin."""
    return index % world_size() == rank()


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then (after a barrier) on the other ranks; return its value.

    For steps that create shared files (rank 0 prepares the folder, the others then only find
    it). An exception on rank 0 is raised on every rank, as the same type and message.
    """
    if not is_distributed():
        return fn()
    init()
    if is_main():
        try:
            result = fn()
        except Exception as error:  # re-raised here after the other ranks hear of it
            _broadcast((type(error), str(error)))
            raise
        _broadcast(None)
        return result
    failure = _broadcast(None)
    if failure is not None:
        kind, message = failure
        raise kind(message)
    return fn()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside this block this process acts as a world of one (runs its part locally)."""
    token = _alone.set(True)
    try:
        yield
    finally:
        _alone.reset(token)
