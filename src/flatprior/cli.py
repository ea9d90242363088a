"""Command-line interface: ``flatprior train | demo | …`` (typer + rich)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flatprior.config import RunConfig
from flatprior.errors import FlatpriorError
from flatprior.measures import MEASURES
from flatprior.names import DATASETS, MODELS, OPTIMIZERS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="flatprior: does flatness or the function prior log P(f) predict generalization?",
)
err = Console(stderr=True)
out = Console()


#: console width when stdout is not a terminal: wide enough that no line is ever wrapped
_PIPE_WIDTH = 10_000


def _measures(value: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in value.split(",") if m.strip()) if value != "none" else ()


def _epoch_progress(total: int):
    """A rich progress bar fed by the trainer's per-epoch metrics."""
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    tid = prog.add_task("training", total=total, info="")

    def update(m: dict) -> None:
        prog.update(
            tid,
            completed=m["epoch"],
            info=f"epoch {m['epoch']} loss {m['train_loss']:.4f} train acc {m['train_acc']:.3f}",
        )

    return prog, update


def _default(field: str):
    """``RunConfig``'s default of ``field``: the ``train`` options default to the config's."""
    return RunConfig.model_fields[field].default


#: RunConfig fields that `flatprior train` has no option for (they keep RunConfig's defaults;
#: `flatprior run SPEC --set FIELD=VALUE` sets any field). tests/test_config.py checks that every
#: other field is an option with RunConfig's default.
TRAIN_NOT_EXPOSED = (
    "boolean_target", "data_seed", "hidden", "width", "sigma_w2", "sigma_b2", "zero_error_on",
    "loss_reduction", "augment", "topk", "kernel", "kernel_draws", "pac_bayes_delta",
    "measure_every", "epoch_measures", "alpha_epoch", "alpha_after_zero_error", "alpha_layer",
    "alpha", "sam_rho", "adaptive_norm", "adaptive_rho", "adaptive_avg_rho", "adaptive_iters",
    "adaptive_m", "adaptive_samples", "pac_bayes_target", "pac_bayes_metric", "pac_bayes_samples",
)
_MEASURES_HELP = ("comma list of " + ", ".join(MEASURES) + "; or 'none' (`flatprior list` "
                  "specs set others; the measures are defined in flatprior.measures)")


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help=" | ".join(DATASETS))] = _default("dataset"),
    data_root: Annotated[Path | None, typer.Option(help="folder with MNIST/CIFAR files")] = None,
    data_path: Annotated[
        Path | None, typer.Option(help="your .npz (x, y) or .csv file (sets --dataset file)")
    ] = None,
    label_column: Annotated[str, typer.Option(help="label column of a .csv data file")] = (
        _default("label_column")
    ),
    n_train: Annotated[int, typer.Option(help="|S|")] = _default("n_train"),
    n_attack: Annotated[int, typer.Option(help="|A| (labels flipped)")] = _default("n_attack"),
    n_test: Annotated[int, typer.Option(help="|E|")] = _default("n_test"),
    model: Annotated[str, typer.Option(help=" | ".join(MODELS))] = _default("model"),
    optimizer: Annotated[str, typer.Option(help=", ".join(OPTIMIZERS))] = _default("optimizer"),
    lr: Annotated[float | None, typer.Option(help="learning rate (default per optimizer)")] = None,
    batch_size: int = _default("batch_size"),
    max_epochs: int = _default("max_epochs"),
    overtrain_epochs: int = _default("overtrain_epochs"),
    seed: int = _default("seed"),
    measures: Annotated[str, typer.Option(help=_MEASURES_HELP)] = ",".join(_default("measures")),
    sharpness_eps: float = _default("sharpness_eps"),
    sharpness_method: Annotated[str, typer.Option(help="sgd | lbfgsb")] = _default(
        "sharpness_method"
    ),
    sharpness_epochs: int = _default("sharpness_epochs"),
    prior_method: Annotated[str, typer.Option(help="ep | tilting | mc")] = _default(
        "prior_method"
    ),
    fam_strength: Annotated[float, typer.Option(help="λ of the FAM regulariser")] = _default(
        "fam_strength"
    ),
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON record")] = False,
    history: Annotated[bool, typer.Option(help="keep per-epoch history in the JSON")] = False,
    save_model: Annotated[
        Path | None, typer.Option(help="write the trained network here (weights-only checkpoint)")
    ] = None,
) -> None:
    """Train one network to zero training error and measure it."""
    # every option named like a RunConfig field goes into the config (no hand copy to forget)
    fields = {k: v for k, v in locals().items() if k in RunConfig.model_fields}
    from flatprior.pipeline import make_config, run

    fields.update(data_root=str(data_root) if data_root else None, measures=_measures(measures))
    if data_path is not None:
        fields.update(dataset="file", data_path=str(data_path.expanduser().resolve()))
    cfg = make_config(**fields)
    if save_model is not None:  # before training: a late failure would cost the whole run
        from flatprior.checkpoint import check_writable_file

        check_writable_file(save_model)
    prog, update = _epoch_progress(max_epochs)
    try:
        with prog:
            rec = run(cfg, progress=update, save_model=str(save_model) if save_model else None)
    except FlatpriorError as exc:
        if getattr(exc, "record", None) is None:
            raise
        _print_record(exc.record, history, json_out)  # the save failed: show the run, then why
        raise
    _print_record(rec, history, json_out)


def _print_record(rec: dict, history: bool, json_out: bool) -> None:
    if not history:
        rec.pop("history", None)
    if json_out:
        print(json.dumps(rec))
        return
    table = Table(title=f"flatprior train  key={rec['key']}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for k, v in rec.items():
        if k in ("config", "versions", "history", "notes"):
            continue
        if v is None:  # not measured: say why where we know
            v = "n/a (no test set: --n-test 0)" if k == "test_error" and not rec.get(
                "n_test") else "n/a"
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(table)
    for note in rec["notes"]:
        out.print(f"[yellow]note:[/] {note}")


def _print_correlations(table, title: str, granulated=None) -> None:
    """Print a correlation table (long form, from ``correlation_table``) as a rich table.

    With ``granulated`` (``granulated_table``) its Ψ and per-axis τ's beside Kendall's τ.
    """
    from flatprior.analysis import wide_table

    if table is None or table.empty:
        out.print(f"[yellow]{title}: not enough zero-error runs with measures to correlate[/]")
        return
    w = wide_table(table, granulated=granulated)
    t = Table(title=title)
    for c in w.columns:
        t.add_column(str(c), justify="left" if c in ("measure", "versus") else "right",
                     no_wrap=True)
    for _, r in w.iterrows():
        t.add_row(*[str(v) for v in r])
    (out if out.is_terminal else Console(width=_PIPE_WIDTH)).print(t)  # pipes: no wrapping
    if "n" in table and (table["n"] < 3).any():
        out.print("[yellow]n/a where n < 3:[/] a correlation needs 3 zero-error runs with both "
                  "the measure and a test error (runs with n_test = 0 have no test error)",
                  soft_wrap=True)


def _resolve_cli(spec, variant, preset, sets, config, data_root, data_path=None,
                 label_column=None):
    from flatprior.experiments.specs import load_overrides, parse_sets, resolve

    overrides = {}
    if config is not None:
        overrides.update(load_overrides(config))
    overrides.update(parse_sets(sets or []))
    if data_root is not None:
        overrides["data_root"] = str(data_root)
    if data_path is not None:
        overrides.update(dataset="file", data_path=str(Path(data_path).expanduser().resolve()))
    if label_column is not None:
        overrides["label_column"] = label_column
    return resolve(spec, preset, variant, overrides)


@app.command("run")
def run_cmd(
    spec: Annotated[str, typer.Argument(help="spec name (see `flatprior list`) or a .toml file")],
    variant: Annotated[
        str | None, typer.Argument(help="variant, e.g. mnist-fcn | cifar-fcn | cifar-resnet")
    ] = None,
    preset: Annotated[str, typer.Option(help="quick (laptop CPU) | paper (study sizes)")] = "quick",
    out_db: Annotated[Path, typer.Option("--out", help="SQLite results file")] = Path("results.db"),
    workers: Annotated[
        int | None, typer.Option(help="local worker processes (default: all cores)")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Dask scheduler address, e.g. tcp://host:8786")
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a run field: FIELD=VALUE (VALUE=[a,b] or "
                                   "{range=[0,1000]} sweeps it)"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML file of overrides (field = value, [sweep] table)")
    ] = None,
    data_root: Annotated[Path | None, typer.Option(help="folder with MNIST/CIFAR files")] = None,
    data_path: Annotated[
        Path | None, typer.Option(help="your .npz (x, y) or .csv file (sets dataset = file)")
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="label column of a .csv data file (default: label)")
    ] = None,
    retry_failed: Annotated[bool, typer.Option(help="re-run runs stored as failed")] = False,
    dry_run: Annotated[bool, typer.Option(help="validate and show the sweep, run nothing")] = False,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
    run_fn: Annotated[str | None, typer.Option(hidden=True, help="module:function")] = None,
    ensemble: Annotated[
        str | None, typer.Option(help="off: one task per run | auto: train compatible runs "
                                 "together as ensembles (much faster for Boolean sweeps; float32 "
                                 "results then differ from the per-run path after long "
                                 "training). Default: the spec's (auto for fig2-boolean and "
                                 "psgd-boolean, off elsewhere; `flatprior list SPEC` shows it)")
    ] = None,
    memory_budget: Annotated[
        str | None, typer.Option(help="memory one ensemble may use, e.g. 512MB, 2GB, 1.5GiB "
                                 "(--ensemble auto; members are trained and measured in chunks "
                                 "that fit; default 2GiB)")
    ] = None,
) -> None:
    """Run an experiment spec (resumable: finished runs in --out are skipped)."""
    from flatprior.experiments.runner import import_run_fn, preflight, run_sweep
    from flatprior.experiments.specs import sweep_for_display
    from flatprior.experiments.store import Store

    if workers is not None and workers < 1:
        raise FlatpriorError(f"--workers must be >= 1, got {workers}")
    if ensemble is not None and ensemble not in ("auto", "off"):
        raise FlatpriorError(f"--ensemble must be auto or off, got {ensemble!r}")
    budget = None
    if memory_budget is not None:
        from flatprior.experiments.ensemble import parse_memory_budget

        budget = parse_memory_budget(memory_budget)
    res = _resolve_cli(spec, variant, preset, sets, config, data_root, data_path, label_column)
    fn = import_run_fn(run_fn) if run_fn else None
    sweep = ", ".join(f"{k} ({len(v)})" for k, v in res.sweep.items()) or "none"
    if ensemble is None:
        ensemble = res.spec.ensemble
        how = "the spec's default"
    else:
        how = "--ensemble"
    if budget is not None and ensemble != "auto":
        err.print("[yellow]note:[/] --memory-budget applies to ensembles only (--ensemble auto)")
    err.print(f"{res.label}: {len(res.configs)} runs; sweep over {sweep}; ensembles: {ensemble} "
              f"({how})", soft_wrap=True)
    if dry_run:
        out.print(json.dumps({"label": res.label, "base": res.base,
                              "sweep": sweep_for_display(res.sweep),
                              "n_runs": len(res.configs)}, indent=1, default=str))
        return
    if fn is None:
        preflight(res.configs)
    with Store(out_db) as store:
        summary = run_sweep(
            res.configs, store, res.label, info=res.info(), run_fn=fn, workers=workers,
            scheduler=scheduler, retry_failed=retry_failed, progress=progress, console=err,
            ensemble=ensemble, memory_budget=budget,
        )
    err.print(summary.line())
    if summary.failed:
        err.print(f"[yellow]{summary.failed} run(s) failed; their errors are in {out_db} "
                  "(`flatprior report`); re-run with --retry-failed[/]")


@app.command("list")
def list_cmd(
    spec: Annotated[str | None, typer.Argument(help="show one spec in detail")] = None,
) -> None:
    """List the experiment specs (what each reproduces, runs per preset, what it needs)."""
    from flatprior.experiments.specs import (
        PRESETS,
        list_specs,
        load_spec,
        resolve,
        sweep_for_display,
    )

    # the terminal's width only on a terminal: a pipe or file gets whole lines (rich would
    # squeeze to 80 columns and split words)
    con = out if out.is_terminal else Console(width=_PIPE_WIDTH)
    if spec is not None:
        s = load_spec(spec)
        con.print(f"[bold]{s.name}[/]: {s.title}\nreproduces: {s.reproduces}\n{s.description}\n"
                  f"flatprior run's default: --ensemble {s.ensemble}")
        for v in list(s.variants) or [None]:
            for p in PRESETS:
                r = resolve(s, p, v, build=False)
                con.print(f"\n[bold]{r.label}[/] ({r.n_runs} runs; sharpness: "
                          f"{r.sharpness_settings()})" + (f"  needs: {r.needs}" if r.needs else ""))
                con.print(json.dumps({"base": r.base, "sweep": sweep_for_display(r.sweep)},
                                     default=str))
        return
    t = Table(title="flatprior experiment specs  (flatprior run NAME [VARIANT] --preset P)")
    for col in ("name", "variants", "reproduces", "quick runs", "paper runs",
                "sharpness quick / paper", "needs"):
        t.add_column(col, justify="right" if "runs" in col else "left", overflow="fold",
                     no_wrap=col in ("name", "variants"))
    for name, s in list_specs().items():
        for v in list(s.variants) or [None]:
            r = {p: resolve(s, p, v, build=False) for p in PRESETS}
            needs = (s.variants[v].needs if v else None) or s.needs or ""
            first = v in (None, next(iter(s.variants), None))
            t.add_row(name if first else "", v or "", s.reproduces if first else "",
                      str(r["quick"].n_runs), str(r["paper"].n_runs),
                      " / ".join(r[p].sharpness_settings(with_eps=False) for p in PRESETS),
                      needs)
    con.print(t)


@app.command("report")
def report_cmd(
    db: Annotated[Path, typer.Argument(help="results database written by `flatprior run`")],
    out_html: Annotated[Path, typer.Option("--out", help="HTML file to write")] = Path(
        "report.html"
    ),
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the 95 % CIs")] = 1000,
    boolean_samples: Annotated[
        int | None, typer.Option(help="fig2-boolean / psgd-boolean: random networks to sample "
                                 "for the prior P(f) (0: none; default: the preset's, e.g. 1e8 "
                                 "for paper, unless --boolean-prior is given; ~200 k/s on 2 "
                                 "cores)")
    ] = None,
    boolean_prior: Annotated[
        list[Path] | None,
        typer.Option(help="fig2-boolean / psgd-boolean: saved prior chunk file(s) from "
                     "`flatprior sample-prior` (repeat the option; adds to --boolean-samples)"),
    ] = None,
    boolean_tilting: Annotated[
        int, typer.Option(help="fig2-boolean: log P(f) by tilting (with CI) for this many of the "
                          "most frequent functions (~0.17 s each per core)")
    ] = 0,
    scheduler: Annotated[
        str | None, typer.Option(help="Dask scheduler address: sampling chunks and tilting "
                                 "estimates as tasks")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the sampled prior and tilting")] = 0,
    export: Annotated[
        Path | None, typer.Option(help="also write the runs as .csv or .parquet")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="do not print the correlation tables")] = False,
) -> None:
    """Write a self-contained HTML report (figures, correlations, every run's config)."""
    from flatprior.analysis import write_report

    if n_boot < 0:
        raise FlatpriorError(f"--n-boot must be >= 0, got {n_boot}")
    from flatprior.analysis.report import PriorOptions

    if (boolean_samples or 0) < 0 or boolean_tilting < 0:
        raise FlatpriorError("--boolean-samples and --boolean-tilting must be >= 0")
    prior = PriorOptions(samples=boolean_samples, files=tuple(boolean_prior or ()),
                         tilting=boolean_tilting, scheduler=scheduler, seed=seed)
    path, sections = write_report(db, out_html, n_boot=n_boot, prior=prior)
    unreadable = sorted({k for s in sections for k in s.unreadable})
    if unreadable:
        err.print(f"[yellow]warning:[/] {len(unreadable)} stored record(s) unreadable (invalid "
                  f"JSON), left out of the report: {', '.join(unreadable[:5])}"
                  + (" …" if len(unreadable) > 5 else ""), highlight=False, soft_wrap=True)
    if not quiet:
        for s in sections:
            what = ("flatness vs log P(f) of the functions SGD found"
                    if s.info.get("analysis") == "boolean" else "correlation with generalization")
            if s.info.get("analysis") not in ("epochs", "psgd"):
                _print_correlations(s.correlations, f"{s.label}: {what}")
            for note in s.notes:
                err.print(f"[yellow]{s.label}:[/] {note}", highlight=False, soft_wrap=True)
            if s.info.get("analysis") == "psgd" and s.extra_tables:
                _print_psgd(s.label, s.extra_tables[0][1])
            if not s.granulated.empty:
                _print_correlations(s.pooled, f"{s.label}: pooled τ and granulated Kendall Ψ "
                                    "(ranked)", s.granulated)
    if export is not None:
        from flatprior.experiments.store import Store

        with Store(db, readonly=True) as store:
            store.export(export)
        err.print(f"runs written to {export}")
    err.print(f"report written to {path}")


def _print_psgd(label: str, summary) -> None:
    t = Table(title=f"{label}: P_SGD(f) vs P_B(f | S) (log10; 95 % bootstrap CIs)")
    groups = [c for c in summary.columns if c not in _PSGD_NUMERIC]
    for c in [*groups, "runs", "fitting nets", "functions both", "r (log)", "Kendall τ"]:
        t.add_column(c)
    for _, r in summary.iterrows():
        t.add_row(*[str(r[g]) for g in groups], str(r["n_sgd"]), str(r["n_fit"]),
                  str(r["functions_both"]),
                  f"{r['pearson_log10']:+.2f} [{r['pearson_log10_ci_low']:+.2f}, "
                  f"{r['pearson_log10_ci_high']:+.2f}]",
                  f"{r['kendall']:+.2f} [{r['kendall_ci_low']:+.2f}, {r['kendall_ci_high']:+.2f}]")
    out.print(t)


_PSGD_NUMERIC = ("n_sgd", "n_fit", "functions_sgd", "functions_sampled", "functions_both",
                 "sgd_mass_sampled", "posterior_mass_sgd", "pearson_log10",
                 "pearson_log10_ci_low", "pearson_log10_ci_high", "kendall", "kendall_ci_low",
                 "kendall_ci_high")


@app.command("sample-prior")
def sample_prior_cmd(
    spec: Annotated[str, typer.Argument(help="Boolean spec whose network to sample "
                                        "(fig2-boolean, psgd-boolean) or a .toml file")],
    variant: Annotated[str | None, typer.Argument(help="variant of the spec")] = None,
    preset: Annotated[str, typer.Option(help="quick | paper")] = "quick",
    samples: Annotated[int, typer.Option(help="random networks to draw")] = 1_000_000,
    seed: Annotated[int, typer.Option(help="master seed: use a new one for every file you "
                                      "will merge")] = 0,
    out_file: Annotated[Path, typer.Option("--out", help=".npz file to write")] = Path(
        "prior.npz"),
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a run field: FIELD=VALUE (e.g. hidden=[40,40])"),
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Dask scheduler address: one task per 2^24-network chunk")
    ] = None,
    independent: Annotated[bool, typer.Option(
        "--independent", help="draw every network independently (default: antithetic pairs, "
        "a network and its twin with the last layer negated: half the cost)")] = False,
) -> None:
    """Sample random networks of a Boolean spec: a prior P(f) chunk file for `flatprior report`.

    Files drawn with different seeds merge, so a 1e8-network prior can be drawn on many machines:

    `flatprior report DB --boolean-prior a.npz --boolean-prior b.npz`
    """
    from flatprior.analysis.report import boolean_prior_for

    res = _resolve_cli(spec, variant, preset, sets, None, None)
    cfg = res.configs[0]
    if cfg.dataset != "boolean" or cfg.model != "fcn":
        raise FlatpriorError(f"{res.label} does not train FCNs on the Boolean cube; choose "
                             "fig2-boolean or psgd-boolean")
    if not str(out_file).endswith(".npz"):
        raise FlatpriorError(f"--out must be a .npz file, got {out_file}")
    if not out_file.expanduser().parent.is_dir():
        raise FlatpriorError(f"cannot write {out_file}: its folder does not exist")
    t0 = time.perf_counter()
    prior = boolean_prior_for(cfg, samples=samples, seed=seed, scheduler=scheduler,
                              antithetic=not independent)
    prior.save(out_file.expanduser())
    err.print(f"{prior.n_samples} networks ({prior.n_functions} distinct functions) in "
              f"{time.perf_counter() - t0:.0f} s written to {out_file}")


VERDICT_STYLE = {"holds": "green", "does not hold": "red", "not enough runs": "yellow",
                 "precondition failed": "magenta"}


@app.command("claims")
def claims_cmd(
    db: Annotated[Path, typer.Argument(help="results database written by `flatprior run`")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per claim")] = False,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the 95 % CIs")] = 1000,
) -> None:
    """A verdict for each of the study's claims from the runs in DB (reads only)."""
    from flatprior.analysis.claims import claims_json, evaluate_claims
    from flatprior.experiments.store import Store

    if n_boot < 1:
        raise FlatpriorError(f"--n-boot must be >= 1, got {n_boot}")
    with Store(db, readonly=True) as store:
        claims = evaluate_claims(store, n_boot=n_boot)
    if as_json:
        typer.echo(claims_json(claims))
        return
    _print_claims(claims, f"The study's claims, measured on {db}")


def _print_claims(claims, title: str) -> None:
    t = Table(title=title, show_lines=True)
    for col in ("claim", "statistic", "value [95 % CI]", "n", "rule", "verdict"):
        t.add_column(col, overflow="fold", justify="right" if col == "n" else "left")
    for c in claims:
        val = "-" if c.value != c.value else f"{c.value:+.3g}"
        if c.ci_low == c.ci_low:
            val += f" [{c.ci_low:+.3g}, {c.ci_high:+.3g}]"
            if c.extra.get("interval"):
                val += f" ({c.extra['interval']})"
        style = VERDICT_STYLE.get(c.verdict, "")
        verdict = f"[{style}]{c.verdict}[/]" + (f"\n{escape(c.detail)}" if c.detail else "")
        t.add_row(f"({escape(c.id)}) {escape(c.claim)}", escape(c.statistic), val, str(c.n),
                  escape(c.rule), verdict)
    out.print(t)


@app.command()
def download(
    dataset: Annotated[str, typer.Argument(help="mnist | cifar10")],
    data_root: Annotated[
        Path | None, typer.Option(help="folder to put the files in (default $FLATPRIOR_DATA)")
    ] = None,
    parts: Annotated[str, typer.Option(help="mnist: train,test | test (the two t10k files); "
                                            "cifar10 comes as one archive")] = "train,test",
    mirror: Annotated[
        str | None,
        typer.Option(help="base URL of a mirror (default: $FLATPRIOR_MNIST_MIRROR or "
                          "$FLATPRIOR_CIFAR10_MIRROR, else the public mirrors)"),
    ] = None,
) -> None:
    """Download a data set's files with md5 checks (files already present are kept)."""
    import os

    from flatprior.errors import check_choice

    check_choice("dataset to download", dataset, ["mnist", "cifar10"])
    wanted = tuple(p.strip() for p in parts.split(",") if p.strip())
    for p in wanted:
        check_choice("--parts entry", p, ["train", "test"])
    if not wanted:
        raise FlatpriorError("--parts is empty; use train,test or test")
    root = Path(data_root or os.environ.get("FLATPRIOR_DATA", "~/.cache/flatprior")).expanduser()
    mirrors = (mirror,) if mirror else None
    if dataset == "cifar10":
        from flatprior.data.cifar10 import FOLDER, TEST_FILE, TRAIN_FILES, download_cifar10

        if set(wanted) != {"train", "test"}:
            err.print("[yellow]note:[/] --parts is for mnist; the CIFAR-10 archive holds both")
        got = download_cifar10(root, mirrors)
        present = [root / FOLDER / f for f in (*TRAIN_FILES, TEST_FILE)]
        name, done = "CIFAR-10 (binary version)", "extracted {} from the md5-checked archive"
    else:
        from flatprior.data.mnist import FILES, _find, download_mnist

        got = download_mnist(root, wanted, mirrors=mirrors)
        present = [_find(root, stem) for key, (stem, _) in FILES.items()
                   if key.split("-")[0] in wanted]
        name, done = f"MNIST ({', '.join(wanted)})", "downloaded {} (md5 ok)"
    for f in got:
        err.print(done.format(f), highlight=False, soft_wrap=True)
    for p in present:
        if p not in got:
            err.print(f"already present: {p}", highlight=False, soft_wrap=True)
    err.print(f"{name} ready in {root}; use --data-root {root}", highlight=False, soft_wrap=True)


@app.command()
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out", help="folder for results.db and report.html")
    ] = Path("flatprior-report"),
    workers: Annotated[int | None, typer.Option(help="worker processes (default: cores)")] = None,
    n_boot: int = 1000,
) -> None:
    """Quick Fig 3 on scikit-learn's digits (no download): correlation table + HTML report."""
    import time

    from flatprior.analysis import write_report
    from flatprior.experiments.runner import preflight, run_sweep
    from flatprior.experiments.specs import resolve
    from flatprior.experiments.store import Store

    t0 = time.perf_counter()
    res = resolve("fig3", "quick", "mnist-fcn")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlatpriorError(
            f"cannot create {out_dir} ({exc.strerror}); choose another --out"
        ) from None
    preflight(res.configs)
    db = out_dir / "results.db"
    with Store(db) as store:
        summary = run_sweep(res.configs, store, res.label, info=res.info(), workers=workers,
                            console=err)
    err.print(summary.line())
    path, sections = write_report(db, out_dir / "report.html", n_boot=n_boot)
    for s in sections:
        if s.label == res.label:
            _print_correlations(
                s.correlations,
                "digits attack-set sweep (FCN 64-40-40-1, SGD): correlation with generalization",
            )
    err.print(f"report written to {path}  ({time.perf_counter() - t0:.0f} s)")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2; Ctrl-C exits 130."""
    try:
        _main()
    except KeyboardInterrupt:  # a Ctrl-C outside the command (e.g. while reporting an error)
        _aborted()


def _main() -> None:
    try:
        code = app(standalone_mode=False)
    except FlatpriorError as exc:
        # escape: messages hold shapes like "[n, 28, 28]" that rich would take as markup
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        _aborted()
    except Exception as exc:  # click usage errors (bad option, bad value, unknown command)
        # typer >= 0.16 vendors click as ``typer._click``: its exceptions are not
        # ``click.ClickException``, so recognise them by their interface instead of their class.
        if not (hasattr(exc, "exit_code") and hasattr(exc, "format_message")):
            raise
        message = exc.format_message()
        if not message:  # NoArgsIsHelpError: the help text is the message
            exc.show()
        else:
            line = " ".join(message.split()).rstrip(".")
            err.print(
                f"[red]error:[/] {escape(line)}; see --help", highlight=False, soft_wrap=True
            )
        sys.exit(exc.exit_code)
    # typer turns a KeyboardInterrupt inside a command into exit code 130, which
    # standalone_mode=False returns instead of exiting with it
    if code == ABORTED:
        _aborted()
    if isinstance(code, int) and code:
        sys.exit(code)


#: exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it
ABORTED = 130


def _aborted() -> None:
    err.print("aborted (finished runs are stored; re-run to resume)", highlight=False)
    # CPython flags a KeyboardInterrupt that escaped code run through PyRun_String (pybind11's
    # py::exec while torch is imported) and then, under `python -m`, ends the process with
    # SIGINT instead of our status (subprocess sees -2, not 130). Running any string clears it.
    try:
        import ctypes

        ctypes.pythonapi.PyRun_SimpleString(b"pass")
    except (AttributeError, OSError):  # not CPython: nothing to clear
        pass
    sys.exit(ABORTED)


if __name__ == "__main__":
    main()
