"""One entry point for log P(f): choose the estimator by name."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from flatprior.errors import FlatpriorError, check_choice

__all__ = ["LOG_PRIOR_METHODS", "LogPriorResult", "function_log_prior", "log_prior",
           "log_prior_distinct"]


@runtime_checkable
class LogPriorResult(Protocol):
    """What every :func:`log_prior` method returns (each adds its own diagnostics).

    Attributes:
        log_prob: the estimate of ``ln P(f)`` (natural log).
        converged: whether the estimator met its own stopping rule / accuracy target.
        std_err: standard error of ``log_prob`` (``None`` for a deterministic approximation
            such as EP).
        ci_low, ci_high: confidence interval of ``ln P(f)`` (``None`` when the method gives
            none).
    """

    log_prob: float
    converged: bool
    std_err: float | None
    ci_low: float | None
    ci_high: float | None

#: estimator name -> what it computes
LOG_PRIOR_METHODS = {
    "ep": "expectation propagation (log_prior_ep), any n",
    "exact": "Genz quasi-Monte-Carlo orthant integral (exact_log_orthant_prob), n <= 20",
    "mc": "plain Monte-Carlo on z ~ N(0, K) (mc_log_orthant_prob), P not too small",
    "tilting": "importance sampling with a tilted proposal (log_prior_tilting)",
}


def log_prior(K, y, method: str = "ep", **kwargs: Any):
    r"""The function prior ``ln P(f)``: the orthant probability of the NNGP, by name of estimator.

    $$
    \ln P(f) = \ln P\big(\operatorname{sign} z = y\big), \qquad z \sim \mathcal{N}(0, K)
    $$

    for a function ``f`` with labels ``y`` on ``n`` inputs and the network's NNGP kernel ``K``
    on them (Valle-Pérez et al., ICLR 2019; Zhang et al., arXiv 2103.06219, Sec. 3).

    Args:
        K: prior covariance ``[n, n]``.
        y: labels ``[n]`` in ``{±1}`` or ``{0, 1}``.
        method: one of :data:`LOG_PRIOR_METHODS` (``"ep"``, ``"exact"``, ``"mc"``,
            ``"tilting"``).
        **kwargs: passed to the estimator.

    Returns:
        The estimator's result, a :class:`LogPriorResult` (``log_prob``, ``converged``,
        ``std_err``, ``ci_low``, ``ci_high``) with the method's own diagnostics besides.

    Example:
        Independent outputs (``K = I``) give ``P(f) = 2^{-n}`` for every labelling:

        >>> import math, torch
        >>> res = log_prior(torch.eye(4), [1, 0, 1, 1], method="ep")
        >>> math.isclose(res.log_prob, -4 * math.log(2), rel_tol=1e-12), res.converged
        (True, True)
    """
    check_choice("log-prior method", method, LOG_PRIOR_METHODS)
    if method == "ep":
        from flatprior.prior.ep import log_prior_ep

        return log_prior_ep(K, y, **kwargs)
    if method == "exact":
        from flatprior.prior.exact import exact_log_orthant_prob

        return exact_log_orthant_prob(K, y, **kwargs)
    if method == "mc":
        from flatprior.prior.exact import mc_log_orthant_prob

        return mc_log_orthant_prob(K, y, **kwargs)
    from flatprior.prior.tilting import log_prior_tilting

    return log_prior_tilting(K, y, **kwargs)


def log_prior_distinct(K, labels, method: str = "ep", **kwargs: Any) -> tuple[list, int]:
    """``log_prior(K, y)`` for every row ``y`` of ``labels`` (``[M, n]``), each distinct row once.

    Many networks of a sweep find the same function (the Boolean system: thousands of SGD runs,
    a few hundred distinct functions, one kernel for all): the estimator runs once per distinct
    label vector and the result object is shared by the rows that have it. For ``"ep"`` the
    distinct rows go through one batched call
    (:func:`flatprior.prior.ep_batched.log_prior_ep_batch`: the same results as
    :func:`log_prior` row by row, bit for bit, with the kernel checked once).

    Args:
        K: prior covariance ``[n, n]``.
        labels: ``[M, n]`` label vectors (rows in ``{±1}`` or ``{0, 1}``).
        method: one of :data:`LOG_PRIOR_METHODS`.
        **kwargs: passed to the estimator.

    Returns:
        ``(results, n_distinct)``: one result per row of ``labels`` (shared objects for equal
        rows) and the number of distinct rows estimated.
    """
    import torch

    check_choice("log-prior method", method, LOG_PRIOR_METHODS)
    lab = torch.as_tensor(labels)
    if lab.dim() != 2 or lab.shape[0] == 0:
        raise FlatpriorError(
            f"labels must be [M, n] (one label vector per row, M >= 1), got {tuple(lab.shape)}"
        )
    uniq, inverse = torch.unique(lab, dim=0, return_inverse=True)
    if method == "ep":
        from flatprior.prior.ep_batched import log_prior_ep_batch

        done = log_prior_ep_batch(K, uniq, **kwargs)
    else:
        done = [log_prior(K, uniq[i], method=method, **kwargs) for i in range(len(uniq))]
    return [done[int(j)] for j in inverse], len(uniq)


def function_log_prior(
    x,
    labels01,
    *,
    kernel: str = "arccos",
    depth: int = 2,
    sigma_w2: float = 2.0,
    sigma_b2: float = 1.0,
    method: str = "ep",
    **kwargs: Any,
):
    """``ln P(f)`` of the function with labels ``labels01`` on inputs ``x`` under the NNGP prior.

    Builds ``K = arccos_kernel(x, depth, sigma_w2, sigma_b2)`` (the NNGP kernel of a ReLU FCN
    with ``depth`` hidden layers, He-normal weights and N(0, sigma_b2) biases by default) and
    returns ``log_prior(K, labels01, method, **kwargs)``. The trainer calls this on S ∪ E
    with the network's own predictions (logit > 0) as labels.

    Args:
        x: inputs ``[n, ...]``.
        labels01: labels ``[n]`` in ``{0, 1}`` (or ``{±1}``).
        kernel: only ``"arccos"``.
        depth: hidden ReLU layers (see :func:`arccos_kernel`).
        sigma_w2: weight variance times fan-in.
        sigma_b2: bias variance.
        method: estimator (see :func:`log_prior`).
        **kwargs: passed to the estimator.
    """
    check_choice("kernel", kernel, ["arccos"])
    check_choice("log-prior method", method, LOG_PRIOR_METHODS)
    from flatprior.prior.kernels import arccos_kernel

    n_x = x.shape[0] if hasattr(x, "shape") else len(x)
    n_y = labels01.shape[0] if hasattr(labels01, "shape") else len(labels01)
    if n_x != n_y:
        raise FlatpriorError(f"x has {n_x} inputs but labels01 has {n_y}; give one label each")
    K = arccos_kernel(x, depth=depth, sigma_w2=sigma_w2, sigma_b2=sigma_b2)
    return log_prior(K, labels01, method=method, **kwargs)
