"""One rank of a 2-process DistributedDataParallel training run under hydra_nb.track (gloo, CPU).

    python tests/ddp_run.py STORE RANK WORLD PORT [OPTIMIZER]     (OPTIMIZER: sgd (default) or adamw)

Used by tests/test_distributed.py, which launches the ranks and compares the store with a
single-process run over the same global batches (see ``global_batches``).
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import hydra_nb

N, D_IN, C, BATCH, EPOCHS, SEED = 32, 5, 3, 4, 2, 7


def data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, D_IN, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, C)).double()


def optimizer(net, name: str = "sgd"):
    if name == "adamw":  # Adam's D_t comes from the averaged .grad: the same on every rank
        return torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    return torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)


def global_batches(world: int):
    """The global batches of the DDP run, step by step: rank r's k-th batch of each epoch, concatenated.

    DistributedSampler(shuffle=True, seed=SEED) permutes with seed SEED + epoch and gives rank r the
    indices [r::world] (N is a multiple of world · BATCH here, so there is no padding).
    """
    out = []
    for epoch in range(EPOCHS):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        per_rank = [order[r::world] for r in range(world)]
        for k in range(N // (world * BATCH)):
            out.append([i for r in range(world) for i in per_rank[r][k * BATCH:(k + 1) * BATCH]])
    return out


def main(store: str, rank: int, world: int, port: int, opt_name: str = "sgd") -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = nn.parallel.DistributedDataParallel(model())
        sampler = DistributedSampler(data(), num_replicas=world, rank=rank, shuffle=True, seed=SEED)
        loader = DataLoader(data(), batch_size=BATCH, sampler=sampler)
        opt = optimizer(net, opt_name)
        with hydra_nb.track(net, loader, store=store, optimizer=opt, projection_dim=None, strict=True):
            for epoch in range(EPOCHS):
                sampler.set_epoch(epoch)
                for x, y in loader:  # the user's own loop, unchanged
                    opt.zero_grad()
                    F.cross_entropy(net(x), y).backward()
                    opt.step()
        if rank == 0:
            torch.save(net.module.state_dict(), store + ".final.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:6])
