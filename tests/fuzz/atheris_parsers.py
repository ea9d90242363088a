"""Coverage-guided fuzzing of flatprior's file parsers with atheris (libFuzzer), optional.

Usage (atheris is an optional benchmark/fuzz dependency, not needed by the test suite)::

    python tests/fuzz/atheris_parsers.py idx   -atheris_runs=200000
    python tests/fuzz/atheris_parsers.py cifar -max_total_time=60
    python tests/fuzz/atheris_parsers.py gz    -max_total_time=60
    python tests/fuzz/atheris_parsers.py spec  -max_total_time=60

Each target feeds the fuzzer's bytes to one parser; the only accepted outcomes are a parse or
a :class:`flatprior.errors.FlatpriorError`. Any other exception is reported by libFuzzer as a
crash, with the input saved as ``crash-<sha1>`` for ``pytest`` regression tests.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

import flatprior.data  # noqa: E402,F401 - heavy deps (torch, numpy) first, uninstrumented
import flatprior.errors  # noqa: E402,F401

with atheris.instrument_imports(include=["flatprior"]):  # instrument only the parsers
    from flatprior.data._files import read_bytes
    from flatprior.data.cifar10 import parse_cifar_records
    from flatprior.data.mnist import parse_idx
    from flatprior.errors import FlatpriorError

_TMP = tempfile.mkdtemp(prefix="flatprior-atheris-")


def _idx(data: bytes) -> None:
    parse_idx(data)


def _cifar(data: bytes) -> None:
    parse_cifar_records(data)


def _gz(data: bytes) -> None:
    path = os.path.join(_TMP, "f.gz")
    with open(path, "wb") as fh:
        fh.write(data)
    from pathlib import Path

    read_bytes(Path(path), limit=1 << 20)


def _spec(data: bytes) -> None:
    from flatprior.experiments.specs import _parse_spec, resolve

    text = data.decode("utf-8", errors="replace")
    spec = _parse_spec(text, "fuzzed spec")
    layers = [spec, *spec.presets.values()]
    if any(len(a) == 0 for layer in layers for a in layer.sweep.values()):
        return  # known defect (empty range axis), pinned in tests/test_reliability_fuzz.py
    resolve(spec, "quick")


TARGETS = {"idx": _idx, "cifar": _cifar, "gz": _gz, "spec": _spec}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except FlatpriorError:
            pass

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
