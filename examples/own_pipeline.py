"""Your own nn.Sequential, cut into pipeline stages over ranks, in your own loop.

Run (from the repository's root; one stage per rank):
    mpirun -n 2 python examples/own_pipeline.py --data datasets/digits.h5
"""

import argparse

import torch
from my_model import mlp

import hpcdl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="datasets/digits.h5")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--run-dir", default="runs/own-pipeline")
    args = parser.parse_args()

    world = hpcdl.init()
    _, info = hpcdl.data.open(args.data, "val", args.batch_size)  # the shapes, before the model is built
    with torch.device("meta"):  # shapes only: no rank allocates the whole model
        model = mlp(info.feature_shape, info.num_classes, hidden=[64, 32])  # any nn.Sequential
    # One stage per rank; each rank allocates only its stage's layers, layer i initialised from (seed, i).
    pipe = hpcdl.Pipeline(
        model, stages=world.size, micro_batches=args.micro_batches, schedule=args.schedule, world=world, seed=0
    )
    # Every stage reads the same global batches: the share is the replica's, not the rank's.
    train, _ = hpcdl.data.open(args.data, "train", args.batch_size, share=pipe.share)
    optimizer = torch.optim.SGD(pipe.params, lr=args.lr, momentum=0.9)
    timer = hpcdl.metrics.PhaseTimer()

    step, last_step = 0, args.max_steps or args.epochs * len(train)
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        sums = torch.zeros(3, dtype=torch.float64)
        for batch in train.batches():  # batches with global_count: the pipeline scales the loss by it
            sums += torch.from_numpy(pipe.train_step(batch, timer).vector())
            optimizer.step()
            pipe.zero_grad()
            step += 1
            if step == last_step:
                break
        loss, correct, count = world.allreduce_sum(sums.numpy())  # only the last stage has losses
        world.log(f"epoch {epoch + 1}: loss {loss / count:.4f}  acc {correct / count:.3f}")
        if step == last_step:
            break

    state = pipe.model_state()  # the whole unsplit model on rank 0
    if world.is_root:
        hpcdl.checkpoint.save(args.run_dir, step, {"model": state, "global_step": step})
    world.log(f"done: {step} steps, {world.size} stages, schedule {args.schedule}")


if __name__ == "__main__":
    main()
