"""Distributed data parallel: two gloo processes track into one store, equal to one process over the same global batches."""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import hydra_nb

sys.path.insert(0, str(Path(__file__).parent))
import ddp_run  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EpochBatches:
    """A batch sampler that yields the given global batches of the current ``epoch``."""

    def __init__(self, batches, per_epoch: int):
        self.batches, self.per_epoch, self.epoch = batches, per_epoch, 0

    def __iter__(self):
        return iter(self.batches[self.epoch * self.per_epoch:(self.epoch + 1) * self.per_epoch])

    def __len__(self):
        return self.per_epoch


def launch(store: Path, world: int = 2, opt_name: str = "sgd"):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "ddp_run.py"), str(store), str(r),
                               str(world), str(port), opt_name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out}"


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_two_ranks_equal_one_process_over_the_same_global_batches(tmp_path, opt_name):
    store_path = tmp_path / "ddp.zarr"
    launch(store_path, opt_name=opt_name)
    store = hydra_nb.open_store(store_path)
    assert store.status == "complete" and store.world_size == 2
    assert store.optimizer == {"sgd": "SGD", "adamw": "AdamW"}[opt_name]
    assert [p["group"] for p in store.log_parts] == ["log/rank0", "log/rank1"]
    steps = len(ddp_run.global_batches(2))
    assert store.steps == steps and list(store.checkpoint_steps) == [0, steps // 2, steps]
    for r in range(2):  # each rank logged its own samples: every sample once per epoch, across the two ranks
        assert store.group[f"log/rank{r}"].attrs["committed"] == {"steps": steps, "rows": ddp_run.N}

    # the same training in one process, on the global batches
    batches = EpochBatches(ddp_run.global_batches(2), per_epoch=steps // 2)
    net = ddp_run.model()
    opt = ddp_run.optimizer(net, opt_name)
    loader = DataLoader(ddp_run.data(), batch_sampler=batches)
    with hydra_nb.track(net, loader, store=tmp_path / "one.zarr", optimizer=opt, projection_dim=None):
        for epoch in range(ddp_run.EPOCHS):
            batches.epoch = epoch
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
    one = hydra_nb.open_store(tmp_path / "one.zarr")
    final = torch.load(str(store_path) + ".final.pt")
    for name, value in net.state_dict().items():  # the runs trained the same model
        torch.testing.assert_close(value, final[name], rtol=1e-10, atol=1e-12)

    x, y = ddp_run.data()[:5]
    np.testing.assert_allclose(store.contributions(net, x, y), one.contributions(net, x, y), rtol=1e-8, atol=1e-12)
    for engine in ("numpy", "dask"):
        _, a = store.trajectory(net, x, y, [0, 7, 31], engine=engine, progress=False)
        _, b = one.trajectory(net, x, y, [0, 7, 31], progress=False)
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(store.self_influence(net, ddp_run.data().tensors, progress=False),
                               one.self_influence(net, ddp_run.data().tensors, progress=False), rtol=1e-8, atol=1e-12)
