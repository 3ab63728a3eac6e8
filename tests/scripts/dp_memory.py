"""Many data-parallel steps with the engine: resident memory must not grow after warm-up."""

import torch

from hpcdl import comm
from hpcdl.data.loader import Batch
from hpcdl.metrics import PhaseTimer
from hpcdl.models import MLP
from hpcdl.parallel.data import DataParallelStrategy


def resident_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


world = comm.init(threads=1)
torch.manual_seed(0)
model = MLP(64, [256, 256], 10)
engine = DataParallelStrategy(model, world, bucket_mb=0.1)
optimizer = torch.optim.SGD(engine.params, lr=0.01, momentum=0.9)
x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
batch, timer = Batch(x, y, 32 * world.size), PhaseTimer()
grad_storage = [p.grad.data_ptr() for p in engine.params]
for step in range(600):
    engine.train_step(batch, timer)
    optimizer.step()
    engine.zero_grad()
    if step == 99:
        after_warmup = resident_kib()
growth = resident_kib() - after_warmup
assert [p.grad.data_ptr() for p in engine.params] == grad_storage, "gradients were reallocated"
assert growth < 1024, f"rank {world.rank}: resident memory grew by {growth} KiB over 500 steps"
if world.is_root:
    print(f"memory flat: {growth} KiB growth over 500 steps", flush=True)
