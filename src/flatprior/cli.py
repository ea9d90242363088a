"""Command-line interface: ``flatprior train | demo | …`` (typer + rich)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flatprior.errors import FlatpriorError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="flatprior: does flatness or the function prior log P(f) predict generalization?",
)
err = Console(stderr=True)
out = Console()


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


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="boolean | digits | mnist | cifar10")] = "digits",
    data_root: Annotated[Path | None, typer.Option(help="folder with MNIST/CIFAR files")] = None,
    n_train: Annotated[int, typer.Option(help="|S|")] = 500,
    n_attack: Annotated[int, typer.Option(help="|A| (labels flipped)")] = 0,
    n_test: Annotated[int, typer.Option(help="|E|")] = 1000,
    model: Annotated[str, typer.Option(help="fcn | cnn | resnet18 | resnet50")] = "fcn",
    optimizer: Annotated[str, typer.Option(help="sgd, momentum, adam, …")] = "sgd",
    lr: Annotated[float | None, typer.Option(help="learning rate (default per optimizer)")] = None,
    batch_size: int = 128,
    max_epochs: int = 2000,
    overtrain_epochs: int = 0,
    seed: int = 0,
    measures: Annotated[
        str,
        typer.Option(
            help="comma list of sharpness, spectral_norm, logprod_topk, trace, "
            "relative_flatness, log_prior, pac_bayes; or 'none'"
        ),
    ] = "sharpness,log_prior,pac_bayes",
    sharpness_eps: float = 1e-4,
    sharpness_method: str = "sgd",
    sharpness_epochs: int = 100,
    prior_method: str = "ep",
    fam_strength: Annotated[float, typer.Option(help="λ of the FAM regulariser")] = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON record")] = False,
    history: Annotated[bool, typer.Option(help="keep per-epoch history in the JSON")] = False,
) -> None:
    """Train one network to zero training error and measure it."""
    from flatprior.pipeline import make_config, run

    cfg = make_config(
        dataset=dataset,
        data_root=str(data_root) if data_root else None,
        n_train=n_train,
        n_attack=n_attack,
        n_test=n_test,
        model=model,
        optimizer=optimizer,
        lr=lr,
        batch_size=batch_size,
        max_epochs=max_epochs,
        overtrain_epochs=overtrain_epochs,
        seed=seed,
        measures=_measures(measures),
        sharpness_eps=sharpness_eps,
        sharpness_method=sharpness_method,
        sharpness_epochs=sharpness_epochs,
        prior_method=prior_method,
        fam_strength=fam_strength,
    )
    prog, update = _epoch_progress(max_epochs)
    with prog:
        rec = run(cfg, progress=update)
    if not history:
        rec.pop("history")
    if json_out:
        print(json.dumps(rec))
        return
    table = Table(title=f"flatprior train  key={rec['key']}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for k, v in rec.items():
        if k in ("config", "versions", "history", "notes"):
            continue
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(table)
    for note in rec["notes"]:
        out.print(f"[yellow]note:[/] {note}")


@app.command()
def demo(
    attack: Annotated[str, typer.Option(help="comma list of attack-set sizes")] = "0,100,200,300",
    seeds: int = 1,
    n_train: int = 400,
    n_test: int = 800,
    measures: Annotated[str, typer.Option(help="comma list of measures, or 'none'")] = "none",
) -> None:
    """Attack-set sweep on scikit-learn's digits (embedded, no download): a table in < 2 min."""
    from flatprior.pipeline import make_config, run

    sizes = [int(a) for a in attack.split(",")]
    rows = []
    prog = Progress(
        TextColumn("[bold]demo"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} runs"),
        TimeElapsedColumn(),
        console=err,
    )
    with prog:
        tid = prog.add_task("demo", total=len(sizes) * seeds)
        for seed in range(seeds):
            for a in sizes:
                cfg = make_config(
                    dataset="digits",
                    n_train=n_train,
                    n_attack=a,
                    n_test=n_test,
                    seed=seed,
                    measures=_measures(measures),
                    sharpness_epochs=20,
                )
                rows.append(run(cfg))
                prog.advance(tid)
    table = Table(title="digits attack-set sweep (FCN 64-40-40-1, SGD)")
    for col in ("|A|", "seed", "epochs", "test error", "sharpness", "log P(f)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["n_attack"]),
            str(r["seed"]),
            str(r["epochs_to_zero_error"]),
            f"{r['test_error']:.3f}",
            f"{r.get('sharpness', float('nan')):.4g}",
            f"{r.get('log_prior', float('nan')):.1f}",
        )
    out.print(table)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    try:
        app(standalone_mode=False)
    except FlatpriorError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
