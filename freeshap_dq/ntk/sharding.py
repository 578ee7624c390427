"""torch.distributed set-up for a sharded eNTK (``freeshap-dq kernel --distributed`` under torchrun).

Each rank computes the per-example gradients and partial Gram of every world-th parameter chunk;
``compute_ntk`` all-reduces the n x (n + m) partial Grams, so the traffic does not grow with the model.
gloo on CPU, NCCL on GPUs (rank r uses cuda:LOCAL_RANK).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch

from freeshap_dq.errors import InputError
from freeshap_dq.ntk.builder import NTKConfig

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def distributed_kernel(config: NTKConfig) -> Iterator[tuple[tuple[int, int], NTKConfig]]:
    """Initialise the process group from torchrun's environment; yield ((rank, world), config for this rank)."""
    import torch.distributed as dist

    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise InputError(f"--distributed runs under torchrun ({', '.join(missing)} not set): "
                         f"torchrun --nproc_per_node N -m freeshap_dq.cli kernel ... --distributed")
    rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if wants_cuda:
        config = dataclasses.replace(config, device=f"cuda:{local}")
        torch.cuda.set_device(local)
    else:
        config = dataclasses.replace(config, device="cpu")
    dist.init_process_group("nccl" if wants_cuda else "gloo")
    try:
        yield (rank, world), config
        dist.barrier()
    finally:
        dist.destroy_process_group()
