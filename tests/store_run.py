"""A small deterministic tracked training run, used by tests/test_store.py in-process and as a child process.

    python tests/store_run.py STORE --steps N --sleep S     (the child a test kills with SIGKILL)
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hydra_nb

N, D_IN, C = 40, 5, 3


def data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, D_IN, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, C)).double()


def train(store, steps: int, sleep: float = 0.0, checkpoint_every=2, **track_options):
    """Train ``steps`` SGD steps under hydra_nb.track (stopping mid-epoch if need be); returns the model."""
    net = model()
    loader = DataLoader(data(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    done = 0
    with hydra_nb.track(net, loader, store=store, optimizer=opt, projection_dim=None,
                        checkpoint_every=checkpoint_every, **track_options):
        while done < steps:
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
                done += 1
                time.sleep(sleep)
                if done == steps:
                    break
    return net


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--sleep", type=float, default=0.0)
    args = ap.parse_args()
    train(args.store, args.steps, args.sleep)
