"""Run every benchmark: ``python benchmarks/run.py [--quick] [name ...]``.

Each ``bench_*.py`` module here exposes ``main(argv)`` and prints its figure next to a baseline
measured in the same run (as a ratio). ``name`` selects modules (e.g. ``train prior``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, well under a minute each")
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    args = ap.parse_args()
    files = sorted(HERE.glob("bench_*.py"))
    if args.names:
        files = [f for f in files if f.stem.removeprefix("bench_") in args.names]
    failed = 0
    for f in files:
        spec = importlib.util.spec_from_file_location(f.stem, f)
        mod = importlib.util.module_from_spec(spec)
        # registered under its name, so functions it sends to worker processes pickle (by
        # reference: the worker imports it from this folder, sys.path[0])
        sys.modules[f.stem] = mod
        print(f"\n=== {f.stem} ===", flush=True)
        t0 = time.perf_counter()
        try:
            spec.loader.exec_module(mod)
            mod.main(["--quick"] if args.quick else [])
        except Exception:  # keep going: one broken benchmark must not hide the others
            traceback.print_exc()
            failed += 1
        print(f"({f.stem}: {time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
