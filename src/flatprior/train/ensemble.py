"""Train M networks of one architecture at once: stacked parameters, one batched step for all.

Each member ``m`` has its own initial weights (its model), its own data (its task's S ∪ A), its
own batch order (``torch.randperm`` from ``torch.Generator().manual_seed(seed_m)``, drawn once
per epoch exactly as :func:`flatprior.train.train` does) and its own stopping epoch (frozen at the
first epoch with zero error, then ``overtrain_epochs`` more, or collapse, or the cap). A member
produces the same :class:`~flatprior.train.TrainResult` as :func:`flatprior.train.train` would
for the same model, task and seed (loss trajectory equal to float32 rounding; tested).

Stacking. Every parameter tensor of shape ``s`` becomes one tensor ``[M, *s]``
(:mod:`flatprior.models.stacked`). The loss of the ensemble is the sum of the members' own
losses, so the gradient of that sum with respect to the stacked tensor is, slice by slice, each
member's own gradient (no member's loss depends on another member's weights). Forward paths:
``"bmm"`` (batched matmuls, FCN), ``"vmap"`` (``torch.func.vmap`` + ``functional_call``, any
model without BatchNorm/Dropout) or ``"loop"`` (FCN, member by member through the single
network's own ``Linear``/BCE kernels: bitwise the trajectories of :func:`train`, tested; 2.5x
slower than ``bmm`` on MNIST, 60x on the Boolean batch-1 system). Measured (forward +
backward of one step, 1 thread, machine loaded by other engineers,
``benchmarks/bench_ensemble.py --backends``): Boolean 7-40-40-1,
batch 1, M = 1000: ``bmm`` 10.9 ms, ``vmap`` 14.9 ms; MNIST 784-40-40-1, batch 128, M = 55:
``bmm`` 40.5 ms, ``vmap`` 43.4 ms. ``"auto"`` therefore takes ``bmm`` for FCNs. With ``bmm``
the float32 rounding differs from the single network's (other matmul kernels): trajectories
agree to ~1e-7 relative per epoch, and over hundreds of epochs (MNIST) that difference can grow
until a stopping epoch differs.

Optimizers (all element-wise, hence exact on stacked parameters: every update of entry ``i``
of member ``m`` reads only entry ``i`` of that member's parameter, gradient and state, and the
member's own step count; nothing is reduced across entries or members). They are written out
here rather than calling ``torch.optim`` because each member needs its own step count (Adam's
and Adagrad's bias terms) and a per-member "skip this step" mask (a member whose epoch has fewer
batches must not move, and for momentum/Adam a zero gradient would still move it):

- ``sgd``/``gd``: ``p <- p - lr (g + wd p)`` (with ``momentum``: torch's buffer, first step
  ``buf = g``, then ``buf <- mu buf + (1 - dampening) g``, Nesterov optional);
- ``momentum``: the same with ``mu = 0.9``, ``wd = 5e-4``;
- ``adam``: Kingma & Ba (2015) with torch's bias correction ``1 - beta^t`` from the member's
  own ``t``; ``adagrad``, ``rmsprop`` (plain/centered/momentum), ``adadelta``: torch's formulas.

Refused (one-line error naming ``--ensemble off``): ``entropy-sgd`` (its inner Langevin loop
draws noise from the global RNG in the single-network order and re-evaluates a closure per
member), ``sam`` and ``asam`` (their ascent step divides by the norm of the whole network's
gradient, and they take a second forward-backward per step), ``fam_strength > 0`` (the FAM
regulariser uses per-layer norms of each member's weights) and ``augment`` (random crops drawn
from the shared generator).

Memory. One member costs about ``4 bytes x (P (params + grad + optimizer state + update
temporaries) + B x A_train + N_eval x A_eval)`` with ``A`` the activations per example (counted
by a probe forward); the ensemble is cut into chunks of ``memory_budget // per_member`` members
that are trained one after the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flatprior.data.tasks import Task
from flatprior.errors import FlatpriorError
from flatprior.models.stacked import (
    check_same_architecture,
    check_stackable_model,
    fcn_bce_and_grads,
    fcn_forward_shared,
    resolve_backend,
    stack_parameters,
    stacked_forward,
)
from flatprior.train.optimizers import OPTIMIZERS
from flatprior.train.stopping import cap_message, collapse_message
from flatprior.train.trainer import TrainConfig, TrainResult, check_task

#: optimizer name -> names of torch keyword arguments the stacked update implements
STACKABLE: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum", "dampening", "weight_decay", "nesterov"),
    "gd": ("momentum", "dampening", "weight_decay", "nesterov"),
    "momentum": ("momentum", "dampening", "weight_decay", "nesterov"),
    "adam": ("betas", "eps", "weight_decay"),
    "adagrad": ("lr_decay", "weight_decay", "eps", "initial_accumulator_value"),
    "rmsprop": ("alpha", "eps", "weight_decay", "momentum", "centered"),
    "adadelta": ("rho", "eps", "weight_decay"),
}
DEFAULT_MEMORY_BUDGET = 2 * 1024**3
_OFF = "use --ensemble off (or flatprior.train.train per network)"


def check_stackable(config: TrainConfig) -> None:
    """Raise a one-line :class:`FlatpriorError` if ``config`` cannot be trained as an ensemble."""
    if config.optimizer not in STACKABLE:
        raise FlatpriorError(
            f"optimizer {config.optimizer!r} cannot be stacked across networks (not element-wise); "
            f"{_OFF}"
        )
    bad = set(config.optimizer_kwargs) - set(STACKABLE[config.optimizer])
    if bad:
        raise FlatpriorError(
            f"optimizer_kwargs {sorted(bad)} are not implemented for stacked {config.optimizer}; "
            f"{_OFF}"
        )
    if config.optimizer_kwargs.get("amsgrad") or config.optimizer_kwargs.get("maximize"):
        raise FlatpriorError(f"amsgrad/maximize are not implemented for ensembles; {_OFF}")
    if config.fam_strength > 0:
        raise FlatpriorError(f"fam_strength > 0 (per-network layer norms) is not stackable; {_OFF}")
    if config.augment:
        raise FlatpriorError(f"augment=True is not supported by ensemble training; {_OFF}")


# ------------------------------------------------------------------------------ memory
def _activations_per_example(model: nn.Module, x1: Tensor) -> int:
    """Numbers of floats the leaf modules output for one example (a probe forward)."""
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, Tensor):
            total[0] += out.numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()
            model(x1)
    finally:
        for h in hooks:
            h.remove()
    return total[0] + x1.numel()


# ------------------------------------------------------------------------------ optimizers
def _col(v: Tensor, like: Tensor) -> Tensor:
    """``[M]`` -> ``[M, 1, ..., 1]`` broadcasting against ``like`` (``[M, *s]``)."""
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class _StackedOptimizer:
    """torch's element-wise optimizers on stacked ``[M, *s]`` parameters (see module docstring).

    ``step(params, grads, active)`` updates ``params`` in place (in-place ops in torch's order,
    so the arithmetic is torch's); members with ``active[m]`` False keep their parameters, state
    and step count. Per-member scalars (Adam's bias correction) broadcast as ``[M, 1, ...]``; when
    every member has the same step count they are Python floats, as in torch.
    """

    def __init__(self, name: str, params: list[Tensor], lr: float | None, overrides: dict):
        spec = OPTIMIZERS[name]
        self.name = name
        self.kind = {"gd": "sgd", "momentum": "sgd"}.get(name, name)
        self.lr = spec.lr if lr is None else float(lr)
        self.h = {**spec.kwargs, **overrides}
        m = params[0].shape[0]
        self.t = torch.zeros(m, dtype=torch.float64)  # per-member step count
        zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
        self.state: dict[str, list[Tensor]] = {}
        if self.kind == "sgd" and self.h.get("momentum", 0.0):
            self.state["buf"] = zeros()
        elif self.kind == "adam":
            self.state["exp_avg"], self.state["exp_avg_sq"] = zeros(), zeros()
        elif self.kind == "adagrad":
            init = float(self.h.get("initial_accumulator_value", 0.0))
            self.state["sum"] = [torch.full_like(p, init) for p in params]
        elif self.kind == "rmsprop":
            self.state["square_avg"] = zeros()
            if self.h.get("centered", False):
                self.state["grad_avg"] = zeros()
            if self.h.get("momentum", 0.0):
                self.state["buf"] = zeros()
        elif self.kind == "adadelta":
            self.state["square_avg"], self.state["acc_delta"] = zeros(), zeros()

    def keep(self, idx: Tensor) -> None:
        """Keep only members ``idx`` (after some finished)."""
        self.t = self.t[idx]
        for k, ts in self.state.items():
            self.state[k] = [s[idx] for s in ts]

    @torch.no_grad()
    def step(self, params: list[Tensor], grads: list[Tensor], active: Tensor | None) -> None:
        t_old = self.t
        self.t = self.t + (1.0 if active is None else active.double())
        tmin, tmax = float(t_old.min()), float(t_old.max())
        # one step count for all: Python scalars (torch's own arithmetic); else [M] tensors
        t = tmin if tmin == tmax else t_old
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            st = {k: v[i] for k, v in self.state.items()}
            if active is None:
                self._update(p, g, st, t)
                continue
            new_p, new_st = p.detach().clone(), {k: v.clone() for k, v in st.items()}
            self._update(new_p, g, new_st, t)
            a = _col(active, p).bool()
            p.copy_(torch.where(a, new_p, p))
            for k, v in new_st.items():
                st[k].copy_(torch.where(a, v, st[k]))

    def _scalar(self, v: float | Tensor, like: Tensor) -> float | Tensor:
        return v if isinstance(v, float) else _col(v, like)

    def _update(self, p: Tensor, g: Tensor, st: dict[str, Tensor], t: float | Tensor) -> None:
        """One torch step on ``p`` and state ``st`` in place; ``t``: step count before it."""
        h, lr = self.h, self.lr
        wd = float(h.get("weight_decay", 0.0))
        if wd:  # g is this step's own gradient tensor: in place saves an allocation per step
            g = g.add_(p, alpha=wd)
        if self.kind == "sgd":
            mu = float(h.get("momentum", 0.0))
            d = g
            if mu:
                buf = st["buf"]
                if isinstance(t, float):
                    if t == 0:
                        buf.copy_(g)
                    else:
                        buf.mul_(mu).add_(g, alpha=1 - float(h.get("dampening", 0.0)))
                else:
                    started = _col(t > 0, p).bool()
                    damp = float(h.get("dampening", 0.0))
                    buf.copy_(torch.where(started, buf * mu + (1 - damp) * g, g))
                d = g.add(buf, alpha=mu) if h.get("nesterov", False) else buf
            p.add_(d, alpha=-lr)
        elif self.kind == "adam":
            b1, b2 = h.get("betas", (0.9, 0.999))
            eps = float(h.get("eps", 1e-8))
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            step = t + 1
            if isinstance(step, float):
                step_size = lr / (1 - b1**step)
                denom = (v.sqrt() / (1 - b2**step) ** 0.5).add_(eps)
                p.addcdiv_(m, denom, value=-step_size)
            else:
                denom = (v.sqrt() / _col((1 - b2**step).sqrt(), p)).add_(eps)
                # torch's addcdiv evaluates (value * t1) / t2; same order here
                p.sub_(m.mul(_col(lr / (1 - b1**step), p)).div_(denom))
        elif self.kind == "adagrad":
            eps = float(h.get("eps", 1e-10))
            decay = float(h.get("lr_decay", 0.0))
            s = st["sum"]
            s.addcmul_(g, g, value=1)
            std = s.sqrt().add_(eps)
            if isinstance(t, float):
                p.addcdiv_(g, std, value=-lr / (1 + t * decay))
            else:
                p.sub_(g.mul(_col(lr / (1 + t * decay), p)).div_(std))
        elif self.kind == "rmsprop":
            alpha, eps = float(h.get("alpha", 0.99)), float(h.get("eps", 1e-8))
            sq = st["square_avg"]
            sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)
            if h.get("centered", False):
                ga = st["grad_avg"]
                ga.lerp_(g, 1 - alpha)
                avg = sq.addcmul(ga, ga, value=-1).sqrt_()
            else:
                avg = sq.sqrt()
            avg = avg.add_(eps)
            mu = float(h.get("momentum", 0.0))
            if mu:
                buf = st["buf"]
                buf.mul_(mu).addcdiv_(g, avg)
                p.add_(buf, alpha=-lr)
            else:
                p.addcdiv_(g, avg, value=-lr)
        else:  # adadelta
            rho, eps = float(h.get("rho", 0.9)), float(h.get("eps", 1e-6))
            sq, acc = st["square_avg"], st["acc_delta"]
            sq.mul_(rho).addcmul_(g, g, value=1 - rho)
            std = sq.add(eps).sqrt_()
            delta = acc.add(eps).sqrt_().div_(std).mul_(g)
            acc.mul_(rho).addcmul_(delta, delta, value=1 - rho)
            p.add_(delta, alpha=-lr)


def _member_losses(params: list[Tensor], x_all: Tensor, y_all: Tensor, idx: Tensor,
                   counts: Tensor | None, reduction: str) -> Tensor:
    """Each member's batch loss exactly as :func:`flatprior.train.train` computes it.

    Its own ``Linear`` kernels and ``BCEWithLogitsLoss`` on its valid rows only: the ``"loop"``
    backend's bitwise-faithful path.
    """
    n_layers = len(params) // 2
    out = []
    for m in range(idx.shape[0]):
        rows = idx[m] if counts is None else idx[m, : int(counts[m])]
        if len(rows) == 0:
            out.append(params[-1][m].sum() * 0.0)  # member sits this step out
            continue
        h = x_all[rows].reshape(len(rows), -1)
        for i in range(n_layers):
            h = nn.functional.linear(h, params[2 * i][m], params[2 * i + 1][m])
            if i < n_layers - 1:
                h = torch.relu(h)
        out.append(nn.functional.binary_cross_entropy_with_logits(
            h.reshape(-1), y_all[rows], reduction=reduction))
    return torch.stack(out)


# ------------------------------------------------------------------------------ data table
class _Pool:
    """All distinct data blocks of the members in one table; members refer to rows by index.

    Members trained on the same S (or A, E) share one copy: the Boolean sweep has one block.
    """

    def __init__(self) -> None:
        self.blocks: list[tuple[Tensor, Tensor]] = []
        self._seen: dict[tuple, int] = {}
        self._offsets: list[int] = []
        self._n = 0

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        """Register ``(x, y)``; return its row indices in the table (``[n]`` int64)."""
        if len(y) == 0:
            return torch.zeros(0, dtype=torch.long)
        key = (x.data_ptr(), tuple(x.shape), y.data_ptr())
        if key not in self._seen:
            for j, (bx, by) in enumerate(self.blocks):  # equal content, other tensor objects
                if bx.shape == x.shape and torch.equal(bx, x) and torch.equal(by, y):
                    self._seen[key] = j
                    break
            else:
                self._seen[key] = len(self.blocks)
                self.blocks.append((x, y))
                self._offsets.append(self._n)
                self._n += len(y)
        j = self._seen[key]
        return torch.arange(self._offsets[j], self._offsets[j] + len(y))

    def tables(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        x = torch.cat([b[0] for b in self.blocks]).to(dtype)
        y = torch.cat([b[1] for b in self.blocks]).to(dtype)
        return x, y


def _pad_rows(rows: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Index lists of unequal length -> ``[M, n_max]`` indices (pad 0), mask, lengths."""
    lens = torch.tensor([len(r) for r in rows])
    n_max = max(int(lens.max()), 1)
    idx = torch.zeros(len(rows), n_max, dtype=torch.long)
    for m, r in enumerate(rows):
        idx[m, : len(r)] = r
    mask = torch.arange(n_max)[None, :] < lens[:, None]
    return idx, mask, lens


# ------------------------------------------------------------------------------ public API
@dataclass
class EnsembleOutcome:
    """Per-member outcome of :func:`train_ensemble`: ``result`` or ``error``.

    ``result`` or, if its loss became NaN/inf (where :func:`flatprior.train.train` raises),
    ``error`` with the same one-line message.
    """

    result: TrainResult | None
    error: FlatpriorError | None = None


def stacked_memory_per_member(
    model: nn.Module, task: Task, config: TrainConfig, n_state: int | None = None
) -> int:
    """Bytes one member needs in the ensemble.

    Counts parameters, gradient, optimizer state, update temporaries, training and evaluation
    activations; element size of the model's dtype.
    """
    p = sum(q.numel() for q in model.parameters())
    if n_state is None:
        kind = {"gd": "sgd", "momentum": "sgd"}.get(config.optimizer, config.optimizer)
        mom = {**OPTIMIZERS[config.optimizer].kwargs, **config.optimizer_kwargs}.get("momentum")
        n_state = {"sgd": 1 if mom else 0, "adam": 2, "adagrad": 1, "rmsprop": 3,
                   "adadelta": 2}.get(kind, 2)
    act = _activations_per_example(model, task.x_train[:1])
    n_fit = len(task.y_train) + len(task.y_attack)
    batch = min(config.batch_size, n_fit)
    n_eval = max(len(task.y_train), len(task.y_attack), len(task.y_test))
    elt = next(model.parameters()).element_size()
    # params + grad + state + (new p, new state, temporaries) ~ 2 (state + 2); activations x3
    # (forward, saved for backward, gradient)
    return elt * (p * (2 * n_state + 4) + 3 * batch * act + 2 * n_eval * act + 4 * n_fit)


def format_bytes(n: float) -> str:
    """``n`` bytes as ``"512 B"``, ``"52.1 KiB"``, ``"1.5 GiB"`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def budget_error(per_member: int, memory_budget: int) -> FlatpriorError:
    """The one-line error for a memory budget below one member's need."""
    return FlatpriorError(
        f"one network needs ~{format_bytes(per_member)} but memory_budget is "
        f"{format_bytes(memory_budget)}; raise memory_budget (flatprior run --memory-budget) or "
        "train it with --ensemble off"
    )


def train_ensemble(
    models: Sequence[nn.Module],
    tasks: Sequence[Task] | Task,
    config: TrainConfig | None = None,
    seeds: Sequence[int] | None = None,
    *,
    backend: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    on_finished: Callable[[int, EnsembleOutcome], None] | None = None,
) -> list[EnsembleOutcome]:
    """Train ``models`` (one architecture) in place, together, each as :func:`train` would.

    Member ``m`` is ``models[m]`` trained on ``tasks[m]`` (or one shared task) with
    ``config`` and ``seed = seeds[m]`` (default ``config.seed`` for all): BCE-with-logits on
    S ∪ A (``mean`` or ``sum`` over the batch), batch order from ``seed``, evaluation in eval mode
    on S, A, E after every epoch, stop at the first epoch with zero error (+ overtraining), at
    collapse or at ``max_epochs``. ``history`` has the same keys as :func:`train`'s;
    ``epoch_time_s`` is the ensemble's epoch time divided by the members it trained.

    Args:
        models: M networks with equal parameter names and shapes (e.g. ``make_model`` with M
            seeds); their parameters are overwritten with the trained ones.
        tasks: one task per member, or one task for all.
        config: shared training configuration (its ``seed`` is used when ``seeds`` is None).
        seeds: per-member batch-order seeds.
        backend: ``"bmm"`` (FCN, batched matmuls: fastest), ``"loop"`` (FCN, each member
            through the single network's own kernels: bitwise the trajectories of
            :func:`train`, 2.5x slower than ``bmm`` on MNIST; for exact reproduction of long
            runs, where float32 rounding differences grow), ``"vmap"`` (any model without
            BatchNorm/Dropout), ``"auto"`` (``bmm`` for FCNs, else ``vmap``).
        memory_budget: bytes; the ensemble is trained in chunks of members that fit (see
            :func:`stacked_memory_per_member`).
        on_finished: called as ``on_finished(m, outcome)`` when member ``m`` stops.

    Returns:
        One :class:`EnsembleOutcome` per member, in order.

    Raises:
        FlatpriorError: mixed architectures, an optimizer/option that cannot be stacked, a task
            the model cannot take, or a memory budget below one member.
    """
    config = (config or TrainConfig()).validate()
    check_stackable(config)
    models = list(models)
    if not models:
        return []
    tasks = [tasks] * len(models) if isinstance(tasks, Task) else list(tasks)
    if len(tasks) != len(models):
        raise FlatpriorError(f"got {len(models)} models but {len(tasks)} tasks; give one per model")
    seeds = [config.seed] * len(models) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != len(models):
        raise FlatpriorError(f"got {len(models)} models but {len(seeds)} seeds; give one per model")
    base = models[0]
    check_same_architecture(models)
    # one architecture: the task checks and the memory probe once per distinct task (members
    # often share one task object: a probe forward per member cost ~0.6 ms each)
    first_of: dict[int, int] = {}
    for i, task in enumerate(tasks):
        if task.input_shape != tasks[0].input_shape:
            raise FlatpriorError(
                f"task {i} has inputs of shape {task.input_shape}, task 0 {tasks[0].input_shape}; "
                "an ensemble needs one input shape (group runs by dataset)"
            )
        if id(task) not in first_of:
            first_of[id(task)] = i
            check_task(models[i], task)
    check_stackable_model(base)
    backend = resolve_backend(base, backend)
    per = max(stacked_memory_per_member(models[i], tasks[i], config) for i in first_of.values())
    if per > memory_budget:
        raise budget_error(per, memory_budget)
    chunk = max(1, memory_budget // per)
    out: list[EnsembleOutcome] = []
    for start in range(0, len(models), chunk):
        sl = slice(start, start + chunk)

        def cb(m, o, start=start):
            if on_finished is not None:
                on_finished(start + m, o)

        out += _train_chunk(models[sl], tasks[sl], config, seeds[sl], backend, cb)
    return out


def _train_chunk(models, tasks, config: TrainConfig, seeds, backend: str,
                 on_finished: Callable) -> list[EnsembleOutcome]:
    """Train one chunk of members together until each has stopped.

    See :class:`_ChunkTrainer` for the steps; returns one outcome per member, in order.
    """
    return _ChunkTrainer(models, tasks, config, seeds, backend, on_finished).run()


class _ChunkTrainer:
    """The training loop of one chunk: stacked parameters, per-member data, stops and records.

    Set-up stacks the members' parameters and indexes all their splits into one row pool; each
    epoch draws every live member's batch order, takes the batched steps, measures, decides who
    stops (zero error + overtraining, collapse, cap, non-finite loss) and drops those members
    from the stacked tensors after writing their weights back to their models.
    """

    def __init__(self, models, tasks, config: TrainConfig, seeds, backend: str,
                 on_finished: Callable) -> None:
        """Stack the parameters, build the optimizer, the row pool and the bookkeeping.

        Args:
            models: the members' models (one architecture); trained weights are written back.
            tasks: one task per member.
            config: the shared training configuration.
            seeds: one batch-order seed per member.
            backend: the stacked forward path (``"bmm"``, ``"vmap"`` or ``"loop"``).
            on_finished: called with (member number, outcome) as each member stops.
        """
        self.t_start = time.perf_counter()
        self.models, self.tasks, self.config = models, tasks, config
        self.backend, self.on_finished = backend, on_finished
        M = len(models)
        base = models[0]
        self.names = [n for n, _ in base.named_parameters()]
        self.dtype = next(base.parameters()).dtype
        self.params = stack_parameters(models)
        self.forward = stacked_forward(base, backend)
        self.opt = _StackedOptimizer(config.optimizer, self.params, config.lr,
                                     dict(config.optimizer_kwargs))
        self.full_batch = OPTIMIZERS[config.optimizer].full_batch
        self._index_rows()
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.mean = config.loss_reduction == "mean"

        # per-member bookkeeping (index = original member number)
        self.history: list[list[dict[str, Any]]] = [[] for _ in range(M)]
        self.zero_epoch: list[int | None] = [None] * M
        self.cap = [config.max_epochs] * M
        self.streak = [0] * M
        self.outcomes: list[EnsembleOutcome | None] = [None] * M
        self.alive = torch.arange(M)  # members still training, in stacked order

    def _index_rows(self) -> None:
        """Put every member's splits into one row pool; derive batch sizes and step counts.

        Sets the pooled tables ``x_all``/``y_all``, the padded fit and evaluation indices, the
        per-member batch sizes and steps per epoch, and the contiguous pool block of each split.
        """
        config = self.config
        pool = _Pool()
        fit_rows, tr_rows, at_rows, te_rows = [], [], [], []
        for t in self.tasks:
            tr, at = pool.add(t.x_train, t.y_train), pool.add(t.x_attack, t.y_attack)
            te = (pool.add(t.x_test, t.y_test) if config.track_test
                  else torch.zeros(0, dtype=torch.long))
            tr_rows.append(tr)
            at_rows.append(at)
            te_rows.append(te)
            fit_rows.append(torch.cat([tr, at]))
        self.x_all, self.y_all = pool.tables(self.dtype)
        self.n_fit = n_fit = torch.tensor([len(r) for r in fit_rows])
        self.batch = batch = torch.tensor([int(n) if self.full_batch
                                           else min(config.batch_size, int(n)) for n in n_fit])
        self.steps = [(int(n) + int(b) - 1) // int(b) for n, b in zip(n_fit, batch, strict=True)]
        self.B = int(batch.max())
        self.ragged = len(set(n_fit.tolist())) > 1 or len(set(batch.tolist())) > 1
        self.fit_idx, _, _ = _pad_rows(fit_rows)
        self.ev = {name: _pad_rows(rows) for name, rows in
                   (("train", tr_rows), ("attack", at_rows), ("test", te_rows))}
        # every split of a member is one contiguous block of the pool, often shared (one S for all
        # members of a seed): evaluate block by block, the first layer as ONE matmul against the
        # weights of all members on that block, without a per-member copy of the inputs
        self.blocks = {name: [(int(r[0]), len(r)) if len(r) else None for r in rows]
                       for name, rows in
                       (("train", tr_rows), ("attack", at_rows), ("test", te_rows))}

    def run(self) -> list[EnsembleOutcome]:
        """Measure at epoch 0, then train epoch by epoch until no member is left.

        Returns:
            The outcome of every member, in member order.
        """
        for m, met in zip(self.alive.tolist(), self.measure(0, 0.0), strict=True):
            self.history[m].append(met)
        epoch = 0
        for p in self.params:
            p.requires_grad_(True)
        while len(self.alive):
            epoch += 1
            self._epoch(epoch)
        return [o for o in self.outcomes if o is not None]

    def _epoch(self, epoch: int) -> None:
        """Train every live member for one epoch, measure, and retire the members that stop.

        Args:
            epoch: the epoch number (1-based).
        """
        t0 = time.perf_counter()
        act = self.alive.tolist()
        order, valid, n_steps = self._batch_order(act)
        bad, bad_loss = self._train_steps(act, order, valid, n_steps)
        mets = self.measure(epoch, (time.perf_counter() - t0) / len(act))
        keep = []
        finished = []
        for j, (m, met) in enumerate(zip(act, mets, strict=True)):
            if bool(bad[j]):
                lr = self.opt.lr
                finished.append(j)
                self.outcomes[m] = EnsembleOutcome(None, FlatpriorError(
                    f"training loss became {float(bad_loss[j])} at epoch {epoch}; lower the "
                    f"learning rate (lr={lr})"))
                continue
            self.history[m].append(met)
            done = self._stop_reason(m, met, epoch)
            if done is None:
                keep.append(j)
            else:
                finished.append(j)
                self._finish(m, done[0], epoch, done[1])
        if finished:
            self._retire(keep, finished)

    def _batch_order(self, act: list[int]) -> tuple[Tensor, Tensor | None, int]:
        """Draw this epoch's batch order of every live member and lay it out step by step.

        One randperm per member per epoch from its own generator (as ``train()``). Ragged
        chunks (different fit sizes or batch sizes) place member ``m``'s step ``s`` rows at
        ``s*B..`` of its row, with a validity mask.

        Args:
            act: the live members (original numbers), in stacked order.

        Returns:
            The pool row indices ``[len(act), ...]``, the validity mask (``None`` if not
            ragged) and the number of steps of the epoch.
        """
        perms = [torch.randperm(int(self.n_fit[m]), generator=self.gens[m]) for m in act]
        n_steps = max(self.steps[m] for m in act)
        if not self.ragged:
            return torch.gather(self.fit_idx[self.alive], 1, torch.stack(perms)), None, n_steps
        B = self.B
        order = torch.zeros(len(act), n_steps * B, dtype=torch.long)
        valid = torch.zeros(len(act), n_steps * B, dtype=torch.bool)
        for j, m in enumerate(act):
            b = int(self.batch[m])
            g = self.fit_idx[m][perms[j]]
            # member m's step s uses its own batch size b: place rows s*b.. at s*B..
            for s in range(self.steps[m]):
                rows = g[s * b : (s + 1) * b]
                order[j, s * B : s * B + len(rows)] = rows
                valid[j, s * B : s * B + len(rows)] = True
        return order, valid, n_steps

    def _train_steps(self, act: list[int], order: Tensor, valid: Tensor | None,
                     n_steps: int) -> tuple[Tensor, Tensor]:
        """Take the epoch's optimizer steps; note each member's first non-finite loss.

        Args:
            act: the live members (original numbers), in stacked order.
            order: the pool row indices from :meth:`_batch_order`.
            valid: the validity mask from :meth:`_batch_order` (ragged chunks only).
            n_steps: the number of steps of the epoch.

        Returns:
            A per-member "loss went non-finite" flag and that first bad loss value.
        """
        bad_loss = torch.full((len(act),), float("nan"), dtype=torch.float64)
        bad = torch.zeros(len(act), dtype=torch.bool)
        for s in range(n_steps):
            losses, active, grads = self._step_losses(act, order, valid, s)
            if grads is None:
                grads = list(torch.autograd.grad(losses.sum(), self.params))
            self.opt.step(self.params, grads, active)
            with torch.no_grad():
                fin = torch.isfinite(losses.detach())
                if active is not None:
                    fin |= ~active
                new_bad = ~fin & ~bad
                if bool(new_bad.any()):
                    bad_loss = torch.where(new_bad, losses.detach().double(), bad_loss)
                    bad |= new_bad
        return bad, bad_loss

    def _step_losses(self, act: list[int], order: Tensor, valid: Tensor | None,
                     s: int) -> tuple[Tensor, Tensor | None, list[Tensor] | None]:
        """Compute every live member's loss on its batch of step ``s``.

        Args:
            act: the live members (original numbers), in stacked order.
            order: the pool row indices from :meth:`_batch_order`.
            valid: the validity mask from :meth:`_batch_order` (ragged chunks only).
            s: the step number within the epoch.

        Returns:
            The per-member losses, the mask of members taking this step (``None``: all) and,
            for the ``bmm`` backend, the gradients (:func:`fcn_bce_and_grads`; else
            ``None``: the caller differentiates the losses).
        """
        B, dtype = self.B, self.dtype
        if self.ragged:
            idx = order[:, s * B : (s + 1) * B]
            w = valid[:, s * B : (s + 1) * B]
            cnt = w.sum(1)
            active = cnt > 0
            if bool(active.all()):
                active = None  # nobody sits out: no masked (3x memory traffic) update
            weight = w.to(dtype) / (cnt.clamp(min=1).to(dtype)[:, None] if self.mean else 1.0)
        else:
            b0 = int(self.batch[act[0]])
            idx = order[:, s * b0 : (s + 1) * b0]
            active = None
            weight = None
        if self.backend == "bmm":  # autograd's gradients, without the autograd engine
            yb = self.y_all[idx]
            row_grad = weight if weight is not None else (
                torch.ones_like(yb) / yb.shape[1] if self.mean else None)
            with torch.no_grad():
                bce, grads = fcn_bce_and_grads([p.detach() for p in self.params],
                                               self.x_all[idx], yb, row_grad)
            if weight is not None:
                losses = (bce * weight).sum(1)
            else:
                losses = bce.mean(1) if self.mean else bce.sum(1)
            return losses, active, grads
        if self.backend == "loop":
            losses = _member_losses(self.params, self.x_all, self.y_all, idx,
                                    cnt if self.ragged else None, self.config.loss_reduction)
        else:
            xb, yb = self.x_all[idx], self.y_all[idx]
            bce = nn.functional.binary_cross_entropy_with_logits(
                self.forward(self.params, xb), yb, reduction="none")
            if weight is not None:
                losses = (bce * weight).sum(1)
            else:
                losses = bce.mean(1) if self.mean else bce.sum(1)
        return losses, active, None

    @torch.no_grad()
    def measure(self, epoch: int, epoch_time: float) -> list[dict[str, Any]]:
        """Measure every live member on its train, attack and test split.

        Args:
            epoch: the epoch number recorded in the rows.
            epoch_time: the epoch's wall time per member.

        Returns:
            One history row per live member, in stacked order.
        """
        # as Python lists once per split: per-member tensor indexing cost ~50 select + item
        # calls per member and epoch (the same floats: .tolist() converts as float() does)
        res = {split: [t.tolist() for t in self._split_metrics(split)]
               for split in ("train", "attack", "test")}
        config, ev = self.config, self.ev
        lens = {s: ev[s][2].tolist() for s in ev}
        out = []
        nan = float("nan")
        for j, m in enumerate(self.alive.tolist()):
            has = {s: lens[s][m] > 0 for s in ev}
            out.append({
                "epoch": epoch,
                "phase": "train" if self.zero_epoch[m] is None else "overtrain",
                "train_loss": res["train"][0][j],
                "train_acc": res["train"][1][j],
                "attack_acc": res["attack"][1][j] if has["attack"] else nan,
                "test_acc": res["test"][1][j] if has["test"] and config.track_test else nan,
                "test_loss": res["test"][0][j] if has["test"] and config.track_test else nan,
                "epoch_time_s": epoch_time,
                "constant": res["train"][2][j],
            })
        return out

    def _split_metrics(self, split: str) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, accuracy and "predicts one class" of every live member on one split.

        Args:
            split: ``"train"``, ``"attack"`` or ``"test"``.

        Returns:
            Per-member mean loss, accuracy and constant-prediction flag.
        """
        ps, alive = self.params, self.alive
        idx, mask, lens = (t[alive] for t in self.ev[split])
        if self.backend == "bmm":
            logits = torch.zeros(idx.shape, dtype=self.dtype)
            by_block: dict[tuple[int, int], list[int]] = {}
            for j, m in enumerate(alive.tolist()):
                if self.blocks[split][m] is not None:
                    by_block.setdefault(self.blocks[split][m], []).append(j)
            for (start, n), js in by_block.items():
                sel = torch.tensor(js)
                sub = ps if len(js) == len(alive) else [p[sel] for p in ps]
                logits[sel, :n] = fcn_forward_shared(sub, self.x_all[start : start + n])
        else:
            logits = self.forward(ps, self.x_all[idx])
        y = self.y_all[idx]
        bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        loss = (bce * mask).sum(1) / lens.clamp(min=1).to(bce.dtype)
        pred = (logits > 0).to(y.dtype)
        correct = ((pred == y) & mask).sum(1).float()
        acc = correct / lens.clamp(min=1).float()
        ones = (pred * mask).sum(1)
        const = (ones == lens) | (ones == 0)
        return loss, acc, const

    def _stop_reason(self, m: int, met: dict[str, Any], epoch: int) -> tuple[str, str] | None:
        """Update member ``m``'s zero-error/collapse state; say whether and why it stops.

        Args:
            m: the member number.
            met: its history row of this epoch.
            epoch: the epoch number.

        Returns:
            ``(status, message)`` if the member stops now, else ``None``.
        """
        config = self.config
        t = self.tasks[m]
        fitted = met["train_acc"] == 1.0 and (
            config.zero_error_on == "train" or len(t.y_attack) == 0 or met["attack_acc"] == 1.0
        )
        done = None
        if self.zero_epoch[m] is None and fitted:
            self.zero_epoch[m] = epoch
            self.cap[m] = epoch + config.overtrain_epochs
        elif self.zero_epoch[m] is None and config.collapse_patience:
            self.streak[m] = self.streak[m] + 1 if met["constant"] else 0
            if self.streak[m] >= config.collapse_patience:
                done = ("collapsed", collapse_message(self.streak[m], met["train_acc"]))
        if done is None and epoch >= self.cap[m]:
            if self.zero_epoch[m] is not None:
                done = ("zero_error", "")
            else:
                done = ("did_not_reach_zero_error", cap_message(
                    config.max_epochs, met["train_acc"], self.history[m][0]["train_loss"],
                    met["train_loss"], config.lr))
        return done

    def _finish(self, m: int, status: str, epoch: int, message: str = "") -> None:
        """Record member ``m``'s train result from its last history row.

        Args:
            m: the member number.
            status: the stop status.
            epoch: the epochs trained.
            message: the explanation (empty for ``zero_error``).
        """
        last = self.history[m][-1]
        t = self.tasks[m]
        config = self.config
        self.outcomes[m] = EnsembleOutcome(TrainResult(
            status=status,
            epochs_to_zero_error=self.zero_epoch[m],
            epochs_trained=epoch,
            train_error=1.0 - last["train_acc"],
            attack_error=(1.0 - last["attack_acc"]) if len(t.y_attack) else 0.0,
            test_error=(1.0 - last["test_acc"]) if config.track_test else float("nan"),
            train_loss=last["train_loss"],
            wall_time_s=time.perf_counter() - self.t_start,
            history=self.history[m],
            message=message,
        ))

    def _retire(self, keep: list[int], finished: list[int]) -> None:
        """Write the finished members' weights back, report them, and drop them from the stack.

        Args:
            keep: stacked positions of the members that go on.
            finished: stacked positions of the members that stopped this epoch.
        """
        with torch.no_grad():
            for j in finished:
                own = dict(self.models[int(self.alive[j])].named_parameters())
                for n, p in zip(self.names, self.params, strict=True):
                    own[n].copy_(p[j])
        for j in finished:
            self.on_finished(int(self.alive[j]), self.outcomes[int(self.alive[j])])
        kj = torch.tensor(keep, dtype=torch.long)
        with torch.no_grad():
            self.params = [p.detach()[kj].clone().requires_grad_(True) for p in self.params]
        self.opt.keep(kj)
        self.alive = self.alive[kj]
