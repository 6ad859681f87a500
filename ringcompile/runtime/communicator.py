"""How ranks exchange blocks: one interface, a torch.distributed implementation.

Strategies only talk to a ``Communicator``; ``RingCommunicator`` runs over a process group
(gloo on CPU, NCCL on CUDA) and ``simulated.SimulatedCommunicator`` runs N virtual ranks in
one process, so the same schedule and merge code is tested both ways.

Every operation is started asynchronously and returns a ``Pending``; its ``wait()`` waits
through ``group.wait_work`` (an explicit timeout on gloo; on NCCL the process group's timeout
and watchdog, so the host never blocks on the GPU) and turns any failure into a
``CommunicationError`` naming the rank and step.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ringcompile.errors import CommunicationError
from ringcompile.log import get_logger

from .group import ResolvedGroup, wait_work

log = get_logger(__name__)
Tensor = torch.Tensor


class Pending:
    """A started exchange; ``wait()`` returns its result tensors (once computed, cached)."""

    def __init__(self, finish: Callable[[], list[Tensor]]) -> None:
        self._finish = finish
        self._result: list[Tensor] | None = None

    def wait(self) -> list[Tensor]:
        if self._result is None:
            self._result = self._finish()
        return self._result


class Communicator(abc.ABC):
    """The exchanges a strategy needs. ``step`` and ``what`` only label errors."""

    rank: int
    world_size: int
    timeout: float

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world_size

    @abc.abstractmethod
    def ring_shift(self, tensors: Sequence[Tensor], step: int, channel: int = 0,
                   what: str = "K/V") -> Pending:
        """Send ``tensors`` to rank+1 and receive same-shaped tensors from rank-1."""

    @abc.abstractmethod
    def all_gather(self, tensor: Tensor, step: int = 0, what: str = "all_gather") -> Pending:
        """Every rank's ``tensor`` (same shape everywhere), in rank order."""

    @abc.abstractmethod
    def all_reduce(self, tensor: Tensor, step: int = 0, what: str = "all_reduce") -> Pending:
        """The sum over ranks (a new tensor; the argument is not modified)."""

    @abc.abstractmethod
    def all_to_all(self, chunks: Sequence[Tensor], step: int = 0, what: str = "all_to_all") -> Pending:
        """``chunks[j]`` goes to rank j; returns the chunk every rank sent here, in rank order.

        All chunks must have the same shape and dtype on every rank.
        """

    def error(self, step: int, what: str, cause: BaseException | str) -> CommunicationError:
        return CommunicationError(
            f"rank {self.rank} of {self.world_size}: {what} at ring step {step} failed or did not finish "
            f"within the {self.timeout:g} s timeout ({cause}). Another rank probably died, hung or ran a "
            f"different schedule; check its log, or raise the 'timeout' option if the step is just slow."
        )


class RingCommunicator(Communicator):
    """Point-to-point ring and collectives over a ``torch.distributed`` process group.

    P2P order follows rank parity (even ranks post sends first, odd ranks receives first, as
    TransformerEngine does), so the exchange cannot deadlock for any N, including 2 where
    the next and previous rank are the same peer.
    """

    def __init__(self, group: ResolvedGroup, timeout: float = 300.0,
                 device: torch.device | None = None) -> None:
        self.resolved = group
        self.device = device  # where small collective tensors live (CUDA for NCCL)
        self.group = group.group
        self.rank = group.rank
        self.world_size = group.world_size
        self.timeout = float(timeout)
        self._next = group.global_rank(self.next_rank)
        self._prev = group.global_rank(self.prev_rank)

    def _finish(self, works: list, step: int, what: str, result: Callable[[], list[Tensor]]) -> Pending:
        def finish() -> list[Tensor]:
            for w in works:
                try:
                    ok = wait_work(w, self.group, self.timeout)
                except Exception as e:  # gloo raises on timeout or a closed peer connection
                    raise self.error(step, what, e) from e
                if ok is False:
                    raise self.error(step, what, "wait returned False")
            return result()
        return Pending(finish)

    def _start(self, step: int, what: str, start: Callable[[], list]) -> list:
        try:
            return start()
        except Exception as e:
            raise self.error(step, what, e) from e

    def ring_shift(self, tensors: Sequence[Tensor], step: int, channel: int = 0,
                   what: str = "K/V") -> Pending:
        sends = [t.contiguous() for t in tensors]
        recvs = [torch.empty_like(t) for t in sends]
        send_ops = [dist.P2POp(dist.isend, t, self._next, self.group, tag=channel) for t in sends]
        recv_ops = [dist.P2POp(dist.irecv, t, self._prev, self.group, tag=channel) for t in recvs]
        ops = send_ops + recv_ops if self.rank % 2 == 0 else recv_ops + send_ops
        works = self._start(step, f"{what} ring transfer", lambda: dist.batch_isend_irecv(ops))
        return self._finish(works, step, f"{what} ring transfer", lambda: recvs)

    def all_gather(self, tensor: Tensor, step: int = 0, what: str = "all_gather") -> Pending:
        tensor = tensor.contiguous()
        outs = [torch.empty_like(tensor) for _ in range(self.world_size)]
        work = self._start(step, what, lambda: dist.all_gather(outs, tensor, group=self.group, async_op=True))
        return self._finish([work], step, what, lambda: outs)

    def all_reduce(self, tensor: Tensor, step: int = 0, what: str = "all_reduce") -> Pending:
        out = tensor.detach().clone().contiguous()
        work = self._start(step, what, lambda: dist.all_reduce(out, group=self.group, async_op=True))
        return self._finish([work], step, what, lambda: [out])

    def all_to_all(self, chunks: Sequence[Tensor], step: int = 0, what: str = "all_to_all") -> Pending:
        send = torch.stack([c.contiguous() for c in chunks])
        recv = torch.empty_like(send)
        work = self._start(step, what, lambda: dist.all_to_all_single(recv, send, group=self.group,
                                                                      async_op=True))
        return self._finish([work], step, what, lambda: list(recv.unbind(0)))


class MailboxCollectives(Communicator):
    """The collectives of a communicator built on point-to-point mailboxes (``_send`` / ``_recv``):
    shared by the virtual ranks of ``runtime.simulated`` and the per-level views of ``runtime.two_level``."""

    def _send(self, dst: int, channel: Any, tensors: Sequence[Tensor]) -> None:
        raise NotImplementedError

    def _recv(self, src: int, channel: Any, step: int, what: str) -> list[Tensor]:
        raise NotImplementedError

    def ring_shift(self, tensors: Sequence[Tensor], step: int, channel: int = 0,
                   what: str = "K/V") -> Pending:
        self._send(self.next_rank, ("ring", channel), tensors)
        return Pending(lambda: self._recv(self.prev_rank, ("ring", channel), step, f"{what} ring transfer"))

    def _exchange(self, kind: str, per_dst: Sequence[Tensor], step: int, what: str) -> Pending:
        for dst in range(self.world_size):
            self._send(dst, kind, [per_dst[dst]])
        return Pending(lambda: [self._recv(src, kind, step, what)[0] for src in range(self.world_size)])

    def all_gather(self, tensor: Tensor, step: int = 0, what: str = "all_gather") -> Pending:
        return self._exchange("all_gather", [tensor] * self.world_size, step, what)

    def all_reduce(self, tensor: Tensor, step: int = 0, what: str = "all_reduce") -> Pending:
        gathered = self._exchange("all_reduce", [tensor] * self.world_size, step, what)

        def total() -> list[Tensor]:
            parts = gathered.wait()
            out = parts[0].clone()
            for p in parts[1:]:
                out += p
            return [out]
        return Pending(total)

    def all_to_all(self, chunks: Sequence[Tensor], step: int = 0, what: str = "all_to_all") -> Pending:
        return self._exchange("all_to_all", list(chunks), step, what)
