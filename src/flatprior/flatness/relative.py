"""Relative flatness (Petzka et al. 2021) of one layer, and the FAM regulariser built from it.

Petzka, Kamp, Adilova, Sminchisescu, Boley, "Relative flatness and generalization", NeurIPS 2021;
Adilova et al., "FAM: Relative flatness aware minimization", TAG-ML 2023. For a layer with weight
``W in R^{m x n}`` (``m`` neurons; row ``w_s = W[s, :]`` is the incoming weight vector of neuron
``s``; a conv weight ``[out, in, kh, kw]`` is read as ``[out, in*kh*kw]``)::

    kappa(W) = sum_{s, s'} <w_s, w_s'> * Tr(H_{s,s'}),
    H_{s,s'} = d^2 L / (dw_s dw_s')  (n x n block),  Tr(H_{s,s'}) = sum_c d^2 L / dW[s,c] dW[s',c]

with ``L`` the mean loss over the set. Equivalently ``kappa = Tr(H_W (G kron I_n))`` with
``G = W W^T`` — which is what the Hutchinson estimator of :func:`fam_regularizer` uses:
``E_v[<G V, H_W v>] = kappa`` for Rademacher ``v`` (``V`` = ``v`` reshaped ``[m, n]``).

Which layer ("penultimate"): the paper's feature layer is the representation ``phi(x)`` fed to the
last layer, and the weights ``W`` are those *consuming* it. Following the authors' code
(``feature_layer = model.output.weight``), the default ``layer=None`` is therefore the LAST
Linear/Conv layer (for FCN 784-40-40-1: the ``1 x 40`` output weights). Any Linear/Conv layer can be
chosen by index (counting Linear/Conv layers from 0, negative from the end) or by module.

Invariance: under Dinh alpha-scaling ``(W_l, b_l, W_{l+1}) -> (a W_l, a b_l, W_{l+1}/a)`` the
Gram matrix of layer ``l`` scales by ``a^2`` and its Hessian block by ``a^-2`` (and the reverse
for layer ``l+1``), so ``kappa`` of both layers is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flatprior.errors import FlatpriorError, check_choice
from flatprior.flatness._common import (
    LossFn,
    align_targets,
    batches,
    check_data,
    check_int,
    check_loss_fn,
    checked_loss,
    eval_copy,
    layer_index_in,
    layer_of,
)
from flatprior.flatness.hessian import hessian_operator

FAM_METHODS = ("auto", "closed_form", "exact", "hutchinson")


def _resolve_in_copy(model: nn.Module, net: nn.Module, layer) -> nn.Module:
    """The copy's module corresponding to ``layer`` resolved on the original ``model``."""
    return layer_of(net, layer_index_in(model, layer_of(model, layer)))


def relative_flatness(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    layer: int | nn.Module | None = None,
    *,
    batch_size: int | None = 1024,
    dtype: torch.dtype | None = torch.float64,
    probe_chunk: int = 256,
) -> float:
    r"""Exact relative flatness ``kappa`` of one layer (see the module docstring).

    $$
    \kappa(W) = \sum_{s, s'} \langle w_s, w_{s'} \rangle \operatorname{Tr} H_{s, s'},
    \qquad H_{s,s'} = \frac{\partial^2 L}{\partial w_s \partial w_{s'}}
    $$

    for the layer's weight ``W [m, n]`` with rows ``w_s`` (Petzka et al., NeurIPS 2021).

    Computed with curvlinops Hessian-vector products restricted to the layer's weight, one basis
    probe ``e_(s,c)`` per weight (``m*n`` HVPs, ``probe_chunk`` at a time): ``kappa =
    sum_(s,c) sum_s' G[s,s'] (H e_(s,c))[(s',c)]``. For the 40x40 and 1x40 layers of the study's
    FCN that is 1600 / 40 HVPs; memory holds ``probe_chunk x m x n`` numbers.

    Args:
        model: network (deep copy in eval mode, cast to ``dtype``; the original is untouched).
        loss_fn: ``(logits, targets) -> mean loss``.
        inputs: the set (e.g. S), ``[N, ...]``.
        targets: its targets, ``[N, ...]``.
        layer: ``None`` (last Linear/Conv = weights on the penultimate representation), an index
            among the Linear/Conv layers, or the module itself.
        batch_size: examples per HVP chunk.
        dtype: compute dtype (default float64).
        probe_chunk: basis probes per operator multiply.

    Returns:
        ``kappa`` (float).

    Example:
        One neuron (``m = 1``): ``kappa = ||w||^2 Tr(H)``; MSE on the basis inputs has
        ``H = (2/3) I``, so ``w = (1, 2, 2)`` gives ``9 * 2``:

        >>> import torch
        >>> net = torch.nn.Linear(3, 1, bias=False)
        >>> _ = net.weight.data.copy_(torch.tensor([[1.0, 2.0, 2.0]]))
        >>> relative_flatness(net, torch.nn.MSELoss(), torch.eye(3), torch.zeros(3, 1))
        18.0
    """
    check_loss_fn(loss_fn)
    check_data(inputs, targets)
    probe_chunk = check_int("probe_chunk", probe_chunk)
    net = eval_copy(model, dtype)
    mod = _resolve_in_copy(model, net, layer)
    weight = mod.weight
    if not weight.requires_grad:
        raise FlatpriorError("that layer's weight has requires_grad=False; pick another layer")
    op = hessian_operator(
        net, loss_fn, inputs, targets, batch_size=batch_size, params=[weight], copy_model=False
    )
    with torch.no_grad():
        w = weight.detach().reshape(weight.shape[0], -1)
        m, n = w.shape
        gram = w @ w.T
        p = m * n
        total = torch.zeros((), dtype=w.dtype, device=w.device)
        for sl in batches(p, probe_chunk):
            idx = torch.arange(sl.start, sl.stop, device=w.device)
            e = torch.zeros(p, idx.numel(), dtype=w.dtype, device=w.device)
            e[idx, torch.arange(idx.numel(), device=w.device)] = 1.0
            he = (op @ e).T.reshape(idx.numel(), m, n)  # row j = H e_(s_j, c_j) as [m, n]
            s_idx, c_idx = idx // n, idx % n
            col = he[torch.arange(idx.numel(), device=w.device), :, c_idx]  # [J, m] over s'
            total += (gram[s_idx] * col).sum()
    if not (bool(torch.isfinite(gram).all()) and bool(torch.isfinite(total))):
        # e.g. |w| ~ 1e200: <w_s, w_s'> overflows to inf and inf * 0 (a zero Hessian entry) = NaN
        raise FlatpriorError(
            f"relative flatness is not finite ({float(total)}): the layer's Gram matrix W W^T "
            f"overflows (max |w| = {float(w.abs().max()):.3g}); rescale the layer's weights"
        )
    return float(total)


def fam_regularizer(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    layer: int | nn.Module | None = None,
    *,
    method: str = "auto",
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    max_exact: int = 2048,
) -> Tensor:
    """Differentiable relative flatness of ``layer`` on a (mini)batch — the FAM regulariser.

    Train with ``loss + lambda * fam_regularizer(...)`` (Adilova et al. 2023). Uses the *live*
    model in its current mode and dtype (no copy), so gradients flow to every parameter, through
    both ``G = W W^T`` and the Hessian block (double backward with ``create_graph=True``;
    curvlinops' operators run under ``no_grad`` and cannot give this gradient).

    Args:
        model: the live network (gradients flow to its parameters).
        loss_fn: ``(logits, targets) -> mean loss``.
        inputs: the (mini)batch ``[B, ...]``.
        targets: its targets ``[B, ...]``.
        layer: as in :func:`relative_flatness`.
        method: ``"closed_form"`` — exact and cheap when ``layer`` is the model's LAST operation
            (a Linear whose output is the model output ``F = h W^T + b``): then
            ``Tr(H_{s,s'}) = sum_i ||h_i||^2 B_i[s,s']`` with ``B_i = d^2 L / dF_i dF_i`` the
            ``m x m`` loss Hessian w.r.t. example ``i``'s logits, so
            ``kappa = sum_i ||h_i||^2 <G, B_i>`` (``m`` extra backward passes; assumes the loss
            is a mean of per-example terms, as every torch loss with ``reduction="mean"``);
            ``"exact"`` — all ``m*n`` basis probes by batched double backward (any layer);
            ``"hutchinson"`` — ``(1/K) sum_k <G V_k, H_W v_k>`` with ``K = n_samples``
            Rademacher probes, unbiased; ``"auto"`` — closed form if applicable, else exact if
            the layer has at most ``max_exact`` weights, else Hutchinson. All three exact
            variants equal :func:`relative_flatness` on the same data/mode/dtype.
        n_samples: Hutchinson probes ``K``.
        generator: torch generator for the probes (``None``: global RNG).
        max_exact: size threshold of ``"auto"``.

    Returns:
        scalar tensor (differentiable w.r.t. the model's parameters).
    """
    check_choice("FAM method", method, FAM_METHODS)
    check_loss_fn(loss_fn)
    loss_fn = align_targets(loss_fn)
    check_data(inputs, targets)
    n_samples = check_int("n_samples", n_samples)
    mod = layer_of(model, layer)
    weight = mod.weight
    if not weight.requires_grad:
        raise FlatpriorError("the chosen layer's weight has requires_grad=False; FAM needs it")
    p0 = weight
    x = inputs.to(device=p0.device, dtype=p0.dtype) if inputs.is_floating_point() else inputs
    y = targets.to(device=p0.device, dtype=p0.dtype) if targets.is_floating_point() else targets
    seen: dict[str, Tensor] = {}

    def hook(_mod, inp, out):
        seen["h"], seen["f"] = inp[0], out

    handle = mod.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        handle.remove()
    loss = checked_loss(loss_fn(out, y), "in the FAM regulariser")
    w = weight.reshape(weight.shape[0], -1)
    m, n = w.shape
    gram = w @ w.T
    last = isinstance(mod, nn.Linear) and seen.get("f") is out and out.ndim == 2
    if method == "closed_form" and not last:
        raise FlatpriorError(
            "FAM method 'closed_form' needs the last Linear layer (its output = the model output); "
            "use method='exact' or 'hutchinson' for other layers"
        )
    if method == "auto":
        method = "closed_form" if last else "exact" if m * n <= max_exact else "hutchinson"
    if method == "closed_form":
        (gf,) = torch.autograd.grad(loss, out, create_graph=True)  # [B, m]
        # row s of every per-example block B_i (blocks are diagonal across examples)
        rows = [torch.autograd.grad(gf[:, s].sum(), out, create_graph=True)[0] for s in range(m)]
        blocks = torch.stack(rows, dim=1)  # [B, s, s']
        hn = (seen["h"] ** 2).sum(dim=1)  # ||h_i||^2
        return torch.einsum("i,ab,iab->", hn, gram, blocks)
    (g,) = torch.autograd.grad(loss, weight, create_graph=True)
    if method == "exact":
        eye = torch.eye(m * n, dtype=w.dtype, device=w.device).reshape(m * n, *weight.shape)
        (h,) = torch.autograd.grad(
            g, weight, grad_outputs=eye, create_graph=True, is_grads_batched=True
        )
        hr = h.reshape(m, n, m, n)  # [s, c, s', c'] = d2L / dW[s,c] dW[s',c']
        return torch.einsum("ab,acbc->", gram, hr)
    v = torch.randint(0, 2, (n_samples, *weight.shape), generator=generator).to(w) * 2 - 1
    (hv,) = torch.autograd.grad(
        g, weight, grad_outputs=v, create_graph=True, is_grads_batched=True
    )
    mv = torch.einsum("ab,kbc->kac", gram, v.reshape(n_samples, m, n))
    return (mv * hv.reshape(n_samples, m, n)).sum() / n_samples
