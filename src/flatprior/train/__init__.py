"""Training to zero error: optimizer registry (incl. Entropy-SGD), the trainer, and ensembles."""

from flatprior.train.ensemble import EnsembleOutcome, train_ensemble
from flatprior.train.entropy_sgd import EntropySGD
from flatprior.train.optimizers import OPTIMIZERS, make_optimizer
from flatprior.train.trainer import TrainConfig, TrainResult, evaluate, predict, train

__all__ = [
    "OPTIMIZERS",
    "EnsembleOutcome",
    "EntropySGD",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "make_optimizer",
    "predict",
    "train",
    "train_ensemble",
]
