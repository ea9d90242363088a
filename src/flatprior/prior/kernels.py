"""NNGP kernels of ReLU networks: the analytic arc-cosine recurrence and a Monte-Carlo kernel.

The prior P(f) of a wide network is the probability that a Gaussian process with the network's
NNGP kernel takes the signs of f (see :mod:`flatprior.prior.ep`). These functions build that
kernel, always in float64.

Example:
    :func:`arccos_kernel` on orthogonal unit inputs (``d = 2``, no bias): ``K^0 = I``, and one
    ReLU layer gives ``theta = pi/2``, hence ``K^1 = [[1, 1/pi], [1/pi, 1]]``:

    >>> import math, torch
    >>> K = arccos_kernel(torch.eye(2), depth=1, sigma_w2=2.0, sigma_b2=0.0)
    >>> torch.allclose(K, torch.tensor([[1, 1 / math.pi], [1 / math.pi, 1]]).double())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from flatprior.errors import FlatpriorError, check_int, check_positive

__all__ = ["arccos_kernel", "empirical_kernel"]

# Bytes of float64 working memory per row block (a few temporaries of this size live at once).
_BLOCK_BYTES = 64 * 2**20
# The kernel is rejected as numerically constant when its largest 1 - correlation is below this
# fraction of the inputs' largest 1 - cosine (bias variance swamping the weights). Measured on
# 200 binary MNIST digits (depth 2): at ratio 1.7e-4 / 1.7e-5 / 1.7e-6 a 1e-8 relative diagonal
# jitter moves EP's ln P by 0.03 / 0.4 / 2.0 nats, i.e. below ~1e-4 the answer is set by
# rounding/jitter, not by the inputs.
_MIN_SPREAD_RATIO = 1e-4


def _as_matrix(x, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise FlatpriorError(f"{name} must have shape [n, ...] with n >= 1, got {arr.shape}")
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise FlatpriorError(
            f"{name} must be a numeric array, got dtype {arr.dtype}; convert it to floats first"
        )
    arr = arr.reshape(arr.shape[0], -1).astype(np.float64, copy=False)
    if arr.shape[1] == 0:
        raise FlatpriorError(f"{name} has zero features per input; pass [n, d] with d >= 1")
    if not np.isfinite(arr).all():
        raise FlatpriorError(f"{name} contains NaN/inf values; clean the inputs first")
    return arr


def _relu_step(k: np.ndarray, d1: np.ndarray, d2: np.ndarray, sw2: float, sb2: float) -> None:
    """In place: k <- sb2 + sw2/(2 pi) sqrt(d1 d2) J(t), t = acos(k / sqrt(d1 d2))."""
    norm = np.sqrt(np.outer(d1, d2))
    np.divide(k, norm, out=k)
    np.clip(k, -1.0, 1.0, out=k)  # rounding can push |cos t| a hair above 1
    theta = np.arccos(k)
    # J(t) = sin t + (pi - t) cos t, with cos t = k and sin t = sqrt(1 - k^2)
    sin = np.sqrt(np.maximum(0.0, 1.0 - k * k))
    np.subtract(math.pi, theta, out=theta)
    theta *= k
    theta += sin
    theta *= norm
    np.multiply(theta, sw2 / (2.0 * math.pi), out=k)
    k += sb2


def arccos_kernel(
    x,
    depth: int = 2,
    sigma_w2: float = 2.0,
    sigma_b2: float = 1.0,
    *,
    x2=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""NNGP kernel of a fully connected ReLU network (Cho & Saul arc-cosine recurrence).

    For weights ``N(0, sigma_w2 / fan_in)`` and biases ``N(0, sigma_b2)``, the output
    pre-activations of an infinitely wide FCN with ``depth`` hidden ReLU layers are a GP with

    $$
    \begin{aligned}
    K^0(x, x') &= \sigma_b^2 + \sigma_w^2\, x\cdot x' / d, \\
    K^{l+1}(x, x') &= \sigma_b^2 + \frac{\sigma_w^2}{2\pi}\sqrt{K^l(x,x)K^l(x',x')}
        \,(\sin\theta + (\pi - \theta)\cos\theta),\quad
    \theta = \arccos\frac{K^l(x,x')}{\sqrt{K^l(x,x)K^l(x',x')}},
    \end{aligned}
    $$

    with ``d`` the input dimension; the result is ``K^{depth}`` (``depth=2`` is FCN d-40-40-1
    in the wide limit). On the diagonal ``K^{l+1}(x,x) = sigma_b2 + sigma_w2/2 * K^l(x,x)``.
    References: Cho & Saul (2009), Lee et al. (2018) "Deep neural networks as Gaussian
    processes", eq. (5) and Zhang et al. (arXiv 2103.06219).

    Args:
        x: inputs ``[n, ...]`` (flattened to ``[n, d]``), tensor or array.
        depth: number of hidden ReLU layers (``>= 0``; 0 gives the linear kernel ``K^0``).
        sigma_w2: weight variance times fan-in, ``sigma_w^2``.
        sigma_b2: bias variance ``sigma_b^2``.
        x2: optional second inputs ``[m, ...]`` for the cross-kernel ``K(x, x2)`` ``[n, m]``.
        chunk_size: rows computed at once (default: about 64 MiB per temporary); memory is
            the ``[n, m]`` float64 output plus a few ``[chunk_size, m]`` temporaries, so
            ``n = 20000`` needs about 3.2 GB.

    Returns:
        ``torch.float64`` tensor ``[n, n]`` (or ``[n, m]``).

    Raises:
        FlatpriorError: bad arguments or inputs (non-numeric, NaN/inf), or (self-kernel) a
            kernel that is numerically constant: ``max(1 - K_ij / sqrt(K_ii K_jj))`` below
            ``1e-4`` times the inputs' ``max(1 - cos(x_i, x_j))``, which happens when
            ``sigma_b2 >> sigma_w2``; ``ln P(f)`` of such a kernel is set by rounding/jitter.
    """
    a, b, sw2, sb2 = _kernel_inputs(x, x2, depth, sigma_w2, sigma_b2)
    d = a.shape[1]
    da = _diag_chain(a, depth, sw2, sb2)
    db = da if x2 is None else _diag_chain(b, depth, sw2, sb2)
    if depth > 0 and (min(da[0].min(), db[0].min()) <= 0.0):
        raise FlatpriorError(
            "an input has zero prior variance (x = 0 with sigma_b2 = 0); use sigma_b2 > 0"
        )
    n, m = a.shape[0], b.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _BLOCK_BYTES // (8 * m))
    check_positive("chunk_size", chunk_size)
    out = np.empty((n, m), dtype=np.float64)
    # spreads max(1 - cos) of the inputs and max(1 - corr) of K (self-kernel only, n >= 2)
    check_spread = x2 is None and n >= 2
    if check_spread:
        nrm = np.sqrt(np.einsum("ij,ij->i", a, a))
        zero = nrm == 0.0
        nrm[zero] = np.inf  # cosine of a zero input with a nonzero one counts as 0, 0-0 as 1
        sd_out = np.sqrt(da[depth])
    spread_in = spread_out = 0.0
    for lo in range(0, n, int(chunk_size)):
        hi = min(n, lo + int(chunk_size))
        k = out[lo:hi]
        np.matmul(a[lo:hi], b.T, out=k)
        if check_spread:
            cos = k / np.outer(nrm[lo:hi], nrm)
            if zero[lo:hi].any():
                cos[np.ix_(zero[lo:hi], zero)] = 1.0
            spread_in = max(spread_in, 1.0 - float(cos.min()))
            del cos
        k *= sw2 / d
        k += sb2
        for layer in range(depth):
            _relu_step(k, da[layer][lo:hi], db[layer], sw2, sb2)
        if check_spread:
            spread_out = max(spread_out, 1.0 - float((k / np.outer(sd_out[lo:hi], sd_out)).min()))
    # inputs that genuinely differ (spread_in > 1e-8) but a kernel that cannot tell them apart
    if check_spread and spread_in > 1e-8 and spread_out < _MIN_SPREAD_RATIO * spread_in:
        raise FlatpriorError(
            f"kernel is numerically constant (all correlations within {spread_out:.1e} of 1, "
            f"inputs differ by up to {spread_in:.2g} in cosine): lower sigma_b2 or raise sigma_w2"
        )
    if x2 is None:
        # exact symmetry and the closed-form diagonal (row blocks round differently)
        _symmetrize_inplace(out)
        np.fill_diagonal(out, da[depth])
    return torch.from_numpy(out)


def _kernel_inputs(x, x2, depth, sigma_w2, sigma_b2):
    """Validated ``(a [n, d], b [m, d], sigma_w2, sigma_b2)`` (``b is a`` without ``x2``)."""
    check_int("depth", depth, 0)
    check_positive("sigma_w2", sigma_w2)
    check_positive("sigma_b2", sigma_b2, allow_zero=True)
    a = _as_matrix(x, "x")
    b = a if x2 is None else _as_matrix(x2, "x2")
    if b.shape[1] != a.shape[1]:
        raise FlatpriorError(
            f"x has {a.shape[1]} features per input but x2 has {b.shape[1]}; they must match"
        )
    return a, b, float(sigma_w2), float(sigma_b2)


def _diag_chain(z: np.ndarray, depth: int, sw2: float, sb2: float) -> list[np.ndarray]:
    """``K^(l)(x, x)`` for layers ``l = 0..depth`` (the ReLU recurrence on the diagonal)."""
    k = sb2 + sw2 * np.einsum("ij,ij->i", z, z) / z.shape[1]
    chain = [k]
    for _ in range(depth):
        k = sb2 + 0.5 * sw2 * k
        chain.append(k)
    return chain


def _symmetrize_inplace(k: np.ndarray, block: int = 2048) -> np.ndarray:
    """Copy the upper triangle onto the lower one, blockwise (no n x n temporary)."""
    n = k.shape[0]
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        k[hi:, lo:hi] = k[lo:hi, hi:].T
        sub = k[lo:hi, lo:hi]
        sub[...] = np.triu(sub) + np.triu(sub, 1).T
    return k


def empirical_kernel(
    make_model: Callable[[int], torch.nn.Module],
    x,
    n_draws: int,
    *,
    seed: int = 0,
    sigma_w2: float = 2.0,
    sigma_b2: float = 1.0,
    chunk_size: int = 1024,
    feature_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""Monte-Carlo NNGP kernel of any network, from the features of its last hidden layer.

    For draws ``s = 1..M`` of a freshly initialised network, let ``Phi_s [n, p]`` be the
    inputs of the final ``nn.Linear`` layer. The output layer with weights
    ``N(0, sigma_w2 / p)`` and biases ``N(0, sigma_b2)`` then gives the kernel

    $$
    K = \sigma_b^2 + \frac{\sigma_w^2}{p}\,\frac{1}{M}\sum_s \Phi_s \Phi_s^\top .
    $$

    This is the kernel used for ResNet-50 in Zhang et al. (arXiv 2103.06219; M = 700,
    p = 2048) and in Novak et al. (2019). Models are put in eval mode (BatchNorm uses its
    initial running statistics, dropout off). Inner products are accumulated in float64.

    Args:
        make_model: ``make_model(seed) -> nn.Module``, a freshly initialised network whose
            last module (in ``model.modules()`` order) is the output ``nn.Linear``.
        x: inputs ``[n, ...]`` in the layout the model expects.
        n_draws: number of random initialisations ``M``.
        seed: master seed; draw ``s`` uses an integer seed derived from it (SeedSequence).
        sigma_w2: output-layer weight variance times fan-in.
        sigma_b2: output-layer bias variance.
        chunk_size: inputs per forward pass.
        feature_fn: optional ``feature_fn(model, x_chunk) -> [b, p]`` returning the features
            instead of the forward hook on the last linear layer.

    Returns:
        ``torch.float64`` tensor ``[n, n]``.
    """
    check_int("n_draws", n_draws, 1)
    check_positive("sigma_w2", sigma_w2)
    check_positive("sigma_b2", sigma_b2, allow_zero=True)
    check_positive("chunk_size", chunk_size)
    xt = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if xt.ndim < 1 or xt.shape[0] == 0:
        raise FlatpriorError(f"x must have shape [n, ...] with n >= 1, got {tuple(xt.shape)}")
    n = xt.shape[0]
    seeds = np.random.SeedSequence(seed).generate_state(int(n_draws), dtype=np.uint32)
    acc = torch.zeros((n, n), dtype=torch.float64)
    fan_in = None
    for s in seeds:
        model = make_model(int(s))
        model.eval()
        mods = list(model.modules())
        if feature_fn is None and not isinstance(mods[-1], torch.nn.Linear):
            raise FlatpriorError(
                "the last module of make_model(seed) must be the output nn.Linear; "
                "reorder the model or pass feature_fn"
            )
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        captured: list[torch.Tensor] = []
        handle = None
        if feature_fn is None:
            handle = mods[-1].register_forward_hook(
                lambda _m, inp, _out, store=captured: store.append(inp[0].detach())
            )
        feats = []
        try:
            with torch.no_grad():
                for lo in range(0, n, int(chunk_size)):
                    xb = xt[lo : lo + int(chunk_size)].to(dtype)
                    if feature_fn is None:
                        captured.clear()
                        model(xb)
                        f = captured[-1]
                    else:
                        f = feature_fn(model, xb)
                    feats.append(f.reshape(f.shape[0], -1).to(torch.float64))
        finally:
            if handle is not None:
                handle.remove()
        phi = torch.cat(feats)
        if not torch.isfinite(phi).all():
            raise FlatpriorError("the network produced NaN/inf features; check the model init")
        if fan_in is None:
            fan_in = phi.shape[1]
        acc.addmm_(phi, phi.T)
    acc.mul_(float(sigma_w2) / (fan_in * int(n_draws)))
    acc.add_(float(sigma_b2))
    return acc
