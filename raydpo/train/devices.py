"""Where a worker computes and where its collectives run: the one place that knows NCCL from gloo.

Ray Train starts an NCCL process group for GPU workers and a gloo one for CPU workers. NCCL
reduces CUDA tensors only ("No backend type associated with device type cpu"), gloo CPU tensors
(and CUDA ones, through a host copy), so a small statistic (a chunk count, a metric sum, a drift) is
moved to :func:`collective_device` before the collective and back to where it came from after.
"""

from __future__ import annotations

import os

import torch


def worker_device(use_gpu: bool, cpus: float | None = None) -> torch.device:
    """This Ray Train worker's compute device, made current.

    With ``use_gpu`` and a visible GPU: the one Ray assigned to this worker (``LOCAL_RANK`` among
    the node's workers when each sees every GPU, else the only one ``CUDA_VISIBLE_DEVICES``
    leaves), set as torch's current device so NCCL, ``torch.cuda`` calls and DeepSpeed agree.
    Otherwise the CPU, computing on the ``cpus`` this worker reserved, not the node's every core."""
    if use_gpu and torch.cuda.is_available():
        try:
            import ray.train.torch

            device = ray.train.torch.get_device()
        except Exception:  # noqa: BLE001 - outside a Ray Train worker (the GPU check, a notebook)
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    return torch.device("cpu")


#: glibc's ``M_MMAP_THRESHOLD`` for CPU workers of a large model: allocations this large or larger
#: are mapped on their own and unmapped when freed. With glibc's own threshold (raised as large
#: blocks are freed, up to 32 MB) the buffers ZeRO-3 gathers and frees module after module stay in
#: the heap: measured on a 1.3 GB Llama on 2 ranks, a worker's peak rose by 25 MB per layer in each
#: forward (and as much in backward), back down only at ``malloc_trim``; with 16 KB it stays flat.
MMAP_THRESHOLD = 16 << 10
#: Models at least this large on disk get :data:`MMAP_THRESHOLD` on CPU workers. Below it the
#: heap's churn is small, and mapping every block over 16 KB costs a tiny model's step about 15%.
LARGE_MODEL_BYTES = 256 << 20


def lean_host_allocator(device: torch.device, model_bytes: int) -> bool:
    """On a CPU worker of a model of ``model_bytes`` >= :data:`LARGE_MODEL_BYTES`, fix glibc's mmap
    threshold at :data:`MMAP_THRESHOLD` (no-op off glibc, on GPUs and for small models); whether set."""
    if device.type != "cpu" or model_bytes < LARGE_MODEL_BYTES:
        return False
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD) == 1  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def release_host_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``; no-op off glibc): after
    loading and before export, phases whose freed buffers would otherwise stay in the worker's RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def collective_device(group=None) -> torch.device:
    """The device a tensor must live on for a collective over ``group``: the current CUDA device
    under NCCL, else the CPU."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """``tensor`` reduced over ``group`` (default: every rank; ``op`` default SUM), as a new tensor
    on ``tensor``'s own device and dtype; ``tensor`` itself alone when no process group exists.

    Any shape; no gradient flows (for differentiable sums see
    :class:`raydpo.train.sequence_parallel.SumOverGroup`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tensor.detach().clone()
    work = tensor.detach().to(collective_device(group), copy=True)
    dist.all_reduce(work, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return work.to(tensor.device)
