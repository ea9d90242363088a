"""Experiments: validated specs (one per paper figure), a resumable runner, a SQLite store."""

from flatprior.experiments.specs import (
    ExperimentSpec,
    Resolved,
    list_specs,
    load_spec,
    parse_sets,
    resolve,
)
from flatprior.experiments.store import Store, flatten_record

__all__ = [
    "ExperimentSpec",
    "Resolved",
    "Store",
    "flatten_record",
    "list_specs",
    "load_spec",
    "parse_sets",
    "resolve",
]
