import json
import subprocess
import sys

import pytest

FLATPRIOR = [sys.executable, "-m", "flatprior.cli"]


def run_cli(*args):
    return subprocess.run([*FLATPRIOR, *args], capture_output=True, text=True, timeout=300)


def test_train_json_record_on_real_mnist(mnist_root):
    p = run_cli(
        "train",
        "--dataset",
        "mnist",
        "--data-root",
        str(mnist_root),
        "--n-train",
        "200",
        "--n-attack",
        "20",
        "--n-test",
        "300",
        "--optimizer",
        "adam",
        "--seed",
        "1",
        "--measures",
        "none",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    for k in (
        "seed",
        "dataset",
        "n_train",
        "n_attack",
        "n_test",
        "optimizer",
        "epochs_to_zero_error",
        "train_error",
        "test_error",
        "wall_time_s",
        "key",
    ):
        assert k in rec
    assert rec["train_error"] == 0.0 and rec["n_attack"] == 20 and rec["optimizer"] == "adam"
    assert rec["config"]["dataset"] == "mnist" and rec["versions"]["torch"].startswith("2.")


@pytest.mark.parametrize(
    "args, match",
    [
        (["train", "--dataset", "mnistt"], "unknown dataset 'mnistt'"),
        (["train", "--optimizer", "lion"], "unknown optimizer 'lion'"),
        (["train", "--n-train", "-5"], "n_train"),
        (["train", "--n-train", "1500", "--n-attack", "300", "--n-test", "100"],
         "largest possible n_attack is 197"),
        (["train", "--dataset", "mnist", "--data-root", "/nonexistent"], "MNIST files not found"),
        (["train", "--measures", "flatness"], "unknown measure"),
    ],
)
def test_cli_bad_input_one_line_exit_2(args, match):
    p = run_cli(*args)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert match in lines[0]


def test_train_saves_a_weights_only_checkpoint(tmp_path):
    import torch

    from flatprior.checkpoint import load_checkpoint
    from flatprior.models import make_model

    path = tmp_path / "net.pt"
    p = run_cli("train", "--n-train", "60", "--n-test", "60", "--measures", "none", "--json",
                "--save-model", str(path))
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    model, meta = load_checkpoint(path, lambda cfg: make_model(cfg["model"], (1, 8, 8)))
    assert rec["model_path"] == str(path)
    from flatprior.pipeline import build_task, make_config

    task = build_task(make_config(**rec["config"]))
    pred = (model(task.x_train).reshape(-1) > 0).float()
    assert torch.equal(pred, task.y_train)  # the saved network is the one that fits S
