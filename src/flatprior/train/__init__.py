"""Training to zero error: optimizer registry (incl. Entropy-SGD), the trainer, and ensembles."""

from flatprior.train.ensemble import EnsembleOutcome, train_ensemble
from flatprior.train.entropy_sgd import EntropySGD
from flatprior.train.optimizers import OPTIMIZERS, make_optimizer
from flatprior.train.stopping import Collapse, EpochCap, Stop, StopRules, ZeroError
from flatprior.train.trainer import TrainConfig, TrainResult, evaluate, predict, train

__all__ = [
    "OPTIMIZERS",
    "Collapse",
    "EnsembleOutcome",
    "EntropySGD",
    "EpochCap",
    "Stop",
    "StopRules",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "make_optimizer",
    "predict",
    "train",
    "ZeroError",
    "train_ensemble",
]
