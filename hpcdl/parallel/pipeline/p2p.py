"""Pipeline point-to-point traffic: non-blocking Isend/Irecv into receive buffers allocated once.

Between two neighbouring stages, activations go forward (tag ACTIVATION) and their
gradients go backward (tag GRADIENT), one message per micro-batch, always in
micro-batch order, so MPI's in-order matching pairs them without sending ids. The
shape and dtype of one sample's activation are agreed once, on the first step; after
that a message carries only the tensor's bytes, and its row count is known on both
sides because every stage of a replica reads the same batch. On a GPU without CUDA-aware MPI the
receive buffers are pinned host memory, copied to the device when taken, and a send goes from a
host copy (`hpcdl.comm.Transport`).
"""

from __future__ import annotations

from collections import deque

import torch

from hpcdl.comm import Request, World, transport, waitall
from hpcdl.device import CPU

ACTIVATION, GRADIENT = 0, 1


def send_meta(pipe: World, peer: int, sample: torch.Tensor) -> None:
    """Tell the next stage, once, the shape and dtype of one sample of our output."""
    pipe.send((tuple(sample.shape[1:]), str(sample.dtype).removeprefix("torch.")), dest=peer, tag=ACTIVATION)


def recv_meta(pipe: World, peer: int) -> tuple[tuple[int, ...], torch.dtype]:
    """The shape and dtype of one sample of the previous stage's output (the first step only)."""
    shape, dtype = pipe.recv(peer, tag=ACTIVATION)
    return tuple(shape), getattr(torch, dtype)


class RecvQueue:
    """Receives from one peer in order into `slots` preallocated buffers; a slot is reused once released."""

    def __init__(
        self, pipe: World, peer: int, tag: int, slots: int, sample_shape: tuple[int, ...], dtype: torch.dtype,
        device: torch.device = CPU,
    ):  # fmt: skip
        self.pipe, self.peer, self.tag = pipe, peer, tag
        self.sample_shape, self.dtype, self.device = sample_shape, dtype, device
        self.via = transport(device)
        self.buffers = [self._buffer(0) for _ in range(slots)]
        self.free = deque(range(slots))
        self.sizes: deque[int] = deque()  # rows of each message still to post, in arrival order
        self.posted: deque[tuple[int, int, Request]] = deque()  # (slot, rows, request)

    def expect(self, sizes: list[int]) -> None:
        """Messages of these row counts will arrive next, in this order; post what fits now."""
        self.sizes.extend(sizes)
        self.post()

    def post(self) -> None:
        """Start an Irecv for each expected message that has a free slot."""
        while self.sizes and self.free:
            slot, rows = self.free.popleft(), self.sizes.popleft()
            if self.buffers[slot].shape[0] < rows:  # grows only when a larger micro-batch appears
                self.buffers[slot] = self._buffer(rows)
            view = self.buffers[slot][:rows]
            request = self.pipe.irecv_buffer(view, self.peer, self.tag)
            self.posted.append((slot, rows, request))

    def _buffer(self, rows: int) -> torch.Tensor:
        """Where MPI writes a message of `rows` rows: on the device, or in pinned host memory when staged."""
        empty = torch.empty(rows, *self.sample_shape, dtype=self.dtype, device=self.device)
        return self.via.mirror(empty)

    def take(self) -> tuple[int, torch.Tensor]:
        """Wait for the oldest message; (its slot, the received rows on the device). Release the slot when done."""
        if not self.posted:
            self.post()
        slot, rows, request = self.posted.popleft()
        request.wait()
        received = self.buffers[slot][:rows]
        return slot, received.to(self.device) if self.via.staged else received

    def release(self, slot: int) -> None:
        """The tensor in `slot` is no longer needed: receive the next message into it."""
        self.free.append(slot)
        self.post()


class SendQueue:
    """Non-blocking sends to one peer; each tensor is kept alive until its send completes."""

    def __init__(self, pipe: World, peer: int, tag: int, device: torch.device = CPU):
        self.pipe, self.peer, self.tag = pipe, peer, tag
        self.via = transport(device)
        self.pending: list[tuple[torch.Tensor, Request]] = []

    def send(self, tensor: torch.Tensor) -> None:
        """Start sending `tensor` (contiguous) without waiting, once MPI can read it (a host copy when staged)."""
        tensor = tensor.detach().contiguous()
        memory = self.via.mirror(tensor)
        self.via.wait(self.via.to_host(tensor, memory))
        self.pending.append((memory, self.pipe.isend_buffer(memory, self.peer, self.tag)))

    def wait(self) -> None:
        """Wait for every pending send."""
        if self.pending:
            waitall(r for _, r in self.pending)
            self.pending.clear()
