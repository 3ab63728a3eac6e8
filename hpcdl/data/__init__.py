"""HDF5 datasets: schema, partition by rank, loaders; `open` gives a rank its loader from Python."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: `python -m hpcdl data ...` must not start MPI or load torch early
    import torch

    from hpcdl.comm import World
    from hpcdl.data.loader import Batch, Loader
    from hpcdl.data.partition import DataShare
    from hpcdl.data.schema import DatasetInfo

PARTITIONS = ("global", "block")


class RankLoader:
    """This rank's share of every global batch of one split; iterate for (x, y) tensors.

    Like torch's DistributedSampler: call `set_epoch(e)` before each epoch, or every
    epoch repeats epoch 0's order. The sample order depends only on (seed, epoch), so
    the union of the ranks' batches is the same global batch at any number of ranks.
    """

    def __init__(self, loader: Loader):
        self.loader = loader
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch`'s sample order for the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader.epoch(self.epoch):
            yield batch.x, batch.y

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """The epoch's batches with `global_count` (the whole global batch's size), from `start_step` on."""
        return self.loader.epoch(self.epoch, start_step)

    def close(self) -> None:
        """Release the HDF5 file."""
        self.loader.reader.close()


def _check_arguments(batch_size: int, partition: str) -> None:
    from hpcdl.errors import ConfigError

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"hpcdl.data.open: batch_size must be a positive integer, got {batch_size!r}")
    if partition not in PARTITIONS:
        raise ConfigError(f"hpcdl.data.open: partition = {partition!r} is not one of {', '.join(PARTITIONS)}")


def open(  # noqa: A001 - hpcdl.data.open, like h5py.File / builtins.open for a dataset
    path: str,
    split: str = "train",
    batch_size: int = 64,
    partition: str = "global",
    seed: int = 0,
    *,
    shuffle: bool | None = None,
    drop_last: bool = False,
    prefetch: int = 2,
    cache_mb: float = 1024.0,
    world: World | None = None,
    share: DataShare | None = None,
) -> tuple[RankLoader, DatasetInfo]:
    """This rank's loader for `split` of an hpcdl HDF5 file, and the file's metadata.

    `batch_size` is the global batch (over all ranks); each rank gets its share.
    `shuffle` defaults to True for "train", False otherwise. `share` (default: the world's
    rank of its size) names this rank's share when several ranks read the same batches,
    e.g. a pipeline's stages: `share=pipe.share` (a strategy's `DataShare`, columns included).
    A bad file or argument ends
    every rank with one message (the check runs before any collective that depends on it).
    """
    from hpcdl.api import init
    from hpcdl.data.loader import Loader, SplitReader
    from hpcdl.data.partition import Partition
    from hpcdl.data.schema import validate

    world = world or init()

    def check() -> DatasetInfo | None:
        _check_arguments(batch_size, partition)
        return validate(path, splits=(split,)) if world.is_root else None

    info = world.comm.bcast(world.agree(check), root=0)
    part = Partition(
        info.sizes[split],
        batch_size,
        world.rank if share is None else share.rank,
        world.size if share is None else share.size,
        seed,
        partition,
        shuffle=split == "train" if shuffle is None else shuffle,
        drop_last=drop_last,
    )
    columns = share.columns if share is not None else None
    reader = world.agree(lambda: SplitReader(path, split, part.owned_range(), cache_mb * 2**20, columns))
    return RankLoader(Loader(reader, part, prefetch)), info
