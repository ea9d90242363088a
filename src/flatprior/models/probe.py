"""Run a model once on one input to turn shape mistakes into one-line errors."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flatprior.errors import FlatpriorError


def forward_probe(model: nn.Module, inputs: Tensor, fix: str, *, cast: bool = False) -> Tensor:
    """``model(inputs[:1])`` in eval mode under ``no_grad`` (the mode is restored).

    A torch error (wrong input shape, wrong dtype) becomes a :class:`FlatpriorError` naming the
    input shape, the first line of torch's message and ``fix`` (what the caller should do).

    Args:
        model: the network.
        inputs: ``[N, ...]``; only the first row is used.
        fix: the end of the message, e.g. ``"build it with make_model(name, input_shape)"``.
        cast: move the row to the model's dtype and device first.

    Returns:
        the model's output for the one row.
    """
    x = inputs[:1]
    p = next(model.parameters(), None)
    if cast and p is not None:
        x = x.to(device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0][:160] if text else type(exc).__name__
        raise FlatpriorError(
            f"the model does not accept inputs of shape {list(inputs.shape[1:])} ({first}); {fix}"
        ) from None
    finally:
        model.train(was_training)
