"""BatchNorm in training mode: both choices against independent per-sample references.

Tiny float64 models with BatchNorm1d / BatchNorm2d (affine or not, momentum=None too), 30
samples, batches of 8 (a last short batch of 6), 2 epochs. The references here never use
hydra_nb's code:

* batch-coupled ("exact"): sample i's loss term differentiated through the *batch* forward with
  PyTorch's own BatchNorm in training mode, one sample at a time (torch.autograd.grad);
* fixed statistics: the same with every BatchNorm replaced by F.batch_norm in eval form fed the
  batch's mean and biased variance, detached.

They enter reference.hessian_free_contributions (fast mode) in place of its one-sample forward;
exact mode is checked against autograd through the unrolled weighted training loop.
Queries run the model in eval mode with the running statistics of the checkpoint, which the
references use as constants (``Run.test_buffers``).
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hydra_nb
from hydra_nb import TrackingConfigError
from hydra_nb.capture.batchnorm import batchnorm_route
from reference import (DT, AdamRun, Run, adam_hessian_free_contributions, assert_replay_matches, ce_loss,
                       hessian_free_contributions, layout_check, make_loader, rel_err, train, unrolled_contributions)

FAST_TOL = 1e-8
EXACT_TOL = 1e-6


# -- models and data --------------------------------------------------------------------------
def mlp(affine=True, momentum=0.1):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, affine=affine, momentum=momentum), nn.Tanh(),
                         nn.Linear(6, 3)).to(DT)


def cnn(affine=True, momentum=0.1):
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, affine=affine, momentum=momentum), nn.Tanh(),
                         nn.Flatten(), nn.Linear(27, 3)).to(DT)


MODELS = {
    "bn1d": lambda: mlp(),
    "bn1d_nonaffine_cumulative": lambda: mlp(affine=False, momentum=None),
    "bn2d": lambda: cnn(),
    "bn2d_nonaffine_cumulative": lambda: cnn(affine=False, momentum=None),
}


def data_for(model, N=30, n_test=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 5, 5) if isinstance(model[0], nn.Conv2d) else (4,)
    X = torch.randn(N, *shape, generator=g, dtype=DT)
    Y = torch.randint(0, 3, (N,), generator=g)
    Xt = torch.randn(n_test, *shape, generator=g, dtype=DT)
    Yt = torch.randint(0, 3, (n_test,), generator=g)
    return X, Y, Xt, Yt


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


# -- independent per-sample references --------------------------------------------------------
def _copy(run: Run, template):
    """A throwaway copy (its running statistics move): of ``template`` with its modules' modes, else all training."""
    return copy.deepcopy(template) if template is not None else copy.deepcopy(run.model).train()


def coupled_per_sample(run: Run, template=None):
    """grad of coef·ℓ_i(θ; batch) through the batch forward (PyTorch's BatchNorm, training mode), one i at a time."""
    return _per_sample_loop(run, _copy(run, template), _copy(run, template))


def fixed_per_sample(run: Run, template=None):
    """The same with the batch statistics computed from the batch and detached (F.batch_norm in eval form)."""
    model = _copy(run, template)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            def forward(x, m=m):
                dims = [0] + list(range(2, x.dim()))
                mean, var = x.mean(dims).detach(), x.var(dims, unbiased=False).detach()
                return F.batch_norm(x, mean, var, m.weight, m.bias, False, 0.0, m.eps)
            m.forward = forward

    return _per_sample_loop(run, model, _copy(run, template))


def _per_sample_loop(run: Run, model: nn.Module, plain: nn.Module):

    def per_sample(params, idx, coef):
        out = {n: torch.zeros(len(idx), *run.shapes[n], dtype=DT) for n in run.names}
        for k in range(len(idx)):
            li = coef * run.loss_fn(functional_call(model, params, (run.X[idx],)), run.Y[idx])[k]
            gs = torch.autograd.grad(li, [params[n] for n in run.names], allow_unused=True)
            for n, g in zip(run.names, gs):
                if g is not None:
                    out[n][k] = g
        # the batch gradient that trained θ: PyTorch's BatchNorm, training mode
        loss = coef * run.loss_fn(functional_call(plain, params, (run.X[idx],)), run.Y[idx]).sum()
        total = dict(zip(run.names, torch.autograd.grad(loss, [params[n] for n in run.names])))
        return out, total

    return per_sample


REFERENCES = {"exact": coupled_per_sample, "fixed": fixed_per_sample}


def tracked(tmp_path, model, X, Y, *, epochs=2, mode="fast", reduction="mean", train_kw=None, loss_fn=None,
            name="run.zarr", **track_kw):
    opt = sgd(model)
    loader = make_loader(X, Y)
    run = Run(model, opt, X, Y, loss_fn or ce_loss, reduction)
    track_kw.setdefault("projection_dim", None)
    with hydra_nb.track(model, loader, store=str(tmp_path / name), optimizer=opt, mode=mode, strict=True,
                        loss_fn=loss_fn, **track_kw):
        train(model, loader, opt, run, epochs, **(train_kw or {}))
    store = hydra_nb.open_store(str(tmp_path / name), loss_fn=loss_fn)
    assert store.status == "complete"
    run.test_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return run, store


# -- fast mode: both choices against their references ------------------------------------------
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("choice", ["fixed", "exact"])
def test_fast_mode_matches_per_sample_reference(tmp_path, model_name, choice):
    model = MODELS[model_name]()
    X, Y, Xt, Yt = data_for(model)
    run, store = tracked(tmp_path, model, X, Y, batchnorm=choice)
    layout_check(run, store)
    assert store.meta["config"]["batchnorm"] == choice
    ref = hessian_free_contributions(run, Xt, Yt, per_sample=REFERENCES[choice](run))
    assert_replay_matches(run, ref)
    h = store.hypergradients(mode="fast")
    err_h = rel_err(h, ref["h"][run.T].numpy())
    assert err_h < FAST_TOL, f"hypergradients rel err {err_h:.3e}"
    err = rel_err(store.contributions(model, Xt, Yt), ref["values"][:, 0])
    assert err < FAST_TOL, f"contributions rel err {err:.3e}"
    # and the other choice's reference is measurably different: the test can tell them apart
    other = hessian_free_contributions(run, Xt, Yt, per_sample=REFERENCES[{"fixed": "exact", "exact": "fixed"}[choice]](run))
    assert rel_err(h, other["h"][run.T].numpy()) > 1e-4


def test_fixed_with_projection_sum_loss_and_accumulation(tmp_path):
    """A projection, a sum-reduced loss and gradient accumulation over two batches (two root calls per step)."""
    model = cnn()
    X, Y, Xt, Yt = data_for(model)
    run, store = tracked(tmp_path, model, X, Y, batchnorm="fixed", projection_dim=16, reduction="sum",
                         train_kw={"accum": 2})
    ref = hessian_free_contributions(run, Xt, Yt, per_sample=fixed_per_sample(run))
    assert_replay_matches(run, ref)
    P = store.projector
    expected = -(P.project_flat(ref["test_grad"][run.T])[:, None, :] * P.project_flat(ref["h"][run.T])[None]).sum(-1)
    err = rel_err(store.contributions(model, Xt, Yt), expected.numpy())
    assert err < 1e-10, f"projected contributions rel err {err:.3e}"


# -- exact mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["bn1d", "bn2d_nonaffine_cumulative"])
def test_exact_mode_matches_unrolled_autograd(tmp_path, model_name):
    """Exact HYDRA (HVPs with batch statistics) with batch-coupled injections = autograd through the loop."""
    model = MODELS[model_name]()
    X, Y, Xt, Yt = data_for(model)
    run, store = tracked(tmp_path, model, X, Y, mode="exact", batchnorm="exact", exact_indices=[0, 5, 11, 29])
    ref = unrolled_contributions(run, Xt, Yt)
    assert_replay_matches(run, ref)
    cols = store.tracked_indices
    err = rel_err(store.contributions(model, Xt, Yt), ref["values"][:, 0, cols])
    assert err < EXACT_TOL, f"exact contributions rel err {err:.3e}"
    # the fast estimate recorded alongside is the batch-coupled Hessian-free one
    fast = hessian_free_contributions(run, Xt, Yt, per_sample=coupled_per_sample(run))
    assert rel_err(store.contributions(model, Xt, Yt, mode="fast"), fast["values"][:, 0, cols]) < FAST_TOL


def test_exact_mode_with_fixed_statistics_injections(tmp_path):
    """Exact Hessian, fixed-statistics injections: a documented mix; it runs and stays close to the truth."""
    model = mlp()
    X, Y, Xt, Yt = data_for(model)
    run, store = tracked(tmp_path, model, X, Y, mode="exact", exact_indices=[0, 5], batchnorm="fixed")
    assert store.meta["config"]["batchnorm"] == "fixed"
    ref = unrolled_contributions(run, Xt, Yt)
    err = rel_err(store.contributions(model, Xt, Yt), ref["values"][:, 0, [0, 5]])
    assert 1e-6 < err < 1.0


# -- the user's run is untouched ----------------------------------------------------------------
def _plain_run(model, X, Y, epochs=2, accum=1):
    opt = sgd(model)
    loader = make_loader(X, Y)
    run = Run(model, opt, X, Y)
    train(model, loader, opt, run, epochs, accum=accum)
    return model


@pytest.mark.parametrize("model_name,choice,mode", [
    ("bn1d", "fixed", "fast"), ("bn1d_nonaffine_cumulative", "exact", "fast"), ("bn2d", "exact", "exact"),
    ("bn2d_nonaffine_cumulative", "fixed", "exact"),
])
def test_training_and_running_statistics_bit_identical(tmp_path, model_name, choice, mode):
    plain = _plain_run(MODELS[model_name](), *data_for(MODELS[model_name]())[:2])
    model = MODELS[model_name]()
    X, Y, _, _ = data_for(model)
    kw = {"exact_indices": [1, 2]} if mode == "exact" else {}
    run, store = tracked(tmp_path, model, X, Y, mode=mode, batchnorm=choice, **kw)
    for (n, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), f"{n} differs with tracking"
    assert int(model[1].num_batches_tracked) == run.T
    # the last checkpoint stores the running statistics as training left them (queries use them)
    flat = store.reader.buffers_at(-1)
    for b in store.meta["buffers"]:
        n = int(np.prod(b["shape"]))
        np.testing.assert_array_equal(flat[b["offset"]:b["offset"] + n],
                                      dict(model.named_buffers())[b["name"]].reshape(-1).numpy())


def test_batchnorm_in_eval_mode_still_uses_per_layer_hooks(tmp_path):
    model = mlp()
    model[1].eval()
    model[1].running_var.fill_(2.0)
    X, Y, _, _ = data_for(model)
    opt = sgd(model)
    loader = make_loader(X, Y)
    with hydra_nb.track(model, loader, store=str(tmp_path / "a.zarr"), optimizer=opt, strict=True) as tr:
        assert tr.batchnorm is None
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert hydra_nb.open_store(str(tmp_path / "a.zarr")).meta["config"]["batchnorm"] is None


# -- clear errors -------------------------------------------------------------------------------
def _track(tmp_path, model, **kw):
    X, Y, _, _ = data_for(model)
    return hydra_nb.track(model, make_loader(X, Y), store=str(tmp_path / "a.zarr"), optimizer=sgd(model), **kw)


def test_unknown_choice(tmp_path):
    with pytest.raises(TrackingConfigError, match="batchnorm must be 'fixed'.*or 'exact'.*got 'approx'"):
        _track(tmp_path, mlp(), batchnorm="approx")


def test_sync_batchnorm_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.SyncBatchNorm(6), nn.Linear(6, 3)).to(DT)
    with pytest.raises(TrackingConfigError, match="SyncBatchNorm in training mode.*Convert it to BatchNorm"):
        _track(tmp_path, model)


def test_distributed_refused():
    with pytest.raises(TrackingConfigError, match="not supported under DistributedDataParallel"):
        batchnorm_route(mlp(), "fixed", world_size=2)


def test_track_running_stats_false_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 3)).to(DT)
    with pytest.raises(TrackingConfigError, match="track_running_stats=False.*also in eval mode"):
        _track(tmp_path, model)


def test_dropout_with_batchnorm_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.2), nn.Linear(6, 3)).to(DT)
    with pytest.raises(TrackingConfigError, match="dropout makes that forward random"):
        _track(tmp_path, model)


def test_switched_to_training_inside_loop(tmp_path):
    model = mlp()
    model[1].eval()
    X, Y, _, _ = data_for(model)
    loader = make_loader(X, Y)
    opt = sgd(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TrackingConfigError, match="switched to training mode after hydra_nb.track started"):
        with hydra_nb.track(model, loader, store=str(tmp_path / "a.zarr"), optimizer=opt):
            model[1].train()
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    assert torch.equal(model[0].weight, before["0.weight"])


def test_model_not_called_as_a_whole(tmp_path):
    model = mlp()
    X, Y, _, _ = data_for(model)
    loader = make_loader(X, Y)
    opt = sgd(model)
    with pytest.raises(TrackingConfigError, match="ran no training forward.*call that model on each batch"):
        with hydra_nb.track(model, loader, store=str(tmp_path / "a.zarr"), optimizer=opt):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model[2:](model[:2](x)), y).backward()
                opt.step()


def test_model_output_not_a_tensor(tmp_path):
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return {"logits": self.net(x)}

    model = DictOut()
    X, Y, _, _ = data_for(model.net)
    loader = make_loader(X, Y)
    opt = sgd(model)
    with pytest.raises(TrackingConfigError, match="output, which must be one tensor.*returned dict"):
        with hydra_nb.track(model, loader, store=str(tmp_path / "a.zarr"), optimizer=opt):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x)["logits"], y).backward()
                opt.step()


@pytest.mark.parametrize("choice", ["fixed", "exact"])
def test_check_catches_extra_loss_terms(tmp_path, choice):
    """The .grad check catches a manual L2 penalty with either choice ('fixed' compares .grad with the
    batch-coupled sum, since its own per-sample gradients need not add up to it)."""
    model = mlp()
    X, Y, _, _ = data_for(model)
    loader = make_loader(X, Y)
    opt = sgd(model)
    with pytest.raises(TrackingConfigError, match="do not add up to the parameters' .grad"):
        with hydra_nb.track(model, loader, store=str(tmp_path / "a.zarr"), optimizer=opt, batchnorm=choice):
            for x, y in loader:
                opt.zero_grad()
                (F.cross_entropy(model(x), y) + 0.1 * model[0].weight.square().sum()).backward()
                opt.step()


@pytest.mark.parametrize("choice", ["fixed", "exact"])
def test_float32_batchnorm1d_over_sequences(tmp_path, choice):
    """float32 (the .grad check's tolerance), BatchNorm1d on (B, C, L) inputs, a projection: runs through."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    X, Y = torch.randn(30, 2, 6), torch.randint(0, 3, (30,))
    loader = make_loader(X, Y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with hydra_nb.track(model, loader, store=str(tmp_path / "a.zarr"), optimizer=opt, strict=True,
                        batchnorm=choice, projection_dim=32):
        for _ in range(2):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    store = hydra_nb.open_store(str(tmp_path / "a.zarr"))
    assert store.status == "complete" and store.steps == 8
    assert np.isfinite(store.contributions(model, X[:3], Y[:3])).all()


def test_resume_with_another_choice_refused(tmp_path):
    model = mlp()
    X, Y, _, _ = data_for(model)
    loader = make_loader(X, Y)
    opt = sgd(model)
    path = str(tmp_path / "a.zarr")

    def epoch():
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    with hydra_nb.track(model, loader, store=path, optimizer=opt, strict=True, batchnorm="fixed"):
        epoch()
    with pytest.raises(TrackingConfigError, match="it used batchnorm='fixed', this is 'exact'"):
        hydra_nb.track(model, loader, store=path, optimizer=opt, resume=True, batchnorm="exact").__enter__()
    with hydra_nb.track(model, loader, store=path, optimizer=opt, strict=True, resume=True, batchnorm="fixed"):
        epoch()
    assert hydra_nb.open_store(path).steps == 8


@pytest.mark.parametrize("choice", ["fixed", "exact"])
def test_one_batchnorm_in_eval_mode_among_training_ones(tmp_path, choice):
    """A BatchNorm layer left in eval mode normalises with its (unchanging) running statistics in the replays."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 5), nn.BatchNorm1d(5),
                          nn.Tanh(), nn.Linear(5, 3)).to(DT)
    with torch.no_grad():
        model[4].running_mean.uniform_(-0.5, 0.5)
        model[4].running_var.uniform_(0.5, 2.0)
    model[4].eval()
    template = copy.deepcopy(model)
    X, Y, Xt, Yt = data_for(mlp())
    run, store = tracked(tmp_path, model, X, Y, batchnorm=choice)
    assert torch.equal(model[4].running_mean, template[4].running_mean)
    ref = hessian_free_contributions(run, Xt, Yt, per_sample=REFERENCES[choice](run, template))
    assert_replay_matches(run, ref)
    err = rel_err(store.hypergradients(mode="fast"), ref["h"][run.T].numpy())
    assert err < FAST_TOL, f"hypergradients rel err {err:.3e}"


@pytest.mark.parametrize("choice", ["fixed", "exact"])
def test_chunked_replays_give_the_same_rows(tmp_path, monkeypatch, choice):
    """Memory-bounded chunks of the vmapped replays (one sample per chunk here) change nothing."""
    import hydra_nb.capture.batchnorm

    model = cnn()
    X, Y, _, _ = data_for(model)
    _, whole = tracked(tmp_path, model, X, Y, batchnorm=choice, name="whole.zarr")
    monkeypatch.setattr(hydra_nb.capture.batchnorm, "_CHUNK_BYTES", 1)
    _, chunked = tracked(tmp_path, cnn(), X, Y, batchnorm=choice, name="chunked.zarr")
    np.testing.assert_allclose(chunked.hypergradients(mode="fast"), whole.hypergradients(mode="fast"),
                               rtol=1e-12, atol=1e-15)


# -- with Adam ------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", ["exact", "fixed"])
def test_adamw_with_batchnorm_matches_the_adam_reference(tmp_path, choice):
    """Adam's preconditioner and BatchNorm's per-sample gradients compose: the stored rows are D_s ⊙ u_s
    with u_s the chosen BatchNorm injection, as the independent Adam reference computes them."""
    model = mlp()
    X, Y, Xt, Yt = data_for(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    loader = make_loader(X, Y)
    run = AdamRun(model, opt, X, Y, ce_loss, "mean")
    with hydra_nb.track(model, loader, store=str(tmp_path / "a.zarr"), optimizer=opt, projection_dim=None,
                        strict=True, batchnorm=choice):
        train(model, loader, opt, run, 2)
    store = hydra_nb.open_store(str(tmp_path / "a.zarr"))
    run.test_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    ref = adam_hessian_free_contributions(run, Xt, Yt, freeze_D=True, per_sample=REFERENCES[choice](run))
    assert_replay_matches(run, ref)
    err = rel_err(store.contributions(model, Xt, Yt), ref["values"][:, 0])
    assert err < FAST_TOL, f"contributions rel err {err:.3e}"
    other = adam_hessian_free_contributions(run, Xt, Yt, freeze_D=True,
                                            per_sample=REFERENCES[{"fixed": "exact", "exact": "fixed"}[choice]](run))
    assert rel_err(store.contributions(model, Xt, Yt), other["values"][:, 0]) > 1e-4
