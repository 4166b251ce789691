"""Run a function on several real processes joined in a gloo process group (CPU)."""

import os
import socket
import sys
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, backend, fn, args):
    if backend == "nccl":
        import torch

        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The work passed. Skip the interpreter's teardown, where gloo's (and DeepSpeed's) threads
    # sometimes abort a finished process ("terminate called without an active exception"),
    # which would fail a test whose every check passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(world: int, fn, *args, backend: str = "gloo") -> None:
    """``fn(rank, world, *args)`` on ``world`` spawned processes; any rank's exception fails.
    With ``backend="nccl"`` rank r uses GPU r."""
    fd, init_file = tempfile.mkstemp(prefix="cce_dist_pg_")
    os.close(fd)
    os.unlink(init_file)
    try:
        mp.spawn(_entry, args=(world, init_file, backend, fn, args), nprocs=world, join=True)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
