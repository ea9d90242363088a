"""Write the golden records of ``tests/test_golden_records.py``.

Regenerate (after a deliberate change of the numbers, e.g. how data splits are drawn):

    PYTHONPATH=src python tests/golden/make_golden.py

Each case is one grid point of a shipped spec's ``quick`` preset, shrunk by overrides so it runs
in about a second, executed by :func:`flatprior.pipeline.run` at one torch thread. Wall times and
library versions are left out of the stored record (they are not functions of the config).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parents[2] / "shared" / "data"

_SMALL = dict(n_train=60, n_test=60, sharpness_epochs=3, max_epochs=300)
# (case name, spec, variant, index in the grid left after the overrides, overrides)
CASES: list[tuple[str, str, str | None, int, dict]] = [
    ("fig2-boolean", "fig2-boolean", "majority", 3,
     dict(max_epochs=400, sharpness_epochs=3, topk=10, measures=["sharpness", "spectral_norm",
                                                         "logprod_topk", "trace", "log_prior"])),
    ("fig3-mnist-fcn", "fig3", "mnist-fcn", 1, dict(_SMALL, n_attack=4,
                                                  measures=["sharpness", "log_prior",
                                                            "pac_bayes"])),
    ("fig4-adam", "fig4", None, 1, dict(_SMALL, n_attack=10)),
    ("fig4-entropy-sgd", "fig4", None, 2, dict(_SMALL, n_attack=10, max_epochs=30)),
    ("fig5", "fig5", None, 1, dict(_SMALL, overtrain_epochs=12, alpha_epoch=6, measure_every=5,
                                   epoch_measures=["sharpness", "log_prior"])),
    ("figS9", "figS9", None, 0, dict(_SMALL, overtrain_epochs=8, alpha_epoch=4, measure_every=4,
                                     epoch_measures=["relative_flatness", "log_prior"])),
    ("figS11-16", "figS11-16", None, 1, dict(_SMALL, overtrain_epochs=5, n_attack=10,
                                             measures=["sharpness", "relative_flatness"])),
    ("figS18-adagrad", "figS18", None, 0, dict(_SMALL, n_attack=0, measures=["spectral_norm",
                                                                           "log_prior"],
                                              prior_method="tilting")),
    ("figS18-gd", "figS18", None, 3, dict(_SMALL, n_attack=10, max_epochs=60)),
    ("figS19", "figS19", None, 0, dict(_SMALL, n_attack=20, data_root=str(SHARED_DATA))),
]
NEEDS_MNIST = {"figS19"}


def mnist_present() -> bool:
    return (SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").exists()


def config_of(case) -> dict:
    from flatprior.experiments.specs import resolve

    _, spec, variant, index, overrides = case
    return resolve(spec, "quick", variant, overrides).configs[index].model_dump(mode="json")


DROPPED = ("versions", "data_root", "executed_as", "ensemble_size")


def strip(record: dict) -> dict:
    """The record without what is not a function of the config (times, versions, paths).

    ``executed_as`` / ``ensemble_size`` say which path ran it (the cases run the per-run path).
    """

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()
                    if not k.endswith("_time_s") and k not in DROPPED}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    return clean(record)


def run_case(case) -> dict:
    import torch

    from flatprior.pipeline import run

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return strip(run(config_of(case)))
    finally:
        torch.set_num_threads(n)


def path_of(name: str) -> Path:
    return HERE / f"{name}.json"


def main() -> None:
    for case in CASES:
        if case[0] in NEEDS_MNIST and not mnist_present():
            print(f"skip {case[0]}: MNIST not at {SHARED_DATA}", file=sys.stderr)
            continue
        rec = run_case(case)
        path_of(case[0]).write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path_of(case[0]).name}")


if __name__ == "__main__":
    main()
