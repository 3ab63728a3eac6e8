"""HDF5 datasets: schema, partition by rank, loaders; `open` gives a rank its loader from Python."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: `python -m hpcdl data ...` must not start MPI or load torch early
    import torch

    from hpcdl.comm import World
    from hpcdl.data.loader import Batch, Loader
    from hpcdl.data.partition import DataShare
    from hpcdl.data.schema import DatasetInfo

from hpcdl.config import PARTITIONS


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


def _check_arguments(
    path: Any,
    split: Any,
    batch_size: Any,
    partition: Any,
    seed: Any,
    shuffle: Any,
    drop_last: Any,
    prefetch: Any,
    cache_mb: Any,
    block_rows: Any,
    window_blocks: Any,
) -> None:
    """open's arguments, held to the config's ranges: a ConfigError naming the first one that is wrong."""
    from hpcdl.config import NON_NEGATIVE, POSITIVE, SEEDS, check_choice, check_flag, check_number, check_path
    from hpcdl.data.schema import SPLITS

    check_path("hpcdl.data.open: path", path)
    check_choice("hpcdl.data.open: split", split, SPLITS)
    check_number("hpcdl.data.open: batch_size", batch_size, POSITIVE, integer=True)
    check_choice("hpcdl.data.open: partition", partition, PARTITIONS)
    check_number("hpcdl.data.open: seed", seed, SEEDS, integer=True)
    if shuffle is not None:  # None: the split's default
        check_flag("hpcdl.data.open: shuffle", shuffle)
    check_flag("hpcdl.data.open: drop_last", drop_last)
    check_number("hpcdl.data.open: prefetch", prefetch, NON_NEGATIVE, integer=True)
    check_number("hpcdl.data.open: cache_mb", cache_mb, NON_NEGATIVE)
    check_number("hpcdl.data.open: block_rows", block_rows, NON_NEGATIVE, integer=True)
    check_number("hpcdl.data.open: window_blocks", window_blocks, POSITIVE, integer=True)


def open(  # noqa: A001 - hpcdl.data.open, like h5py.File / builtins.open for a dataset
    path: str | os.PathLike[str],
    split: str = "train",
    batch_size: int = 64,
    partition: str = "global",
    seed: int = 0,
    *,
    shuffle: bool | None = None,
    drop_last: bool = False,
    prefetch: int = 2,
    cache_mb: float = 1024.0,
    block_rows: int = 0,
    window_blocks: int = 16,
    world: World | None = None,
    share: DataShare | None = None,
) -> tuple[RankLoader, DatasetInfo]:
    """This rank's loader for `split` of an hpcdl HDF5 file, and the file's metadata.

    `batch_size` is the global batch (over all ranks); each rank gets its share.
    `shuffle` defaults to True for "train", False otherwise. `share` (default: the world's
    rank of its size) names this rank's share when several ranks read the same batches,
    e.g. a pipeline's stages: `share=pipe.share` (a strategy's `DataShare`, columns included).
    `block_rows` (0: whole chunks, about 1 MiB) and `window_blocks` shape the `chunked` order.
    A bad file or argument ends
    every rank with one message (the check runs before any collective that depends on it).
    """
    from hpcdl.comm import init
    from hpcdl.data.chunked import block_rows_of
    from hpcdl.data.loader import Loader, SplitReader
    from hpcdl.data.partition import Partition
    from hpcdl.data.schema import validate

    world = world or init()

    def check() -> DatasetInfo | None:
        _check_arguments(
            path, split, batch_size, partition, seed, shuffle, drop_last, prefetch, cache_mb, block_rows, window_blocks
        )
        return validate(path, splits=(split,)) if world.is_root else None

    info = world.bcast(world.agree(check), root=0)
    part = Partition(
        info.sizes[split],
        batch_size,
        world.rank if share is None else share.rank,
        world.size if share is None else share.size,
        seed,
        partition,
        shuffle=split == "train" if shuffle is None else shuffle,
        drop_last=drop_last,
        block_rows=world.agree(lambda: block_rows_of(path, split, block_rows)),  # read from the file on every rank
        window_blocks=window_blocks,
    )
    columns = share.columns if share is not None else None
    budget, blocks = cache_mb * 2**20, part.read_blocks()
    reader = world.agree(lambda: SplitReader(path, split, part.owned_range(), budget, columns, blocks=blocks))
    return RankLoader(Loader(reader, part, prefetch)), info
