"""hpcdl.horovod: Horovod's PyTorch API on hpcdl's engine, against numpy and the single-process reference."""

import h5py
import pytest
import torch

import hpcdl.horovod as hvd
from hpcdl.errors import HpcdlError

from conftest import REPO, run_mpi
from reference import assert_close_states, plain_mlp, reference_train

SCRIPTS = REPO / "tests" / "scripts"


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_collectives_match_numpy(ranks):
    """Every collective, async form, DistributedOptimizer variant and join, checked against numpy on every rank."""
    result = run_mpi(ranks, str(SCRIPTS / "horovod_collectives.py"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"on {ranks} ranks" in result.stdout and "OK" in result.stdout, result.stdout


def test_horovod_style_script_matches_one_process(datasets, tmp_path):
    """A pytorch_mnist.py-style script, changed only in its import, trains like one process on the global batch."""
    out, per_worker, epochs, lr = tmp_path / "final.pt", 24, 2, 0.025
    result = run_mpi(
        2,
        str(SCRIPTS / "horovod_mnist.py"),
        "--data",
        str(datasets["synthetic"]),
        "--out",
        str(out),
        "--batch-size",
        str(per_worker),
        "--epochs",
        str(epochs),
        "--lr",
        str(lr),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Test set: Average loss" in result.stdout, result.stdout
    with h5py.File(datasets["synthetic"], "r") as f:
        train_size = len(f["train/y"])
    # The split gives every rank equal local batches here, so the global batch is 2 x 24 and lr scales by 2.
    assert train_size % 2 == 0 and (train_size % 48) % 2 == 0
    steps = epochs * -(-train_size // 48)
    expected = reference_train(datasets["synthetic"], plain_mlp([16, 8]), seed=0, batch=48, steps=steps, lr=2 * lr)
    assert_close_states(torch.load(out)["model"], expected)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["tests/scripts/horovod_mnist.py", "--data", "{data}", "--out", "{out}", "--use-adasum"], "op=hvd.Adasum"),
        (["-c", "import hpcdl.horovod as hvd; hvd.init(); hvd.SyncBatchNorm(8)"], "hvd.SyncBatchNorm"),
    ],
)
def test_unsupported_calls_end_every_rank_with_what_to_use(datasets, tmp_path, args, words):
    args = [a.format(data=datasets["synthetic"], out=tmp_path / "x.pt") for a in args]
    result = run_mpi(2, *args, timeout=300)
    assert result.returncode != 0, result.stdout
    assert words in result.stderr and "is not offered by hpcdl; use" in result.stderr, result.stderr
    assert not (tmp_path / "x.pt").exists()


def test_without_mpi_the_refusals_and_compression_behave():
    """What needs no MPI: refusals name the alternative, calls before init() say so, fp16 compression round-trips."""
    for name in hvd.NOT_OFFERED:
        with pytest.raises(HpcdlError, match=f"hvd.{name}.* is not offered by hpcdl; use .+ instead"):
            getattr(hvd, name)()
    with pytest.raises(HpcdlError, match="hvd.elastic.run"):
        _ = hvd.elastic.run
    with pytest.raises(HpcdlError, match="call hvd.init"):
        hvd.rank()
    with pytest.raises(AttributeError):
        _ = hvd.no_such_function
    # DistributedOptimizer options hpcdl would otherwise ignore are refused before any communication.
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    for option in ({"num_groups": 2}, {"groups": 2}):
        with pytest.raises(HpcdlError, match=f"{next(iter(option))}=.* is not offered.*HOROVOD_FUSION_THRESHOLD"):
            hvd.DistributedOptimizer(optimizer, **option)
    with pytest.raises(HpcdlError, match="gradient_predivide_factor applies to op=hvd.Average only"):
        hvd.DistributedOptimizer(optimizer, op=hvd.Sum, gradient_predivide_factor=2.0)
    tensor = torch.linspace(-2, 2, 7, dtype=torch.float64)
    wire, ctx = hvd.Compression.fp16.compress(tensor)
    assert wire.dtype == torch.float16
    restored = hvd.Compression.fp16.decompress(wire, ctx)
    assert restored.dtype == torch.float64 and torch.allclose(restored, tensor, atol=1e-3)
    assert hvd.Compression.none.compress(tensor)[0] is tensor


# Run by test_horovod_semantics_match_numpy on 1, 2 and 3 ranks: each rank's input is a function of its rank,
# so every rank computes the expected result in numpy without communicating; prints "OK" from rank 0.
SEMANTICS = r"""
import warnings

import numpy as np
import torch

import hpcdl.horovod as hvd

hvd.init()
R, N = hvd.rank(), hvd.size()


def data(r, rows=5):
    return np.random.default_rng(r).integers(-8, 9, size=(rows, 3)).astype(np.float64)


def close(actual, expected, what):
    actual = actual.detach().numpy() if torch.is_tensor(actual) else actual
    assert np.allclose(actual, expected), f"{what} on rank {R}: {actual} != {expected}"


everyone = [data(r) for r in range(N)]
total = np.sum(everyone, axis=0)
rows = [5 // N + (r < 5 % N) for r in range(N)]  # Horovod's split of dim 0: the first ranks get one more
mine = slice(sum(rows[:R]), sum(rows[: R + 1]))

# reducescatter: sum, average and scaling; the gradient is the allgather of the gradient (x size for Sum).
x = torch.tensor(data(R), requires_grad=True)
out = hvd.reducescatter(x, op=hvd.Sum)
close(out, total[mine], "reducescatter sum")
out.backward(torch.ones_like(out))
close(x.grad, np.full((5, 3), N), "reducescatter sum gradient")
close(hvd.reducescatter(x, op=hvd.Average, prescale_factor=2.0, postscale_factor=3.0), 6 * total[mine] / N, "scaled")
close(hvd.grouped_reducescatter([x, x], op=hvd.Sum)[1], total[mine], "grouped_reducescatter")

# Gradients: allreduce's is the allreduce of the gradient; allgather's this rank's rows of the averaged one;
# broadcast's the averaged gradient on the root only; alltoall's the reverse alltoall.
y = torch.tensor(data(R), requires_grad=True)
(hvd.allreduce(y, op=hvd.Sum) * torch.tensor(data(7))).sum().backward()
close(y.grad, N * data(7), "allreduce gradient")
z = torch.tensor(data(R, rows=R + 1), requires_grad=True)
gathered = hvd.allgather(z)
close(gathered, np.concatenate([data(r, rows=r + 1) for r in range(N)]), "allgather")
gathered.backward(torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape))
start = sum(r + 1 for r in range(R))
close(z.grad, np.arange(gathered.numel()).reshape(gathered.shape)[start : start + R + 1], "allgather gradient")
b = torch.tensor(data(R), requires_grad=True)
hvd.broadcast(b, N - 1).sum().backward()
close(b.grad, np.full((5, 3), float(R == N - 1)), "broadcast gradient")
a = torch.arange(2.0 * N, requires_grad=True)
received, splits = hvd.alltoall(a, torch.full((N,), 2, dtype=torch.int32))
(received * torch.arange(2.0 * N)).sum().backward()
close(a.grad, np.tile([2.0 * R, 2.0 * R + 1], N), "alltoall gradient")  # each rank's rows come back

# Process sets: the even and the odd ranks reduce among themselves; a non-member is refused.
evens, odds = hvd.add_process_set(range(0, N, 2)), hvd.add_process_set(range(1, N, 2)) if N > 1 else None
ours = evens if R % 2 == 0 else odds
members = range(R % 2, N, 2)
close(hvd.allreduce(torch.tensor(data(R)), op=hvd.Sum, process_set=ours), sum(data(r) for r in members), "set sum")
assert hvd.broadcast_object(R, root_rank=R % 2, process_set=ours) == R % 2
if N > 1 and R % 2:
    try:
        hvd.allreduce(torch.ones(1), process_set=evens)
        raise AssertionError("a collective on a set without this rank was not refused")
    except ValueError:
        pass
hvd.barrier(ours)
assert hvd.remove_process_set(evens) and not hvd.remove_process_set(evens)

# Disagreements raise Horovod's exception type on every rank (no hang), and the next collective still works.
for call in (
    lambda: hvd.allreduce(torch.ones(3 + R)),
    lambda: hvd.allgather(torch.ones(2, 1 + R)),
    lambda: hvd.broadcast(torch.ones(2), root_rank=R),
    lambda: hvd.reducescatter(torch.ones(4, dtype=torch.float32 if R else torch.float64)),
):
    try:
        call()
        assert N == 1, "a disagreement did not raise"
    except RuntimeError as error:
        assert N > 1 and isinstance(error, hvd.HorovodInternalError), error
bad_arguments = [lambda: hvd.reducescatter(torch.tensor(1.0)), lambda: hvd.alltoall(torch.ones(N), [N + 1] * N)]
for bad in bad_arguments:
    try:
        bad()
        raise AssertionError("a bad argument was not refused")
    except ValueError:
        pass
first = hvd.allreduce_async(torch.ones(2), name="twice")
try:
    hvd.allreduce_async(torch.ones(2), name="twice")
    raise AssertionError("a duplicate name was not refused")
except ValueError:
    pass
hvd.barrier()  # with the first still in flight: barriers do not meet the tensor collectives
close(hvd.synchronize(first), np.ones(2), "allreduce after a refused duplicate")

# Handles synchronized out of order still pair up across ranks.
h1, h2 = hvd.allreduce_async(torch.ones(2), op=hvd.Sum), hvd.allgather_async(torch.ones(1))
close(hvd.synchronize(h2), np.ones(N), "second handle first")
close(hvd.synchronize(h1), np.full(2, N), "first handle second")

# join: the last rank runs one more allreduce; the joined ranks add zeros to it; every rank learns who was last.
if R == N - 1:
    close(hvd.allreduce(torch.ones(2) * 4, op=hvd.Sum), np.full(2, 4.0), "allreduce while others joined")
assert hvd.join() == N - 1

# Sparse allreduce: every rank's entries, summed where they meet.
dense = torch.zeros(4, 2)
dense[R % 4, 1] = R + 1.0
summed = hvd.sparse_allreduce_async(dense.to_sparse(), op=hvd.Sum)()
expected = np.zeros((4, 2))
for r in range(N):
    expected[r % 4, 1] += r + 1
close(summed.to_dense(), expected, "sparse allreduce")

# DistributedOptimizer: parameter names, and step() after synchronize() warns.
model = torch.nn.Linear(2, 1)
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
assert sorted(optimizer._parameter_names.values()) == ["allreduce.noname.0", "allreduce.noname.1"]
model(torch.ones(1, 2)).sum().backward()
optimizer.synchronize()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    optimizer.step()
assert any("skip_synchronize" in str(w.message) for w in caught), caught
if R == 0:
    print(f"OK on {N} ranks", flush=True)
"""


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_horovod_semantics_match_numpy(ranks, tmp_path):
    """reducescatter, gradients of every collective, process sets, errors on every rank, join, sparse, optimizer."""
    script = tmp_path / "semantics.py"
    script.write_text(SEMANTICS)
    result = run_mpi(ranks, str(script), timeout=120, env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert f"OK on {ranks} ranks" in result.stdout, result.stdout


def test_duplicate_or_missing_names_raise_value_error_without_init():
    """As Horovod's: named_parameters with duplicate names, or lacking a parameter, is a ValueError."""
    nets = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD([*nets[0].parameters(), *nets[1].parameters()], lr=0.1)
    with pytest.raises(ValueError, match="duplicate names"):
        hvd.DistributedOptimizer(optimizer, named_parameters=[*nets[0].named_parameters(), *nets[1].named_parameters()])
    with pytest.raises(ValueError, match="not in it"):
        hvd.DistributedOptimizer(optimizer, named_parameters=list(nets[0].named_parameters()))
