"""Gradient buckets: flat, preallocated gradient storage and its non-blocking Allreduce."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from hpcdl import trace
from hpcdl.comm import World, mpi

WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Bucket:
    """Gradients of a few parameters in one flat buffer; each parameter's .grad is a view into it."""

    params: list[nn.Parameter]
    flat: torch.Tensor
    wire: torch.Tensor | None = None  # compressed copy that travels, when compression is on
    gathered: torch.Tensor | None = None  # bf16: every rank's wire copy (MPI cannot sum bf16)
    ready: int = 0
    request: object = None
    started: float = 0.0  # when its Allreduce began (recorded only while tracing)


def group_parameters(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Parameters in reverse registration order (the order backward produces their gradients),
    cut into groups of at most `bucket_bytes` (a larger parameter gets a group of its own)."""
    groups: list[list[nn.Parameter]] = [[]]
    size = 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if groups[-1] and size + nbytes > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += nbytes
    return groups


class GradBuckets:
    """All of a model's gradients as buckets, each summed over ranks by one Iallreduce."""

    def __init__(self, world: World, params: list[nn.Parameter], bucket_bytes: int, compression: str = "none"):
        self.world = world
        self.wire_dtype = WIRE_DTYPES[compression]
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[nn.Parameter, Bucket] = {}
        for group in group_parameters(params, bucket_bytes):
            numel = sum(p.numel() for p in group)
            bucket = Bucket(group, torch.zeros(numel, dtype=group[0].dtype))
            if self.wire_dtype is not None:
                bucket.wire = torch.zeros(numel, dtype=self.wire_dtype)
            if self.wire_dtype is torch.bfloat16:
                bucket.gathered = torch.zeros(world.size, numel, dtype=torch.bfloat16)
            offset = 0
            for p in group:
                p.grad = bucket.flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                self.bucket_of[p] = bucket
            self.buckets.append(bucket)
        self.bytes_per_sync = sum(
            b.flat.numel() * (b.wire if b.wire is not None else b.flat).element_size() for b in self.buckets
        )

    def mark_ready(self, param: nn.Parameter) -> Bucket | None:
        """Count a parameter's gradient as final; returns its bucket when the bucket is complete."""
        bucket = self.bucket_of[param]
        bucket.ready += 1
        if bucket.ready < len(bucket.params):
            return None
        bucket.ready = 0
        return bucket

    def start(self, bucket: Bucket) -> None:
        """Begin summing one bucket over ranks without waiting for it."""
        MPI = mpi()
        comm = self.world.comm
        if trace.ACTIVE is not None:
            bucket.started = time.perf_counter()
        if bucket.wire is None:
            bucket.request = comm.Iallreduce(MPI.IN_PLACE, [bucket.flat.numpy(), MPI.FLOAT], op=MPI.SUM)
            return
        bucket.wire.copy_(bucket.flat)
        if self.wire_dtype is torch.float16:
            bucket.request = comm.Iallreduce(MPI.IN_PLACE, [bucket.wire.numpy(), MPI.FLOAT16_T], op=MPI.SUM)
        else:
            bits = bucket.wire.view(torch.int16).numpy()
            bucket.request = comm.Iallgather(
                [bits, MPI.INT16_T], [bucket.gathered.view(torch.int16).numpy(), MPI.INT16_T]
            )

    def progress(self) -> None:
        """Let MPI move pending reductions forward (MPI progresses only inside MPI calls)."""
        pending = [b.request for b in self.buckets if b.request is not None]
        if pending:
            mpi().Request.Testall(pending)

    def start_all_idle(self) -> None:
        """Start every bucket not started yet (overlap off, or hooks that did not fire)."""
        for bucket in self.buckets:
            if bucket.request is None:
                self.start(bucket)

    def wait(self) -> None:
        """Wait for every bucket's sum; afterwards each .grad holds the sum over ranks."""
        mpi().Request.Waitall([b.request for b in self.buckets])
        if trace.ACTIVE is not None:  # one timeline event per bucket: its start to the wait's end
            done = time.perf_counter()
            for k, b in enumerate(self.buckets):
                trace.ACTIVE.record(f"allreduce bucket {k}", b.started, done - b.started, trace.BUCKET_TID + k)
        for bucket in self.buckets:
            bucket.request, bucket.ready = None, 0
            if bucket.gathered is not None:
                torch.sum(bucket.gathered, dim=0, dtype=torch.float32, out=bucket.flat)
            elif bucket.wire is not None:
                bucket.flat.copy_(bucket.wire)

    def zero(self) -> None:
        """Zero all gradients in place (the views stay attached to their buckets)."""
        for bucket in self.buckets:
            bucket.flat.zero_()
            bucket.ready = 0
