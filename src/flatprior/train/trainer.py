"""Train a one-logit network with BCE-with-logits until the first epoch of zero training error.

The trainer is a plain loop over pre-loaded CPU tensors (no DataLoader: for |S| ~ 500 its
per-batch overhead would dominate). After every epoch it evaluates the model in eval mode on S,
A and E and hands ``(model, metrics)`` to each callback, so measures (sharpness, log P(f), …) can
hook in. A callback returning ``"stop"`` ends training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

from flatprior.data.tasks import Task
from flatprior.errors import (
    FlatpriorError,
    check_choice,
    check_finite_tensor,
    check_positive,
)
from flatprior.models.probe import forward_probe
from flatprior.train.optimizers import make_optimizer
from flatprior.train.stopping import Stop, StopRules, cap_message

Callback = Callable[[nn.Module, dict[str, Any]], Any]


@dataclass
class TrainConfig:
    """How to train. ``lr=None`` takes the optimizer's default (see ``OPTIMIZERS``).

    Attributes:
        zero_error_on: ``"train"`` stops at 100 % accuracy on S (the study), ``"train+attack"``
            requires S ∪ A to be fitted.
        max_epochs: cap on epochs before zero error; reaching it ends with status
            ``"did_not_reach_zero_error"``.
        overtrain_epochs: epochs to continue after zero error.
        collapse_patience: stop with status ``"collapsed"`` when the network has predicted one
            class for every training input for this many consecutive epochs (0 disables).
        augment: random crop (pad 4) + horizontal flip of training batches (CIFAR); measurements
            always use the un-augmented data.
        fam_strength: λ of the FAM regulariser (relative flatness of the penultimate layer).
    """

    optimizer: str = "sgd"
    lr: float | None = None
    batch_size: int = 128
    max_epochs: int = 2000
    overtrain_epochs: int = 0
    zero_error_on: Literal["train", "train+attack"] = "train"
    loss_reduction: Literal["mean", "sum"] = "mean"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    collapse_patience: int = 200
    augment: bool = False
    fam_strength: float = 0.0
    track_test: bool = True
    seed: int = 0

    def validate(self) -> TrainConfig:
        """Check every field; return ``self`` (one-line FlatpriorError otherwise)."""
        from flatprior.train.optimizers import OPTIMIZERS

        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("zero_error_on", self.zero_error_on, ("train", "train+attack"))
        check_choice("loss_reduction", self.loss_reduction, ("mean", "sum"))
        if self.lr is not None:
            check_positive("lr", self.lr)
        for name in ("batch_size", "max_epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise FlatpriorError(f"{name} must be a whole number >= 1, got {v!r}")
        if not isinstance(self.overtrain_epochs, int) or self.overtrain_epochs < 0:
            raise FlatpriorError(f"overtrain_epochs must be >= 0, got {self.overtrain_epochs!r}")
        check_positive("fam_strength", self.fam_strength, allow_zero=True)
        return self


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Errors are fractions in [0, 1]; ``attack_error`` is measured against the flipped labels the
    network was trained on.
    """

    status: Literal["zero_error", "did_not_reach_zero_error", "collapsed", "stopped"]
    epochs_to_zero_error: int | None
    epochs_trained: int
    train_error: float
    attack_error: float
    test_error: float
    train_loss: float
    wall_time_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""

    @property
    def reached_zero_error(self) -> bool:
        """Whether training fitted the training set at some epoch."""
        return self.epochs_to_zero_error is not None

    def summary(self) -> dict[str, Any]:
        """The result without its per-epoch ``history``.

        The other fields are scalars and strings: read directly (``asdict`` would deep-copy
        the history only to drop it).
        """
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "history"}


def _loss_fn(reduction: str) -> nn.Module:
    return nn.BCEWithLogitsLoss(reduction=reduction)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 4096
) -> tuple[float, float, torch.Tensor]:
    """Mean BCE loss, accuracy and predictions (0/1, ``[n]``) of ``model`` in eval mode."""
    if len(y) == 0:
        return float("nan"), float("nan"), torch.zeros(0)
    logits = _eval_logits(model, x, batch_size)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y).item()
    pred = (logits > 0).float()
    return loss, (pred == y).float().mean().item(), pred


def _eval_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits ``[n]`` of ``model`` in eval mode, in batches; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat(
            [_one_logit(model(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        )
    finally:
        if was_training:  # an eval-mode model stays as it is (no second walk over its modules)
            model.train()


def _one_logit(out: torch.Tensor) -> torch.Tensor:
    """``[b]`` logits from a model output ``[b]`` or ``[b, 1]``; one line otherwise."""
    if out.ndim > 2 or (out.ndim == 2 and out.shape[1] != 1):
        raise FlatpriorError(
            f"the model returns outputs of shape {list(out.shape[1:])} per input; flatprior's "
            "binary tasks need one logit per input (last layer nn.Linear(..., 1))"
        )
    return out.reshape(-1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 4096) -> torch.Tensor:
    """Predicted labels in {0, 1} (logit > 0), eval mode, ``[n]`` float32.

    :func:`evaluate`'s predictions without its loss and accuracy (an ensemble's records call
    this once or twice per member).
    """
    if len(x) == 0:
        return torch.zeros(0)
    return (_eval_logits(model, x, batch_size) > 0).float()


def _augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip, per image."""
    n, _, h, w = xb.shape
    padded = nn.functional.pad(xb, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(
        n, xb.shape[1], h, w + 8
    )
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, xb.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_task(model: nn.Module, task: Task) -> None:
    """Raise :class:`FlatpriorError` unless ``task`` is something ``model`` can be trained on.

    Checks (before any training, so a bad hand-made task fails in milliseconds with a clear
    message rather than as a torch shape error or a misleading "loss became nan"): tensors,
    float inputs without NaN/inf, labels in {0, 1} with one per input, the same input shape in
    every split, and one logit per input from ``model``.
    """
    if not isinstance(model, nn.Module):
        raise FlatpriorError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = None
    for split in ("train", "attack", "test"):
        x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise FlatpriorError(f"task.x_{split}/y_{split} must be torch tensors")
        if not x.is_floating_point():
            raise FlatpriorError(
                f"task.x_{split} has dtype {x.dtype}; inputs must be float (use .float())"
            )
        if y.dim() != 1 or len(y) != len(x):
            raise FlatpriorError(
                f"task.y_{split} must be a vector with one label per input: x_{split} has "
                f"{len(x)} rows, y_{split} has shape {tuple(y.shape)}"
            )
        if len(x) and shape is not None and tuple(x.shape[1:]) != shape:
            raise FlatpriorError(
                f"task.x_{split} inputs have shape {tuple(x.shape[1:])} but x_train has {shape}"
            )
        if split == "train":
            shape = tuple(x.shape[1:])
        check_finite_tensor(f"task.x_{split}", x)
        if len(y) and not bool(((y == 0) | (y == 1)).all()):
            bad = y[(y != 0) & (y != 1)][:3].tolist()
            raise FlatpriorError(
                f"task.y_{split} must hold labels in {{0, 1}}, found {bad}; binarise the labels"
            )
    if len(task.y_train) == 0:
        raise FlatpriorError("the task has an empty training set; ask for n_train >= 1")
    probe = forward_probe(model, task.x_train, "build it with make_model(name, task.input_shape)")
    if probe.numel() != 1:
        raise FlatpriorError(
            f"the model must output one logit per input, got {tuple(probe.shape)} for one input"
        )


class _EpochStep:
    """One epoch of mini-batch training on S ∪ A (shuffled by a seeded generator).

    Holds what persists between epochs: the optimizer, the batch order's generator (also used
    for augmentation) and the loss. Entropy-SGD's Langevin noise gets its own generator, seeded
    like the batch order, so training touches no global RNG.
    """

    def __init__(self, model: nn.Module, task: Task, config: TrainConfig):
        self.model, self.config = model, config
        self.x_fit = torch.cat([task.x_train, task.x_attack])
        self.y_fit = torch.cat([task.y_train, task.y_attack])
        self.n = len(self.y_fit)
        kwargs = dict(config.optimizer_kwargs)
        self.needs_closure = config.optimizer == "entropy-sgd"
        if self.needs_closure:
            kwargs.setdefault("generator", torch.Generator().manual_seed(config.seed))
        self.opt, spec = make_optimizer(config.optimizer, model.parameters(), config.lr, **kwargs)
        self.step_style = spec.step_style  # "plain", "closure" (Entropy-SGD) or "sam"
        self.batch = self.n if spec.full_batch else min(config.batch_size, self.n)
        self.loss_fn = _loss_fn(config.loss_reduction)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.fam = None
        if config.fam_strength > 0:
            from flatprior.flatness.relative import fam_regularizer

            self.fam = fam_regularizer
        self.drop_single = _has_batchnorm(model)

    def _batch_loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """Zero the gradients, then the loss of one batch (+ FAM) and its backward pass."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(xb).reshape(-1), yb)
        if self.fam is not None:
            loss = loss + self.config.fam_strength * self.fam(self.model, _loss_fn("mean"), xb,
                                                              yb)
        loss.backward()
        return loss

    def __call__(self, epoch: int) -> None:
        """Train one epoch; raise :class:`FlatpriorError` if the loss becomes NaN/inf."""
        self.model.train()
        perm = torch.randperm(self.n, generator=self.gen)
        for start in range(0, self.n, self.batch):
            idx = perm[start : start + self.batch]
            if self.drop_single and len(idx) == 1 and self.n > 1:
                continue  # BatchNorm cannot normalise a batch of one example
            xb, yb = self.x_fit[idx], self.y_fit[idx]
            if self.config.augment and xb.dim() == 4:
                xb = _augment(xb, self.gen)
            if self.step_style == "closure":
                loss = self.opt.step(lambda xb=xb, yb=yb: self._batch_loss(xb, yb))
            elif self.step_style == "sam":
                loss = self._batch_loss(xb, yb)  # gradient at w (and the loss reported)
                self.opt.step(lambda xb=xb, yb=yb: self._batch_loss(xb, yb))
            else:
                loss = self._batch_loss(xb, yb)
                self.opt.step()
            if not math.isfinite(loss.item()):
                raise FlatpriorError(
                    f"training loss became {loss.item()} at epoch {epoch}; lower the learning rate "
                    f"(lr={self.opt.param_groups[0]['lr']})"
                )


def _epoch_metrics(model: nn.Module, task: Task, config: TrainConfig, epoch: int,
                   epoch_time: float, phase: str) -> dict[str, Any]:
    """The per-epoch record: losses and accuracies on S, A and E (eval mode)."""
    tr_loss, tr_acc, tr_pred = evaluate(model, task.x_train, task.y_train)
    _, at_acc, _ = evaluate(model, task.x_attack, task.y_attack)
    te_loss, te_acc = (float("nan"), float("nan"))
    if config.track_test:
        te_loss, te_acc, _ = evaluate(model, task.x_test, task.y_test)
    return {
        "epoch": epoch,
        "phase": phase,
        "train_loss": tr_loss,
        "train_acc": tr_acc,
        "attack_acc": at_acc,
        "test_acc": te_acc,
        "test_loss": te_loss,
        "epoch_time_s": epoch_time,
        "constant": bool(tr_pred.min() == tr_pred.max()),
    }


def train(
    model: nn.Module,
    task: Task,
    config: TrainConfig | None = None,
    callbacks: Sequence[Callback] = (),
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on S ∪ A until the first epoch with zero error, then overtrain.

    Loss: BCE-with-logits of the single logit against labels in {0, 1} (``mean`` or ``sum`` over
    the batch). Per epoch the model is evaluated in eval mode and ``metrics`` — ``epoch``,
    ``phase`` (``"train"`` before zero error, ``"overtrain"`` after), ``train_loss``,
    ``train_acc``, ``attack_acc``, ``test_acc``, ``test_loss``, ``epoch_time_s`` — is passed to
    every callback and appended to ``history``. Epoch 0 is the untrained network. Training ends
    by the rules of :mod:`flatprior.train.stopping` (zero error + overtraining, collapse, the
    epoch cap) or when a callback returns ``"stop"``.

    Reproducible: the batch order (and augmentation, and Entropy-SGD noise) come from ``seed``.
    """
    config = (config or TrainConfig()).validate()
    check_task(model, task)
    step = _EpochStep(model, task, config)
    rules = StopRules.from_config(config, has_attack=len(task.y_attack) > 0)
    history: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def emit(m: dict[str, Any]) -> bool:
        history.append(m)
        if progress is not None:
            progress(m)
        stop = False
        for cb in callbacks:
            stop |= cb(model, m) == "stop"
        return stop

    stopped = emit(_epoch_metrics(model, task, config, 0, 0.0, rules.phase))
    epoch, stop = 0, None
    while not stopped and stop is None:
        epoch += 1
        t0 = time.perf_counter()
        step(epoch)
        m = _epoch_metrics(model, task, config, epoch, time.perf_counter() - t0, rules.phase)
        stopped = emit(m)
        stop = rules(epoch, m)
    return _result(task, config, rules, stop, stopped, epoch, history,
                   time.perf_counter() - t_start)


def _result(task: Task, config: TrainConfig, rules: StopRules, stop: Stop | None, stopped: bool,
            epoch: int, history: list[dict[str, Any]], wall_time: float) -> TrainResult:
    status, message = (stop.status, stop.message) if stop is not None else ("", "")
    if rules.zero_error.epoch is not None:
        status = "zero_error"
    elif stopped:  # a callback's "stop" outranks the cap (and keeps a collapse message)
        status = "stopped"
        message = message if stop is not None and stop.status == "collapsed" else ""
    if status == "did_not_reach_zero_error":  # the cap's message, told if training diverged
        message = cap_message(config.max_epochs, history[-1]["train_acc"],
                              history[0]["train_loss"], history[-1]["train_loss"], config.lr)
    last = history[-1]
    return TrainResult(
        status=status,
        epochs_to_zero_error=rules.zero_error.epoch,
        epochs_trained=epoch,
        train_error=1.0 - last["train_acc"],
        attack_error=(1.0 - last["attack_acc"]) if len(task.y_attack) else 0.0,
        test_error=(1.0 - last["test_acc"]) if config.track_test else float("nan"),
        train_loss=last["train_loss"],
        wall_time_s=wall_time,
        history=history,
        message=message,
    )
