"""Data-parallel training under ``torchrun``: the process group, each rank's device, and the few collectives
the trainer needs so that every rank takes the same decisions (stop, skip, evaluate) at the same step.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them (or with ``WORLD_SIZE=1``) the run is
one process and every helper here is a no-op. The backend is NCCL on CUDA (one GPU per local rank) and gloo
on the CPU. NVLink multicast (NVLS) is left off: ``NCCL_NVLS_ENABLE=0`` unless the user set it.

Two ways to spread the model: ``wrap_ddp`` (DistributedDataParallel: every rank holds all the weights and the
optimizer state; gradients are all-reduced) and ``wrap_fsdp`` (FSDP2, ``fully_shard``: each rank holds a
1 / world_size share of the weights, gradients and optimizer state; a block's weights are all-gathered just
before its forward and backward). Under FSDP the checkpoints keep the one-process format: ``full_state_dicts``
gathers the whole weights and optimizer state onto rank 0, ``load_full_state_dicts`` shards them back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

from minillm.errors import MiniLLMError, UsageError

# Rank 0 may encode a large corpus into the token cache while the other ranks wait at a barrier.
SETUP_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""

    rank: int = 0  # global rank (RANK)
    world_size: int = 1  # processes in the run (WORLD_SIZE)
    local_rank: int = 0  # rank on this machine (LOCAL_RANK): picks the GPU
    device: torch.device = torch.device("cpu")  # this rank's device
    backend: str | None = None  # "nccl", "gloo", or None for one process

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files and logs."""
        return self.rank == 0


def env_ranks() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment; ``(0, 1, 0)`` without it."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise MiniLLMError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e}); start the run with torchrun") from e


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` for ``--device name`` (auto, cpu, cuda) under torchrun."""
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda:"):
        raise UsageError(f"--device {name}: under torchrun each rank uses cuda:LOCAL_RANK; give --device cuda or auto "
                         f"(choose GPUs with CUDA_VISIBLE_DEVICES)")
    if not torch.cuda.is_available():
        if name == "cuda":
            raise MiniLLMError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu (or auto)")
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise MiniLLMError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; give torchrun "
                           f"--nproc_per_node {torch.cuda.device_count()} or fewer")
    return torch.device("cuda", local_rank)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA; nothing elsewhere). The interpreter lock is released while it
    waits, so another thread (a background compile) runs meanwhile, which a read-back (``.tolist()``) does not allow."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(device_name: str) -> Dist:
    """Join the process group when started by torchrun with several processes; else a one-process ``Dist``."""
    rank, world, local = env_ranks()
    if world <= 1:
        return Dist()
    import torch.distributed as td

    device = rank_device(device_name, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast
    if not td.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            td.init_process_group(backend, timeout=SETUP_TIMEOUT, device_id=device)
        else:
            td.init_process_group(backend, timeout=SETUP_TIMEOUT)
    return Dist(rank, world, local, device, backend)


def cleanup(d: Dist, finished: bool = False) -> None:
    """Leave the process group (idempotent). Objects that hold communication work (the DDP reducer, FSDP's
    pending reduce-scatters, often kept alive by reference cycles) are collected first, while the interpreter
    is whole: freed later, during interpreter shutdown, their tensors can abort the process (SIGABRT,
    "terminate called without an active exception"), which torchrun then reports as a failed run. After a
    normal end (``finished``) the ranks also meet at a barrier, so none exits while another still works."""
    if d.enabled:
        import gc

        import torch.distributed as td

        if td.is_initialized():
            gc.collect()
            if finished:
                td.barrier()
            td.destroy_process_group()
        gc.collect()


@contextlib.contextmanager
def session(device_name: str) -> Iterator[Dist]:
    """``setup`` ... ``cleanup`` (with the closing barrier only when the body ended normally: after an error
    another rank may never reach it)."""
    d = setup(device_name)
    try:
        yield d
    except BaseException:
        cleanup(d)
        raise
    cleanup(d, finished=True)


def all_reduce_(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    """Reduce ``t`` in place over the ranks (``op`` sum, mean, max or min); returns it."""
    if not d.enabled:
        return t
    import torch.distributed as td

    ops = {"sum": td.ReduceOp.SUM, "mean": td.ReduceOp.SUM, "max": td.ReduceOp.MAX, "min": td.ReduceOp.MIN}
    td.all_reduce(t, op=ops[op])
    if op == "mean":
        t /= d.world_size
    return t


def agree_max(values: Sequence[float], d: Dist) -> list[float]:
    """Each value's maximum over the ranks, so that a flag raised on any rank (a signal, a time limit) is
    raised on all of them and no rank waits in a collective the others skip."""
    if not d.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=d.device)
    return all_reduce_(t, d, "max").tolist()


@contextlib.contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the body first (creating what the others then read); the other ranks run it once rank 0 has
    finished it. When the body fails on rank 0, the others stop with an error instead of waiting forever."""
    if not d.enabled:
        yield
        return
    import torch.distributed as td

    flag = torch.zeros(1, dtype=torch.int32, device=d.device)
    if not d.is_main:
        td.broadcast(flag, src=0)
        if int(flag.item()) != 1:
            raise MiniLLMError(f"rank {d.rank}: rank 0 stopped during setup (its message says why)")
        yield
        return
    try:
        yield
    except BaseException:
        td.broadcast(flag, src=0)  # 0: failed
        raise
    flag.fill_(1)
    td.broadcast(flag, src=0)


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of DistributedDataParallel inside (``enabled`` False), for the inner
    micro-batches of gradient accumulation; the last micro-batch's backward then reduces the summed gradients."""
    if enabled or not hasattr(model, "no_sync"):
        yield
        return
    with model.no_sync():
        yield


def wrap_ddp(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (the model itself for one process). Buffers (RoPE tables) are the same
    on every rank, so they are not broadcast at each forward."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.device.index] if d.device.type == "cuda" else None
    try:
        return DDP(model, device_ids=ids, forward_sync_buffers=False)
    except TypeError:  # torch before forward_sync_buffers
        return DDP(model, device_ids=ids, broadcast_buffers=False)


def check_world_size(saved: int, d: Dist, outdir) -> None:
    """Refuse to resume a run with another number of processes (the global batch and data order would change)."""
    if int(saved) != d.world_size:
        raise MiniLLMError(
            f"--resume: the run in {outdir} was trained by {saved} process(es), this one has {d.world_size}; resume "
            f"with the same world size (torchrun --nproc_per_node x --nnodes = {saved}, or --nproc {saved}), or start "
            f"a new --outdir")


def under_torchrun() -> bool:
    """True when this process was started by torchrun's agent (which forwards the signals it receives)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


# ---------------------------------------------------------------- FSDP2 (fully sharded data parallel)

FSDP_MUON = ("--fsdp cannot train with --optimizer muon (the default of --config small and medium): Muon "
             "orthogonalizes each whole weight matrix, and FSDP splits every matrix across the GPUs; add "
             "--optimizer adamw, or leave out --fsdp to train data-parallel (DDP) with Muon")
FSDP_ONE_PROCESS = ("--fsdp shards the model over several processes, and this run has one: start it with "
                    "--nproc N (N > 1 GPUs of this machine) or under torchrun --nproc_per_node N; on one GPU "
                    "leave out --fsdp")


def fsdp_problem(optimizer: str, world_size: int, dtype: torch.dtype | None = None) -> str | None:
    """Why ``--fsdp`` cannot run with these settings (a message naming the flags and the fix), or None."""
    if optimizer == "muon":
        return FSDP_MUON
    if world_size <= 1:
        return FSDP_ONE_PROCESS
    if dtype == torch.float16:
        return ("--fsdp with fp16 (--precision fp16, or auto on a GPU without bf16): the loss scaler would check "
                "each rank's gradient shard apart; give --precision bf16 or fp32")
    return None


def wrap_fsdp(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """Shard ``model`` over the ranks with FSDP2 (the model itself for one process). Each transformer block
    (``model.blocks``) is one unit, then the root takes the rest (embedding, final norm, output layer).

    In place: the same object comes back, its parameters now DTensors holding this rank's shard (dim 0 split
    over the ranks), so build the optimizer after this. Every rank must start from the same weights (the
    trainer seeds the initialization; a resume loads them with ``load_full_state_dicts``). Parameters stay
    fp32 (autocast does the mixed precision, as on one GPU); after a block's forward its gathered weights
    are freed and gathered again for its backward (ZeRO-3). Call the module (``model(x)``), never
    ``model.forward(x)``: the hooks that gather the weights run on the call. Compile after wrapping
    (``torch.compile(model)``): the FSDP hooks break the graph at each block, each block compiles once."""
    if not d.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    for block in getattr(model, "blocks", ()):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each of ``opt``'s parameters, in the order ``opt.state_dict()`` numbers them (0, 1, ...);
    a tied parameter under its first name, as ``get_optimizer_state_dict`` names it."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def _ids_from_names(sd: dict, names: list[str]) -> dict:
    """An optimizer state dict keyed by parameter names -> the plain ``Optimizer.state_dict()`` format."""
    if not sd:
        return sd
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]}


def _names_from_ids(sd: dict, names: list[str]) -> dict:
    """A plain ``Optimizer.state_dict()`` -> keyed by parameter names (what ``set_optimizer_state_dict`` reads)."""
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def full_state_dicts(model: torch.nn.Module, opts: Sequence[torch.optim.Optimizer]) -> tuple[dict, list[dict]]:
    """``(model state dict, [optimizer state dicts])`` of an FSDP-sharded model, whole and on the CPU, in the
    formats ``model.state_dict()`` and ``opt.state_dict()`` of one process give. A collective: every rank must
    call it; rank 0 receives the dicts, the other ranks empty ones."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = [_ids_from_names(get_optimizer_state_dict(model, opt, options=options), _param_names(model, opt))
             for opt in opts]
    return weights, optim


def load_full_state_dicts(model: torch.nn.Module, opts: Sequence[torch.optim.Optimizer], weights: dict,
                          optim: Sequence[dict]) -> None:
    """Load whole (one-process format) model and optimizer state dicts into an FSDP-sharded model and its
    optimizers: each rank keeps its own shard. Every rank passes the whole dicts (each reads the checkpoint)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if len(optim) != len(opts):
        raise ValueError(f"the checkpoint holds {len(optim)} optimizer(s), this run has {len(opts)}")
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    for opt, sd in zip(opts, optim, strict=True):
        set_optimizer_state_dict(model, opt, _names_from_ids(sd, _param_names(model, opt)), options=options)
