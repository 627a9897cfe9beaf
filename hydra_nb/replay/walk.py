"""Reverse-mode HYDRA: exact contributions of every training sample, by walking the recorded run backward.

The run. At every optimizer step t training took

    θ_{t+1}, s_{t+1} = step_t(θ_t, s_t, ∇θ L_t(θ_t; w))
    L_t(θ; w) = Σ_{backward calls k of step t} Σ_b c_kb·(1 + w_{i_kb})·ℓ(f(x_{i_kb}; θ), y_{i_kb})

where s is the optimizer's state (SGD's momentum buffers, Adam's moments), step_t its update with
the hyperparameters of step t (``OptimizerRule.functional_step``), c_kb the weight the user's loss
gave row b of backward call k (1/|B| for a mean, 1 for a sum; recorded while tracking), i_kb the
dataset index of that row and w the per-sample loss weights, at w = 0.

The adjoint. For a test vector g (the gradient of a test loss at θ_S) let a_S = g, ā_S = 0 and, for
t = S−1, …, 0,

    (a_t, ā_t, d_t) = vector–Jacobian product of (θ_t, s_t, w) ↦ (θ_{t+1}, s_{t+1}) at (a_{t+1}, ā_{t+1}).

Then ∂⟨g, θ_S(w)⟩/∂w_i = Σ_t d_t[i], and ``contributions[z, i] = −Σ_t d_t[i]`` with g = ∇θ L(z; θ_S):
the definition of the README, exactly, for every training sample at once. Each product is one
double-backward of step t's weighted batch loss (its gradient built with ``create_graph``, pushed
through the optimizer's update); d_t is nonzero only for the rows of step t's batch. Many test
vectors go through one walk together (``is_grads_batched``: vmap over the cotangents), and a vector
may join the walk at its own step (trajectories: one walk for every checkpoint).

The states. θ_t and s_t come from replaying training forward from the stored checkpoints: interval
[S_c, S_{c+1}) starts from checkpoint c's parameters and optimizer state and must arrive at checkpoint
c+1's stored parameters within ``tolerance`` (relative, ‖θ_replayed − θ_stored‖ / ‖θ_stored‖);
otherwise :class:`~hydra_nb.errors.ReplayError` names the checkpoint and the likely causes, and no
number is returned. At most ``L`` states are held at once, L = ⌊state memory / (bytes of θ and s)⌋:
an interval longer than L is replayed once keeping every ⌈n/L⌉-th state, then each piece again
(recursively), so memory is at most L·(|θ| + |s|)·itemsize per level of recursion.
"""

from __future__ import annotations

import contextlib

import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from ..errors import ReplayError
from ..params import ParamLayout

# relative drift ‖θ_replayed − θ_stored‖ / ‖θ_stored‖ allowed at a checkpoint, by dtype: a replay sums
# the same terms in another order (the user's mean vs Σ c_b·ℓ_b, torch's kernels vs ours), and training
# can grow such differences over an interval; a replay of the wrong data or a random augmentation is
# off by far more (measured: benchmarks/replay_cost.py prints the drift of every interval)
DEFAULT_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}

LIKELY_CAUSES = (
    "train_data is not the dataset the tracked loader indexed (another order, other samples, or other "
    "preprocessing); the dataset applies random augmentation in __getitem__ (replay reads each sample "
    "without it); the loss the loop backpropagated had terms replay cannot see (a regulariser on the "
    "parameters, an auxiliary output); or a nondeterministic kernel (some GPU ops) made training "
    "irreproducible")


@dataclass
class Call:
    """One backward call of a step, as tracking recorded it: which samples, with which loss weights, and
    the random-number state its forward started from (None: the forward drew no random numbers)."""

    samples: np.ndarray  # (B,) int64 dataset indices, one per row of the batch (repeats allowed)
    weights: np.ndarray  # (B,) float64 c_b: ∂(the loop's loss)/∂ℓ_b
    rng: torch.Tensor | None = None  # torch.get_rng_state() before the forward (uint8)
    cuda_rng: torch.Tensor | None = None  # torch.cuda.get_rng_state() of the model's device


class Recording(Protocol):
    """What replay reads from a tracked run (``hydra_nb.store`` implements it over a store)."""

    layout: ParamLayout
    checkpoint_steps: np.ndarray

    def params_at(self, c: int) -> np.ndarray: ...  # flat θ at checkpoint c
    def buffers_at(self, c: int) -> dict[str, torch.Tensor]: ...  # the model's buffers at checkpoint c
    def optimizer_state_at(self, c: int) -> dict[str, list[torch.Tensor | None]]: ...
    def trace_rows(self, lo: int, hi: int) -> list[dict[str, np.ndarray]]: ...  # rows of steps lo..hi-1
    def calls(self, lo: int, hi: int) -> list[list[Call]]: ...  # each step's backward calls


@dataclass
class State:
    """θ_t (one tensor per tracked parameter, layout order) and the optimizer's state s_t."""

    params: list[torch.Tensor]
    opt: dict[str, list[torch.Tensor | None]]

    def nbytes(self) -> int:
        tensors = self.params + [s for v in self.opt.values() for s in v if s is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def check_arrival(params, stored, checkpoint_steps, c_next: int, tolerance: float, outcome: str) -> float:
    """drift = ‖θ_replayed − θ_stored‖/‖θ_stored‖ at checkpoint ``c_next`` (``params``: the replayed tensors,
    ``stored``: the checkpoint's flat θ); raises ReplayError, saying ``outcome`` (what is then not done), where it
    is above ``tolerance`` or not finite. Returns the drift."""
    got = torch.cat([p.detach().reshape(-1) for p in params]).to(torch.float64)
    stored = torch.as_tensor(stored).to(device=got.device, dtype=torch.float64)
    drift = float((got - stored).norm() / stored.norm().clamp_min(1e-300))
    if not math.isfinite(drift) or drift > tolerance:
        lo, hi = (int(checkpoint_steps[c]) for c in (c_next - 1, c_next))
        raise ReplayError(
            f"Replaying the run did not reproduce it: replayed from checkpoint {c_next - 1} (step {lo}) to "
            f"checkpoint {c_next} (step {hi}), the parameters differ from the stored ones by {drift:.2e} "
            f"(relative; the tolerance is {tolerance:.0e}), so {outcome}. Likely causes: {LIKELY_CAUSES}. Pass the "
            "training set exactly as the tracked DataLoader's dataset indexes it (e.g. train_data=loader.dataset, "
            "without random transforms).")
    return drift


class Replayer:
    """Replays a recorded run forward from its checkpoints and walks it backward (see the module docstring).

    ``batch(samples) -> (args, kwargs, targets)`` builds a backward call's model inputs from the training
    data; ``loss_fn(outputs, targets)`` gives one loss per sample; ``rule`` is the run's optimizer rule
    (its ``functional_step`` is differentiated). ``state_memory``: bytes of replayed states held at once.
    """

    def __init__(self, recording: Recording, model: nn.Module, rule, batch: Callable, loss_fn: Callable, *,
                 device: torch.device, dtype: torch.dtype, tolerance: float | None = None,
                 state_memory: int = 256 << 20, cotangent_chunk: int = 64, vjp_memory: int | None = None,
                 progress=None, vjp_method: str = "auto"):
        self.rec = recording
        self.model = model
        self.rule = rule
        self.batch = batch
        self.loss_fn = loss_fn
        self.device, self.dtype = device, dtype
        self.tolerance = DEFAULT_TOLERANCE.get(dtype, 1e-3) if tolerance is None else float(tolerance)
        self.state_memory = int(state_memory)
        self.cotangent_chunk = max(1, int(cotangent_chunk))
        # bytes the vmapped products may hold: each cotangent in flight costs about one step graph (G, measured on
        # the first step), so at most ⌊vjp_memory / G⌋ of them go through a product together (at least 1)
        self.vjp_memory = None if vjp_memory is None else int(vjp_memory)
        self._chunk_sized = False
        self.progress = progress
        self.layout = recording.layout
        self.names = [s.name for s in self.layout.slots]
        self.drift: dict[int, float] = {}  # checkpoint index → relative drift measured on arrival
        self.vjp_method = vjp_method  # "auto", "batched" or "loop" (see _batched_vjp)
        self.graph_bytes = 0  # measured: one step's kept graph (its saved tensors) and state, on the first step
        self.vjp_seconds: dict[str, float] = {}
        self._batches: dict[int, list] = {}

    # -- the weighted batch loss of one step ----------------------------------------------------
    def _inputs(self, t: int, calls: list[Call]) -> list:
        """(args, kwargs, targets, weights, rng, cuda_rng) per call of step t (built once per step and reused)."""
        cached = self._batches.get(t)
        if cached is None:
            cached = []
            for call in calls:
                args, kwargs, targets = self.batch(call.samples)
                weights = torch.as_tensor(call.weights, dtype=self.dtype, device=self.device)
                cached.append((args, kwargs, targets, weights, call.rng, call.cuda_rng))
            self._batches = {t: cached}  # only the step being worked on
        return cached

    def loss(self, t: int, calls: list[Call], params: list[torch.Tensor], buffers: dict,
             w: torch.Tensor | None = None) -> torch.Tensor:
        """L_t(θ; w) = Σ_k Σ_b c_kb·(1 + w_r)·ℓ_r, with w over the step's rows in call order (None: w = 0).

        Each call's forward runs from the random-number state recorded for it, so dropout draws the
        masks training drew.
        """
        named = dict(zip(self.names, params))
        total = None
        row = 0
        for args, kwargs, targets, weights, rng, cuda_rng in self._inputs(t, calls):
            if rng is not None:
                torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)
            out = torch.func.functional_call(self.model, {**buffers, **named}, args, kwargs)
            per_sample = self.loss_fn(out, targets)
            n = per_sample.shape[0]
            scale = weights if w is None else weights * (1 + w[row:row + n])
            term = (scale * per_sample).sum()
            total = term if total is None else total + term
            row += n
        return total

    def _gradients(self, params: list[torch.Tensor], grads, row: dict) -> list[torch.Tensor | None]:
        """Gradients as the optimizer saw them: None where the parameter had no .grad at that step,
        zeros where it had one but the loss does not reach it."""
        out = []
        for k, (p, g) in enumerate(zip(params, grads)):
            if not row["active"][k]:
                out.append(None)
            else:
                out.append(torch.zeros_like(p) if g is None else g)
        return out

    def _step(self, t: int, calls: list[Call], row: dict, state: State, buffers: dict,
              w: torch.Tensor | None = None) -> State:
        """One optimizer step of the replay: θ_{t+1}, s_{t+1} from θ_t, s_t (no graph kept); ``w`` the rows' weights."""
        params = [p.detach().requires_grad_(True) for p in state.params]
        with torch.enable_grad():
            loss = self.loss(t, calls, params, buffers, w)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            new_params, new_opt = self.rule.functional_step(
                [p.detach() for p in params], self._gradients(params, grads, row), state.opt, row)
        return State([p.detach() for p in new_params], {f: [None if s is None else s.detach() for s in v]
                                                         for f, v in new_opt.items()})

    # -- forward replay ---------------------------------------------------------------------------
    def _start(self, c: int) -> State:
        flat = torch.as_tensor(self.rec.params_at(c)).to(device=self.device, dtype=self.dtype)
        params = [v.clone() for v in self.layout.unflatten(flat).values()]
        opt = {f: [None if s is None else s.to(device=self.device, dtype=self.dtype) for s in v]
               for f, v in self.rec.optimizer_state_at(c).items()}
        return State(params, opt)

    def _buffers(self, c: int) -> dict:
        """Scratch copies of the model's buffers (BatchNorm in training mode updates its running
        statistics in place during a replayed forward: they must not be the user's)."""
        return {n: b.to(self.device).clone() for n, b in self.rec.buffers_at(c).items()}

    def _replay(self, span: "_Span", lo: int, hi: int, start: State, stride: int, arrive: bool):
        """Replay steps from ``start`` = θ_lo; return the states at lo, lo+stride, … (< hi) and, if
        ``arrive``, θ_hi (else None: the last step is not taken)."""
        kept = {lo: start}
        state = start
        last = hi if arrive else hi - 1
        for t in range(lo, last):
            state = self._step(t, span.calls[t - span.lo], span.rows[t - span.lo], state, span.buffers)
            if (t + 1 - lo) % stride == 0 and t + 1 < hi:
                kept[t + 1] = state
            self._tick()
        return kept, (state if arrive else None)

    def _capacity(self, state: State) -> int:
        """L: how many states fit in the state memory (at least 2, so that each level of pieces halves them)."""
        return max(2, self.state_memory // max(1, state.nbytes()))

    def _check_arrival(self, c_next: int, arrived: State) -> None:
        """θ replayed from checkpoint c_next−1 must arrive at checkpoint c_next's stored θ within the tolerance."""
        self.drift[c_next] = check_arrival(arrived.params, self.rec.params_at(c_next), self.rec.checkpoint_steps,
                                           c_next, self.tolerance, "no exact answer is returned")

    # -- what if: the run again with some samples' loss weights changed ----------------------------
    def counterfactual(self, w: np.ndarray, verified: set) -> tuple[State, dict]:
        """θ and the buffers at the last checkpoint of the run retrained with per-sample weights (1 + w_i): the
        same batches in the same order (w_i = −1 removes sample i's term; a mean keeps its denominator).

        The run itself must replay: each interval not in ``verified`` (checkpoint indices already reached
        by a replay within the tolerance) is first replayed as recorded and checked, then added to it.
        Running statistics (BatchNorm) evolve with the changed run, from the first checkpoint's.
        """
        w_all = torch.as_tensor(np.asarray(w, dtype=np.float64), dtype=self.dtype, device=self.device)
        state = self._start(0)
        buffers = self._buffers(0)
        for c in range(len(self.rec.checkpoint_steps) - 1):
            lo, hi = int(self.rec.checkpoint_steps[c]), int(self.rec.checkpoint_steps[c + 1])
            if hi == lo:
                continue
            span = _Span(lo, self.rec.trace_rows(lo, hi), self.rec.calls(lo, hi), self._buffers(c))
            if c + 1 not in verified:
                _, arrived = self._replay(span, lo, hi, self._start(c), hi - lo, arrive=True)
                self._check_arrival(c + 1, arrived)
                verified.add(c + 1)
            for t in range(lo, hi):
                calls = span.calls[t - lo]
                samples = np.concatenate([k.samples for k in calls]) if calls else np.zeros(0, dtype=np.int64)
                state = self._step(t, calls, span.rows[t - lo], state, buffers,
                                   w_all[torch.from_numpy(samples).to(self.device)])
                self._tick()
        return state, buffers

    # -- the backward walk --------------------------------------------------------------------------
    def walk(self, vectors: dict[int, torch.Tensor], col: np.ndarray, n_cols: int) -> torch.Tensor:
        """∂⟨g_r, θ_{S(r)}(w)⟩/∂w, summed into columns: out[r, col[i]] += Σ_t d_t[r, i].

        ``vectors``: checkpoint index c → (m_c, D) test vectors g that join the walk at step S_c; the
        result's rows follow ascending c. ``col``: (N,) output column of each dataset index (−1: not
        wanted). Returns (Σ m_c, n_cols) in float64. Raises ReplayError if an interval does not replay.
        """
        stops = sorted(vectors)
        offsets, m = {}, 0
        for c in stops:
            offsets[c] = m
            m += int(vectors[c].shape[0])
        out = torch.zeros(m, n_cols, dtype=torch.float64)
        if m == 0 or stops[-1] == 0:
            return out
        walk = _Walk(torch.zeros(m, self.layout.size, dtype=self.dtype, device=self.device), None, m, out,
                     torch.as_tensor(np.asarray(col), dtype=torch.int64))
        for c in range(stops[-1], 0, -1):
            if c in vectors:  # this vector's walk starts here; rows of later-joining vectors lie below
                o = offsets[c]
                walk.adj[o:o + vectors[c].shape[0]] += vectors[c].to(device=self.device, dtype=self.dtype)
                walk.live = min(walk.live, o)
            self._walk_interval(c - 1, walk)
        return out

    def steps_to_walk(self, top: int) -> int:
        """Optimizer steps a walk from checkpoint ``top`` replays (its progress counts each twice: forward, back)."""
        return int(self.rec.checkpoint_steps[top] - self.rec.checkpoint_steps[0])

    def _walk_interval(self, c: int, walk: "_Walk") -> None:
        """Steps S_{c+1}−1 … S_c back: replay the interval from checkpoint c, check that it arrives at
        checkpoint c+1, then take the VJPs, in pieces of at most L states."""
        lo, hi = int(self.rec.checkpoint_steps[c]), int(self.rec.checkpoint_steps[c + 1])
        if hi == lo:
            return
        span = _Span(lo, self.rec.trace_rows(lo, hi), self.rec.calls(lo, hi), self._buffers(c))
        start = self._start(c)
        capacity = self._capacity(start)
        if hi - lo <= capacity:
            graphs = self._replay_graphs(span, lo, hi, start, c)
            if graphs is not None:  # the whole interval's step graphs fit: no second forward pass
                for t in range(hi - 1, lo - 1, -1):
                    self._vjp(graphs.pop(), walk)
                    self._tick()
                return
        stride = 1 if hi - lo <= capacity else -(-(hi - lo) // capacity)
        kept, arrived = self._replay(span, lo, hi, start, stride, arrive=True)
        self._check_arrival(c + 1, arrived)
        self._walk_back(span, lo, hi, kept, stride, walk)

    def _replay_graphs(self, span: "_Span", lo: int, hi: int, start: State, c: int) -> list | None:
        """Replay the interval building each step's graph, and keep them all, if they fit in the state memory
        (the first step's saved tensors are counted: ``graph_bytes``); else None, having replayed one step."""
        graphs, state = [], start
        for t in range(lo, hi):
            graph = self._graph(t, state, span)
            if t == lo and self.graph_bytes * (hi - lo) > self.state_memory:
                return None
            graphs.append(graph)
            state = graph.after
            self._tick()
        self._check_arrival(c + 1, state)
        return graphs

    def _walk_back(self, span: "_Span", lo: int, hi: int, kept: dict, stride: int, walk: "_Walk") -> None:
        if stride == 1:
            for t in range(hi - 1, lo - 1, -1):
                self._vjp(self._graph(t, kept.pop(t), span), walk)
                self._tick()
            return
        for a in sorted(kept, reverse=True):  # each piece from its kept state, recursively
            b = min(a + stride, hi)
            start = kept.pop(a)
            capacity = self._capacity(start)
            sub = 1 if b - a <= capacity else -(-(b - a) // capacity)
            sub_kept, _ = self._replay(span, a, b, start, sub, arrive=False)
            self._walk_back(span, a, b, sub_kept, sub, walk)

    def _graph(self, t: int, state: State, span: "_Span") -> "_StepGraph":
        """Step t as a differentiable function of (θ_t, s_t, w): its outputs (θ_{t+1}, s_{t+1}, the ones that
        depend on the inputs) with the gradient's graph built (``create_graph``), ready for VJPs."""
        row, calls = span.rows[t - span.lo], span.calls[t - span.lo]
        params = [p.detach().requires_grad_(True) for p in state.params]
        opt = {f: [None if s is None else s.detach().requires_grad_(True) for s in v] for f, v in state.opt.items()}
        samples = np.concatenate([c.samples for c in calls]) if calls else np.zeros(0, dtype=np.int64)
        w = torch.zeros(len(samples), dtype=self.dtype, device=self.device, requires_grad=True)
        counted = [0]

        def pack(x):  # counts the tensors the graph saves (the first graph only), keeps them as they are
            counted[0] += x.numel() * x.element_size()
            return x

        with torch.enable_grad(), (torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x)
                                   if not self.graph_bytes else contextlib.nullcontext()):
            loss = self.loss(t, calls, params, span.buffers, w)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            new_params, new_opt = self.rule.functional_step(params, self._gradients(params, grads, row), opt, row)
        if not self.graph_bytes:
            self.graph_bytes = counted[0] + state.nbytes()
        outputs, cot_of = [], []
        for k, p in enumerate(new_params):
            if p.requires_grad:
                outputs.append(p)
                cot_of.append(("param", k))
        for f, values in new_opt.items():
            for k, s in enumerate(values):
                if s is not None and s.requires_grad:
                    outputs.append(s)
                    cot_of.append((f, k))
        inputs = params + [s for v in opt.values() for s in v if s is not None] + [w]
        after = State([p.detach() for p in new_params],
                      {f: [None if s is None else s.detach() for s in v] for f, v in new_opt.items()})
        return _StepGraph(outputs, cot_of, inputs, len(params), opt, samples, after)

    def _vjp(self, graph: "_StepGraph", walk: "_Walk") -> None:
        """One step back, in place on ``walk``: (a_t, ā_t) and d_t from (a_{t+1}, ā_{t+1}) for its live rows."""
        outputs, cot_of, inputs, samples, opt = graph.outputs, graph.cot_of, graph.inputs, graph.samples, graph.opt
        views = list(self.layout.unflatten(walk.adj).values())  # (m, *shape) views of a_{t+1}
        cols = walk.col[torch.from_numpy(samples)] if len(samples) else torch.zeros(0, dtype=torch.int64)
        wanted = cols >= 0
        new_adj = torch.zeros_like(walk.adj)
        new_views = list(self.layout.unflatten(new_adj).values())
        new_state = {f: [None if s is None else torch.zeros((walk.adj.shape[0], *s.shape), dtype=self.dtype,
                                                             device=self.device) for s in v] for f, v in opt.items()}
        if not self._chunk_sized and self.vjp_memory is not None and self.graph_bytes:
            self.cotangent_chunk = max(1, min(self.cotangent_chunk, self.vjp_memory // self.graph_bytes))
            self._chunk_sized = True
        for a in range(walk.live, walk.m, self.cotangent_chunk):
            b = min(a + self.cotangent_chunk, walk.m)
            cots = []
            for kind, k in cot_of:
                if kind == "param":
                    cots.append(views[k][a:b])
                else:
                    prev = None if walk.state is None else walk.state.get(kind, [None] * (k + 1))[k]
                    cots.append(prev[a:b] if prev is not None else
                                torch.zeros((b - a, *outputs[len(cots)].shape), dtype=self.dtype, device=self.device))
            got = self._batched_vjp(outputs, inputs, cots)
            for k in range(graph.n_params):
                if got[k] is not None:
                    new_views[k][a:b] = got[k]
            pos = graph.n_params
            for f, v in opt.items():
                for k, s in enumerate(v):
                    if s is not None:
                        if got[pos] is not None:
                            new_state[f][k][a:b] = got[pos]
                        pos += 1
            d = got[-1]
            if d is not None and bool(wanted.any()):
                walk.out[a:b].index_add_(1, cols[wanted], d[:, wanted.to(d.device)].detach().to("cpu", torch.float64))
        walk.adj.copy_(new_adj)
        walk.state = new_state

    def _batched_vjp(self, outputs, inputs, cots) -> list:
        """The VJP of ``outputs`` w.r.t. ``inputs`` for a batch of cotangents: vmapped over the batch
        (``is_grads_batched``) or one cotangent at a time (the graph kept between them). Same numbers either
        way; which is faster depends on the model and the device (a conv net's double-backward batches poorly
        on the CPU), so with more than one cotangent the first step times both and the walk keeps the faster
        (``vjp_method``; ``vjp_seconds`` holds the timings)."""
        if not outputs:
            return [None] * len(inputs)
        n = cots[0].shape[0]
        if n == 1:
            return [None if g is None else g.unsqueeze(0) for g in torch.autograd.grad(
                outputs, inputs, grad_outputs=[c[0] for c in cots], retain_graph=True, allow_unused=True)]
        if self.vjp_method == "auto":
            timed = {}
            for method in ("batched", "loop"):
                start = time.perf_counter()
                try:
                    got = getattr(self, f"_vjp_{method}")(outputs, inputs, cots)
                except RuntimeError:  # an operation without a batching rule: the loop it is
                    continue
                timed[method] = time.perf_counter() - start
            self.vjp_seconds = timed
            self.vjp_method = min(timed, key=timed.get)
            return got
        if self.vjp_method == "batched":
            try:
                return self._vjp_batched(outputs, inputs, cots)
            except RuntimeError:
                self.vjp_method = "loop"
        return self._vjp_loop(outputs, inputs, cots)

    @staticmethod
    def _vjp_batched(outputs, inputs, cots) -> list:
        return list(torch.autograd.grad(outputs, inputs, grad_outputs=cots, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True))

    @staticmethod
    def _vjp_loop(outputs, inputs, cots) -> list:
        rows = [torch.autograd.grad(outputs, inputs, grad_outputs=[c[i] for c in cots], retain_graph=True,
                                    allow_unused=True) for i in range(cots[0].shape[0])]
        return [None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(inputs))]

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.update()


@dataclass
class _StepGraph:
    """One step as a function of its inputs (θ_t, s_t, w), with the graph of its gradient kept."""

    outputs: list  # θ_{t+1} and s_{t+1} tensors that depend on the inputs
    cot_of: list  # for each output: ("param", k) or (state field, k)
    inputs: list  # θ_t per parameter, s_t per present state tensor, then w (the step's rows)
    n_params: int
    opt: dict  # s_t leaves (None where absent)
    samples: np.ndarray  # the dataset index of each row of w
    after: State  # θ_{t+1}, s_{t+1} detached: the next step's start


@dataclass
class _Span:
    """One checkpoint interval's recorded steps: trace rows, backward calls, the buffers replay uses."""

    lo: int
    rows: list
    calls: list
    buffers: dict


@dataclass
class _Walk:
    """The walk's running adjoints: a (m, D) for θ, ā per optimizer-state tensor (m, *shape) or None,
    rows below ``live`` not yet started (zero), and the accumulated result."""

    adj: torch.Tensor
    state: dict | None
    live: int
    out: torch.Tensor
    col: torch.Tensor

    @property
    def m(self) -> int:
        return self.adj.shape[0]
