"""Multi-process tests on 127.0.0.1: a free port, and a group of processes that fails the test on an error or
a hang (every process killed past the deadline)."""
import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(entry, args, nprocs: int, timeout_s: float, what: str, start_method: str = "fork") -> None:
    """``entry(rank, *args)`` in ``nprocs`` processes. fork by default: the children inherit the imported torch
    and fastkd (spawn re-imports them: ~10 s a process here); CUDA cannot be used after a fork (spawn)."""
    ctx = mp.start_processes(entry, args=args, nprocs=nprocs, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{what} did not finish in {timeout_s} s (hang?)")
