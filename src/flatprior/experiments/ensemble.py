"""Run compatible runs of a sweep as one ensemble: train together, measure together.

One record each, with the same fields as :func:`flatprior.pipeline.run`.

Runs are compatible when their configs differ only in :data:`MEMBER_FIELDS` (seed, data seed,
sizes of S/A/E, Boolean target): one architecture, dataset and optimizer configuration. A run
takes the per-run path instead (``why_not_ensemble`` says why) for a non-FCN model, per-epoch
measures, alpha-scaling, Entropy-SGD/FAM/augmentation, L-BFGS-B as *the* sharpness method
(``sharpness_method="lbfgsb"``; the separate ``sharpness_lbfgsb`` measure is batched), or
measures without a batched version (``logprod_topk``, ``trace``, ``relative_flatness``).

Values per member equal the per-run path's (training: float32 rounding; measures: the batched
versions in :mod:`flatprior.flatness.batched`, tested to 1e-6 relative; log P(f): the same
estimator, once per distinct function, batched over the functions for EP). Wall times:
``train_time_s``, ``<measure>_time_s`` and ``wall_time_s`` are the ensemble's times divided by
its members (so they add up to the real total); ``history[*].epoch_time_s`` likewise.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import traceback
from collections import defaultdict
from typing import Any

from flatprior.errors import FlatpriorError

#: config fields that may differ between members of one ensemble
MEMBER_FIELDS = ("seed", "data_seed", "n_train", "n_attack", "n_test", "boolean_target")
#: measures with a batched (or per-distinct-function) implementation
ENSEMBLE_MEASURES = ("sharpness", "sharpness_lbfgsb", "spectral_norm", "log_prior", "pac_bayes")
#: default members per ensemble task (progress and resume granularity; larger M is a little
#: faster per member: Boolean batch 1, training only, loaded machine: M = 200: ~29 ms per
#: member, M = 1000: ~24 ms)
DEFAULT_ENSEMBLE_SIZE = 250
#: bytes an ensemble may use for its stacked networks and measures (``--memory-budget``)
DEFAULT_MEMORY_BUDGET = 2 * 1024**3
#: size suffixes of :func:`parse_memory_budget` (decimal kB/MB/GB/TB as in Dask, binary *iB)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
#: entries (a few floats each) of the worker's log P(f) cache across ensembles
LOG_PRIOR_CACHE_SIZE = 200_000


class _PriorCache:
    """Arc-cosine kernels and EP log P(f) values a worker process already computed.

    The runs of a Boolean sweep share one input set and one kernel, and thousands of them find
    the same few functions; every ensemble task of a worker would otherwise recompute the
    kernel and EP for the same label vectors. Both are deterministic functions of their key
    (EP batched or not gives the same bits), so a cached value is the value recomputing would
    give. Only the arc-cosine kernel (a function of X and the variances) and ``"ep"`` are
    cached; the record fields of a function are kept, not its EP sites (LRU, bounded).
    """

    def __init__(self, size: int):
        from collections import OrderedDict

        self.size = size
        self.kernels: dict[tuple, Any] = {}
        self.values: OrderedDict[tuple, dict[str, Any]] = OrderedDict()

    def kernel(self, key: tuple | None, compute):
        if key is None:
            return compute()
        if key not in self.kernels:
            if len(self.kernels) >= 8:  # a sweep has a handful of input sets per worker
                self.kernels.clear()
            self.kernels[key] = compute()
        return self.kernels[key]

    def get(self, key: tuple) -> dict[str, Any] | None:
        v = self.values.get(key)
        if v is not None:
            self.values.move_to_end(key)
        return v

    def put(self, key: tuple, fields: dict[str, Any]) -> None:
        self.values[key] = fields
        while len(self.values) > self.size:
            self.values.popitem(last=False)


_PRIOR_CACHE = _PriorCache(LOG_PRIOR_CACHE_SIZE)


def parse_memory_budget(text: str | int) -> int:
    """``"512MB"``, ``"2GB"``, ``"1.5GiB"``, ``"4096"`` (bytes) -> bytes (int > 0).

    Units as in Dask: ``kB/MB/GB/TB`` are powers of 1000, ``KiB/MiB/GiB/TiB`` of 1024;
    case-insensitive, a space before the unit allowed.

    Raises:
        FlatpriorError: not a positive size with a known unit (one line).
    """
    import re

    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text),
                         flags=re.IGNORECASE)
        if m is None or m.group(2).lower() not in _UNITS:
            raise FlatpriorError(
                f"--memory-budget {text!r}: give a size like 512MB, 2GB or 1.5GiB"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value * _UNITS[unit]):  # e.g. "1e400GB": float overflow
        raise FlatpriorError(f"--memory-budget {text!r}: too large; give a size like 2GB")
    size = int(value * _UNITS[unit])
    if size < 1:
        raise FlatpriorError(f"--memory-budget {text!r}: must be at least 1 byte (e.g. 2GB)")
    return size


def check_memory_budget(cfgs: list, memory_budget: int) -> None:
    """Fail fast when one member of an ensemble would not fit ``memory_budget`` bytes.

    For each group of compatible runs (:func:`group_key`), the member with the most data is
    sized by :func:`flatprior.train.ensemble.stacked_memory_per_member` (what
    :func:`flatprior.train.train_ensemble` checks inside each work item, where the error would
    fail every member instead of stopping the sweep).

    Raises:
        FlatpriorError: the budget is below one member's need (the trainer's one-line error).
    """
    from flatprior.pipeline import build_model, build_task
    from flatprior.train.ensemble import budget_error, stacked_memory_per_member

    largest: dict[str, Any] = {}
    for cfg in cfgs:
        g = group_key(cfg)
        size = cfg.n_train + cfg.n_attack + cfg.n_test
        if g is not None and (g not in largest or size > largest[g][0]):
            largest[g] = (size, cfg)
    for _, cfg in largest.values():
        task = build_task(cfg)
        per = stacked_memory_per_member(build_model(cfg, task.input_shape), task,
                                        cfg.train_config())
        if per > memory_budget:
            raise budget_error(per, memory_budget)


def why_not_ensemble(cfg) -> str | None:
    """Why a run cannot be an ensemble member, or ``None`` if it can.

    ``None`` if the run (a :class:`flatprior.pipeline.RunConfig`) can be an ensemble member,
    else the reason it takes the per-run path.
    """
    from flatprior.train.ensemble import STACKABLE

    if cfg.model != "fcn":
        return f"model {cfg.model!r} (ensembles train FCNs)"
    if cfg.optimizer not in STACKABLE:
        return f"optimizer {cfg.optimizer!r} is not element-wise"
    if cfg.fam_strength > 0 or cfg.augment:
        return "FAM regulariser or augmentation"
    if cfg.measure_every:
        return "per-epoch measures"
    if cfg.alpha_epoch is not None:
        return "alpha-scaling"
    bad = [m for m in cfg.measures if m not in ENSEMBLE_MEASURES]
    if bad:
        return f"measure(s) {bad} have no batched version"
    if "sharpness" in cfg.measures and cfg.sharpness_method != "sgd":
        return "L-BFGS-B sharpness"
    return None


def group_key(cfg) -> str | None:
    """Runs with equal keys can share an ensemble; ``None``: per-run path."""
    if why_not_ensemble(cfg) is not None:
        return None
    d = cfg.model_dump(mode="json", exclude=set(MEMBER_FIELDS))
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def plan(todo: list[tuple[str, Any]], parallel: int, max_size: int = DEFAULT_ENSEMBLE_SIZE,
         ) -> list[list[tuple[str, Any]]]:
    """Cut ``todo`` (``(key, RunConfig)`` pairs) into work items.

    Work items are ensembles of compatible runs (at most ``max_size`` members, and split so
    ``parallel`` workers all get one), and single runs. Order within a group follows ``todo``.
    """
    groups: dict[str, list] = defaultdict(list)
    items: list[list] = []
    for key, cfg in todo:
        g = group_key(cfg)
        if g is None:
            items.append([(key, cfg)])
        else:
            groups[g].append((key, cfg))
    for members in groups.values():
        if len(members) == 1:
            items.append(members)
            continue
        n_parts = max(-(-len(members) // max_size), min(parallel, len(members) // 2 or 1))
        size = -(-len(members) // n_parts)
        items += [members[i : i + size] for i in range(0, len(members), size)]
    return items


def _failed(exc: BaseException, wall: float) -> dict[str, Any]:
    from flatprior.experiments.store import FAILED

    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"status": FAILED, "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(tb[-6:]), "wall_time_s": wall}


def execute_ensemble(cfgs: list[dict[str, Any]], single_thread: bool = False,
                     memory_budget: int = DEFAULT_MEMORY_BUDGET) -> list[dict[str, Any]]:
    """:func:`run_ensemble` in a worker; never raises: an exception fails every member."""
    from flatprior.experiments.runner import _single_thread

    if single_thread:
        _single_thread()
    t0 = time.perf_counter()
    try:
        recs = run_ensemble(cfgs, memory_budget=memory_budget)
    except Exception as exc:  # recorded, not fatal to the sweep
        return [_failed(exc, (time.perf_counter() - t0) / len(cfgs)) for _ in cfgs]
    for r in recs:
        r.setdefault("status", "done")
    return recs


def _task_signature(cfg) -> tuple:
    return (cfg.dataset, cfg.data_root, cfg.n_train, cfg.n_attack, cfg.n_test,
            cfg.seed if cfg.data_seed is None else cfg.data_seed, cfg.boolean_target)


def run_ensemble(cfgs: list[dict[str, Any]], *, memory_budget: int = DEFAULT_MEMORY_BUDGET
                 ) -> list[dict[str, Any]]:
    """Execute compatible runs together; one record per config, in order.

    Failed members get a ``failed`` record with the error the per-run path would raise.
    """
    from flatprior.pipeline import build_model, make_config, train_record
    from flatprior.train import train_ensemble

    t_start = time.perf_counter()
    runs = [make_config(**c) if isinstance(c, dict) else c for c in cfgs]
    keys = {group_key(c) for c in runs}
    if None in keys or len(keys) != 1:
        raise FlatpriorError(
            "these runs cannot share an ensemble (different architecture/dataset/optimizer "
            "settings or unsupported options); run them with --ensemble off"
        )
    cfg0 = runs[0]
    tasks = _build_tasks(runs)
    models = [build_model(c, t.input_shape) for c, t in zip(runs, tasks, strict=True)]
    outs = train_ensemble(models, tasks, cfg0.train_config(), [c.seed for c in runs],
                          memory_budget=memory_budget)
    t_train = time.perf_counter() - t_start
    ok = [i for i, o in enumerate(outs) if o.error is None]
    records: list[dict[str, Any] | None] = [None] * len(runs)
    for i in ok:
        models[i].eval()
        records[i] = train_record(runs[i], tasks[i], models[i], outs[i].result)
        records[i].update(train_time_s=t_train / len(runs), executed_as="ensemble",
                          ensemble_size=len(runs))
    which = cfg0.measures
    if ok and "sharpness" in which:
        _measure_sharpness(ok, runs, tasks, models, records, memory_budget)
    if ok and "spectral_norm" in which:
        _measure_spectral_norm(ok, runs, tasks, models, records, memory_budget)
    if ok and ("log_prior" in which or "pac_bayes" in which):
        _measure_prior(ok, cfg0, tasks, models, records)
    if ok and "sharpness_lbfgsb" in which:
        _measure_sharpness_lbfgsb(ok, runs, tasks, models, records, memory_budget)
    return _final_records(outs, records, (time.perf_counter() - t_start) / len(runs))


def _build_tasks(runs: list) -> list:
    """Build each run's task, once per distinct task signature.

    Args:
        runs: the members' run configs.

    Returns:
        One task per run (shared objects for equal signatures).
    """
    from flatprior.pipeline import build_task

    task_cache: dict[tuple, Any] = {}
    tasks = []
    for c in runs:
        sig = _task_signature(c)
        if sig not in task_cache:
            task_cache[sig] = build_task(c)
        tasks.append(task_cache[sig])
    return tasks


def _measure_sharpness(ok: list[int], runs: list, tasks: list, models: list, records: list,
                       memory_budget: int) -> None:
    """Add the batched Keskar sharpness of the members ``ok`` to their records.

    The time is the batched measure's wall time divided by the members.
    """
    from flatprior.flatness.batched import batched_keskar_sharpness

    cfg0 = runs[0]
    t0 = time.perf_counter()
    res = _chunked(ok, models, memory_budget, lambda idx: batched_keskar_sharpness(
        [models[i] for i in idx], [tasks[i].x_train for i in idx],
        [tasks[i].y_train for i in idx], cfg0.sharpness_eps, epochs=cfg0.sharpness_epochs,
        seeds=[runs[i].seed for i in idx]))
    dt = (time.perf_counter() - t0) / len(ok)
    for i, (value, steps) in zip(ok, res, strict=True):
        records[i].update(sharpness=value, sharpness_method="sgd",
                          sharpness_eps=float(cfg0.sharpness_eps), sharpness_steps=steps,
                          sharpness_time_s=dt)


def _measure_spectral_norm(ok: list[int], runs: list, tasks: list, models: list, records: list,
                           memory_budget: int) -> None:
    """Add the batched Hessian spectral norm of the members ``ok`` to their records.

    The time is the batched measure's wall time divided by the members.
    """
    from flatprior.flatness.batched import batched_hessian_spectral_norm

    t0 = time.perf_counter()
    res = _chunked(ok, models, memory_budget, lambda idx: batched_hessian_spectral_norm(
        [models[i] for i in idx], [tasks[i].x_train for i in idx],
        [tasks[i].y_train for i in idx], seeds=[runs[i].seed for i in idx]).tolist(),
        lanczos=True)
    dt = (time.perf_counter() - t0) / len(ok)
    for i, v in zip(ok, res, strict=True):
        records[i].update(spectral_norm=v, spectral_norm_time_s=dt)


def _measure_sharpness_lbfgsb(ok: list[int], runs: list, tasks: list, models: list,
                              records: list, memory_budget: int) -> None:
    """Add the L-BFGS-B Keskar sharpness of the members ``ok`` (lockstep, batched f and g).

    As :func:`flatprior.pipeline.sharpness_lbfgsb` (maxiter 10, float64, on S); the time is the
    batched measure's wall time divided by the members.
    """
    from flatprior.flatness.batched import batched_lbfgsb_sharpness

    cfg0 = runs[0]
    t0 = time.perf_counter()
    res = _chunked(ok, models, memory_budget, lambda idx: batched_lbfgsb_sharpness(
        [models[i] for i in idx], [tasks[i].x_train for i in idx],
        [tasks[i].y_train for i in idx], cfg0.sharpness_eps), lbfgsb=True)
    dt = (time.perf_counter() - t0) / len(ok)
    for i, (value, _steps) in zip(ok, res, strict=True):
        records[i].update(sharpness_lbfgsb=value, sharpness_lbfgsb_time_s=dt)


def _measure_prior(ok: list[int], cfg0, tasks: list, models: list, records: list) -> None:
    """Add log P(f) and/or the PAC-Bayes bound of the members ``ok`` to their records.

    One kernel per distinct X = S ∪ E, one estimate per distinct function on it (for one seed S
    and E do not depend on n_attack: fig3's 55 runs have 5 kernels).
    """
    import torch

    from flatprior.pipeline import kernel_of

    which = cfg0.measures
    by_x: dict[bytes, list[int]] = defaultdict(list)
    xs = {}
    for i in ok:
        x = torch.cat([tasks[i].x_train, tasks[i].x_test])
        h = hashlib.sha256(x.numpy().tobytes()).digest() + bytes(str(tuple(x.shape)), "ascii")
        by_x[h].append(i)
        xs[h] = x
    for h, idx in by_x.items():
        task = tasks[idx[0]]
        t0 = time.perf_counter()
        x = xs[h]
        kkey = ((h, len(cfg0.hidden), cfg0.sigma_w2, cfg0.sigma_b2)
                if cfg0.kernel == "arccos" else None)
        K = _PRIOR_CACHE.kernel(kkey, lambda x=x: kernel_of(x, cfg0))
        dt_k = (time.perf_counter() - t0) / len(idx)
        for i in idx:
            records[i]["kernel_time_s"] = dt_k
        if "log_prior" in which:
            _log_prior_on(K, kkey, x, idx, cfg0, models, records)
        if "pac_bayes" in which:
            _pac_bayes_on(K, len(task.y_train), idx, cfg0, tasks, records)


def _log_prior_on(K, kkey: tuple | None, x, idx: list[int], cfg0, models: list,
                  records: list) -> None:
    """Add log P(f) of the members ``idx`` (one shared input set ``x``, kernel ``K``).

    One estimate per distinct function the members compute on ``x`` that this worker has not
    estimated before on the same kernel (``kkey``; see :class:`_PriorCache`).
    """
    import torch

    from flatprior.pipeline import log_prior_fields
    from flatprior.prior.api import log_prior_distinct
    from flatprior.train import predict

    t0 = time.perf_counter()
    labels = torch.stack([predict(models[i], x) for i in idx])
    cacheable = kkey is not None and cfg0.prior_method == "ep"
    rows = [(kkey, cfg0.prior_method, bytes(lab.to(torch.int8).numpy())) for lab in labels]
    fields = [_PRIOR_CACHE.get(r) if cacheable else None for r in rows]
    todo = [j for j, f in enumerate(fields) if f is None]
    if todo:
        results, _ = log_prior_distinct(K, labels[todo], method=cfg0.prior_method)
        for j, r in zip(todo, results, strict=True):
            fields[j] = log_prior_fields(r)
            if cacheable:
                _PRIOR_CACHE.put(rows[j], fields[j])
    dt = (time.perf_counter() - t0) / len(idx)
    for i, f in zip(idx, fields, strict=True):
        records[i].update(f)
        records[i]["log_prior_time_s"] = dt


def _pac_bayes_on(K, m: int, idx: list[int], cfg0, tasks: list, records: list) -> None:
    """Add log P(train labels) and the PAC-Bayes bound of the members ``idx``.

    One estimate per distinct true labelling of S (Boolean targets may differ), on the
    kernel's first ``m`` rows and columns (S).
    """
    import torch

    from flatprior.prior import pac_bayes_bound
    from flatprior.prior.api import log_prior_distinct

    t0 = time.perf_counter()
    ys = torch.stack([tasks[i].y_train for i in idx])
    results, _ = log_prior_distinct(K[:m, :m], ys, method=cfg0.prior_method)
    dt = (time.perf_counter() - t0) / len(idx)
    for i, r in zip(idx, results, strict=True):
        bound = float(pac_bayes_bound(r.log_prob, m, cfg0.pac_bayes_delta))
        records[i].update(log_p_train=float(r.log_prob), pac_bayes_bound=bound,
                          pac_bayes_time_s=dt)


def _final_records(outs: list, records: list, wall: float) -> list[dict[str, Any]]:
    """Assemble the output: history and wall time on each record, ``failed`` records for errors.

    Args:
        outs: the members' training outcomes.
        records: the members' records (``None`` for failed members).
        wall: the ensemble's wall time per member.

    Returns:
        One JSON-able record per member, in order.
    """
    from flatprior.pipeline import _jsonable

    out = []
    for i, o in enumerate(outs):
        if o.error is not None:
            out.append(_failed(o.error, wall))
            continue
        rec = records[i]
        rec["history"] = o.result.history
        rec["wall_time_s"] = wall
        out.append(_jsonable(rec))
    return out


def _chunked(ok: list[int], models, budget: int, fn, lanczos: bool = False,
             lbfgsb: bool = False) -> list:
    """Apply a batched measure to the members ``ok`` in chunks that fit ``budget`` bytes.

    The size estimate: float64 parameters x a few copies, the Lanczos basis of up to 300
    vectors, or scipy's L-BFGS-B work arrays (``2 m p + 5 p`` floats, ``m = 10``) besides.
    """
    p = sum(q.numel() for q in models[ok[0]].parameters())
    per = 8 * p * (min(300, p) + 8 if lanczos else 41 if lbfgsb else 16)
    size = max(1, budget // per)
    out: list = []
    for s in range(0, len(ok), size):
        idx = ok[s : s + size]
        r = fn(idx)
        out += list(zip(r.value, r.n_steps, strict=True)) if hasattr(r, "value") else list(r)
    return out
