"""Your own training loop on hpcdl: hpcdl's data loader and its data-parallel engine, your code between.

Run (from the repository's root):
    mpirun -n 2 python examples/own_loop.py --config examples/own_model.toml

It reads the same TOML as `hpcdl train`, so the two give the same parameters.
"""

import argparse
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from my_model import mlp

import hpcdl
from hpcdl import config


def evaluate(model: torch.nn.Module, loader, world) -> tuple[float, float]:
    """Validation loss and accuracy over the whole split, summed over ranks."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            sums += torch.tensor(
                [F.cross_entropy(logits, y, reduction="sum").item(), (logits.argmax(1) == y).sum(), len(y)]
            )
    loss, correct, count = world.allreduce_sum(sums.numpy())
    return loss / count, correct / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/own_model.toml", help="a named config or TOML file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()

    world = hpcdl.init()  # MPI, this rank's place, and errors that end every rank
    cfg = world.agree(lambda: config.load(args.config, args.set))  # a bad config stops every rank
    train, info = hpcdl.data.open(cfg.data.path, "train", cfg.train.batch_size, cfg.data.partition, cfg.train.seed)
    val, _ = hpcdl.data.open(cfg.data.path, "val", cfg.train.batch_size)

    torch.manual_seed(cfg.train.seed)
    model = hpcdl.DataParallel(mlp(info.feature_shape, info.num_classes, **cfg.model.kwargs), cfg.parallel.bucket_mb)
    t = cfg.train
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    timer = hpcdl.metrics.PhaseTimer()

    accumulate = cfg.parallel.accumulate_steps  # batches per optimizer step
    step, last_step = 0, t.max_steps or t.epochs * len(train)
    for epoch in range(t.epochs):
        train.set_epoch(epoch)  # each epoch its own order, the same at any number of ranks
        model.train()
        for i, (x, y) in enumerate(train):
            start = i - i % accumulate
            window = min(accumulate, len(train) - start)  # an epoch's last window may be shorter
            sync = i + 1 == start + window
            # Only the window's last backward communicates; the others accumulate locally.
            with nullcontext() if sync else model.no_sync():
                with timer.phase("forward"):
                    loss = F.cross_entropy(model(x), y) / window
                with timer.phase("backward"):
                    loss.backward()  # with sync: returns with every .grad averaged over ranks
            if sync:
                with timer.phase("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad()
            step += 1
            if step == last_step:
                break
        val_loss, val_acc = evaluate(model, val, world)
        world.log(f"epoch {epoch + 1}: loss {loss.item() * window:.4f}  val_loss {val_loss:.4f}  val_acc {val_acc:.3f}")
        if step == last_step:
            break

    if world.is_root:
        hpcdl.checkpoint.save(cfg.run.dir, step, {"model": model.module.state_dict(), "global_step": step})
    split = hpcdl.metrics.slowest_rank_split(world, timer, step)
    world.log(f"done: {step} steps; ms per step (slowest rank): " + "  ".join(f"{k} {v:.2f}" for k, v in split.items()))


if __name__ == "__main__":
    main()
