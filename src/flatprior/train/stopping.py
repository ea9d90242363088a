"""When training ends: stop rules checked after every epoch.

A rule is a small object called as ``rule(epoch, metrics)`` after each epoch's evaluation, with
``metrics`` the dict :func:`flatprior.train.train` records (``train_acc``, ``attack_acc``,
``constant`` …); it returns a :class:`Stop` to end training or ``None`` to go on. Rules may keep
state (a counter), so build fresh ones per training run. :class:`StopRules` combines the study's
three — zero error (then optional overtraining), collapse and the epoch cap — in the order the
trainer applies them. Other training loops (e.g. ensembles) can reuse the rules one by one::

    rules = StopRules.from_config(config, has_attack=len(task.y_attack) > 0)
    for epoch in range(1, ...):
        ...  # one epoch, then metrics = {...}
        if (stop := rules(epoch, metrics)) is not None:
            break
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Collapse", "EpochCap", "Stop", "StopRules", "ZeroError", "cap_message",
           "collapse_message"]

Metrics = dict[str, Any]


@dataclass(frozen=True)
class Stop:
    """The end of training.

    ``status`` as in :class:`flatprior.train.TrainResult`, and a one-line ``message`` for the
    user (empty when nothing needs saying).
    """

    status: str
    message: str = ""


@dataclass
class ZeroError:
    """First epoch with zero training error, then ``overtrain_epochs`` more.

    Attributes:
        overtrain_epochs: epochs to continue after zero error.
        needs_attack: also require 100 % accuracy on the attack set A (``zero_error_on =
            "train+attack"`` with a non-empty A).
        epoch: the first epoch with zero error (``None`` until then).
    """

    overtrain_epochs: int = 0
    needs_attack: bool = False
    epoch: int | None = None

    def fitted(self, metrics: Metrics) -> bool:
        """Whether the epoch's metrics show zero error on S (and on A if required)."""
        return metrics["train_acc"] == 1.0 and (
            not self.needs_attack or metrics["attack_acc"] == 1.0
        )

    def __call__(self, epoch: int, metrics: Metrics) -> Stop | None:
        """``Stop("zero_error")`` once the overtraining after the first fitted epoch is done."""
        if self.epoch is None and self.fitted(metrics):
            self.epoch = epoch
        if self.epoch is not None and epoch >= self.epoch + self.overtrain_epochs:
            return Stop("zero_error")
        return None


@dataclass
class Collapse:
    """The network predicts one class for every training input ``patience`` epochs running.

    Reads ``metrics["constant"]``. ``patience = 0`` disables the rule.
    """

    patience: int = 200
    streak: int = 0

    def __call__(self, epoch: int, metrics: Metrics) -> Stop | None:
        """``Stop("collapsed")`` after ``patience`` constant-prediction epochs running."""
        if not self.patience:
            return None
        self.streak = self.streak + 1 if metrics["constant"] else 0
        if self.streak < self.patience:
            return None
        return Stop("collapsed", collapse_message(self.streak, metrics["train_acc"]))


def collapse_message(streak: int, train_acc: float) -> str:
    """Why a run that predicts one class for every training input was stopped."""
    return (f"collapsed: predicted one class for every training input for {streak} epochs "
            f"(train accuracy {train_acc:.3f}); lower the learning rate or change the optimizer")


def cap_message(max_epochs: int, train_acc: float, first_loss: float | None = None,
                last_loss: float | None = None, lr: float | None = None) -> str:
    """Why a run stopped at the epoch cap without fitting S, and what to change.

    A training loss that ended above its value before training (``first_loss``) is a step-size
    problem: "diverged ... lower the learning rate"; otherwise the run was too short or too slow.
    """
    if first_loss is not None and last_loss is not None and last_loss > first_loss:
        lr_text = " at its default" if lr is None else f"={lr:g}"
        return (f"diverged: the training loss rose from {first_loss:.4g} before training to "
                f"{last_loss:.4g} after {max_epochs} epochs (train accuracy {train_acc:.4f}); "
                f"lower the learning rate (lr{lr_text})")
    return (f"did not reach zero training error within {max_epochs} epochs (train accuracy "
            f"{train_acc:.4f}); raise max_epochs or the learning rate")


@dataclass(frozen=True)
class EpochCap:
    """At most ``max_epochs`` epochs."""

    max_epochs: int

    def __call__(self, epoch: int, metrics: Metrics) -> Stop | None:
        """``Stop("did_not_reach_zero_error")`` at epoch ``max_epochs``."""
        if epoch < self.max_epochs:
            return None
        return Stop("did_not_reach_zero_error", cap_message(self.max_epochs, metrics["train_acc"]))


@dataclass
class StopRules:
    """Zero error first; before zero error also collapse, then the epoch cap.

    Once zero error is reached only the overtraining count matters (the cap and the collapse
    rule no longer apply), as in the study: a run that fits S always gets its overtraining.
    """

    zero_error: ZeroError
    collapse: Collapse
    cap: EpochCap

    @classmethod
    def from_config(cls, config, *, has_attack: bool) -> StopRules:
        """Rules of a :class:`flatprior.train.TrainConfig` (``has_attack``: A is non-empty)."""
        return cls(
            ZeroError(config.overtrain_epochs,
                      needs_attack=config.zero_error_on == "train+attack" and has_attack),
            Collapse(config.collapse_patience),
            EpochCap(config.max_epochs),
        )

    @property
    def phase(self) -> str:
        """``"train"`` before zero error, ``"overtrain"`` after."""
        return "train" if self.zero_error.epoch is None else "overtrain"

    def __call__(self, epoch: int, metrics: Metrics) -> Stop | None:
        """The first rule that stops at this epoch, or ``None`` to go on."""
        before = self.zero_error.epoch is None
        stop = self.zero_error(epoch, metrics)
        if stop is not None or not before or self.zero_error.epoch is not None:
            return stop
        return self.collapse(epoch, metrics) or self.cap(epoch, metrics)
