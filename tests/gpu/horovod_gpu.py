"""A Horovod GPU script as users write it, on hpcdl.horovod: set_device(local_rank), model.cuda(), CUDA tensors
in collectives, DistributedOptimizer. Prints 'horovod on GPU: ok' on rank 0 when every check holds."""

import torch

import hpcdl.horovod as hvd

hvd.init()
torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())
device = torch.device("cuda", torch.cuda.current_device())

summed = hvd.allreduce(torch.full((3,), float(hvd.rank() + 1), device=device), op=hvd.Sum)
assert summed.is_cuda and torch.equal(summed.cpu(), torch.full((3,), float(hvd.size() * (hvd.size() + 1) // 2)))
gathered = hvd.allgather(torch.tensor([[hvd.rank()]], device=device))
assert gathered.is_cuda and gathered.flatten().tolist() == list(range(hvd.size()))
root_value = hvd.broadcast(torch.tensor([hvd.rank() + 10.0], device=device), root_rank=0)
assert root_value.is_cuda and root_value.item() == 10.0

torch.manual_seed(hvd.rank())  # different starts: broadcast_parameters must make them equal
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).cuda()
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
x = torch.randn(64, 8, generator=torch.Generator().manual_seed(hvd.rank())).cuda()
y = (x[:, 0] > 0).long()
for _ in range(5):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
weights = torch.cat([p.detach().flatten() for p in model.parameters()])
every = hvd.allgather(weights[None])
assert torch.equal(every[0], every[-1]), "replicas differ after DistributedOptimizer steps"
if hvd.rank() == 0:
    print("horovod on GPU: ok", flush=True)
