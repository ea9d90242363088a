"""Run many configurations: local worker processes or a Dask cluster; results into a Store.

Only the calling process writes the store: workers (processes or Dask workers) return records and
the parent writes each one in its own transaction as it arrives. Keys already in the store are
skipped (``--retry-failed`` re-runs the ``failed`` ones), so a killed sweep resumes where it
stopped. A run that raises is recorded with ``status = "failed"`` and its error text; the sweep
goes on.

With ``ensemble="auto"`` (default ``"off"``) and the default run function, compatible runs (same
architecture, dataset and optimizer settings, differing in seed/sizes; see
:mod:`flatprior.experiments.ensemble`) are trained and measured together as one work item (one
process task or one Dask task) and stored together in one transaction, so a killed ensemble
leaves none of its members and resumes as a whole. Other runs take the per-run path.

The run function is injectable (``run_fn``: any picklable ``dict -> record dict`` function, by
default :func:`flatprior.pipeline.run`), which is how the tests use cheap fakes.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from flatprior import measures
from flatprior.errors import FlatpriorError
from flatprior.experiments.store import FAILED, Store

RunFn = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class SweepSummary:
    """What a call to :func:`run_sweep` did."""

    label: str
    total: int
    skipped: int
    done: int
    failed: int
    wall_time_s: float

    def line(self) -> str:
        """One line for the terminal: runs stored, run now, failed, wall time."""
        return (
            f"{self.label}: {self.total} runs, {self.skipped} already stored, {self.done} run now "
            f"({self.failed} failed) in {self.wall_time_s:.1f} s"
        )


def default_run_fn(cfg: dict[str, Any]) -> dict[str, Any]:
    """:func:`flatprior.pipeline.run` with one torch thread.

    The pipeline is imported lazily, so workers import torch only here.

    Seeded runs are bit-identical at a fixed torch thread count only (intra-op parallel
    reductions sum in another order with more threads). Every sweep run uses one thread, in a
    worker process or in this one (``--workers 1``), so a sweep's records do not depend on
    ``--workers``, the machine's cores or ``OMP_NUM_THREADS``.
    """
    import torch

    from flatprior.pipeline import run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(cfg)
    finally:
        torch.set_num_threads(before)


def import_run_fn(path: str) -> RunFn:
    """``"package.module:function"`` -> the function (for ``flatprior run --run-fn``)."""
    mod, sep, name = path.partition(":")
    if not sep:
        raise FlatpriorError(f"--run-fn {path!r}: use module:function")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as exc:
        raise FlatpriorError(f"--run-fn {path!r}: cannot import ({exc})") from None
    if not callable(fn):
        raise FlatpriorError(f"--run-fn {path!r} is not callable")
    return fn


def _single_thread() -> None:
    """One BLAS/torch thread in this worker.

    Workers share the cores, and for the study's small networks oversubscription costs more
    than intra-op parallelism gains.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"  # read by torch/numpy when they are first imported
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _watch_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Exit this worker as soon as ``parent_pid`` is gone (runs in a daemon thread)."""
    while True:
        if os.getppid() != parent_pid:  # re-parented: the sweep's process died
            os._exit(1)
        time.sleep(interval)


def _worker_init(parent_pid: int) -> None:
    """Initializer of the local worker processes.

    * one BLAS/torch thread (:func:`_single_thread`);
    * SIGINT ignored: Ctrl-C reaches the whole process group, and the parent alone stops the
      sweep (it terminates the workers; finished runs are already stored);
    * die with the parent: a parent killed with SIGKILL cannot shut the pool down, and idle
      workers would wait on their task queue forever (each holds torch, ~0.5 GB). On Linux the
      kernel sends SIGKILL when the parent exits (``prctl(PR_SET_PDEATHSIG)``); a thread that
      polls the parent id covers other systems and the race where the parent died before
      ``prctl`` ran.
    """
    import signal
    import threading

    _single_thread()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl: the watchdog thread alone
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                     name="flatprior-parent-watchdog").start()


def execute(run_fn: RunFn, cfg: dict[str, Any], single_thread: bool = False) -> dict[str, Any]:
    """Run one config in a worker; never raises: an exception becomes a ``failed`` record."""
    if single_thread:
        _single_thread()
    t0 = time.perf_counter()
    try:
        rec = dict(run_fn(cfg))
    except Exception as exc:  # recorded, not fatal to the sweep
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        return {
            "status": FAILED,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(tb[-6:]),
            "wall_time_s": time.perf_counter() - t0,
        }
    rec.setdefault("status", "done")
    return rec


def execute_item(run_fn: RunFn, cfgs: list[dict[str, Any]], single_thread: bool = False,
                 ensemble: bool = False, memory_budget: int | None = None
                 ) -> list[dict[str, Any]]:
    """Execute one work item in a worker; never raises.

    One run (``run_fn``) or, with ``ensemble``, compatible runs as one ensemble
    (:func:`flatprior.experiments.ensemble.execute_ensemble`, within ``memory_budget`` bytes;
    ``None``: its default).
    """
    if not ensemble:
        return [execute(run_fn, c, single_thread) for c in cfgs]
    from flatprior.experiments.ensemble import DEFAULT_MEMORY_BUDGET, execute_ensemble

    return execute_ensemble(cfgs, single_thread,
                            DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget)


def _finish(rec: dict[str, Any], key: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Make a worker's record storable: the config's key, the config, JSON-safe numbers."""
    rec = _json_safe(rec)
    rec["key"] = key
    rec.setdefault("config", cfg)
    if rec.get("status") == FAILED:
        rec.setdefault("error", "unknown error")
    return rec


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return _json_safe(obj.item())
        except (TypeError, ValueError):
            return str(obj)
    return obj


def preflight(configs: Sequence) -> None:
    """Fail fast (one line) on what would make every run fail.

    Missing data files, sizes larger than the data set, the arc-cosine kernel asked of a
    non-FCN model.
    """
    from flatprior.pipeline import build_task

    seen = set()
    for cfg in configs:
        # epoch_measures count only when they are measured (measure_every > 0)
        per_epoch = cfg.epoch_measures if cfg.measure_every else ()
        kernel_measures = [m for m in (*cfg.measures, *per_epoch)
                           if measures.REGISTRY[m].needs_fcn]
        if kernel_measures and cfg.kernel == "arccos" and cfg.model != "fcn":
            raise FlatpriorError(
                f"{kernel_measures[0]} with the arc-cosine kernel needs model='fcn', not "
                f"{cfg.model!r}; use --set kernel=empirical"
            )
    worst: dict[tuple, Any] = {}
    for cfg in configs:
        sig = (cfg.dataset, cfg.data_root, cfg.data_path, cfg.label_column, cfg.n_train,
               cfg.n_test, cfg.boolean_target)
        if sig not in worst or cfg.n_attack > worst[sig].n_attack:
            worst[sig] = cfg
    for sig, cfg in worst.items():
        if sig in seen:
            continue
        seen.add(sig)
        build_task(cfg)  # raises FlatpriorError with the data loader's message


def _progress(console, label: str, total: int, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        SpinnerColumn(),
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )
    tid = prog.add_task(label, total=total, failed="")
    return prog, tid


def run_sweep(
    configs: Iterable,
    store: Store,
    label: str,
    *,
    info: dict[str, Any] | None = None,
    run_fn: RunFn | None = None,
    workers: int | None = None,
    scheduler: str | Any | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    console=None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    connect_timeout: float = 20.0,
    ensemble: str = "off",
    memory_budget: int | None = None,
) -> SweepSummary:
    """Run every configuration not yet in ``store`` and store each record as it arrives.

    Args:
        configs: :class:`flatprior.pipeline.RunConfig` objects (e.g. ``resolve(...).configs``).
        store: the results database (written only by this process).
        label: the spec label the runs are listed under (``fig3/mnist-fcn@quick``).
        info: the spec description stored with the label (for reports).
        run_fn: picklable ``dict -> record`` function; default :func:`flatprior.pipeline.run`.
        workers: local worker processes (default: all cores); 1 runs in this process.
        scheduler: a Dask scheduler address (``tcp://host:8786``) or a ``dask.distributed.Client``;
            then ``workers`` is ignored.
        retry_failed: re-run keys stored with status ``failed``.
        progress: show a rich progress bar with ETA (on stderr).
        on_record: called with each stored record (in this process).
        connect_timeout: seconds to wait for the Dask scheduler.
        console: rich console for the progress bar and messages (default: stderr).
        ensemble: ``"auto"``: group compatible runs into ensembles (default run function only);
            ``"off"``: one run per task.
        memory_budget: bytes one ensemble may use (its members are trained and measured in
            chunks that fit; default
            :data:`flatprior.experiments.ensemble.DEFAULT_MEMORY_BUDGET`, 2 GiB). Checked
            before any run starts: a budget below one member raises.

    Returns:
        A :class:`SweepSummary`.
    """
    t0 = time.perf_counter()
    if ensemble not in ("auto", "off"):
        raise FlatpriorError(f"--ensemble must be auto or off, got {ensemble!r}")
    use_ensembles = ensemble == "auto" and run_fn is None
    if memory_budget is not None and (isinstance(memory_budget, bool)
                                      or not isinstance(memory_budget, int) or memory_budget < 1):
        raise FlatpriorError(f"memory_budget must be a number of bytes >= 1, got {memory_budget!r}")
    run_fn = run_fn or default_run_fn
    configs = list(configs)
    todo, skipped, by_key = _pending(configs, store.statuses(), retry_failed)
    store.set_spec(label, info or {"label": label})
    store.add_members(label, skipped)
    summary = SweepSummary(label, len(configs), len(skipped), 0, 0, 0.0)
    if not todo:
        summary.wall_time_s = time.perf_counter() - t0
        return summary
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    prog, tid = _progress(console, label, len(todo), progress)

    def take(item: list[tuple[str, dict[str, Any]]], recs: list[dict[str, Any]]) -> None:
        recs = [_finish(rec, key, cfg) for (key, cfg), rec in zip(item, recs, strict=True)]
        store.put_many(recs, label)  # one transaction: an ensemble is stored whole or not
        for rec in recs:
            summary.done += 1
            if rec["status"] == FAILED:
                summary.failed += 1
                prog.update(tid, failed=f"[red]{summary.failed} failed")
            prog.advance(tid)
            if on_record is not None:
                on_record(rec)

    n = workers if workers is not None else (os.cpu_count() or 1)
    if scheduler is None and n < 1:
        raise FlatpriorError(f"--workers must be >= 1, got {n}")
    items = _work_items(todo, by_key, n, use_ensembles)
    if use_ensembles:
        _note_per_run_path(console, [by_key[k] for item, ens in items if not ens for k, _ in item])
    if skipped:
        _warn_mixed_paths(console, store, label, any(ens for _, ens in items))
    if memory_budget is not None and any(ens for _, ens in items):
        from flatprior.experiments.ensemble import check_memory_budget

        check_memory_budget([by_key[k] for item, ens in items if ens for k, _ in item],
                            memory_budget)
    with prog:
        if scheduler is not None:
            _run_dask(items, run_fn, scheduler, take, connect_timeout, memory_budget)
        else:
            n = min(n, len(items))
            if n == 1:
                for item, ens in items:
                    take(item, execute_item(run_fn, [c for _, c in item], False, ens,
                                            memory_budget))
            else:
                _run_pool(items, run_fn, n, take, memory_budget)
    summary.wall_time_s = time.perf_counter() - t0
    return summary


def _note_per_run_path(console, cfgs: list) -> None:
    """One line per reason why runs of an ``--ensemble auto`` sweep take the per-run path.

    E.g. ``note: 4 runs take the per-run path: optimizer 'sam' is not element-wise``, so a
    user who asked for ensembles learns which runs are not and why (a group of one compatible
    run is not noted: it is an ensemble of one, run the cheaper way).
    """
    from collections import Counter

    from rich.markup import escape

    from flatprior.experiments.ensemble import why_not_ensemble

    reasons = Counter(why for cfg in cfgs if (why := why_not_ensemble(cfg)) is not None)
    for why, count in reasons.items():
        runs = "1 run takes" if count == 1 else f"{count} runs take"
        console.print(f"[yellow]note:[/] {runs} the per-run path: {escape(why)}", soft_wrap=True)


def _warn_mixed_paths(console, store, label: str, ensembles_now: bool) -> None:
    """One line when this resumed sweep runs on another path than its stored runs did.

    The paths agree to float32 rounding, which long training can amplify; a store that mixes
    them is legal (the report says so) but rarely wanted.
    """
    counts = store.execution_counts(label)
    other = "single" if ensembles_now else "ensemble"
    if counts.get(other):
        now, flag = (("as ensembles", "off") if ensembles_now else ("one per run", "auto"))
        before = "one per run" if other == "single" else "as ensembles"
        console.print(f"[yellow]note:[/] {counts[other]} stored runs of {label} ran {before}; "
                      f"the remaining runs run {now} (--ensemble {flag} keeps one path)",
                      soft_wrap=True)


def _pending(configs: list, stored: dict[str, str], retry_failed: bool
             ) -> tuple[list[tuple[str, dict[str, Any]]], list[str], dict[str, Any]]:
    """Split the configs into those to run and those already stored.

    Args:
        configs: the sweep's run configs.
        stored: the store's status per key.
        retry_failed: also run keys stored with status ``failed``.

    Returns:
        The ``(key, dumped config)`` pairs to run, the skipped keys, and the config per key to run.
    """
    todo, skipped, by_key = [], [], {}
    for cfg in configs:
        key = cfg.key()
        st = stored.get(key)
        if st is None or (retry_failed and st == FAILED):
            todo.append((key, cfg.model_dump(mode="json")))
            by_key[key] = cfg
        else:
            skipped.append(key)
    return todo, skipped, by_key


def _work_items(todo: list[tuple[str, dict[str, Any]]], by_key: dict[str, Any], n: int,
                use_ensembles: bool) -> list[tuple[list[tuple[str, dict[str, Any]]], bool]]:
    """Group the runs into work items: ensembles of compatible runs, or one run each.

    Args:
        todo: the ``(key, dumped config)`` pairs to run.
        by_key: the config object per key.
        n: the number of workers (the ensemble planner spreads the groups over them).
        use_ensembles: group compatible runs (else one run per item).

    Returns:
        ``(runs, is_ensemble)`` per work item.
    """
    if not use_ensembles:
        return [([t], False) for t in todo]
    from flatprior.experiments.ensemble import plan

    groups = plan([(k, by_key[k]) for k, _ in todo], n)
    dumped = dict(todo)
    return [([(k, dumped[k]) for k, _ in g], len(g) > 1) for g in groups]


def _run_pool(items, run_fn: RunFn, n: int, take, memory_budget: int | None = None) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: the parent may hold torch/BLAS thread pools that do not survive a fork
    pool = ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    try:
        futs = {pool.submit(execute_item, run_fn, [c for _, c in item], True, ens,
                            memory_budget): item
                for item, ens in items}
        for fut in as_completed(futs):
            item = futs[fut]
            try:
                recs = fut.result()
            except BrokenProcessPool:
                raise FlatpriorError(
                    "a worker process died (out of memory or killed); finished runs are saved, "
                    "re-run the same command to resume (try fewer --workers)"
                ) from None
            take(item, recs)
    except BaseException:  # Ctrl-C, a store that cannot be written, ...
        # running tasks would otherwise finish first (and the interpreter waits for them at
        # exit): stop the workers now; the finished runs are stored already
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            proc.terminate()
        raise
    pool.shutdown(wait=True)


@contextlib.contextmanager
def dask_client(scheduler, timeout: float = 20.0):
    """A ``dask.distributed.Client`` for ``scheduler`` (an address or a Client).

    A client opened here from an address is closed on leaving the block; a Client passed in
    is left open. One-line errors when dask is missing or the scheduler cannot be reached.
    """
    try:
        from dask.distributed import Client
    except ImportError:  # pragma: no cover - dask is a dependency
        raise FlatpriorError(
            "--scheduler needs dask[distributed]; pip install 'dask[distributed]'"
        ) from None
    if isinstance(scheduler, Client):
        yield scheduler
        return
    try:
        client = Client(scheduler, timeout=f"{timeout}s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise FlatpriorError(
            f"cannot reach the Dask scheduler at {scheduler!r} ({exc}); check the address "
            "(tcp://host:8786) and that `dask scheduler` is running"
        ) from None
    try:
        yield client
    finally:
        client.close()


def _run_dask(items, run_fn: RunFn, scheduler, take, timeout: float,
              memory_budget: int | None = None) -> None:
    with dask_client(scheduler, timeout) as client:
        from dask.distributed import as_completed  # importable: dask_client checked

        futs = {}
        for item, ens in items:  # one Dask task per run or per ensemble
            dkey = f"flatprior-{item[0][0]}-{uuid.uuid4().hex[:8]}"
            f = client.submit(execute_item, run_fn, [c for _, c in item], True, ens,
                              memory_budget, pure=False, key=dkey)
            futs[f] = item
        for fut in as_completed(list(futs)):
            item = futs[fut]
            try:
                recs = fut.result()
            except Exception as exc:  # e.g. KilledWorker: the run's worker died repeatedly
                recs = [{"status": FAILED, "error": f"{type(exc).__name__}: {exc}"}] * len(item)
            take(item, [dict(r) for r in recs])
            fut.release()
