"""Starting hosts: N local processes (gloo on CPU, NCCL one GPU each), or the world torchrun gives.

``run_local(fn, hosts, ...)`` spawns ``hosts`` processes (spawn start method: no inherited
locks, no deadlock), binds the rendezvous to 127.0.0.1 unless told otherwise, runs
``fn(rank, world, *args)`` in each after ``init_process_group`` and returns every rank's result.
A rank that raises, dies or stops answering makes every process exit and ``run_local`` raise
:class:`HostFailure` naming the rank and the cause, within ``timeout`` seconds.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_local", "HostFailure", "init_from_env", "free_port"]


class HostFailure(RuntimeError):
    """A host failed; ``rank`` and ``cause`` say which and why."""

    def __init__(self, rank, cause):
        super().__init__(f"host {rank} failed: {cause}")
        self.rank = rank
        self.cause = cause


def free_port(addr="127.0.0.1"):
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _backend_for(world):
    if torch.cuda.is_available() and torch.cuda.device_count() >= world:
        return "nccl"
    return "gloo"


def init_from_env(timeout=120.0, backend=None):
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the env)."""
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    backend = backend or _backend_for(world)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    return rank, world


def _worker(rank, world, addr, port, backend, timeout, fn, args, results):
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout))
        out = fn(rank, world, *args)
        # plain pickle bytes: tensors travel by value, not as shared memory that dies with us
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"))
        os._exit(1)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def run_local(fn, hosts, args=(), *, timeout=120.0, backend=None, addr="127.0.0.1"):
    """Run ``fn(rank, world, *args)`` on ``hosts`` local processes; returns results by rank.

    ``fn`` must be importable (a module-level function) and its result picklable.
    """
    if isinstance(hosts, bool) or not isinstance(hosts, int) or hosts < 1:
        raise ValueError(f"hosts must be a positive int, got {hosts!r}")
    backend = backend or _backend_for(hosts)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port(addr)
    procs = [ctx.Process(target=_worker, args=(r, hosts, addr, port, backend, timeout, fn, args, results),
                         daemon=True) for r in range(hosts)]
    for p in procs:
        p.start()
    done, failure = {}, None
    deadline = time.monotonic() + timeout + 30.0  # start-up allowance on top of the op timeout
    try:
        while len(done) < hosts and failure is None:
            try:
                rank, status, payload = results.get(timeout=0.5)
                if status == "ok":
                    done[rank] = pickle.loads(payload)
                else:
                    failure = HostFailure(rank, payload)
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in done and p.exitcode is not None and p.exitcode != 0:
                    # give its own report a moment to arrive first
                    try:
                        rank, status, payload = results.get(timeout=1.0)
                        if status != "ok":
                            failure = HostFailure(rank, payload)
                            break
                        done[rank] = pickle.loads(payload)
                    except queue.Empty:
                        failure = HostFailure(r, f"process exited with code {p.exitcode}")
                        break
            if failure is None and time.monotonic() > deadline:
                missing = [r for r in range(hosts) if r not in done]
                failure = HostFailure(missing[0], f"no answer within {timeout + 30.0:.0f} s "
                                      f"(ranks {missing} still running)")
    finally:
        for p in procs:
            if p.is_alive() and (failure is not None):
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if failure is not None:
        raise failure
    return [done[r] for r in range(hosts)]
