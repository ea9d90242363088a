"""Keskar sharpness and the Hessian spectral norm of M networks at once (stacked parameters).

Member ``m`` is network ``models[m]`` measured on its own ``(inputs[m], targets[m])`` (the set S
it was trained on). The values equal the single-network measures of
:mod:`flatprior.flatness.keskar` (``method="sgd"``) and :mod:`flatprior.flatness.hessian` on each
member (float64 by default; tested to 1e-6 relative): the loss is the sum of the members' mean
losses, and each member's loss depends only on its own slice of the stacked parameters, so
gradients and Hessian-vector products of the sum are, slice by slice, each member's own.

- :func:`batched_keskar_sharpness`: projected SGD ascent in each member's box
  ``|delta_i| <= eps (|w_i| + 1)``, each member with its own minibatch order (its ``seed``, drawn
  exactly as :func:`flatprior.flatness.keskar_sharpness` does), its own running maximum of the
  full-set loss and its own stop (``patience`` epochs without a gain above ``tol``).
- :func:`batched_lbfgsb_sharpness`: Keskar's own maximiser, scipy's L-BFGS-B (maxiter 10), one
  instance per member driven in lockstep through scipy's reverse-communication routine
  (``setulb``, the very code ``scipy.optimize.minimize(method="L-BFGS-B")`` runs), with the
  members' loss and gradient requests answered by one batched forward/backward.
- :func:`batched_hessian_spectral_norm`: ``max_i |lambda_i(H_m)|`` by Lanczos with full
  re-orthogonalisation on batched HVPs (FCNs: written out, Pearlmutter's R-operator; other
  models: double backward), per member until the Ritz estimate ``beta_k |s_k| <= tol |theta|``
  (ARPACK's criterion). Hand-rolled because ARPACK/scipy ``eigsh`` drives one operator at a
  time; here one batched HVP serves all M members.

Members finish at different iterations (Lanczos) or epochs (ascent); the stacks are cut to the
running members as they finish (:data:`_COMPACT_FRACTION`), which changes no member's bits.

References: Keskar et al., ICLR 2017 (sharpness); Golub & Van Loan, Matrix Computations, 4th ed.,
Sec. 10.1 (Lanczos).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from flatprior.errors import FlatpriorError, check_positive
from flatprior.flatness._common import batches, check_int
from flatprior.models.stacked import (
    FcnBceHessian,
    fcn_bce_and_grads,
    fcn_forward,
    stack_parameters,
    stacked_forward,
)

#: cut a stack (Lanczos, SGD ascent) to its running members once this fraction of it has
#: finished: a cut copies the running part once, and every later iteration skips the finished
#: members' HVPs, re-orthogonalisation or ascent steps (the bulk of the work: Boolean members
#: converge after 9 to 21 Lanczos iterations, 34 to 100 ascent epochs)
_COMPACT_FRACTION = 0.125


def _members_to_keep(going: Tensor) -> Tensor | None:
    """Stack positions kept when a stack is cut to its running members ``going`` (bool ``[M]``).

    At least two: torch's ``bmm`` on a batch of one takes another matmul kernel than on a
    batch of two or more (other rounding; batches of 2 to 250 give the same bits), so a lone
    running member keeps one finished member beside it (that one's results are already taken).
    ``None`` when the cut would keep the whole stack.
    """
    keep = going.nonzero().flatten()
    if len(keep) == 1:
        keep = torch.cat([keep, (~going).nonzero().flatten()[:1]]).sort().values
    return None if len(keep) == len(going) else keep


@dataclass
class _Stack:
    """Stacked members: flat parameters, padded data with a row mask, and the stacked forward.

    Flat stacked parameters ``w0 [M, p]`` of the members, their data padded to ``[M, n, ...]``
    with a row mask, and the stacked forward.
    """

    w0: Tensor
    shapes: list[torch.Size]
    numels: list[int]
    x: Tensor
    y: Tensor
    mask: Tensor
    lens: Tensor
    forward: object

    def subset(self, idx: list[int]) -> _Stack:
        """The members ``idx`` only (each member's numbers do not depend on the others)."""
        if len(idx) == self.w0.shape[0]:
            return self
        t = torch.tensor(idx, dtype=torch.long)
        return _Stack(self.w0[t], self.shapes, self.numels, self.x[t], self.y[t], self.mask[t],
                      self.lens[t], self.forward)

    def params(self, theta: Tensor) -> list[Tensor]:
        m = theta.shape[0]
        return [c.reshape(m, *s) for c, s in
                zip(torch.split(theta, self.numels, dim=1), self.shapes, strict=True)]

    def flatten(self, pieces: Sequence[Tensor]) -> Tensor:
        """Stacked pieces ``[M, *shape]`` -> flat ``[M, p]`` (the inverse of :meth:`params`).

        Each piece is copied once into its columns, whatever its strides (a transposed weight
        gradient would be copied twice by reshape + cat).
        """
        out = torch.empty(pieces[0].shape[0], sum(self.numels), dtype=pieces[0].dtype)
        start = 0
        for q, k in zip(pieces, self.numels, strict=True):
            out[:, start : start + k].view(q.shape).copy_(q)
            start += k
        return out

    def row_losses(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Per-example BCE-with-logits ``[M, B]`` of each member on its rows."""
        logits = self.forward(self.params(theta), x)
        return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")


def _stack(models: Sequence[nn.Module], inputs, targets, dtype, backend: str) -> _Stack:
    models = list(models)
    if not models:
        raise FlatpriorError("no models given")
    if isinstance(inputs, Tensor):
        inputs, targets = [inputs] * len(models), [targets] * len(models)
    if len(inputs) != len(models) or len(targets) != len(models):
        raise FlatpriorError("give one (inputs, targets) pair per model, or one for all")
    if any(len(x) == 0 or len(x) != len(y) for x, y in zip(inputs, targets, strict=True)):
        raise FlatpriorError("every member needs >= 1 input and one target per input")
    ps = stack_parameters(models, dtype)  # also checks: one architecture
    w0 = torch.cat([p.reshape(len(models), -1) for p in ps], dim=1)
    n_max = max(len(x) for x in inputs)
    shape = tuple(inputs[0].shape[1:])
    lens = torch.tensor([len(xi) for xi in inputs])
    if bool((lens == n_max).all()):  # no padding: one stack (a copy per member costs ~10 us)
        x = torch.stack(list(inputs)).to(w0.dtype)
        y = torch.stack([yi.reshape(-1) for yi in targets]).to(w0.dtype)
    else:
        x = torch.zeros(len(models), n_max, *shape, dtype=w0.dtype)
        y = torch.zeros(len(models), n_max, dtype=w0.dtype)
        for m, (xi, yi) in enumerate(zip(inputs, targets, strict=True)):
            x[m, : len(xi)] = xi.to(w0.dtype)
            y[m, : len(yi)] = yi.reshape(-1).to(w0.dtype)
    mask = torch.arange(n_max)[None, :] < lens[:, None]
    return _Stack(w0, [p.shape[1:] for p in ps], [p[0].numel() for p in ps], x, y, mask, lens,
                  stacked_forward(models[0], backend))


def _full_loss(st: _Stack, theta: Tensor, eval_bs: int | None) -> list[float]:
    """Each member's mean loss over its whole set, summed over eval batches.

    Summed exactly as :meth:`flatprior.flatness.keskar._Problem.full_loss` does
    (``sum_b n_b L_b / N``).
    """
    with torch.no_grad():
        rows = torch.cat([st.row_losses(theta, st.x[:, sl], st.y[:, sl])
                          for sl in batches(st.x.shape[1], eval_bs)], dim=1)
    rows = rows.masked_fill(~st.mask, 0.0)
    lens = st.lens.tolist()
    if eval_bs is None or max(lens) <= eval_bs:  # one eval batch per member: vectorised
        means = (rows.sum(1) / st.lens.to(rows.dtype)).tolist()
        out = [lb * n / n for lb, n in zip(means, lens, strict=True)]
    else:
        out = []
        for m, n in enumerate(lens):
            total = 0.0
            for sl in batches(n, eval_bs):
                lb = rows[m, sl].sum() / (sl.stop - sl.start)
                total += float(lb) * (sl.stop - sl.start)
            out.append(total / n)
    if not all(math.isfinite(v) for v in out):
        raise FlatpriorError("a member's loss is NaN/inf inside the sharpness box")
    return out


@dataclass
class BatchedSharpness:
    """Per-member results of :func:`batched_keskar_sharpness`, as lists of length M.

    ``value`` (Keskar sharpness), ``max_loss``, ``base_loss``, ``n_steps`` (epochs run).
    """

    value: list[float]
    max_loss: list[float]
    base_loss: list[float]
    n_steps: list[int]


def batched_keskar_sharpness(
    models: Sequence[nn.Module],
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor | Sequence[Tensor],
    eps: float = 1e-4,
    *,
    lr: float = 1e-3,
    batch_size: int = 128,
    epochs: int = 100,
    patience: int = 10,
    tol: float = 1e-4,
    eval_batch_size: int | None = 4096,
    dtype: torch.dtype = torch.float64,
    seeds: Sequence[int] | int = 0,
    backend: str = "auto",
) -> BatchedSharpness:
    """Keskar sharpness of every member by projected SGD ascent.

    ``100 (max_{delta in C_eps} L(w + delta) - L(w)) / (1 + L(w))`` of every member by projected
    SGD ascent (the ``method="sgd"`` of :func:`keskar_sharpness`, full parameter space,
    BCE-with-logits mean loss, eval mode). ``eps``, ``lr``, ``batch_size``, ``epochs``,
    ``patience``, ``tol``, ``eval_batch_size``, ``dtype``: as in :func:`keskar_sharpness`.

    Args:
        models: M one-logit networks of one architecture (left unchanged).
        inputs: one ``[N, ...]`` set for all members, or one ``[N_m, ...]`` per member.
        targets: one ``[N]`` set of 0/1 targets for all members, or one ``[N_m]`` per member.
        eps: box size ``> 0`` (relative to ``|w| + 1`` per parameter).
        lr: SGD ascent step size.
        batch_size: SGD ascent minibatch size; the last, smaller batch is used too.
        epochs: maximum number of SGD ascent epochs.
        patience: stop a member after this many consecutive epochs without a significant gain.
        tol: relative change of the running max counted as "no change".
        eval_batch_size: chunk size for full-set evaluations (memory only, not the value).
        dtype: compute dtype of the stacked parameters and data (default float64).
        seeds: per-member seeds of the minibatch order (or one for all).
        backend: stacked forward (:mod:`flatprior.models.stacked`).
    """
    check_positive("eps", eps)
    check_positive("lr", lr)
    check_positive("tol", tol, allow_zero=True)
    batch_size, epochs, patience = (check_int(k, v) for k, v in (
        ("batch_size", batch_size), ("epochs", epochs), ("patience", patience)))
    st = _stack(models, inputs, targets, dtype, backend)
    M = st.w0.shape[0]
    seeds = [seeds] * M if isinstance(seeds, int) else [int(s) for s in seeds]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    r = eps * (st.w0.abs() + 1.0)
    z = torch.zeros_like(st.w0)
    base = _full_loss(st, st.w0, eval_batch_size)
    lens = st.lens.tolist()
    if len(set(lens)) == 1 and lens[0] <= batch_size and (
            eval_batch_size is None or lens[0] <= eval_batch_size):
        best, steps = _ascent_whole_set(st, r, lr, epochs, patience, tol, base)
        value = [100.0 * (b - b0) / (1.0 + b0) for b, b0 in zip(best, base, strict=True)]
        return BatchedSharpness(value, best, base, steps)
    best = list(base)
    stalled = [0] * M
    steps = [0] * M
    running = torch.ones(M, dtype=torch.bool)
    B = min(batch_size, max(lens))
    for epoch in range(1, epochs + 1):
        act = running.nonzero().flatten().tolist()
        perms = {m: torch.randperm(lens[m], generator=gens[m]) for m in act}
        n_steps = max(len(batches(lens[m], batch_size)) for m in act)
        uniform = len(act) == M and len(set(lens)) == 1
        if uniform:  # every member runs, same n: one [M, n] order tensor
            order = torch.stack([perms[m] for m in range(M)])
        for s in range(n_steps):
            if uniform:
                sl = batches(lens[0], batch_size)[s]
                idx = order[:, sl]
                w = torch.full(idx.shape, 1.0 / idx.shape[1], dtype=st.w0.dtype)
            else:
                idx = torch.zeros(M, B, dtype=torch.long)
                w = torch.zeros(M, B, dtype=st.w0.dtype)
                for m in act:
                    sls = batches(lens[m], batch_size)
                    if s < len(sls):
                        rows = perms[m][sls[s]]
                        idx[m, : len(rows)] = rows
                        w[m, : len(rows)] = 1.0 / len(rows)
            stepping = (w.sum(1) > 0)
            ar = torch.arange(M)[:, None]
            zz = z.detach().requires_grad_(True)
            loss = (st.row_losses(st.w0 + zz, st.x[ar, idx], st.y[ar, idx]) * w).sum()
            (g,) = torch.autograd.grad(loss, zz)
            with torch.no_grad():
                new = torch.clamp(z + lr * g, -r, r)  # projection onto each member's box
                z = torch.where(stepping[:, None], new, z)
        cur = _full_loss(st, st.w0 + z, eval_batch_size)
        for m in act:
            steps[m] = epoch
            _stalled(m, cur, best, base, stalled, tol)
            if stalled[m] >= patience:
                running[m] = False
        if not bool(running.any()):
            break
    value = [100.0 * (b - b0) / (1.0 + b0) for b, b0 in zip(best, base, strict=True)]
    return BatchedSharpness(value, best, base, steps)


def _lbfgsb_lockstep_available() -> bool:
    """Whether scipy's L-BFGS-B has the reverse-communication ``setulb`` this module drives.

    The C implementation of scipy 1.15 to 1.17 (``_lbfgsb.setulb(m, x, l, u, nbd, f, g, factr,
    pgtol, wa, iwa, task, lsave, isave, dsave, maxls, ln_task)``, a private routine); any other
    version: member by member. The upper bound is the newest scipy tested here: a later release
    may change the private signature, so it falls back until it is checked and the bound raised.
    """
    import scipy

    try:
        from scipy.optimize import _lbfgsb  # noqa: F401
    except ImportError:  # pragma: no cover - private module moved
        return False
    major, minor = (int(v) for v in scipy.__version__.split(".")[:2])
    return (1, 15) <= (major, minor) <= (1, 17)


class _LbfgsbMember:
    """One member's L-BFGS-B state: the work arrays of ``scipy.optimize._lbfgsb.setulb``.

    Set up as ``scipy.optimize._lbfgsb_py._minimize_lbfgsb`` sets them up for
    ``minimize(fun, 0, jac=True, method="L-BFGS-B", bounds=Bounds(-r, r),
    options={"maxiter": maxiter})`` (defaults ``maxcor = 10``, ``ftol = 2.22e-9``,
    ``gtol = 1e-5``, ``maxls = 20``).
    """

    M_CORR, FTOL, GTOL, MAXLS = 10, 2.2204460492503131e-09, 1e-5, 20

    def __init__(self, r: np.ndarray, maxiter: int):
        n = r.shape[0]
        m = self.M_CORR
        self.low, self.up = -r, r.copy()
        self.nbd = np.full(n, 2, dtype=np.int32)  # both bounds finite
        self.x = np.clip(np.zeros(n), self.low, self.up)
        self.f = np.array(0.0, dtype=np.float64)
        self.g = np.zeros(n, dtype=np.float64)
        self.wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, np.float64)
        self.iwa = np.zeros(3 * n, dtype=np.int32)
        self.task = np.zeros(2, dtype=np.int32)
        self.ln_task = np.zeros(2, dtype=np.int32)
        self.lsave = np.zeros(4, dtype=np.int32)
        self.isave = np.zeros(44, dtype=np.int32)
        self.dsave = np.zeros(29, dtype=np.float64)
        self.factr = self.FTOL / np.finfo(float).eps
        self.maxiter = maxiter
        self.n_iter = 0

    def advance(self) -> bool:
        """Run ``setulb`` until it asks for f and g at ``self.x`` (True) or stops (False).

        The loop body of ``_minimize_lbfgsb``: a new iteration counts towards ``maxiter``.
        """
        from scipy.optimize import _lbfgsb

        while True:
            _lbfgsb.setulb(self.M_CORR, self.x, self.low, self.up, self.nbd, self.f, self.g,
                           self.factr, self.GTOL, self.wa, self.iwa, self.task, self.lsave,
                           self.isave, self.dsave, self.MAXLS, self.ln_task)
            if self.task[0] == 3:
                return True
            if self.task[0] != 1:
                return False
            self.n_iter += 1
            if self.n_iter >= self.maxiter:
                self.task[0], self.task[1] = 5, 504


def _loss_and_grad(st: _Stack, z: Tensor, eval_bs: int | None) -> tuple[Tensor, Tensor]:
    """Each member's mean loss over its whole set and its gradient w.r.t. its ``z`` row.

    Eval batches weighted ``n_b / N`` as :meth:`flatprior.flatness.keskar._Problem.
    full_loss_and_grad` does.
    """
    n = st.lens.to(st.w0.dtype)
    total = torch.zeros(z.shape[0], dtype=z.dtype)
    grad = torch.zeros_like(z)
    for sl in batches(st.x.shape[1], eval_bs):
        rows, g = _rows_and_grad(st, z, n, sl)
        total += rows.sum(1) / n
        grad += g
    return total, grad


def batched_lbfgsb_sharpness(
    models: Sequence[nn.Module],
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor | Sequence[Tensor],
    eps: float = 1e-4,
    *,
    maxiter: int = 10,
    eval_batch_size: int | None = 4096,
    dtype: torch.dtype = torch.float64,
    backend: str = "auto",
) -> BatchedSharpness:
    """Keskar sharpness of every member maximised by L-BFGS-B (Keskar et al., ICLR 2017).

    ``100 (max_{delta in C_eps} L(w + delta) - L(w)) / (1 + L(w))`` as
    :func:`flatprior.flatness.keskar_sharpness` with ``method="lbfgsb"`` computes it: L-BFGS-B
    on ``-L(w + clip(delta))`` from ``delta = 0`` in the box ``|delta_i| <= eps (|w_i| + 1)``,
    ``maxiter`` iterations, the largest loss seen at any evaluation. One scipy L-BFGS-B
    instance per member, all advanced in lockstep (``setulb`` reverse communication); the
    members waiting for a loss and gradient get them from one batched forward/backward. Each
    member's iterates are those of its own ``scipy.optimize.minimize`` run up to float64
    rounding of the batched forward (tested to 1e-6 relative). With a scipy outside 1.15-1.17
    (another or unchecked ``setulb``), each member runs :func:`keskar_sharpness` itself.

    Args:
        models: M one-logit networks of one architecture (left unchanged).
        inputs: one ``[N, ...]`` set for all members, or one ``[N_m, ...]`` per member.
        targets: one ``[N]`` set of 0/1 targets for all members, or one ``[N_m]`` per member.
        eps: box size ``> 0`` (relative to ``|w| + 1`` per parameter).
        maxiter: L-BFGS-B iterations (Keskar et al.: 10).
        eval_batch_size: chunk size of the loss evaluations (memory only, not the value).
        dtype: compute dtype (default float64, as scipy works in float64).
        backend: stacked forward (:mod:`flatprior.models.stacked`).

    Returns:
        :class:`BatchedSharpness` (``n_steps``: L-BFGS-B iterations per member).
    """
    check_positive("eps", eps)
    maxiter = check_int("maxiter", maxiter)
    if not _lbfgsb_lockstep_available():
        return _lbfgsb_member_by_member(models, inputs, targets, eps, maxiter, eval_batch_size)
    st = _stack(models, inputs, targets, dtype, backend)
    M = st.w0.shape[0]
    r = eps * (st.w0.abs() + 1.0)
    rn = r.detach().double().numpy()
    base = _full_loss(st, st.w0, eval_batch_size)
    best = list(base)
    members = [_LbfgsbMember(rn[m], maxiter) for m in range(M)]
    waiting = [m for m in range(M) if members[m].advance()]
    while waiting:  # only the members that asked (line searches desynchronise the members)
        # f and g at the clipped point, as keskar's fun(zn) does
        z = torch.from_numpy(np.stack([np.clip(members[m].x, -rn[m], rn[m]) for m in waiting]))
        vals, grads = _loss_and_grad(st.subset(waiting), z.to(st.w0.dtype), eval_batch_size)
        vals_l = vals.tolist()
        gn = grads.detach().double().numpy()
        for j, m in enumerate(waiting):
            val = vals_l[j]
            if not math.isfinite(val):
                raise FlatpriorError("a member's loss is NaN/inf inside the sharpness box")
            if val > best[m]:
                best[m] = val
            members[m].f[...] = -val
            members[m].g[:] = -gn[j]
        waiting = [m for m in waiting if members[m].advance()]
    value = [100.0 * (b - b0) / (1.0 + b0) for b, b0 in zip(best, base, strict=True)]
    return BatchedSharpness(value, best, base, [mem.n_iter for mem in members])


def _lbfgsb_member_by_member(models, inputs, targets, eps, maxiter, eval_bs
                             ) -> BatchedSharpness:
    """:func:`keskar_sharpness` (L-BFGS-B) on each member: the fallback for other scipy versions."""
    from flatprior.flatness.keskar import keskar_sharpness

    models = list(models)
    if isinstance(inputs, Tensor):
        inputs, targets = [inputs] * len(models), [targets] * len(models)
    res = [keskar_sharpness(m, nn.BCEWithLogitsLoss(), x, y.reshape(-1, 1), eps, "lbfgsb",
                            lbfgs_maxiter=maxiter, eval_batch_size=eval_bs,
                            dtype=torch.float64, return_details=True)
           for m, x, y in zip(models, inputs, targets, strict=True)]
    return BatchedSharpness([q.value for q in res], [q.max_loss for q in res],
                            [q.base_loss for q in res], [q.n_steps for q in res])


def _stalled(m: int, cur: list[float] | dict[int, float], best: list[float], base: list[float],
             stalled: list[int], tol: float) -> None:
    """Member ``m``'s running maximum and stall count after an epoch (as ``keskar_sharpness``)."""
    gain = cur[m] - best[m]
    if gain > 0:
        best[m] = cur[m]
    stalled[m] = stalled[m] + 1 if gain <= tol * max(best[m] - base[m], 0.0) else 0


def _rows_and_grad(st: _Stack, z: Tensor, n: Tensor, sl: slice = slice(None)
                   ) -> tuple[Tensor, Tensor]:
    """Masked row losses at ``w0 + z`` (rows ``sl``) and the gradient of their summed means.

    ``d/dz sum_m (sum_{rows in sl} masked loss) / n_m``; for FCNs (the ``bmm`` forward) by
    :func:`flatprior.models.stacked.fcn_bce_and_grads`, autograd's own formulas without the
    engine (the same bits), else by autograd.
    """
    x, y, mask = st.x[:, sl], st.y[:, sl], st.mask[:, sl]
    if st.forward is fcn_forward:
        with torch.no_grad():
            rows, grads = fcn_bce_and_grads(st.params(st.w0 + z), x, y, _row_grad(n, mask))
        return rows.masked_fill(~mask, 0.0), st.flatten(grads)
    zz = z.detach().requires_grad_(True)
    rows = st.row_losses(st.w0 + zz, x, y).masked_fill(~mask, 0.0)
    (g,) = torch.autograd.grad((rows.sum(1) / n).sum(), zz)
    return rows.detach(), g


def _row_grad(n: Tensor, mask: Tensor) -> Tensor:
    """What autograd sends back to the rows of ``(rows.sum(1) / n).sum()``: ``1 / n_m``, masked."""
    return (torch.ones_like(n) / n)[:, None].expand(mask.shape).masked_fill(~mask, 0.0)


def _rows_and_grad_pieces(st: _Stack, zs: list[Tensor], n: Tensor, thetas: list[Tensor]
                          ) -> tuple[Tensor, list[Tensor]]:
    """:func:`_rows_and_grad` on all rows with ``z`` and the gradient as lists of pieces.

    FCNs: one piece per parameter tensor (``[M, *shape]``), so the written-out gradient is used
    as it comes (no copy into the flat layout); ``w0 + z`` is written into ``thetas``. Other
    models: one flat piece.
    """
    if st.forward is not fcn_forward:
        rows, g = _rows_and_grad(st, zs[0], n)
        return rows, [g]
    for w, z, t in zip(st.params(st.w0), zs, thetas, strict=True):
        torch.add(w, z, out=t)
    with torch.no_grad():
        rows, grads = fcn_bce_and_grads(thetas, st.x, st.y, _row_grad(n, st.mask))
    return rows.masked_fill(~st.mask, 0.0), grads


def _ascent_whole_set(st: _Stack, r: Tensor, lr: float, epochs: int, patience: int, tol: float,
                      base: list[float]) -> tuple[list[float], list[int]]:
    """The ascent when every member's set is one minibatch and one evaluation batch.

    Then an epoch is one step on the whole set, and the step of epoch ``e + 1`` starts at the
    point epoch ``e`` evaluates: one forward (with graph) serves both, instead of a step forward
    and an evaluation forward (a third less work; the Boolean paper preset: n = 64 <= batch
    128). The step's loss is the mean over the rows in their stored order rather than the
    epoch's shuffled order: the same gradient up to float64 rounding of the row sum (the
    shuffle of a one-batch epoch changes nothing else). The evaluation is :func:`_full_loss`'s
    arithmetic on the same row losses. Members stop after different numbers of epochs (Boolean
    paper preset: 34 to 100); once :data:`_COMPACT_FRACTION` of the stack has stopped, the
    stack is cut to the members still running (their numbers do not change: tested). The
    perturbation is kept as pieces (:func:`_rows_and_grad_pieces`) in buffers reused every
    epoch (fresh ``[M, p]`` tensors cost page faults).

    Returns:
        Each member's maximum full-set loss and its number of epochs.
    """
    M = st.w0.shape[0]
    best, stalled, steps = list(base), [0] * M, [0] * M
    alive = list(range(M))  # the stacked members (original numbers)
    running = torch.ones(M, dtype=torch.bool)  # per stacked member
    n = st.lens.to(st.w0.dtype)
    lens = st.lens.tolist()
    rs = [q.contiguous() for q in st.params(r)] if st.forward is fcn_forward else [r]
    neg_rs = [-q for q in rs]
    zs = [torch.zeros_like(q) for q in rs]
    steps_buf = [torch.empty_like(q) for q in rs]
    thetas = [torch.empty_like(q) for q in rs]
    rows, gs = _rows_and_grad_pieces(st, zs, n, thetas)
    for epoch in range(1, epochs + 1):
        with torch.no_grad():  # z <- clamp(z + lr g, -r, r), as lr * g + z (the same bits)
            for g, z, nr, rr, sb in zip(gs, zs, neg_rs, rs, steps_buf, strict=True):
                torch.mul(g, lr, out=sb).add_(z).clamp_(nr, rr)
            if len(alive) == int(running.sum()):
                zs, steps_buf = steps_buf, zs
            else:
                for z, sb in zip(zs, steps_buf, strict=True):
                    torch.where(running.reshape(-1, *[1] * (z.dim() - 1)), sb, z, out=z)
        rows, gs = _rows_and_grad_pieces(st, zs, n, thetas)
        means = (rows.sum(1) / n).tolist()
        cur = dict(zip(alive, (lb * k / k for lb, k in zip(means, lens, strict=True)),
                       strict=True))
        act = [j for j, on in enumerate(running.tolist()) if on]
        if not all(math.isfinite(cur[alive[j]]) for j in act):
            raise FlatpriorError("a member's loss is NaN/inf inside the sharpness box")
        for j in act:
            m = alive[j]
            steps[m] = epoch
            _stalled(m, cur, best, base, stalled, tol)
            if stalled[m] >= patience:
                running[j] = False
        n_run = int(running.sum())
        if not n_run:
            break
        keep = (_members_to_keep(running)
                if len(alive) - n_run >= _COMPACT_FRACTION * len(alive) else None)
        if keep is not None:
            st = st.subset(keep.tolist())
            alive = [alive[j] for j in keep.tolist()]
            running, n, lens = running[keep], n[keep], [lens[j] for j in keep.tolist()]
            zs, gs, rs, neg_rs = ([q[keep] for q in qs] for qs in (zs, gs, rs, neg_rs))
            steps_buf = [torch.empty_like(q) for q in rs]
            thetas = [torch.empty_like(q) for q in rs]
    return best, steps


class _HessianOperator:
    """Hessian-vector products of every stacked member's mean loss over its whole set at ``w0``.

    ``H v`` of ``sum_m mean_m(loss)`` (each member's own Hessian block), evaluation batches of
    ``batch_size`` rows weighted ``n_b / N``. FCNs (the ``bmm`` forward): the written-out
    :class:`flatprior.models.stacked.FcnBceHessian` (no autograd graph); other models: double
    backward through the graph of the summed gradients.
    """

    def __init__(self, st: _Stack, batch_size: int | None):
        self.st, self.batch_size = st, batch_size
        n = st.lens.to(st.w0.dtype)
        slices = batches(st.x.shape[1], batch_size)
        if st.forward is fcn_forward:
            row_grad = _row_grad(n, st.mask)
            ps = st.params(st.w0)
            self.parts = [FcnBceHessian(ps, st.x[:, sl], st.y[:, sl], row_grad[:, sl])
                          for sl in slices]
            return
        self.parts = None
        self.theta = st.w0.clone().requires_grad_(True)
        self.grads = []
        with torch.enable_grad():
            for sl in slices:
                rows = st.row_losses(self.theta, st.x[:, sl], st.y[:, sl]).masked_fill(
                    ~st.mask[:, sl], 0)
                loss = (rows.sum(1) / n).sum()  # batch b contributes n_b/N of its mean
                (g,) = torch.autograd.grad(loss, self.theta, create_graph=True)
                self.grads.append(g)

    def __call__(self, v: Tensor) -> Tensor:
        """``H v`` for flat directions ``v [M, p]``."""
        out = torch.zeros_like(v)
        if self.parts is not None:
            pieces = self.st.params(v)
            for part in self.parts:
                out += self.st.flatten(part(pieces))
            return out
        for g in self.grads:
            (h,) = torch.autograd.grad(g, self.theta, grad_outputs=v, retain_graph=True)
            out += h
        return out.detach()

    def subset(self, idx: Tensor) -> _HessianOperator:
        """The operator of the stacked members ``idx`` only (their products unchanged)."""
        if self.parts is None:  # a new graph on the members kept
            return _HessianOperator(self.st.subset(idx.tolist()), self.batch_size)
        out = object.__new__(_HessianOperator)
        out.st, out.batch_size = self.st.subset(idx.tolist()), self.batch_size
        out.parts = [part.subset(idx) for part in self.parts]
        return out


def batched_hessian_spectral_norm(
    models: Sequence[nn.Module],
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor | Sequence[Tensor],
    *,
    tol: float = 1e-10,
    max_iter: int = 300,
    batch_size: int | None = 1024,
    dtype: torch.dtype = torch.float64,
    seeds: Sequence[int] | int = 0,
    backend: str = "auto",
) -> Tensor:
    """``||H_m||_2 = max_i |lambda_i(H_m)|`` of the mean-loss Hessian of every member.

    Lanczos with full re-orthogonalisation: ``q_1`` random (member ``m``'s from ``seeds[m]``,
    or one seed for all), ``w = H q_j -
    alpha_j q_j - beta_{j-1} q_{j-1}`` re-orthogonalised twice against all ``q``,
    ``T_k = tridiag(beta, alpha, beta)``; the Ritz value ``theta`` of largest magnitude is
    accepted when ``beta_k |s_k| <= tol |theta|`` (``s`` its eigenvector of ``T_k``), or exactly
    when ``beta_k`` vanishes. HVPs: :class:`_HessianOperator` (minibatches of ``batch_size``
    weighted ``n_b / N``). Members converge after different numbers of iterations (Boolean
    paper preset: 9 to 21); once :data:`_COMPACT_FRACTION` of the stack has converged, the
    stack is cut to the members still running (each member's iterations are its own, so its
    value does not change: tested bit for bit).

    Returns:
        float64 ``[M]``.
    """
    check_positive("tol", tol, allow_zero=True)
    max_iter = check_int("max_iter", max_iter)
    st = _stack(models, inputs, targets, dtype, backend)
    M, p = st.w0.shape
    op = _HessianOperator(st, batch_size)
    seeds = [seeds] * M if isinstance(seeds, int) else [int(s) for s in seeds]
    q = torch.stack([torch.randn(p, generator=torch.Generator().manual_seed(s),
                                 dtype=torch.float64) for s in seeds]).to(st.w0.dtype)
    q = q / q.norm(dim=1, keepdim=True)
    # the Lanczos basis [M, k, p] in a buffer grown by doubling (re-stacking a list every
    # iteration made the basis O(k^2) memory traffic: 10 s of 15 on 250 untrained nets)
    Q = torch.empty(M, min(16, max_iter, p), p, dtype=q.dtype)
    Q[:, 0] = q
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    result = torch.full((M,), float("nan"), dtype=torch.float64)
    alive = torch.arange(M)  # the stacked members (original numbers)
    done = torch.zeros(M, dtype=torch.bool)  # per stacked member
    k_max = min(max_iter, p)
    tmp = torch.empty(M, p, dtype=Q.dtype)  # scratch: a fresh [M, p] costs page faults
    for k in range(1, k_max + 1):
        w = op(Q[:, k - 1])  # a new tensor: updated in place below (the same arithmetic)
        a = torch.mul(w, Q[:, k - 1], out=tmp).sum(1)
        w.sub_(torch.mul(Q[:, k - 1], a[:, None], out=tmp))
        if betas:
            w.sub_(torch.mul(Q[:, k - 2], betas[-1][:, None], out=tmp))
        Qs = Q[:, :k]  # [M, k, p]
        for _ in range(2):  # w -= Q (Q^T w), twice
            c = torch.bmm(Qs, w[:, :, None]).transpose(1, 2)
            w.sub_(torch.bmm(c, Qs, out=tmp.view(-1, 1, p)).view(-1, p))
        b = w.norm(dim=1)
        alphas.append(a)
        T = torch.diag_embed(torch.stack(alphas, 1))
        if k > 1:
            off = torch.stack(betas, 1)
            T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        evals, evecs = torch.linalg.eigh(T.double())
        j = evals.abs().argmax(1)
        th = evals.gather(1, j[:, None]).squeeze(1)
        s_last = evecs[torch.arange(len(alive)), -1, j]
        resid = b.double() * s_last.abs()
        ok = (resid <= tol * th.abs()) | (b <= 1e-14 * th.abs().clamp(min=1e-300)) | (k == p)
        new = ok & ~done
        result[alive[new]] = th[new].abs()
        done |= ok
        if bool(done.all()) or k == k_max:
            break
        betas.append(b)
        n_done = int(done.sum())
        keep = (_members_to_keep(~done)
                if n_done and n_done >= _COMPACT_FRACTION * len(alive) else None)
        if keep is not None:
            op = op.subset(keep)
            alive, done, w, b = alive[keep], done[keep], w[keep], b[keep]
            alphas = [t[keep] for t in alphas]
            betas = [t[keep] for t in betas]
            Q_old, Q = Q, torch.empty(len(keep), Q.shape[1], p, dtype=Q.dtype)
            Q[:, :k] = Q_old[keep, :k]
            del Q_old
            tmp = torch.empty(len(keep), p, dtype=Q.dtype)
        if k == Q.shape[1]:
            Q = torch.cat([Q, torch.empty_like(Q)[:, : min(Q.shape[1], k_max - k)]], dim=1)
        torch.div(w, b.clamp(min=1e-300)[:, None], out=Q[:, k])
    if not bool(done.all()):
        raise FlatpriorError(
            f"Lanczos did not converge within {k_max} iterations for {int((~done).sum())} "
            "member(s); raise max_iter or tol"
        )
    return result
