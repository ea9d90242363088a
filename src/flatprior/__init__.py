"""flatprior: does flatness or the function prior log P(f) predict generalization?

The public API, one import away:

```python
import torch
import flatprior as fp

task = fp.make_task("digits", n_train=100, n_attack=0, n_test=200, seed=0)
model = fp.make_model("fcn", task.input_shape, seed=0)
fp.train_network(model, task, fp.TrainConfig())           # to zero training error
fp.keskar_sharpness(model, torch.nn.BCEWithLogitsLoss(), task.x_train, task.y_train[:, None])
x = torch.cat([task.x_train, task.x_test])
fp.log_prior(fp.arccos_kernel(x.flatten(1).double()), fp.predict(model, x)).log_prob  # nats
```

Names are loaded on first use (PEP 562), so ``import flatprior`` does not import PyTorch; the
subpackages (:mod:`flatprior.data`, :mod:`flatprior.models`, :mod:`flatprior.train`,
:mod:`flatprior.flatness`, :mod:`flatprior.prior`, :mod:`flatprior.experiments`,
:mod:`flatprior.analysis`) hold the rest. The trainer is exported as ``train_network``
because ``flatprior.train`` is the subpackage.
"""

from __future__ import annotations

import importlib
from typing import Any

from flatprior.errors import FlatpriorError

__version__ = "0.1.0"

#: public name -> (module, attribute in that module)
_EXPORTS: dict[str, tuple[str, str]] = {
    # data and models
    "Task": ("flatprior.data", "Task"),
    "make_task": ("flatprior.data", "make_task"),
    "task_from_arrays": ("flatprior.data", "task_from_arrays"),
    "make_model": ("flatprior.models", "make_model"),
    "alpha_scale": ("flatprior.models", "alpha_scale"),
    # training
    "TrainConfig": ("flatprior.train", "TrainConfig"),
    "TrainResult": ("flatprior.train", "TrainResult"),
    "train_network": ("flatprior.train", "train"),
    "predict": ("flatprior.train", "predict"),
    "evaluate": ("flatprior.train", "evaluate"),
    # flatness
    "keskar_sharpness": ("flatprior.flatness", "keskar_sharpness"),
    "hessian_operator": ("flatprior.flatness", "hessian_operator"),
    "top_eigenvalues": ("flatprior.flatness", "top_eigenvalues"),
    "spectral_norm": ("flatprior.flatness", "spectral_norm"),
    "log_product_topk": ("flatprior.flatness", "log_product_topk"),
    "trace": ("flatprior.flatness", "trace"),
    "hessian_spectral_norm": ("flatprior.flatness", "hessian_spectral_norm"),
    "hessian_log_product_topk": ("flatprior.flatness", "hessian_log_product_topk"),
    "hessian_trace": ("flatprior.flatness", "hessian_trace"),
    "relative_flatness": ("flatprior.flatness", "relative_flatness"),
    "fam_regularizer": ("flatprior.flatness", "fam_regularizer"),
    "flatness_measures": ("flatprior.flatness", "flatness_measures"),
    # function prior
    "arccos_kernel": ("flatprior.prior", "arccos_kernel"),
    "empirical_kernel": ("flatprior.prior", "empirical_kernel"),
    "log_prior": ("flatprior.prior", "log_prior"),
    "log_prior_ep": ("flatprior.prior", "log_prior_ep"),
    "log_prior_tilting": ("flatprior.prior", "log_prior_tilting"),
    "exact_log_orthant_prob": ("flatprior.prior", "exact_log_orthant_prob"),
    "mc_log_orthant_prob": ("flatprior.prior", "mc_log_orthant_prob"),
    "pac_bayes_bound": ("flatprior.prior", "pac_bayes_bound"),
    "sample_boolean_prior": ("flatprior.prior", "sample_boolean_prior"),
    "LogPriorResult": ("flatprior.prior", "LogPriorResult"),
    # runs, experiments, analysis
    "RunConfig": ("flatprior.config", "RunConfig"),
    "make_config": ("flatprior.config", "make_config"),
    "Measure": ("flatprior.measures", "Measure"),
    "MEASURE_REGISTRY": ("flatprior.measures", "REGISTRY"),
    "run": ("flatprior.pipeline", "run"),
    "resolve": ("flatprior.experiments", "resolve"),
    "Store": ("flatprior.experiments", "Store"),
    "correlation": ("flatprior.analysis", "correlation"),
    "correlation_table": ("flatprior.analysis", "correlation_table"),
    "write_report": ("flatprior.analysis", "write_report"),
}

__all__ = ["FlatpriorError", "__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562) and cache it in the module."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flatprior' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Module attributes plus the lazily loaded public names."""
    return sorted(set(globals()) | set(__all__))
