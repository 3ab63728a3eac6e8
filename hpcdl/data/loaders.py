"""A training run's two loaders, from its config: train and validation, for this rank's share of every global batch."""

from __future__ import annotations

import torch

from hpcdl.comm import World
from hpcdl.config import Config
from hpcdl.data.chunked import block_rows_of
from hpcdl.data.loader import Loader, SplitReader
from hpcdl.data.partition import DataShare, Partition
from hpcdl.data.schema import DatasetInfo
from hpcdl.device import CPU
from hpcdl.models import torch_dtype


def make_loaders(
    cfg: Config, world: World, info: DatasetInfo, share: DataShare, device: torch.device = CPU
) -> tuple[Loader, Loader]:
    """Train and validation loaders for this rank's share of every global batch (its columns only, if set), on
    `device`."""
    budget, dtype = cfg.data.cache_mb * 2**20, torch_dtype(cfg.model.dtype)
    val_part = Partition(info.sizes["val"], cfg.train.batch_size, share.rank, share.size, 0, shuffle=False)

    def loader(split: str, part: Partition) -> Loader:
        reader = SplitReader(cfg.data.path, split, part.owned_range(), budget, share.columns, blocks=part.read_blocks())
        return Loader(reader, part, cfg.data.prefetch, dtype, device=device)

    def loaders() -> tuple[Loader, Loader]:
        train_part = Partition(
            info.sizes["train"], cfg.train.batch_size, share.rank, share.size, cfg.train.seed, cfg.data.partition,
            drop_last=cfg.data.drop_last, window_blocks=cfg.data.window_blocks,
            block_rows=block_rows_of(cfg.data.path, "train", cfg.data.block_rows),
        )  # fmt: skip
        return loader("train", train_part), loader("val", val_part)

    return world.agree(loaders)
