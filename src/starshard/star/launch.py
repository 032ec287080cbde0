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
        # put() hands the message to a feeder thread: flush it before _exit, or it is lost
        results.close()
        results.join_thread()
        os._exit(1)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


# errors a rank gets because of another rank: a collective timing out, a peer's socket closing
_SYMPTOM_WORDS = ("timed out", "timeout", "deadline exceeded", "connection closed", "connection reset",
                  "broken pipe", "read error", "closed by peer", "socket closed")


def _first_line(payload):
    text = str(payload).strip()
    return text.splitlines()[0] if text else ""


def _is_symptom(payload):
    first = _first_line(payload).lower()
    return any(w in first for w in _SYMPTOM_WORDS)


def _how_it_ended(exitcode):
    return f"killed by signal {-exitcode}" if exitcode < 0 else f"exited with code {exitcode}"


def _blame(rank, payload, procs, done, results, grace=3.0):
    """The failure to report, given ``rank``'s error ``payload``.

    A rank whose collective timed out or whose peer hung up is a symptom, not the cause: after
    such an error the other ranks get ``grace`` seconds to report too, and then the culprit is
    named: first a rank that raised an error of its own, then a rank that died without a result,
    then a rank still running without a word (it stopped answering).
    """
    if not _is_symptom(payload):
        return HostFailure(rank, payload)
    reports = {rank: payload}
    end = time.monotonic() + grace
    while time.monotonic() < end:
        accounted = all(r in reports or r in done or p.exitcode is not None for r, p in enumerate(procs))
        if accounted:
            break
        try:
            r, status, pl = results.get(timeout=0.2)
            if status == "ok":
                done.setdefault(r, None)
            else:
                reports[r] = pl
        except queue.Empty:
            pass
    for r, pl in reports.items():
        if not _is_symptom(pl):
            return HostFailure(r, pl)
    seen = f"host {rank}: {_first_line(payload)}"
    for r, p in enumerate(procs):
        if r not in reports and r not in done and p.exitcode is not None:
            return HostFailure(r, f"process {_how_it_ended(p.exitcode)} without a result ({seen})")
    silent = [r for r, p in enumerate(procs) if r not in reports and r not in done and p.is_alive()]
    if silent:
        return HostFailure(silent[0], f"stopped answering: the others timed out or lost it ({seen}); "
                           f"still silent: ranks {silent}")
    return HostFailure(rank, payload)


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
                    failure = _blame(rank, payload, procs, done, results)
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in done and p.exitcode is not None:
                    # it ended without a result we have read: give its report a moment to arrive
                    # (a rank that succeeded exits 0 right after putting its result)
                    try:
                        rank, status, payload = results.get(timeout=1.0)
                        if status != "ok":
                            failure = _blame(rank, payload, procs, done, results)
                            break
                        done[rank] = pickle.loads(payload)
                    except queue.Empty:
                        failure = HostFailure(r, f"process {_how_it_ended(p.exitcode)} without a result")
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
