"""Communication between hosts: a thin layer over ``torch.distributed`` with one-host fallback.

Every collective runs under the process group's timeout, so a host that dies or stops
answering makes the others raise instead of hang. gloo moves CPU tensors; NCCL moves CUDA ones.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Comm"]


class Comm:
    """Rank, world size and the collectives the engine needs."""

    def __init__(self, group=None):
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(group)
            self.world = dist.get_world_size(group)
            self.backend = dist.get_backend(group)
        else:
            self.rank, self.world, self.backend = 0, 1, None

    @property
    def distributed(self):
        return self.world > 1

    def _wire(self, t):
        # gloo has no bf16/fp16 reductions everywhere; moving fp32 keeps partials exact
        if self.backend == "gloo" and t.dtype in (torch.bfloat16, torch.float16):
            return t.float()
        return t

    def all_gather_stacked(self, t):
        """``[world, *t.shape]``: every rank's tensor in rank order, by one collective."""
        if not self.distributed:
            return t[None]
        w = self._wire(t.contiguous())
        if self.backend == "nccl":
            out = w.new_empty((self.world,) + tuple(w.shape))
            dist.all_gather_into_tensor(out, w, group=self.group)
        else:
            bufs = [torch.empty_like(w) for _ in range(self.world)]
            dist.all_gather(bufs, w, group=self.group)
            out = torch.stack(bufs)
        return out.to(t.dtype)

    def broadcast(self, t, src):
        """``t`` from rank ``src`` on every rank (in place, returned)."""
        if not self.distributed:
            return t
        w = self._wire(t.contiguous())
        dist.broadcast(w, src, group=self.group)
        if w is not t:
            t.copy_(w.to(t.dtype))
        return t

    def ring_exchange(self, send, recv_like):
        """Send ``send`` to rank+1 and receive a tensor shaped like ``recv_like`` from rank-1."""
        if not self.distributed:
            return send
        s = self._wire(send.contiguous())
        r = torch.empty_like(self._wire(recv_like))
        nxt, prv = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        ops = [dist.P2POp(dist.isend, s, nxt, group=self.group),
               dist.P2POp(dist.irecv, r, prv, group=self.group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return r.to(recv_like.dtype)

    def barrier(self):
        if self.distributed:
            dist.barrier(group=self.group)
