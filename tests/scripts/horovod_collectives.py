"""Every collective of hpcdl.horovod against numpy, at any number of ranks; prints 'OK n checks'.

Each rank's input is a function of its rank, so every rank can compute what every
other rank sent and so the expected result, in numpy, without communicating.
"""

import time

import numpy as np
import torch
from torch import nn

import hpcdl.horovod as hvd
from hpcdl.errors import HpcdlError

hvd.init()
R, N = hvd.rank(), hvd.size()
checks = 0


def data(r: int, shape=(3, 4), dtype=np.float32) -> np.ndarray:
    """Rank r's input: small integers (exactly representable, so sums are exact)."""
    return np.random.default_rng(r).integers(-8, 9, size=shape).astype(dtype)


def same(actual, expected, what: str, atol: float = 0.0, rtol: float = 0.0) -> None:
    global checks
    actual = actual.numpy() if torch.is_tensor(actual) else np.asarray(actual)
    assert actual.shape == np.shape(expected), f"{what}: shape {actual.shape} != {np.shape(expected)}"
    assert np.allclose(actual, expected, atol=atol, rtol=rtol), f"{what} on rank {R}: {actual} != {expected}"
    checks += 1


everyone = [data(r) for r in range(N)]
total = np.sum(everyone, axis=0)
mine = torch.from_numpy(data(R))

# The world.
assert hvd.is_initialized() and 0 <= hvd.local_rank() < hvd.local_size() and hvd.cross_rank() < hvd.cross_size()
assert isinstance(hvd.mpi_threads_supported(), bool) and hvd.mpi_enabled() and not hvd.nccl_built()

# allreduce: average (default), sum, min, max, the deprecated average=, scaling, input untouched.
before = mine.clone()
same(hvd.allreduce(mine), total / N, "allreduce average", 1e-6)
same(hvd.allreduce(mine, op=hvd.Sum), total, "allreduce sum")
same(hvd.allreduce(mine, average=False), total, "allreduce average=False")
same(hvd.allreduce(mine, op=hvd.Min), np.min(everyone, axis=0), "allreduce min")
same(hvd.allreduce(mine, op=hvd.Max), np.max(everyone, axis=0), "allreduce max")
same(hvd.allreduce(mine, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5), total, "allreduce scaled")
same(mine, before, "allreduce leaves its input")
same(hvd.allreduce(mine.double()), total.astype(np.float64) / N, "allreduce float64", 1e-12)
ints = torch.from_numpy(data(R, dtype=np.int64))
same(hvd.allreduce(ints, op=hvd.Sum), np.sum([data(r, dtype=np.int64) for r in range(N)], axis=0), "allreduce int64")
same(hvd.allreduce(mine, compression=hvd.Compression.fp16), total / N, "allreduce fp16", 1e-2)
same(hvd.allreduce(mine.to(torch.bfloat16)).float(), total / N, "allreduce bf16", 0.1)
same(hvd.allreduce(torch.tensor(float(R))), np.mean(np.arange(N)), "allreduce scalar (metric averaging)", 1e-6)

# In place and asynchronous forms.
inplace = mine.clone()
assert hvd.allreduce_(inplace, op=hvd.Sum) is inplace
same(inplace, total, "allreduce_")
handles = [hvd.allreduce_async(mine, op=hvd.Sum), hvd.allreduce_async_(mine.clone(), op=hvd.Max)]
same(hvd.synchronize(handles[0]), total, "allreduce_async")
same(hvd.synchronize(handles[1]), np.max(everyone, axis=0), "allreduce_async_")
assert hvd.poll(handles[0])
grouped = hvd.grouped_allreduce([mine, 2 * mine], op=hvd.Sum)
same(grouped[1], 2 * total, "grouped_allreduce")
column = torch.from_numpy(data(R, (4, 3))).t()  # not contiguous
same(hvd.allreduce(column, op=hvd.Sum), np.sum([data(r, (4, 3)).T for r in range(N)], axis=0), "allreduce strided")

# allgather: uneven first dims (rank r has r+1 rows), in rank order.
rows = [data(r, (r + 1, 2)) for r in range(N)]
same(hvd.allgather(torch.from_numpy(rows[R])), np.concatenate(rows), "allgather uneven")
same(hvd.synchronize(hvd.allgather_async(torch.from_numpy(rows[R]))), np.concatenate(rows), "allgather_async")
same(hvd.allgather(torch.tensor([R])), np.arange(N), "allgather 1-d")
assert hvd.allgather_object({"rank": R}) == [{"rank": r} for r in range(N)]

# broadcast from the last rank: a new tensor, in place, asynchronous, objects.
root = N - 1
same(hvd.broadcast(mine, root), everyone[root], "broadcast")
same(mine, before, "broadcast leaves its input")
inplace = mine.clone()
hvd.broadcast_(inplace, root)
same(inplace, everyone[root], "broadcast_")
inplace = mine.clone()
same(hvd.synchronize(hvd.broadcast_async_(inplace, root)), everyone[root], "broadcast_async_")
same(hvd.synchronize(hvd.broadcast_async(mine, root)), everyone[root], "broadcast_async")
assert hvd.broadcast_object({"from": R}, root_rank=root) == {"from": root}

# alltoall: rank r sends (r + d) % 3 rows to rank d (some empty); equal parts without splits.
send = [[(r + d) % 3 for d in range(N)] for r in range(N)]
blocks = {r: np.split(data(r, (sum(send[r]), 2)), np.cumsum(send[r])[:-1]) for r in range(N)}
out, received = hvd.alltoall(torch.from_numpy(data(R, (sum(send[R]), 2))), splits=torch.tensor(send[R]))
same(out, np.concatenate([blocks[r][R] for r in range(N)]), "alltoall splits")
same(received, [send[r][R] for r in range(N)], "alltoall received splits")
even = [data(r, (2 * N, 3)) for r in range(N)]
same(hvd.alltoall(torch.from_numpy(even[R])), np.concatenate([e[2 * R : 2 * R + 2] for e in even]), "alltoall")

# broadcast_parameters (state_dict and named_parameters) and broadcast_optimizer_state.
torch.manual_seed(R)
model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
torch.manual_seed(root)
expected = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).state_dict()
hvd.broadcast_parameters(model.state_dict(), root_rank=root)
for name, tensor in model.state_dict().items():
    same(tensor, expected[name].numpy(), f"broadcast_parameters {name}")
torch.manual_seed(R)
model2 = nn.Linear(4, 3)
hvd.broadcast_parameters(model2.named_parameters(), root_rank=0)
torch.manual_seed(0)
same(model2.weight.detach(), nn.Linear(4, 3).weight.detach().numpy(), "broadcast_parameters named")
opt = torch.optim.SGD(model.parameters(), lr=0.1 * (R + 1), momentum=0.9)
model(torch.ones(5, 4)).sum().backward()
opt.step()
hvd.broadcast_optimizer_state(opt, root_rank=0)
assert opt.param_groups[0]["lr"] == 0.1, "broadcast_optimizer_state: lr"
momentum = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
for buffer in momentum:
    same(hvd.allreduce(buffer, op=hvd.Max) - hvd.allreduce(buffer, op=hvd.Min), np.zeros(buffer.shape), "opt state")


# DistributedOptimizer: the gradient step() uses is the average (or sum) of every rank's gradient,
# for models of any floating dtype ("mixed": a float64 layer feeding a float32 one).
class Mixed(nn.Module):
    """A float64 layer feeding a float32 one: one model, buckets of two dtypes."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(5, 4).double(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x.double())).float())


def make_net(dtype) -> nn.Module:
    return Mixed() if dtype == "mixed" else nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def rank_batch(r: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.float32 if dtype == "mixed" else dtype
    return torch.from_numpy(data(100 + r, (6, 5))).to(dtype), torch.from_numpy(data(200 + r, (6, 2))).to(dtype)


def local_grads(net: nn.Module, r: int, passes: int, dtype) -> list[np.ndarray]:
    """Rank r's gradient, computed here without communication."""
    net.zero_grad()
    for _ in range(passes):
        x, y = rank_batch(r, dtype)
        ((net(x) - y) ** 2).mean().backward()
    return [p.grad.double().numpy().copy() for p in net.parameters()]


for op, compression, passes, dtype, tol in (
    (hvd.Average, hvd.Compression.none, 1, torch.float32, 1e-6),
    (hvd.Sum, hvd.Compression.none, 1, torch.float32, 1e-5),
    (hvd.Average, hvd.Compression.none, 2, torch.float32, 1e-6),
    (hvd.Average, hvd.Compression.fp16, 1, torch.float32, 2e-2),
    (hvd.Average, hvd.Compression.none, 1, torch.float64, 1e-12),
    (hvd.Average, hvd.Compression.none, 1, torch.float16, 1e-2),
    (hvd.Average, hvd.Compression.none, 1, torch.bfloat16, 3e-2),
    (hvd.Average, hvd.Compression.fp16, 1, torch.bfloat16, 3e-2),
    (hvd.Sum, hvd.Compression.none, 2, "mixed", 1e-5),
):
    case = f"DistributedOptimizer {op} {compression.__name__} passes={passes} {dtype}"
    torch.manual_seed(0)
    net, plain = make_net(dtype), make_net(dtype)
    plain.load_state_dict(net.state_dict())
    per_rank = [local_grads(plain, r, passes, dtype) for r in range(N)]
    want = [np.sum(g, axis=0) / (N if op == hvd.Average else 1) for g in zip(*per_rank)]
    base = torch.optim.SGD(net.parameters(), lr=0.5)
    dist = hvd.DistributedOptimizer(
        base, named_parameters=net.named_parameters(), op=op, compression=compression, backward_passes_per_step=passes
    )
    assert isinstance(dist, torch.optim.SGD)
    for step in range(2):  # the second step checks zero_grad(set_to_none) and the counters' reset
        dist.zero_grad()
        net.zero_grad(set_to_none=True)
        for _ in range(passes):
            x, y = rank_batch(R, dtype)
            ((net(x) - y) ** 2).mean().backward()
        dist.synchronize()
        for p, g in zip(net.parameters(), want):
            assert p.grad.dtype == p.dtype, f"{case}: gradient dtype {p.grad.dtype} != {p.dtype}"
            same(p.grad.double(), g, f"{case} step {step}", tol, tol)
        with dist.skip_synchronize():
            before_step = [p.detach().to(torch.float64, copy=True) for p in net.parameters()]
            dist.step()
        for p, p0, g in zip(net.parameters(), before_step, want):
            same(p.detach().double(), p0.numpy() - 0.5 * g, f"{case} step() {step}", 10 * tol, 10 * tol)
        plain.load_state_dict(net.state_dict())
        per_rank = [local_grads(plain, r, passes, dtype) for r in range(N)]
        want = [np.sum(g, axis=0) / (N if op == hvd.Average else 1) for g in zip(*per_rank)]


# Sparse gradients (nn.Embedding(sparse=True)): refused by default; with sparse_as_dense=True
# reduced densely in their bucket, so .grad is the dense average.
def lookups(r: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(300 + r).integers(0, 10, size=(2, 4)))


def dense_embedding_grad(embedding: nn.Embedding, r: int) -> np.ndarray:
    """Rank r's gradient of the same embedding made dense, computed here without communication."""
    dense = nn.Embedding(10, 3)
    dense.load_state_dict(embedding.state_dict())
    dense(lookups(r)).pow(2).sum().backward()
    return dense.weight.grad.numpy()


refused = nn.Embedding(10, 3, sparse=True)
hvd.DistributedOptimizer(torch.optim.SGD(refused.parameters(), lr=0.1))
try:
    refused(lookups(R)).pow(2).sum().backward()
    raise AssertionError("a sparse gradient without sparse_as_dense=True was not refused")
except HpcdlError as error:
    assert "sparse gradient" in str(error) and "sparse_as_dense=True" in str(error), error
checks += 1

torch.manual_seed(0)
embedding = nn.Embedding(10, 3, sparse=True)
want = np.mean([dense_embedding_grad(embedding, r) for r in range(N)], axis=0)
dense_opt = hvd.DistributedOptimizer(torch.optim.SGD(embedding.parameters(), lr=0.1), sparse_as_dense=True)
for step in range(2):  # the second after zero_grad(set_to_none=True): autograd then makes a new gradient
    dense_opt.zero_grad()
    if step:
        embedding.zero_grad(set_to_none=True)
    embedding(lookups(R)).pow(2).sum().backward()
    dense_opt.synchronize()
    assert not embedding.weight.grad.is_sparse
    same(embedding.weight.grad, want, f"sparse_as_dense=True step {step}", 1e-6)

# join: the rank that arrives last is reported everywhere.
time.sleep(0.4 * R)
last = hvd.join()
assert last == N - 1, f"join returned {last}, expected {N - 1}"
checks += 1

hvd.shutdown()
assert not hvd.is_initialized()
if R == 0:
    print(f"OK {checks} checks on {N} ranks", flush=True)
