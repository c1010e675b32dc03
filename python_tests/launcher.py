"""Runs a test function in several processes that share a gloo process group.

The processes are forked from a forkserver that has imported torch and titans_ext once per test
session, so a launch costs well under a second after the first (a spawned process pays the
imports every time, seconds each). Nothing can hang: the process group's collectives time out,
a process that raises ends the launch (the others are terminated), and the launch as a whole
has a deadline after which every process is killed.
"""

import datetime
import pickle
import time
from pathlib import Path

import torch.multiprocessing as mp

PRELOAD = ["torch", "titans_ext"]


def _run_rank(rank, fn, world_size, workdir, collective_timeout_s, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'store'}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout_s))
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    with open(workdir / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn, world_size, workdir, *args, timeout_s=300, collective_timeout_s=120):
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` processes (default group: gloo over
    all of them) and returns the list of their return values (picklable), in rank order.

    ``fn`` must be importable (a module-level function). ``workdir``: an empty directory for the
    rendezvous file and the results. A process that raises makes this raise with its traceback.
    """
    workdir = Path(workdir)
    mp.set_forkserver_preload(PRELOAD)
    context = mp.start_processes(_run_rank, args=(fn, world_size, workdir, collective_timeout_s, args),
                                 nprocs=world_size, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):  # raises ProcessRaisedException / ProcessExitedException
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed test: {world_size} processes still running after {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
    results = []
    for rank in range(world_size):
        with open(workdir / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results
