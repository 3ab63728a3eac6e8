"""A Horovod-style training script (after Horovod's pytorch_mnist.py), moved over by one import.

Run: mpirun -n 2 python tests/scripts/horovod_mnist.py --data FILE.h5 --out final.pt
Only the import line differs from a Horovod script; everything else is Horovod's API.
"""

import argparse

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
from torch import nn

import hpcdl.horovod as hvd  # was: import horovod.torch as hvd

parser = argparse.ArgumentParser(description="PyTorch MNIST-style example, Horovod API")
parser.add_argument("--data", required=True, help="an hpcdl HDF5 file (train and val splits)")
parser.add_argument("--out", required=True, help="where rank 0 saves the final state_dict")
parser.add_argument("--batch-size", type=int, default=24, help="input batch size per worker")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--lr", type=float, default=0.025, help="learning rate for one worker (scaled by size)")
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--hidden", type=int, nargs="+", default=[16, 8])
parser.add_argument("--fp16-allreduce", action="store_true", default=False)
parser.add_argument("--use-adasum", action="store_true", default=False)
args = parser.parse_args()

hvd.init()
torch.manual_seed(args.seed)
torch.set_num_threads(1)


class H5Dataset(torch.utils.data.Dataset):
    """One split of the file, in memory."""

    def __init__(self, path: str, split: str):
        with h5py.File(path, "r") as f:
            self.x, self.y = torch.from_numpy(f[f"{split}/x"][:]), torch.from_numpy(f[f"{split}/y"][:])
            self.num_classes = int(f.attrs["num_classes"])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Sampler(torch.utils.data.Sampler):
    """Like torch's DistributedSampler: one permutation per (seed, epoch), rank r takes every size-th index."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        self.n, self.num_replicas, self.rank, self.shuffle, self.seed, self.epoch = (
            len(dataset), num_replicas, rank, shuffle, seed, 0,
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else range(self.n)
        return iter([int(i) for i in order[self.rank :: self.num_replicas]])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


train_dataset = H5Dataset(args.data, "train")
train_sampler = Sampler(train_dataset, num_replicas=hvd.size(), rank=hvd.rank(), seed=args.seed)
train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=args.batch_size, sampler=train_sampler)
test_dataset = H5Dataset(args.data, "val")
test_sampler = Sampler(test_dataset, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=False)
test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=args.batch_size, sampler=test_sampler)


class Net(nn.Sequential):
    """Flatten, hidden ReLU layers, log-probabilities."""

    def __init__(self, in_features: int, hidden: list[int], classes: int):
        layers, width = [nn.Flatten()], in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        super().__init__(*layers, nn.Linear(width, classes))

    def forward(self, x):
        return F.log_softmax(super().forward(x), dim=1)


model = Net(train_dataset.x[0].numel(), args.hidden, train_dataset.num_classes)

# Horovod: scale the learning rate by the number of workers (Adasum does not need it).
lr_scaler = hvd.size() if not args.use_adasum else 1
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * lr_scaler, momentum=args.momentum)

# Horovod: broadcast parameters & optimizer state.
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)

compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none
optimizer = hvd.DistributedOptimizer(
    optimizer,
    named_parameters=model.named_parameters(),
    compression=compression,
    op=hvd.Adasum if args.use_adasum else hvd.Average,
)


def train(epoch: int) -> None:
    model.train()
    train_sampler.set_epoch(epoch)  # Horovod: a different order each epoch
    for batch_idx, (data, target) in enumerate(train_loader):
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % 5 == 0 and hvd.rank() == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_sampler)}]\tLoss: {loss.item():.6f}")


def metric_average(val: float, name: str) -> float:
    tensor = torch.tensor(val)
    avg_tensor = hvd.allreduce(tensor, name=name)
    return avg_tensor.item()


def test() -> float:
    model.eval()
    test_loss, test_accuracy = 0.0, 0.0
    with torch.no_grad():
        for data, target in test_loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            test_accuracy += output.argmax(dim=1).eq(target).float().sum().item()
    test_loss /= len(test_sampler)
    test_accuracy /= len(test_sampler)
    test_loss = metric_average(test_loss, "avg_loss")
    test_accuracy = metric_average(test_accuracy, "avg_accuracy")
    if hvd.rank() == 0:
        print(f"Test set: Average loss: {test_loss:.4f}, Accuracy: {100.0 * test_accuracy:.2f}%")
    return test_accuracy


for epoch in range(args.epochs):
    train(epoch)
    accuracy = test()

if hvd.rank() == 0:
    torch.save({"model": model.state_dict(), "accuracy": accuracy}, args.out)
