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
