"""M networks of one architecture as stacked parameters ``[M, *shape]`` and a batched forward.

Used by ensemble training (:mod:`flatprior.train.ensemble`) and the batched measures
(:mod:`flatprior.flatness.batched`). Two forward paths, both mapping inputs ``[M, B, ...]``
(member ``m`` sees rows ``x[m]``) to logits ``[M, B]``:

- ``"bmm"`` (FCN only): ``h <- relu(baddbmm(b, h, W^T))`` layer by layer;
- ``"vmap"`` (any model without BatchNorm/Dropout): ``torch.func.vmap`` over
  ``torch.func.functional_call`` of the architecture with each member's parameters.

Measured with ``python benchmarks/bench_ensemble.py --backends`` (forward + backward of one
training step, 1 thread, machine loaded by other engineers): see :data:`BACKEND_TIMINGS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from flatprior.errors import FlatpriorError, check_choice
from flatprior.models.fcn import FCN

BACKENDS = ("auto", "bmm", "loop", "vmap")

#: measured ms per forward+backward step (see module docstring): bmm is faster on both study
#: systems, so "auto" takes bmm for FCNs
BACKEND_TIMINGS = {
    "boolean 7-40-40-1, batch 1, M=1000": {"bmm": 10.9, "vmap": 14.9},
    "mnist 784-40-40-1, batch 128, M=55": {"bmm": 40.5, "vmap": 43.4},
}

StackedForward = Callable[[Sequence[Tensor], Tensor], Tensor]


def check_stackable_model(model: nn.Module) -> None:
    """Raise :class:`FlatpriorError` if ``model`` has BatchNorm or Dropout (cannot be stacked)."""
    if any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) for m in model.modules()):
        raise FlatpriorError(
            "BatchNorm/Dropout models cannot be stacked; use --ensemble off (one network per run)"
        )


def resolve_backend(model: nn.Module, backend: str) -> str:
    """Validate ``backend`` for ``model`` and resolve ``"auto"`` (``"bmm"`` for FCNs, else vmap)."""
    check_choice("ensemble backend", backend, BACKENDS)
    if backend == "auto":
        return "bmm" if isinstance(model, FCN) else "vmap"
    if backend in ("bmm", "loop") and not isinstance(model, FCN):
        raise FlatpriorError(f"backend {backend!r} is for FCN models; use backend='vmap'")
    return backend


def _parameter_lists(models: Sequence[nn.Module]) -> list[list[Tensor]]:
    """Each model's parameters in ``named_parameters`` order (one walk of each model).

    Raises:
        FlatpriorError: the models do not share one type and parameter layout.
    """
    out = []
    sig = None
    for i, mod in enumerate(models):
        named = list(mod.named_parameters())
        this = [(n, p.shape, p.dtype) for n, p in named]
        if sig is None:
            sig = this
        elif type(mod) is not type(models[0]) or this != sig:
            raise FlatpriorError(
                f"model {i} has another architecture than model 0; an ensemble needs one "
                "architecture (group runs by model/hidden/width)"
            )
        out.append([p for _, p in named])
    return out


def check_same_architecture(models: Sequence[nn.Module]) -> None:
    """Raise :class:`FlatpriorError` unless all ``models`` share one type and parameter layout."""
    _parameter_lists(models)


def stack_parameters(models: Sequence[nn.Module], dtype: torch.dtype | None = None) -> list[Tensor]:
    """``[M, *shape]`` copies of every parameter, in ``named_parameters`` order.

    Raises:
        FlatpriorError: the models do not share one architecture (as
            :func:`check_same_architecture`, in the same walk over each model).
    """
    per_model = _parameter_lists(models)
    out = []
    for j in range(len(per_model[0])):
        t = torch.stack([ps[j].detach() for ps in per_model])  # a new tensor
        out.append(t.to(dtype) if dtype is not None else t)
    return out


def fcn_forward(params: Sequence[Tensor], x: Tensor) -> Tensor:
    """``[M, B, ...]`` inputs -> ``[M, B]`` logits of stacked FCNs (``params``: W1, b1, W2, ...)."""
    h = x.reshape(x.shape[0], x.shape[1], -1)
    n_layers = len(params) // 2
    for i in range(n_layers):
        w, b = params[2 * i], params[2 * i + 1]
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if i < n_layers - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


def _fcn_activations(params: Sequence[Tensor], x: Tensor) -> tuple[list[Tensor], Tensor]:
    """The input of every layer of stacked FCNs and their output ``[M, B, 1]``.

    :func:`fcn_forward`'s arithmetic, keeping the layer inputs (``[M, B, fan_in]`` each) that
    a written-out backward reads.
    """
    h = x.reshape(x.shape[0], x.shape[1], -1)
    acts = [h]
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = torch.baddbmm(params[2 * i + 1].unsqueeze(1), h, params[2 * i].transpose(1, 2))
        if i < n_layers - 1:
            h = torch.relu(h)
            acts.append(h)
    return acts, h


def fcn_bce_and_grads(params: Sequence[Tensor], x: Tensor, y: Tensor, row_grad: Tensor | None
                      ) -> tuple[Tensor, list[Tensor]]:
    """Per-row BCE-with-logits of stacked FCNs and the gradient of a weighted sum of it.

    ``bce[m, b] = BCEWithLogits(fcn_forward(params, x)[m, b], y[m, b])`` and the gradient of
    ``sum_{m,b} row_grad[m, b] bce[m, b]`` (``row_grad`` ``None``: all ones) with respect to
    every stacked parameter. The backward is autograd's own formulas for these ops written out
    (BCE-with-logits: ``(sigmoid(z) - y) * grad``; ``baddbmm``: ``grad.sum`` for the bias,
    ``batch1^T @ grad`` and ``grad @ batch2^T`` for the factors; ReLU: ``threshold_backward`` on
    its output), so pass as ``row_grad`` exactly what autograd would send back to the rows
    (e.g. ``ones / B`` for a mean) and the gradients are autograd's bit for bit (tested)
    without the autograd engine, whose per-node dispatch dominates the steps of small networks
    (measured: 0.50 vs 1.14 ms per batch-1 step of M = 250 FCNs 7-40-40-1). For one row per
    member the weight gradient ``h^T @ g`` is an outer product: a single multiplication per
    entry either way.

    Args:
        params: stacked ``[M, out, in]`` weights and ``[M, out]`` biases, layer by layer.
        x: inputs ``[M, B, ...]``.
        y: 0/1 targets ``[M, B]``.
        row_grad: ``d total / d bce`` ``[M, B]``, or ``None`` for ones.

    Returns:
        ``bce [M, B]`` and one gradient per parameter tensor (shapes of ``params``).
    """
    B, n_layers = y.shape[1], len(params) // 2
    acts, h = _fcn_activations(params, x)
    logits = h.squeeze(-1)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    g = torch.sigmoid(logits) - y
    if row_grad is not None:
        g = g * row_grad
    g = g.unsqueeze(-1)
    grads: list[Tensor] = [g] * len(params)
    for i in reversed(range(n_layers)):
        h_in = acts[i]
        grads[2 * i + 1] = g.sum(1)
        grads[2 * i] = (g.transpose(1, 2) * h_in if B == 1
                        else h_in.transpose(1, 2).bmm(g).transpose(1, 2))
        if i > 0:
            g = torch.ops.aten.threshold_backward(g.bmm(params[2 * i]), h_in, 0)
    return bce, grads


class FcnBceHessian:
    """Hessian-vector products of a weighted BCE sum of stacked FCNs, written out.

    The loss is ``L(theta) = sum_{m,b} row_grad[m, b] BCEWithLogits(fcn(theta_m, x[m, b]),
    y[m, b])`` at the fixed stacked parameters ``params``; ``H v`` is its Hessian (block
    diagonal over the members) times a direction ``v`` of the shapes of ``params``. Computed
    by Pearlmutter's R-operator (Neural Computation 6, 1994): the forward pass and the
    gradient's backward pass differentiated along ``v``. With layer ``i`` computing
    ``z_i = a_i W_i^T + b_i``, ``a_{i+1} = relu(z_i)``, ``delta_i = dL/dz_i``:

    - ``R z_i = R a_i W_i^T + a_i V_i^T + v_{b_i}``, ``R a_{i+1} = relu'(z_i) R z_i``,
      ``R a_0 = 0``;
    - ``R delta_last = sigmoid'(z) row_grad R z_last``,
      ``R delta_i = relu'(z_i) (R delta_{i+1} W_{i+1} + delta_{i+1} V_{i+1})`` (ReLU'' = 0);
    - ``(H v)_{W_i} = R delta_i^T a_i + delta_i^T R a_i``, ``(H v)_{b_i} = sum_b R delta_i``.

    The same products autograd's double backward forms (equal to float64 rounding, tested),
    without building and replaying a graph: the forward and ``delta`` are computed once, and a
    product costs a few small batched matmuls. Members are independent, so :meth:`subset`
    keeps some of them with their numbers unchanged.

    Args:
        params: stacked ``[M, out, in]`` weights and ``[M, out]`` biases, layer by layer.
        x: inputs ``[M, B, ...]``.
        y: 0/1 targets ``[M, B]``.
        row_grad: the rows' weights ``[M, B]`` (e.g. ``1 / n_m``, 0 for padding rows).
    """

    def __init__(self, params: Sequence[Tensor], x: Tensor, y: Tensor, row_grad: Tensor):
        params = [p.detach() for p in params]
        self.weights = params[0::2]
        self.acts, h = _fcn_activations(params, x)  # the input of every layer, the output
        n_layers = len(self.weights)
        sig = torch.sigmoid(h)
        rg = row_grad.unsqueeze(-1)
        self.curvature = sig * (1 - sig) * rg  # d delta_last / d z_last, [M, B, 1]
        g = (sig - y.unsqueeze(-1)) * rg
        self.deltas = [g] * n_layers
        for i in reversed(range(1, n_layers)):
            g = torch.ops.aten.threshold_backward(g.bmm(self.weights[i]), self.acts[i], 0)
            self.deltas[i - 1] = g

    def subset(self, idx: Tensor) -> FcnBceHessian:
        """The members ``idx`` only (their products are unchanged)."""
        out = object.__new__(FcnBceHessian)
        out.weights = [w[idx] for w in self.weights]
        out.acts = [a[idx] for a in self.acts]
        out.curvature = self.curvature[idx]
        out.deltas = [d[idx] for d in self.deltas]
        return out

    def __call__(self, v: Sequence[Tensor]) -> list[Tensor]:
        """``H v`` for ``v`` (stacked ``[M, *shape]`` pieces, one per parameter tensor)."""
        n_layers = len(self.weights)
        acts, deltas, ws = self.acts, self.deltas, self.weights
        r_acts = [None] * n_layers  # R a_i (R a_0 = 0)
        r_z = None
        for i in range(n_layers):
            r_z = torch.baddbmm(v[2 * i + 1].unsqueeze(1), acts[i], v[2 * i].transpose(1, 2))
            if i > 0:
                r_z = r_z + r_acts[i].bmm(ws[i].transpose(1, 2))
            if i < n_layers - 1:
                r_acts[i + 1] = torch.ops.aten.threshold_backward(r_z, acts[i + 1], 0)
        r_d = self.curvature * r_z
        out: list[Tensor] = [r_d] * (2 * n_layers)
        for i in reversed(range(n_layers)):
            out[2 * i + 1] = r_d.sum(1)
            if i == 0:
                out[0] = r_d.transpose(1, 2).bmm(acts[0])
            else:  # R delta^T a + delta^T R a as one product over the stacked rows
                out[2 * i] = torch.cat([r_d, deltas[i]], 1).transpose(1, 2).bmm(
                    torch.cat([acts[i], r_acts[i]], 1))
                back = r_d.bmm(ws[i]) + deltas[i].bmm(v[2 * i])
                r_d = torch.ops.aten.threshold_backward(back, acts[i], 0)
        return out


def fcn_forward_shared(params: Sequence[Tensor], x: Tensor) -> Tensor:
    """:func:`fcn_forward` for inputs ``x [n, ...]`` that every member sees.

    The first layer is one ``[n, d] x [d, M * width]`` matmul (no ``[M, n, d]`` copy of the
    inputs).
    """
    w1, b1 = params[0], params[1]
    m, width = w1.shape[0], w1.shape[1]
    h = x.reshape(x.shape[0], -1) @ w1.reshape(m * width, -1).T  # [n, M * width]
    h = h.reshape(x.shape[0], m, width).transpose(0, 1) + b1.unsqueeze(1)  # [M, n, width]
    n_layers = len(params) // 2
    for i in range(1, n_layers):
        h = torch.relu(h)
        w, b = params[2 * i], params[2 * i + 1]
        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
    return h.squeeze(-1)


def fcn_forward_loop(params: Sequence[Tensor], x: Tensor) -> Tensor:
    """Like :func:`fcn_forward`, member by member with ``F.linear``.

    ``F.linear`` on slices of the stacked parameters: the very kernels (``addmm``) a single
    :class:`~flatprior.models.FCN` runs, so a member's logits and gradients are bitwise those of
    the single network on the same batch.
    """
    n_layers = len(params) // 2
    outs = []
    for m in range(x.shape[0]):
        h = x[m].reshape(x.shape[1], -1)
        for i in range(n_layers):
            h = nn.functional.linear(h, params[2 * i][m], params[2 * i + 1][m])
            if i < n_layers - 1:
                h = torch.relu(h)
        outs.append(h.reshape(-1))
    return torch.stack(outs)


def stacked_forward(model: nn.Module, backend: str = "auto") -> StackedForward:
    """The batched forward ``(params, x[M, B, ...]) -> logits[M, B]`` for ``model``'s architecture.

    ``model`` itself is only used as the template; its weights are ignored.
    """
    check_stackable_model(model)
    backend = resolve_backend(model, backend)
    if backend == "bmm":
        return fcn_forward
    if backend == "loop":
        return fcn_forward_loop
    names = [n for n, _ in model.named_parameters()]

    def one(ps: tuple[Tensor, ...], xb: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, ps, strict=True)), (xb,)).reshape(-1)

    batched = vmap(one)

    def forward(params: Sequence[Tensor], x: Tensor) -> Tensor:
        return batched(tuple(params), x)

    return forward
