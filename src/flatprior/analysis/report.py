"""A self-contained HTML report of a results database.

Figures (base64 PNG), correlation tables, the configuration of every run, and the library
versions. No external files or scripts.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from flatprior.analysis.claims import evaluate_claims
from flatprior.analysis.correlations import (
    boolean_table,
    correlation_table,
    epochs_summary,
    granulated_table,
    measure_columns,
    prior_agreement,
    psgd_summary,
    psgd_table,
    swept_axes,
    wide_table,
)
from flatprior.analysis.plots import (
    attack_figure,
    boolean_figure,
    epochs_figure,
    psgd_figure,
    psi_figure,
    to_png,
)
from flatprior.errors import FlatpriorError

#: per-run columns shown in the run tables (when present), after the varying config fields
RESULT_COLUMNS = (
    "status",
    "epochs_to_zero_error",
    "train_error",
    "attack_error",
    "test_error",
    "log_prior",
    "sharpness",
    "spectral_norm",
    "relative_flatness",
    "pac_bayes_bound",
    "wall_time_s",
    "error",
)
MAX_RUN_ROWS = 3000
MAX_EPOCH_FIGURES = 6


@dataclass
class SpecSection:
    """Analysis of the runs of one spec label."""

    label: str
    info: dict[str, Any]
    frame: pd.DataFrame
    correlations: pd.DataFrame = field(default_factory=pd.DataFrame)
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, png)
    # granulated Kendall (>= 2 swept axes): one row per measure, and the pooled correlations
    granulated: pd.DataFrame = field(default_factory=pd.DataFrame)
    pooled: pd.DataFrame = field(default_factory=pd.DataFrame)
    extra_tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    #: sentences shown under the section title (e.g. what an analysis still needs)
    notes: list[str] = field(default_factory=list)
    #: keys of this spec's stored records that could not be read (invalid JSON; skipped)
    unreadable: list[str] = field(default_factory=list)


def execution_note(df: pd.DataFrame) -> str:
    """One sentence: how many finished runs in ``df`` ran as ensemble members, how many alone.

    From the records' ``executed_as`` (finished records written before it existed count as
    not recorded; failed runs are left out). The two paths agree to float32 rounding, which
    long training can amplify (README, "Many small networks at once"), so a store that mixes
    them says so.
    """
    from flatprior.experiments.store import FAILED

    if "status" in df.columns:
        df = df[df["status"] != FAILED]
    col = (df["executed_as"] if "executed_as" in df.columns
           else pd.Series(index=df.index, dtype=object))
    counts = col.fillna("unknown").value_counts()
    n_ens, n_one, n_unk = (int(counts.get(k, 0)) for k in ("ensemble", "single", "unknown"))
    parts = [f"{n_ens} as ensemble members (--ensemble auto)" if n_ens else "",
             f"{n_one} one per run" if n_one else "",
             f"{n_unk} not recorded (stored before December 2026)" if n_unk else ""]
    text = "Finished runs executed: " + (", ".join(p for p in parts if p) or "none") + "."
    if n_ens and n_one:
        text += (" Both paths in one store: they agree to float32 rounding, which long training "
                 "can amplify (a run may stop at another epoch).")
    return text


@dataclass
class PriorOptions:
    """Where the sampled Boolean prior comes from and how much else to estimate (report).

    Attributes:
        samples: random networks to draw (0: none; ``None``: none if ``files`` are given,
            else the spec preset's ``prior_samples``, if any).
        files: saved :class:`flatprior.prior.BooleanPrior` chunk files to add.
        tilting: log P(f) by tilting (with its CI) for this many of the most frequent
            functions (fig2-boolean; ~0.17 s each on one core at n = 128).
        scheduler: Dask scheduler address: sampled chunks and tilting estimates as tasks.
        seed: master seed of the drawn chunks and the tilting estimates.
    """

    samples: int | None = None
    files: tuple = ()
    tilting: int = 0
    scheduler: Any = None
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    def samples_for(self, info: dict[str, Any]) -> int:
        """Networks to draw for a spec (``info``: its stored description)."""
        if self.samples is not None:
            return int(self.samples)
        return 0 if self.files else int(info.get("prior_samples") or 0)

    def wanted(self, info: dict[str, Any]) -> bool:
        """Whether a sampled prior is asked for (here or by the spec's preset)."""
        return self.samples_for(info) > 0 or bool(self.files)

    def prior_for(self, cfg, info: dict[str, Any]):
        """The sampled prior of ``cfg``'s network (drawn once per network and size).

        After drawing :data:`SAVE_PRIOR_TIP_FROM` networks or more, says on stderr (once per
        network) how to draw the same sample once into a file for later reports.
        """
        n, cached = self.samples_for(info), len(self._cache)
        prior = boolean_prior_for(cfg, samples=n, files=self.files, seed=self.seed,
                                  scheduler=self.scheduler, cache=self._cache)
        if n >= SAVE_PRIOR_TIP_FROM and len(self._cache) > cached:  # drawn now, not cached
            from rich.console import Console

            Console(stderr=True, soft_wrap=True).print(
                f"[yellow]tip:[/] this report drew {n:,} random networks; later reports can "
                f"reuse the same draws from a file: "
                f"{sample_prior_command(cfg, info, n, self.seed)} "
                f"then `flatprior report DB --boolean-prior prior.npz`", markup=True,
                highlight=False)
        return prior


def _first_config(store, label: str):
    """The :class:`flatprior.pipeline.RunConfig` of the first stored run of ``label``."""
    from flatprior.config import RunConfig

    for rec in store.records(spec=label):
        if isinstance(rec.get("config"), dict):
            return RunConfig.model_validate(rec["config"])
    raise FlatpriorError(f"{label}: no stored run has a config")


def analyse_spec(
    store,
    label: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    boolean_samples: int | None = None,
    prior: PriorOptions | None = None,
    make_figures: bool = True,
) -> SpecSection:
    """Correlations (and figures) of one spec label's runs in ``store``.

    ``prior`` (or the shorthand ``boolean_samples``; ``None``: the spec preset's
    ``prior_samples``) gives the sampled prior the ``boolean`` and ``psgd`` analyses use.
    """
    if prior is None:
        prior = PriorOptions(samples=boolean_samples, seed=seed)
    info = store.spec_info(label) or {"label": label}
    before = set(store.unreadable)
    df = store.to_frame(spec=label)
    sec = SpecSection(label, info, df, unreadable=sorted(store.unreadable - before))
    if df.empty:
        return sec
    sec.notes.append(execution_note(df))
    kind = info.get("analysis", "attack")
    group_by = info.get("group_by", ["optimizer"])
    if kind == "boolean" and "function" in df.columns:
        _analyse_boolean(sec, store, prior, n_boot=n_boot, seed=seed, make_figures=make_figures)
        return sec
    if kind == "psgd" and "function" in df.columns:
        _analyse_psgd(sec, store, prior, group_by, n_boot=n_boot, seed=seed,
                      make_figures=make_figures)
        return sec
    if kind == "epochs":
        # one trajectory per run: key moments instead of cross-run correlations
        recs = list(store.records(spec=label))
        for rec in recs[:MAX_EPOCH_FIGURES]:
            sec.extra_tables.append(
                (f"Run {rec['key']}: measures around zero error and the α-scaling",
                 epochs_summary(rec))
            )
            if not make_figures:
                continue
            cfg = rec.get("config", {})
            cap = (f"Run {rec['key']} ({cfg.get('dataset')}, seed {cfg.get('seed')}, "
                   f"{cfg.get('optimizer')}, α = {cfg.get('alpha')} at +{cfg.get('alpha_epoch')} "
                   "epochs): grey dotted = first zero training error, red dashed = α-scaling")
            sec.figures.append((cap, to_png(epochs_figure(rec))))
        return sec
    sec.correlations = correlation_table(df, group_by=group_by, n_boot=n_boot, seed=seed)
    axes = swept_axes(df)
    if len(axes) >= 2:
        sec.granulated = granulated_table(df, axes, n_boot=n_boot, seed=seed)
        sec.pooled = correlation_table(df, group_by=None, n_boot=n_boot, seed=seed)
        if make_figures and not sec.granulated.empty:
            sec.figures.append((
                "Predictors ranked by the granulated Kendall coefficient Ψ (Jiang et al. 2020) "
                f"over the swept axes {', '.join(axes)}: Ψ with its 95 % bootstrap interval and "
                "the τ along each axis", to_png(psi_figure(sec.granulated)),
            ))
    if make_figures:
        sec.figures.append((
            "Each measure against the generalization error; colour = attack-set size |A| "
            "(runs that reached zero training error)",
            to_png(attack_figure(df, group_by=group_by)),
        ))
    return sec


def _hex_functions(bt: pd.DataFrame, n: int = 20) -> pd.DataFrame:
    """The first ``n`` rows with each function as 32 hex digits instead of 128 bits."""
    from flatprior.prior import function_hex

    shown = bt.head(n).copy()
    shown["function"] = [function_hex([c == "1" for c in f]) for f in shown["function"]]
    return shown


def _covers_cube(cfg) -> bool:
    """Whether the runs' S ∪ E is the whole cube (then the stored EP log P(f) is on it)."""
    return cfg.n_attack == 0 and cfg.n_test is not None and cfg.n_train + cfg.n_test == 128


def _analyse_boolean(sec: SpecSection, store, prior: PriorOptions, *, n_boot: int, seed: int,
                     make_figures: bool) -> None:
    """Fig 2 / Fig S3: the most frequent SGD functions, log P(f) three ways, flatness vs log P."""
    info, df = sec.info, sec.frame
    cfg = _first_config(store, sec.label)
    sampled = prior.prior_for(cfg, info) if prior.wanted(info) else None
    bt = boolean_table(df, top=info.get("boolean_top", 1000), prior=sampled)
    ep_ok = _covers_cube(cfg)
    if not ep_ok and "log_prior" in bt:  # EP on a subset of the cube is another quantity
        bt = bt.rename(columns={"log_prior": "log_prior_on_s_e"})
    if prior.tilting > 0 and len(bt):
        bt = boolean_tilting(bt, cfg, top=prior.tilting, seed=prior.seed,
                             scheduler=prior.scheduler)
    sec.extra_tables.append(
        (f"The {min(20, len(bt))} functions SGD found most often (of {len(bt)} kept; function "
         "as 32 hex digits, input 0 = the high bit)", _hex_functions(bt)))
    agree = prior_agreement(bt, n_boot=n_boot, seed=seed)
    if not agree.empty:
        what = "" if ep_ok else (" (EP left out: the runs' S ∪ E is not the whole cube, so "
                                 "their stored EP log P(f) is on fewer inputs)")
        sec.extra_tables.insert(0, (
            "Agreement of the log P(f) estimates over the functions kept: sampling (Wilson "
            "95 % CI; antithetic pairs: of 2P on n/2 pairs, halved), tilting (its 95 % CI) and "
            "EP (no CI); |d| in nats" + what, agree))
    flat = [c for c in measure_columns(bt) if c not in ("log_prior", "pac_bayes_bound")]
    parts = []
    for tgt in ("log_prior", "log_p_tilting", "log_p_sampled"):
        if tgt in bt and bt[tgt].notna().sum() >= 3:
            t = correlation_table(bt, target=tgt, measures=flat, group_by=None, status=None,
                                  n_boot=n_boot, seed=seed)
            t.insert(0, "versus", tgt)
            parts.append(t)
    sec.correlations = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if make_figures:
        sec.figures.append((
            "Flatness of the most frequent SGD functions against their log P(f) (Fig 2: "
            "sharpness; Fig S3: Hessian spectral norm), one row per estimator of log P(f); "
            "colour: how often SGD found the function; grey bars: the estimator's 95 % CI; "
            "titles: Kendall τ [95 % bootstrap CI]",
            to_png(boolean_figure(bt, n_boot=n_boot)),
        ))


def boolean_tilting(bt: pd.DataFrame, cfg, *, top: int, seed: int = 0,
                    scheduler=None) -> pd.DataFrame:
    """Add ``log_p_tilting`` (with ``_ci_low`` / ``_ci_high``, ``tilting_converged``).

    For the ``top`` first functions of a :func:`boolean_table`: the certified importance-
    sampling estimate (:func:`flatprior.prior.tilting.log_prior_tilting`, its 95 % CI) of
    ``ln P(f)`` on all 128 inputs under the runs' NNGP kernel
    (:func:`flatprior.pipeline.kernel_of`). One estimate per function, seeded by ``seed``
    (its value does not depend on where it runs); with ``scheduler`` one Dask task per
    function, else spread over this machine's cores (one estimate per core at a time: at
    n = 128 an estimate is ~0.17 s of single-threaded sampling, so threads inside one would not
    help), with a progress bar on stderr.
    """
    import numpy as np
    import torch

    from flatprior.data.boolean import boolean_inputs
    from flatprior.pipeline import kernel_of

    K = kernel_of(torch.as_tensor(boolean_inputs()), cfg).numpy()
    labels = [np.frombuffer(f.encode(), dtype=np.uint8) - ord("0")
              for f in bt["function"].head(int(top))]
    if scheduler is not None:  # a Dask task uses one core (several tasks share a worker)
        res = _dask_map(_tilting_one, [(K, y, seed, 1) for y in labels], scheduler)
    else:
        res = _tilting_local(K, labels, seed)
    out = bt.copy()
    n = len(res)
    for col, i in (("log_p_tilting", 0), ("log_p_tilting_ci_low", 1),
                   ("log_p_tilting_ci_high", 2), ("tilting_converged", 3)):
        out[col] = [r[i] for r in res] + [np.nan] * (len(out) - n)
    return out


def _stderr_progress(text: str, *, disable: bool):
    """A transient rich progress bar on stderr: ``text``, bar, done/total, time left."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(text), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=disable)


def _tilting_local(K, labels: list, seed: int) -> list[tuple[float, float, float, bool]]:
    """:func:`_tilting_one` of every label vector on this machine's cores, with progress."""
    import contextlib
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    workers = min(len(labels) // 8, os.cpu_count() or 1)  # a process costs ~2 s to start
    with _stderr_progress("tilting estimates", disable=len(labels) < 20) as prog:
        task = prog.add_task("tilting", total=len(labels))
        # chunks of ~10 functions: K is sent once per chunk, the bar still moves
        chunks = [labels[i : i + 10] for i in range(0, len(labels), 10)]
        out = []
        with (ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers >= 2
              else contextlib.nullcontext()) as pool:
            for res in (pool.map if pool else map)(_tilting_many, [K] * len(chunks), chunks,
                                                   [seed] * len(chunks)):
                out += res
                prog.advance(task, len(res))
        return out


def _tilting_many(K, labels: list, seed: int) -> list[tuple[float, float, float, bool]]:
    """:func:`_tilting_one` of several label vectors, one thread (a pool worker's task)."""
    return [_tilting_one(K, y, seed, 1) for y in labels]


def _tilting_one(K, y, seed: int, n_threads: int) -> tuple[float, float, float, bool]:
    """``(log P, CI low, CI high, converged)`` of one function by tilting."""
    from flatprior.prior import log_prior

    r = log_prior(K, y, method="tilting", seed=seed, n_threads=n_threads)
    return (float(r.log_prob), float(r.ci_low), float(r.ci_high), bool(r.converged))


def _analyse_psgd(sec: SpecSection, store, prior: PriorOptions, group_by, *, n_boot: int,
                  seed: int, make_figures: bool) -> None:
    """P_SGD(f) vs P_B(f | S) per optimizer (Mingard et al. 2021)."""
    if not prior.wanted(sec.info):
        sec.notes.append("P_B(f | S) needs a sampled prior: run `flatprior report DB "
                         "--boolean-samples N` or `--boolean-prior FILE.npz` (files written by "
                         "`flatprior sample-prior`)")
        return
    sampled = prior.prior_for(_first_config(store, sec.label), sec.info)
    table = psgd_table(sec.frame, sampled, group_by=group_by)
    summary = psgd_summary(table, group_by=group_by, n_boot=n_boot, seed=seed)
    sec.extra_tables.append((
        "P_SGD(f) vs P_B(f | S) per group: Pearson r of log10 P and Kendall τ (95 % bootstrap "
        "CIs) over the functions both found; how much of each distribution the other saw "
        f"(prior: {sampled.n_samples:.3g} sampled networks)", summary))
    top = table.groupby([g for g in group_by if g in table] + ["training_set"],
                        sort=True, dropna=False).head(10)
    sec.extra_tables.append(("The 10 functions each group's runs found most often",
                             _hex_functions(top, len(top))))
    if make_figures:
        sec.figures.append((
            "P_SGD(f), the fraction of runs that found f, against P_B(f | S), the fraction of "
            "sampled random networks fitting S that compute f (log-log; grey bars: Wilson "
            "95 % CI; dashed: P_SGD = P_B); functions found by both",
            to_png(psgd_figure(table, summary, group_by=group_by))))


#: networks per sampled chunk of :func:`boolean_prior_for` (one Dask task each; ~1.5 min at
#: ~200 k networks/s on 2 cores); chunk ``i`` of master seed ``s`` has its own derived seed
PRIOR_CHUNK = 1 << 24


def _chunk_seeds(seed: int, n_chunks: int) -> list[int]:
    """Distinct derived seeds of the sampled chunks (``SeedSequence(seed, spawn_key=(i,))``)."""
    import numpy as np

    return [int(np.random.SeedSequence(int(seed), spawn_key=(1 << 20, i)).generate_state(
        1, dtype=np.uint32)[0]) for i in range(n_chunks)]


#: a report that draws this many networks or more says how to save them for later reports
SAVE_PRIOR_TIP_FROM = 10_000_000


def sample_prior_command(cfg, info: dict[str, Any], samples: int, seed: int) -> str:
    """The ``flatprior sample-prior`` call that draws what a report draws for ``cfg``.

    Same network (its ``hidden`` and variances pinned with ``--set``), number and master seed:
    :func:`boolean_prior_for` derives every chunk's seed from them alone, so the file holds the
    very draws the report made (tested).
    """
    widths, sigma_w2, sigma_b2 = _boolean_network(cfg)
    hidden = "[" + ",".join(map(str, widths[1:-1])) + "]"
    variant = f" {info['variant']}" if info.get("variant") else ""
    return (f"`flatprior sample-prior {info.get('name', 'fig2-boolean')}{variant} --preset "
            f"{info.get('preset', 'quick')} --samples {samples} --seed {seed} --set "
            f"'hidden={hidden}' --set sigma_w2={sigma_w2!r} --set sigma_b2={sigma_b2!r} "
            f"--out prior.npz`")


def _boolean_network(runs) -> tuple[tuple[int, ...], float, float]:
    """FCN widths ``(7, *hidden, 1)``, ``sigma_w2`` and ``sigma_b2`` of the runs' networks.

    ``runs``: a :class:`flatprior.pipeline.RunConfig` or its stored dict (which may predate
    the variance rename, ``sigma_b``: read with today's names).
    """
    from flatprior.config import migrate_config

    cfg = migrate_config(runs) if isinstance(runs, dict) else runs.model_dump(mode="json")
    widths = (7, *(int(h) for h in cfg.get("hidden") or [40, 40]), 1)
    return widths, float(cfg.get("sigma_w2", 2.0)), float(cfg.get("sigma_b2", 1.0))


def boolean_prior_for(runs, *, samples: int = 0, files=(), seed: int = 0,
                      scheduler=None, progress: bool = True, cache: dict | None = None,
                      antithetic: bool = True):
    """The sampled prior ``P(f)`` of the networks that ``runs`` trained (Boolean system).

    The one place that calls :func:`flatprior.prior.sample_boolean_prior` for runs, with the
    network :func:`_boolean_network` reads from them (as :func:`sample_prior_command` does), so
    the sample and the runs stay consistent: FCN
    ``(7, *hidden, 1)``, weights ``N(0, sigma_w2 / fan_in)``, biases ``N(0, sigma_b2)`` (the
    trained networks' initialisation, :func:`flatprior.models.init`).

    Args:
        runs: a :class:`flatprior.pipeline.RunConfig` (or its dict) of the runs.
        samples: random networks to draw now (in chunks of :data:`PRIOR_CHUNK`, chunk ``i``
            from a seed derived from ``seed`` and ``i``, so the result is the same locally and
            on a cluster).
        files: saved :class:`flatprior.prior.BooleanPrior` chunk files (``.npz``) to add;
            each must have been drawn for the same network.
        seed: master seed of the drawn chunks (use a different one per batch of chunks you
            merge later: equal seeds would double-count and are refused).
        scheduler: Dask scheduler address or ``dask.distributed.Client``: one task per chunk.
        progress: progress bar on stderr (for >= 1e6 networks drawn locally).
        cache: a dict that keeps the result per network, size, files and seed (a report's
            sections share one sample).
        antithetic: draw the networks in negated pairs (the sampler's default; ``samples``
            must be even), else independently.

    Returns:
        A :class:`flatprior.prior.BooleanPrior` (files and drawn chunks combined).
    """
    from flatprior.errors import check_int
    from flatprior.prior import BooleanPrior, sample_boolean_prior

    widths, sigma_w2, sigma_b2 = _boolean_network(runs)
    check_int("boolean prior samples", samples, 0)
    if antithetic and samples % 2:
        raise FlatpriorError(f"{samples} networks to sample is odd, but they are drawn in "
                             "antithetic pairs: give an even number")
    key = (widths, sigma_w2, sigma_b2, int(samples), tuple(str(f) for f in files), int(seed),
           bool(antithetic))
    if cache is not None and key in cache:
        return cache[key]
    parts = [BooleanPrior.load(f) for f in files]
    for f, p in zip(files, parts, strict=True):
        if (tuple(p.widths), p.sigma_w2, p.sigma_b2) != (widths, sigma_w2, sigma_b2):
            raise FlatpriorError(
                f"{f} was sampled for FCN {tuple(p.widths)}, sigma_w2 {p.sigma_w2:g}, sigma_b2 "
                f"{p.sigma_b2:g}, but the runs train FCN {widths}, sigma_w2 {sigma_w2:g}, "
                f"sigma_b2 {sigma_b2:g}; sample a prior for these runs (flatprior sample-prior)")
    if samples == 0 and not parts:
        raise FlatpriorError("no sampled prior: give a number of networks to sample or saved "
                             "prior files (--boolean-samples N or --boolean-prior FILE)")
    n_chunks = -(-int(samples) // PRIOR_CHUNK)
    sizes = [min(PRIOR_CHUNK, samples - i * PRIOR_CHUNK) for i in range(n_chunks)]
    jobs = list(zip(sizes, _chunk_seeds(seed, n_chunks), strict=True))

    def draw(n, s, report=None):
        return sample_boolean_prior(n, widths, sigma_w2=sigma_w2, sigma_b2=sigma_b2, seed=s,
                                    antithetic=antithetic, progress=report)

    if jobs and scheduler is not None:
        parts += _dask_map(draw, jobs, scheduler)
    elif jobs:
        # ~200 k networks/s on 2 cores: a bar for anything longer than a few seconds
        with _stderr_progress("sampling random networks",
                              disable=not progress or samples < 1_000_000) as prog:
            task = prog.add_task("sample", total=int(samples))
            for n, s in jobs:
                parts.append(draw(n, s, lambda k: prog.advance(task, k)))
    prior = BooleanPrior.combine(parts)
    if cache is not None:
        cache[key] = prior
    return prior


def _dask_map(fn, jobs, scheduler) -> list:
    """``[fn(*job) for job in jobs]`` as Dask tasks (results gathered in order)."""
    from flatprior.experiments.runner import dask_client

    with dask_client(scheduler) as client:
        return client.gather([client.submit(fn, *job, pure=False) for job in jobs])


# -- HTML -----------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}.muted{color:#777}
.scroll{max-height:480px;overflow:auto}
"""


def _table_html(df: pd.DataFrame, cls: str = "data") -> str:
    if df.empty:
        return "<p class='muted'>(none)</p>"
    return df.to_html(index=False, escape=True, classes=cls, na_rep="", float_format=_fmt)


def _fmt(v: float) -> str:
    if v != v:
        return ""
    a = abs(v)
    return f"{v:.4g}" if a == 0 or 1e-3 <= a < 1e5 else f"{v:.3e}"


def _img(png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>"


def _runs_html(df: pd.DataFrame) -> str:
    """The configuration of every run.

    The fields common to all (one JSON block) and, per run, the fields that vary plus its
    results.
    """
    from flatprior.config import RunConfig

    fields = [f for f in RunConfig.model_fields if f in df.columns]
    common = {f: df[f].iloc[0] for f in fields if df[f].nunique(dropna=False) <= 1}
    varying = [f for f in fields if f not in common]
    common_json = json.dumps({k: _py(v) for k, v in common.items()}, indent=1)
    cols = ["key", *varying, *[c for c in RESULT_COLUMNS if c in df.columns and c not in varying]]
    shown = df[cols]
    note = ""
    if len(shown) > MAX_RUN_ROWS:
        note = f"<p class='muted'>first {MAX_RUN_ROWS} of {len(shown)} runs shown</p>"
        shown = shown.head(MAX_RUN_ROWS)
    return (
        "<details><summary>Configuration shared by all runs</summary>"
        f"<pre>{html.escape(common_json)}</pre></details>"
        f"<p>Per-run configuration (fields that vary) and results:</p>{note}"
        f"<div class='scroll'>{_table_html(shown)}</div>"
    )


def _py(v):
    if isinstance(v, str):
        try:
            return json.loads(v) if v[:1] in "[{" else v
        except ValueError:
            return v
    if hasattr(v, "item"):
        return v.item()
    return v


def _claims_html(claims: list | str | None) -> str:
    """The verdict table of :mod:`flatprior.analysis.claims` (or why there is none)."""
    head = ("<h2 id='claims'>The study's claims</h2><p>Each claim of the study with its "
            "statistic, 95 % interval, the rule fixed in advance and the verdict "
            "(<code>flatprior claims DB</code> prints the same).</p>")
    if claims is None:
        return ""
    if isinstance(claims, str):
        return head + f"<p class='muted'>{html.escape(claims)}</p>"
    from flatprior.analysis.claims import claims_frame

    t = claims_frame(claims)[["id", "claim", "statistic", "value", "ci_low", "ci_high", "n",
                             "rule", "verdict", "detail"]]
    return head + f"<div class='scroll'>{_table_html(t)}</div>"


def render_html(sections: list[SpecSection], *, title: str, source: str,
                versions: list[dict[str, Any]], claims: list | str | None = None) -> str:
    """The report page as one HTML string (no external resources).

    ``claims``: the verdicts (first section), or a sentence saying why there are none.
    """
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='muted'>Results database <code>{html.escape(source)}</code>; generated {now}."
        "</p>",
        "<p>Correlations: Kendall τ, Spearman ρ and Pearson r between each measure and the "
        "generalization error (test error), with 95 % percentile-bootstrap intervals, over the "
        "runs that reached zero training error. Pearson r uses log10 of the flatness measures. "
        "log P(f) is the natural log of the NNGP prior probability of the function on S ∪ E.</p>",
        _claims_html(claims),
        "<ul>",
    ]
    if claims is not None:
        parts.append("<li><a href='#claims'>The study's claims: verdicts</a></li>")
    for s in sections:
        parts.append(f"<li><a href='#{_anchor(s.label)}'>{html.escape(s.label)}</a> — "
                     f"{html.escape(s.info.get('title', ''))} ({len(s.frame)} runs)</li>")
    parts.append("</ul>")
    for s in sections:
        info = s.info
        parts.append(f"<h2 id='{_anchor(s.label)}'>{html.escape(s.label)}: "
                     f"{html.escape(info.get('title', ''))}</h2>")
        if info.get("reproduces"):
            parts.append(f"<p><b>Reproduces:</b> {html.escape(info['reproduces'])}</p>")
        if info.get("description"):
            parts.append(f"<p>{html.escape(info['description'])}</p>")
        for note in s.notes:
            parts.append(f"<p><b>Note:</b> {html.escape(note)}</p>")
        if s.unreadable:
            parts.append(f"<p><b>{len(s.unreadable)} stored record(s) unreadable</b> (invalid "
                         "JSON), left out: " + html.escape(", ".join(s.unreadable)) + "</p>")
        if not s.frame.empty and "status" in s.frame:
            counts = s.frame["status"].value_counts().to_dict()
            parts.append("<p><b>Runs:</b> " + ", ".join(
                f"{html.escape(str(k))}: {v}" for k, v in counts.items()) + "</p>")
        # epochs: a trajectory per run; psgd: its own agreement table (no measure correlations)
        if info.get("analysis") not in ("epochs", "psgd"):
            parts.append("<h3>Correlations</h3>")
            if not s.correlations.empty:
                parts.append(_table_html(wide_table(s.correlations)))
                parts.append("<details><summary>long form (with p-values)</summary>"
                             f"{_table_html(s.correlations)}</details>")
            else:
                parts.append("<p class='muted'>not enough zero-error runs with measures "
                             "to correlate</p>")
        if not s.granulated.empty:
            axes = [c[4:] for c in s.granulated.columns if c.startswith("tau_")
                    and not c.endswith(("_ci_low", "_ci_high"))]
            parts.append(
                "<h3>Granulated Kendall Ψ beside the pooled τ</h3><p>Ψ (Jiang et al. 2020): "
                "for each swept axis, Kendall τ over groups of runs that differ only in that "
                "axis (seeds are replicates within a group), averaged over the groups, then "
                "over the axes (" + html.escape(", ".join(axes)) + "). Pooled: one τ over all "
                "runs. Ranked by Ψ in the direction each measure should predict (log P(f): "
                "negative; the others are complexity measures: positive).</p>")
            parts.append(_table_html(wide_table(s.pooled, granulated=s.granulated)))
        for cap, png in s.figures:
            parts.append(f"<figure>{_img(png, cap)}<figcaption>{html.escape(cap)}"
                         "</figcaption></figure>")
        for cap, t in s.extra_tables:
            parts.append(f"<h3>{html.escape(cap)}</h3><div class='scroll'>{_table_html(t)}</div>")
        if not s.frame.empty and "status" in s.frame and (s.frame["status"] == "failed").any():
            f = s.frame[s.frame["status"] == "failed"][["key", "error"]]
            parts.append(f"<h3>Failed runs</h3>{_table_html(f)}")
        if not s.frame.empty:
            parts.append(f"<h3>Runs</h3>{_runs_html(s.frame)}")
    parts.append("<h2 id='versions'>Versions</h2>")
    uniq = {json.dumps(v, sort_keys=True) for v in versions if v}
    for v in sorted(uniq):
        parts.append(f"<pre>{html.escape(v)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _anchor(label: str) -> str:
    return "spec-" + "".join(c if c.isalnum() else "-" for c in label)


def write_report(
    db: str | Path,
    out: str | Path,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    boolean_samples: int | None = None,
    prior: PriorOptions | None = None,
    title: str = "flatprior report",
) -> tuple[Path, list[SpecSection]]:
    """Analyse every spec in the results database ``db`` and write the HTML page ``out``.

    ``prior``: the sampled Boolean prior for the ``boolean`` / ``psgd`` analyses (shorthand:
    ``boolean_samples`` networks drawn with ``seed``; ``None``: each spec preset's
    ``prior_samples``); drawn once per network and size, and shared.

    Returns the path written and the analysed sections (their ``correlations`` DataFrames).
    """
    if prior is None:
        prior = PriorOptions(samples=boolean_samples, seed=seed)
    from flatprior.experiments.store import Store

    out = Path(out).expanduser()
    if out.is_dir():
        out = out / "report.html"
    if not out.parent.is_dir():
        raise FlatpriorError(f"cannot write the report to {out}: folder {out.parent} is missing")
    with Store(db, readonly=True) as store:
        labels = store.specs()
        if not labels:
            raise FlatpriorError(f"{db} holds no runs yet; run `flatprior run SPEC --out {db}`")
        sections = [
            analyse_spec(store, lab, n_boot=n_boot, seed=seed, prior=prior)
            for lab in labels
        ]
        versions = store.versions()
        try:  # the sections' frames: each spec's records are parsed once per report
            claims = evaluate_claims(store, n_boot=max(n_boot, 1), seed=seed,
                                     frames={s.label: s.frame for s in sections})
        except FlatpriorError as exc:  # e.g. no run reached zero error: say so on the page
            claims = f"no verdicts: {exc}"
    page = render_html(sections, title=title, source=str(db), versions=versions, claims=claims)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise FlatpriorError(f"cannot write the report to {out} ({exc.strerror})") from None
    return out, sections
