"""Shared plumbing of the flatness measures: input checks, a safe model copy, batched losses.

Every measure works on a *deep copy* of the model in **eval mode** (Dropout off, BatchNorm on its
running statistics), so the caller's model is never modified and ``L(w)`` and every perturbed loss
are computed in the same mode (the study's code mixed train and eval mode).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from flatprior import errors
from flatprior.errors import FlatpriorError, check_finite_tensor
from flatprior.models.probe import forward_probe
from flatprior.models.rescale import linear_layers

LossFn = Callable[[Tensor, Tensor], Tensor]


def check_data(inputs: Tensor, targets: Tensor, model: nn.Module | None = None) -> int:
    """Validate ``inputs [N, ...]`` / ``targets [N, ...]``; return ``N`` (> 0).

    With ``model``, also run it once on ``inputs[:1]`` (no grad, eval mode, mode restored) so an
    input shape the model cannot take fails here with one line, not deep inside torch.
    """
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise FlatpriorError("inputs and targets must be torch tensors (e.g. task.x_train)")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise FlatpriorError("inputs are empty (N = 0); pass at least one training example")
    if not inputs.is_floating_point():
        raise FlatpriorError(f"inputs have dtype {inputs.dtype}; they must be float (use .float())")
    if targets.ndim == 0 or targets.shape[0] != inputs.shape[0]:
        got = "a scalar" if targets.ndim == 0 else str(targets.shape[0])
        raise FlatpriorError(
            f"targets must have one row per input: {inputs.shape[0]} inputs but {got} targets"
        )
    check_finite_tensor("inputs", inputs)
    if targets.is_floating_point():
        check_finite_tensor("targets", targets)
    if model is not None:
        probe_model(model, inputs)
    return int(inputs.shape[0])


def probe_model(model: nn.Module, inputs: Tensor) -> None:
    """Forward ``inputs[:1]`` through ``model`` in eval mode under ``no_grad``.

    The inputs are cast to the model's dtype/device; a torch error becomes a one-line
    :class:`FlatpriorError`.
    """
    if not isinstance(model, nn.Module):
        return  # eval_copy reports a non-module model
    lin = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    want = f" (its first Linear layer takes {lin.in_features} features)" if lin else ""
    forward_probe(model, inputs, f"pass inputs shaped like its training data{want}", cast=True)


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """:func:`flatprior.errors.check_int` accepting integral floats (``3.0``)."""
    return errors.check_int(name, value, minimum, integral_floats=True)


def check_loss_fn(loss_fn: object) -> None:
    """Loss callables must return the *mean* over the batch (we weight batches by their size)."""
    if not callable(loss_fn):
        raise FlatpriorError("loss_fn must be callable (logits, targets) -> mean loss")
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction != "mean":
        raise FlatpriorError(
            f"loss_fn has reduction={reduction!r}; flatness measures use the MEAN loss, "
            "pass e.g. torch.nn.BCEWithLogitsLoss(reduction='mean')"
        )


def align_targets(loss_fn: LossFn) -> LossFn:
    """Wrap ``loss_fn`` so float targets ``[N]`` meet one-logit outputs ``[N, 1]``.

    A float target tensor with the logits' number of elements but another shape is reshaped to
    the logits' shape (BCE needs equal shapes); integer class labels pass through unchanged.
    """

    def fn(logits: Tensor, targets: Tensor) -> Tensor:
        if (targets.is_floating_point() and targets.shape != logits.shape
                and targets.numel() == logits.numel()):
            targets = targets.reshape(logits.shape)
        try:
            return loss_fn(logits, targets)
        except (ValueError, RuntimeError):
            per_out = logits[:1].numel()
            per_target = targets[:1].numel()
            if logits.ndim and targets.ndim and per_out != per_target:
                raise FlatpriorError(
                    f"the model returns {per_out} outputs per input but the targets hold "
                    f"{per_target}; the default BCE loss needs one logit per input (last layer "
                    "nn.Linear(..., 1)), or pass a loss_fn that fits the outputs"
                ) from None
            raise

    return fn


def trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named trainable parameters; raise if there are none."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise FlatpriorError(
            "model has no trainable parameters (all requires_grad=False); nothing to perturb"
        )
    return named


def eval_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A deep copy in eval mode, cast to ``dtype`` (``None`` keeps the model's dtype)."""
    if not isinstance(model, nn.Module):
        raise FlatpriorError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable_named(model)
    m = copy.deepcopy(model)
    if dtype is not None:
        m = m.to(dtype)
    return m.eval()


def cast_data(
    inputs: Tensor, targets: Tensor, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Move data to ``device``; floating tensors to ``dtype`` (integer class labels stay)."""
    x = inputs.to(device=device, dtype=dtype) if inputs.is_floating_point() else inputs.to(device)
    y = targets.to(device=device, dtype=dtype) if targets.is_floating_point() else targets.to(
        device
    )
    return x, y


def batches(n: int, batch_size: int | None) -> list[slice]:
    """Contiguous slices covering ``range(n)``; the last one may be shorter (never dropped)."""
    bs = n if batch_size is None else max(1, min(int(batch_size), n))
    return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


def checked_loss(loss: Tensor, where: str) -> Tensor:
    """Raise a one-line error if ``loss`` is not a finite scalar."""
    if loss.ndim != 0 and loss.numel() != 1:
        raise FlatpriorError(
            f"loss_fn returned shape {tuple(loss.shape)} {where}; it must return a scalar mean"
        )
    if not math.isfinite(float(loss.detach())):
        raise FlatpriorError(
            f"loss_fn returned {float(loss.detach())} {where}; check the model/targets "
            "(e.g. BCE targets must be 0/1 floats shaped like the logits)"
        )
    return loss.reshape(())


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    batch_size: int | None = None,
    where: str = "",
) -> float:
    """Mean loss over the whole set: ``sum_b n_b * loss_b / N`` (every example counts once)."""
    n = x.shape[0]
    total = 0.0
    for sl in batches(n, batch_size):
        xb = x[sl]
        total += float(checked_loss(loss_fn(model(xb), y[sl]), where)) * xb.shape[0]
    return total / n


def layer_of(model: nn.Module, layer: int | nn.Module | None) -> nn.Module:
    """Resolve ``layer``: ``None`` = last Linear/Conv layer, an int indexes those layers."""
    layers = linear_layers(model)
    if not layers:
        raise FlatpriorError("model has no Linear/Conv layer; relative flatness needs one")
    if layer is None:
        return layers[-1]
    if isinstance(layer, nn.Module):
        for m in layers:
            if m is layer:
                return m
        raise FlatpriorError("layer module is not a Linear/Conv layer of this model")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise FlatpriorError(f"layer must be None, an int or an nn.Module, got {layer!r}")
    if not -len(layers) <= layer < len(layers):
        raise FlatpriorError(
            f"layer index {layer} out of range; the model has {len(layers)} Linear/Conv layers"
        )
    return layers[layer]


def layer_index_in(model: nn.Module, module: nn.Module) -> int:
    """Index of ``module`` among :func:`flatprior.models.linear_layers` of ``model``."""
    layers = linear_layers(model)
    return next(i for i, m in enumerate(layers) if m is module)


def flat_params(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])
