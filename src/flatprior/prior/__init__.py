"""Function prior log P(f).

NNGP kernels, EP for the orthant probability, minimax tilting, exact references, the Boolean
sampler and the PAC-Bayes bound.
"""

from flatprior.prior.api import (
    LOG_PRIOR_METHODS,
    LogPriorResult,
    function_log_prior,
    log_prior,
)
from flatprior.prior.boolean import (
    BooleanPrior,
    boolean_inputs,
    function_bits,
    function_hex,
    sample_boolean_prior,
)
from flatprior.prior.bounds import pac_bayes_bound
from flatprior.prior.ep import EPResult, log_prior_ep, log_prior_probit
from flatprior.prior.ep_batched import log_prior_ep_batch
from flatprior.prior.exact import (
    MCOrthantResult,
    OrthantResult,
    exact_log_orthant_prob,
    mc_log_orthant_prob,
    orthant_prob_closed_form,
)
from flatprior.prior.kernels import arccos_kernel, empirical_kernel
from flatprior.prior.likelihoods import HeavisideLikelihood, ProbitLikelihood
from flatprior.prior.tilting import TiltingResult, log_prior_tilting

__all__ = [
    "LOG_PRIOR_METHODS",
    "BooleanPrior",
    "EPResult",
    "HeavisideLikelihood",
    "LogPriorResult",
    "MCOrthantResult",
    "OrthantResult",
    "ProbitLikelihood",
    "TiltingResult",
    "arccos_kernel",
    "boolean_inputs",
    "empirical_kernel",
    "exact_log_orthant_prob",
    "function_bits",
    "function_hex",
    "function_log_prior",
    "log_prior",
    "log_prior_ep",
    "log_prior_ep_batch",
    "log_prior_probit",
    "log_prior_tilting",
    "mc_log_orthant_prob",
    "orthant_prob_closed_form",
    "pac_bayes_bound",
    "sample_boolean_prior",
]
