"""Bad-input matrix: every user mistake gives one FlatpriorError line naming problem and fix.

Two tables:

* ``API_CASES``: calls of the public Python API with a bad file, array, name, number or
  config. Each must raise :class:`FlatpriorError` (not an error from inside numpy/torch) whose
  message is one line and contains the expected words.
* ``CLI_CASES``: ``flatprior`` command lines, run in-process through the real entry point
  :func:`flatprior.cli.main`: exit status != 0, exactly one line on stderr, no traceback. Two of
  them are also run as real subprocesses.

A defect found by this matrix is pinned with ``xfail(strict=True)`` until it is fixed (none is
open now).
"""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flatprior.errors import FlatpriorError

# ---------------------------------------------------------------------------------------------
# small builders of (bad) data files


def idx_bytes(arr: np.ndarray, *, type_code: int = 0x08) -> bytes:
    """IDX encoding of a uint8 array: magic 00 00 <type> <ndim>, big-endian dims, data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.tobytes()


def write_mnist(
    root: Path,
    n: int = 30,
    *,
    images: bytes | None = None,
    labels: bytes | None = None,
    gz: bool = False,
) -> Path:
    """A fake MNIST test split in ``root`` (valid unless ``images``/``labels`` are given)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    if images is None:
        images = idx_bytes(rng.integers(0, 256, (n, 28, 28)))
    if labels is None:
        labels = idx_bytes(rng.integers(0, 10, n))
    for stem, data in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        if gz:
            (root / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / stem).write_bytes(data)
    return root


def cifar_bytes(n: int, *, label: int | None = None, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    rec = rng.integers(0, 256, (n, 3073)).astype(np.uint8)
    rec[:, 0] = rng.choice([1, 3], n) if label is None else label
    return rec.tobytes()


def write_cifar(root: Path, *, test: bytes, train: bytes | None = None) -> Path:
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True, exist_ok=True)
    (d / "test_batch.bin").write_bytes(test)
    if train is not None:
        (d / "data_batch_1.bin").write_bytes(train)
    return root


def tiny_fcn(d: int = 4):
    from flatprior.models import make_model

    return make_model("fcn", (d,), hidden=(5,), seed=0)


def xy(n: int = 10, d: int = 4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), (torch.rand(n, 1, generator=g) > 0.5).float()


def hand_task(x, y):
    from flatprior.data.tasks import Task

    return Task("digits", x, y, x[:0], y[:0], x, y, 0)


BCE = torch.nn.BCEWithLogitsLoss()


# ---------------------------------------------------------------------------------------------
# the API table: (id, call(tmp_path), words the message must contain)


def _mnist(tmp, **kw):
    from flatprior.data import make_task

    return make_task("mnist", 5, 0, 5, data_root=write_mnist(tmp / "m", **kw))


def _cifar(tmp, **kw):
    from flatprior.data import make_task

    return make_task("cifar10", 2, 0, 2, data_root=write_cifar(tmp / "c", **kw))


def _truncated_gz(tmp):
    write_mnist(tmp / "m", gz=True)
    p = tmp / "m" / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    from flatprior.data import make_task

    return make_task("mnist", 5, 0, 5, data_root=tmp / "m")


def _not_gzip(tmp):
    root = write_mnist(tmp / "m")
    (root / "t10k-images-idx3-ubyte").rename(root / "t10k-images-idx3-ubyte.gz")
    from flatprior.data import make_task

    return make_task("mnist", 5, 0, 5, data_root=root)


def _gzip_bomb(tmp):
    from flatprior.data._files import read_bytes

    p = tmp / "bomb.gz"
    p.write_bytes(gzip.compress(b"\0" * 200_000))
    return read_bytes(p, limit=10_000)


def _forged_header(tmp):
    from flatprior.data.mnist import parse_idx

    return parse_idx(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1))


def _checkpoint(tmp, content: bytes | None):
    from flatprior.checkpoint import load_checkpoint

    p = tmp / "model.pt"
    if content is not None:
        p.write_bytes(content)
    return load_checkpoint(p, lambda cfg: tiny_fcn())


def _truncated_checkpoint(tmp):
    from flatprior.checkpoint import save_checkpoint

    p = save_checkpoint(tiny_fcn(), tmp / "model.pt", config={"model": "fcn"})
    return _checkpoint(tmp, p.read_bytes()[:300])


def _checkpoint_wrong_arch(tmp):
    from flatprior.checkpoint import load_checkpoint, save_checkpoint

    p = save_checkpoint(tiny_fcn(4), tmp / "model.pt", config={"d": 4})
    return load_checkpoint(p, lambda cfg: tiny_fcn(7))


def _spec_file(tmp, text: str | None):
    from flatprior.experiments.specs import load_spec

    p = tmp / "my.toml"
    if text is not None:
        p.write_text(text)
    return load_spec(str(p))


def _toml_bytes(tmp, data: bytes, name: str = "latin1.toml") -> Path:
    """A TOML file with the given bytes (e.g. Latin-1 text, which is not UTF-8)."""
    p = tmp / name
    p.write_bytes(data)
    return p


LATIN1_TOML = "# r\xe9sultats de l'\xe9t\xe9\nn_train = 200\n".encode("latin-1")


def two_output_model():
    """A network with two outputs per input (a 2-class softmax head)."""
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))


def indefinite_kernel(n: int = 10, lam_rel: float = -0.038) -> np.ndarray:
    """A symmetric kernel whose smallest eigenvalue is ``lam_rel * max K_ii`` (< 0)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, n))
    k = a @ a.T / n + 0.5 * np.eye(n)
    w, v = np.linalg.eigh(k)
    w[0] = lam_rel * float(np.diag(k).max())
    k = (v * w) @ v.T
    return (k + k.T) / 2


Y10 = np.where(np.arange(10) % 2 == 0, 1, -1)


def _spec_folder(tmp):
    from flatprior.experiments.specs import load_spec

    (tmp / "d.toml").mkdir()
    return load_spec(str(tmp / "d.toml"))


def _store_on_text_file(tmp):
    from flatprior.experiments.store import Store

    p = tmp / "results.db"
    p.write_text("these are my notes, not a database\n" * 100)
    return Store(p)


def _load_boolean_prior(path):
    from flatprior.prior import BooleanPrior

    return BooleanPrior.load(path)


def _boolean_prior_text_file(tmp):
    p = tmp / "prior.npz"
    p.write_text("my notes\n")
    return _load_boolean_prior(p)


def _boolean_prior_truncated(tmp):
    from flatprior.prior import BooleanPrior, sample_boolean_prior

    p = tmp / "prior.npz"
    sample_boolean_prior(200, (7, 4, 1), 1.0, 1.0, 0).save(p)
    p.write_bytes(p.read_bytes()[:100])
    return BooleanPrior.load(p)


def _train(x, y, **cfg):
    from flatprior.train import TrainConfig, train

    d = x.shape[1] if x.dim() > 1 else 1
    return train(tiny_fcn(cfg.pop("d", d)), hand_task(x, y), TrainConfig(max_epochs=2, **cfg))


X, Y = xy()


def _api_cases():
    from flatprior.checkpoint import check_writable_file
    from flatprior.data import make_task
    from flatprior.experiments.specs import load_overrides, load_spec
    from flatprior.flatness import (
        flatness_measures,
        hessian_spectral_norm,
        hessian_top_eigenvalues,
        keskar_sharpness,
    )
    from flatprior.models import alpha_scale, make_model
    from flatprior.pipeline import make_config
    from flatprior.prior import (
        arccos_kernel,
        empirical_kernel,
        log_prior,
        log_prior_ep,
        pac_bayes_bound,
        sample_boolean_prior,
    )
    from flatprior.train import make_optimizer, predict

    m = tiny_fcn()
    c = [
        # --- files ----------------------------------------------------------------------------
        ("mnist-missing", lambda t: make_task("mnist", 5, data_root=t / "nope"), "not found"),
        ("mnist-empty-file", lambda t: _mnist(t, images=b""), "too short"),
        ("mnist-truncated-gz", _truncated_gz, "truncated"),
        ("mnist-not-gzip", _not_gzip, "corrupted"),
        (
            "mnist-wrong-magic",
            lambda t: _mnist(t, images=idx_bytes(np.zeros((30, 28, 28)), type_code=0x0D)),
            "wrong magic",
        ),
        (
            "mnist-wrong-dims",
            lambda t: _mnist(t, images=idx_bytes(np.zeros((30, 27, 27)))),
            "shape [n, 28, 28]",
        ),
        ("mnist-label-12", lambda t: _mnist(t, labels=idx_bytes(np.full(30, 12))), "out of range"),
        (
            "mnist-label-count",
            lambda t: _mnist(t, labels=idx_bytes(np.zeros(29))),
            "do not belong together",
        ),
        (
            "mnist-payload-truncated",
            lambda t: _mnist(t, images=idx_bytes(np.zeros((30, 28, 28)))[:-100]),
            "truncated or corrupted",
        ),
        ("idx-forged-2^96-header", _forged_header, "truncated or corrupted"),
        ("gzip-bomb", _gzip_bomb, "more than 10000 bytes"),
        ("cifar-missing", lambda t: make_task("cifar10", 2, data_root=t), "not found"),
        ("cifar-empty", lambda t: _cifar(t, test=b""), "not a whole number"),
        ("cifar-truncated", lambda t: _cifar(t, test=cifar_bytes(3)[:-7]), "not a whole number"),
        ("cifar-label-11", lambda t: _cifar(t, test=cifar_bytes(3, label=11)), "out of range"),
        ("cifar-no-train", lambda t: _cifar(t, test=cifar_bytes(4)), "no CIFAR-10 training"),
        ("checkpoint-missing", lambda t: _checkpoint(t, None), "not found"),
        ("checkpoint-random-bytes", lambda t: _checkpoint(t, b"\x80\x04junk" * 50), "checkpoint"),
        ("checkpoint-truncated", _truncated_checkpoint, "truncated"),
        ("checkpoint-wrong-arch", _checkpoint_wrong_arch, "does not fit"),
        ("spec-file-missing", lambda t: _spec_file(t, None), "not found"),
        ("spec-file-not-toml", lambda t: _spec_file(t, "name = [unclosed\n"), "not valid TOML"),
        (
            "spec-unknown-run-field",
            lambda t: _spec_file(
                t,
                'name="x"\ntitle="x"\nreproduces="x"\n[base]\nn_trian=5\n'
                "[presets.quick]\n[presets.paper]\n",
            ),
            "n_trian",
        ),
        ("store-on-text-file", _store_on_text_file, "not a flatprior results database"),
        # issue #17: files that are not UTF-8, folders where a file belongs, unwritable outputs
        (
            "spec-file-not-utf8",
            lambda t: load_spec(str(_toml_bytes(t, LATIN1_TOML))),
            "is not UTF-8 text (byte 0xe9",
        ),
        ("spec-file-is-folder", _spec_folder, "is a folder"),
        ("config-file-not-utf8", lambda t: load_overrides(_toml_bytes(t, LATIN1_TOML)),
         "save it as UTF-8"),
        ("config-file-is-folder", lambda t: load_overrides(t), "is a folder"),
        ("save-model-missing-folder", lambda t: check_writable_file(t / "no" / "m.pt"),
         "does not exist"),
        pytest.param(
            "save-model-read-only-folder",
            lambda t: check_writable_file("/sys/m.pt"),
            "cannot write in /sys",
            marks=pytest.mark.skipif(not Path("/sys").is_dir(), reason="no /sys"),
        ),
        pytest.param(
            "boolean-prior-truncated-npz",
            _boolean_prior_truncated,
            "cannot read",
        ),
        # a text file: numpy's own refusal suggested allow_pickle; ours says what the file is not
        ("boolean-prior-text-file", _boolean_prior_text_file, "not an .npz archive"),
        ("boolean-prior-missing", lambda t: _load_boolean_prior(t / "none.npz"), "not found"),
        # --- arrays ---------------------------------------------------------------------------
        ("kernel-nan-input", lambda t: arccos_kernel(torch.tensor([[np.nan, 1.0]])), "NaN/inf"),
        ("kernel-empty-input", lambda t: arccos_kernel(torch.zeros(0, 3)), "n >= 1"),
        pytest.param(
            "kernel-string-input",
            lambda t: arccos_kernel(np.array([["a", "b"]])),
            "numeric",
        ),
        ("ep-K-inf", lambda t: log_prior_ep(np.array([[1, np.inf], [np.inf, 1]]), [1, 0]), "inf"),
        ("ep-K-nonsquare", lambda t: log_prior_ep(np.ones((2, 3)), [1, 0]), "square"),
        (
            "ep-K-strings",
            lambda t: log_prior_ep(np.array([["a", "b"], ["c", "d"]]), [1, 0]),
            "numeric",
        ),
        (
            "ep-K-not-psd",
            lambda t: log_prior_ep(np.array([[1, 2.0], [2.0, 1]]), [1, 0]),
            "semidefinite",
        ),
        ("ep-y-length", lambda t: log_prior_ep(np.eye(3), [1, 0]), "one label per kernel row"),
        ("ep-y-values", lambda t: log_prior_ep(np.eye(2), [2, 0]), "{0, 1}"),
        ("ep-y-nan", lambda t: log_prior_ep(np.eye(2), [np.nan, 0]), "{0, 1}"),
        ("sharpness-nan-inputs", lambda t: keskar_sharpness(m, BCE, X * np.nan, Y), "NaN/inf"),
        ("sharpness-empty-inputs", lambda t: keskar_sharpness(m, BCE, X[:0], Y[:0]), "empty"),
        (
            "sharpness-target-count",
            lambda t: keskar_sharpness(m, BCE, X, Y[:3]),
            "one row per input",
        ),
        ("sharpness-numpy-inputs", lambda t: keskar_sharpness(m, BCE, X.numpy(), Y), "tensors"),
        (
            "sharpness-wrong-features",
            lambda t: keskar_sharpness(m, BCE, torch.randn(10, 5), Y),
            "input",
        ),
        (
            "sharpness-int-inputs",
            lambda t: keskar_sharpness(m, BCE, X.long(), Y),
            "float",
        ),
        (
            "hessian-wrong-features",
            lambda t: hessian_spectral_norm(m, BCE, torch.randn(10, 5), Y),
            "input",
        ),
        ("train-nan-inputs", lambda t: _train(X * np.nan, Y.reshape(-1)), "NaN/inf"),
        ("train-labels-2", lambda t: _train(X, torch.full((10,), 2.0)), "{0, 1}"),
        ("train-label-count", lambda t: _train(X, Y.reshape(-1)[:7]), "one label per input"),
        ("train-int-inputs", lambda t: _train(X.long(), Y.reshape(-1)), "must be float"),
        ("train-wrong-features", lambda t: _train(X, Y.reshape(-1), d=5), "does not accept"),
        ("boolean-target-length", lambda t: make_task("boolean", 10, target="0101"), "128"),
        (
            "boolean-target-callable",
            lambda t: make_task("boolean", 10, target=lambda x: x.sum(1)),
            "{0, 1}",
        ),
        # --- names ----------------------------------------------------------------------------
        ("unknown-dataset", lambda t: make_task("imagenet", 10), "unknown dataset"),
        ("unknown-model", lambda t: make_model("mlp", (4,)), "unknown model"),
        (
            "unknown-optimizer",
            lambda t: make_optimizer("lion", m.parameters()),
            "unknown optimizer",
        ),
        (
            "unknown-flatness-measure",
            lambda t: flatness_measures(m, X, Y, which=("flat",)),
            "unknown flatness measure",
        ),
        (
            "unknown-sharpness-method",
            lambda t: keskar_sharpness(m, BCE, X, Y, method="adam"),
            "unknown sharpness method",
        ),
        (
            "unknown-prior-method",
            lambda t: log_prior(np.eye(2), [1, 0], method="vi"),
            "unknown log-prior method",
        ),
        ("unknown-run-measure", lambda t: make_config(measures=("flatness",)), "unknown measure"),
        # --- numbers --------------------------------------------------------------------------
        ("n_train-negative", lambda t: make_task("digits", -1), "n_train must be >= 0"),
        ("n_train-fraction", lambda t: make_task("digits", 2.5), "whole number"),
        ("n_train-zero", lambda t: make_task("digits", 0), "n_train must be >= 1"),
        ("seed-negative", lambda t: make_task("digits", 10, seed=-1), "seed must be >= 0"),
        ("sizes-larger-than-data", lambda t: make_task("digits", 2000), "only 1797"),
        ("n_test-larger-than-data", lambda t: make_task("digits", 10, n_test=5000), "only 1797"),
        ("eps-zero", lambda t: keskar_sharpness(m, BCE, X, Y, eps=0), "eps must be > 0"),
        ("eps-negative", lambda t: keskar_sharpness(m, BCE, X, Y, eps=-1e-3), "eps must be > 0"),
        ("alpha-zero", lambda t: alpha_scale(m, 0, 0.0), "alpha must be > 0"),
        ("alpha-negative", lambda t: alpha_scale(m, 0, -2.0), "alpha must be > 0"),
        ("alpha-nan", lambda t: alpha_scale(m, 0, float("nan")), "alpha must be finite"),
        ("alpha-layer-out-of-range", lambda t: alpha_scale(m, 5, 2.0), "layer_index"),
        ("lr-zero", lambda t: make_optimizer("sgd", m.parameters(), 0.0), "lr must be > 0"),
        ("lr-nan", lambda t: make_optimizer("sgd", m.parameters(), float("nan")), "finite"),
        ("batch-size-zero", lambda t: _train(X, Y.reshape(-1), batch_size=0), "batch_size"),
        ("hessian-k-zero", lambda t: hessian_top_eigenvalues(m, BCE, X, Y, k=0), "k must be"),
        (
            "hessian-k-too-big",
            lambda t: hessian_top_eigenvalues(m, BCE, X, Y, k=10**6),
            "choose k <=",
        ),
        ("kernel-depth-negative", lambda t: arccos_kernel(X, depth=-1), "depth"),
        ("kernel-sigma_w2-zero", lambda t: arccos_kernel(X, sigma_w2=0), "sigma_w2 must be > 0"),
        ("ep-tol-zero", lambda t: log_prior_ep(np.eye(2), [1, 0], tol=0), "tol must be > 0"),
        ("ep-max_iter-zero", lambda t: log_prior_ep(np.eye(2), [1, 0], max_iter=0), "max_iter"),
        ("pac-bayes-m-1", lambda t: pac_bayes_bound(-5.0, 1, 0.05), "m (training-set size)"),
        ("pac-bayes-delta-2", lambda t: pac_bayes_bound(-5.0, 100, 2.0), "delta"),
        ("pac-bayes-logp-positive", lambda t: pac_bayes_bound(5.0, 100, 0.05), "<= 0"),
        (
            "boolean-prior-n-negative",
            lambda t: sample_boolean_prior(-1, (7, 4, 1), 1.0, 1.0, 0),
            "n_samples",
        ),
        (
            "boolean-prior-width-negative",
            lambda t: sample_boolean_prior(10, (7, -4, 1), 1.0, 1.0, 0),
            "widths",
        ),
        (
            "empirical-kernel-0-draws",
            lambda t: empirical_kernel(lambda s: tiny_fcn(), X, 0),
            "n_draws",
        ),
        ("model-width-zero", lambda t: make_model("resnet18", (3, 32, 32), width=0), "width"),
        # width is the ResNets' base channel count: on an fcn it used to be dropped silently
        ("fcn-width", lambda t: make_model("fcn", (4,), width=20), "for an fcn set hidden"),
        ("cnn-hidden", lambda t: make_model("cnn", (1, 8, 8), hidden=(100,)), "drop hidden"),
        ("model-hidden-negative", lambda t: make_model("fcn", (4,), hidden=(-5,)), "positive"),
        ("cnn-image-too-small", lambda t: make_model("cnn", (1, 2, 2)), "at least 4x4"),
        ("resnet-on-vectors", lambda t: make_model("resnet18", (64,)), "image inputs"),
        # issue #17: one shared PSD check, one line from every log P(f) method
        ("not-psd-ep", lambda t: log_prior(indefinite_kernel(), Y10, method="ep"),
         "min eigenvalue"),
        ("not-psd-exact", lambda t: log_prior(indefinite_kernel(), Y10, method="exact"),
         "min eigenvalue"),
        ("not-psd-tilting", lambda t: log_prior(indefinite_kernel(), Y10, method="tilting"),
         "min eigenvalue"),
        ("not-psd-mc", lambda t: log_prior(indefinite_kernel(), Y10, method="mc"),
         "min eigenvalue"),
        # issue #17: models with several outputs where one logit is needed
        ("predict-two-outputs", lambda t: predict(two_output_model(), X),
         "one logit per input"),
        (
            "flatness-two-outputs",
            lambda t: flatness_measures(two_output_model(), X, Y, which=("spectral_norm",)),
            "returns 2 outputs per input",
        ),
        (
            "sharpness-two-outputs",
            lambda t: keskar_sharpness(two_output_model(), BCE, X, Y, 1e-3, epochs=2),
            "returns 2 outputs per input",
        ),
        # --- configs --------------------------------------------------------------------------
        ("config-unknown-field", lambda t: make_config(n_trian=5), "n_trian: unknown field"),
        ("config-wrong-type", lambda t: make_config(n_train="many"), "n_train"),
        ("config-eps-zero", lambda t: make_config(sharpness_eps=0), "sharpness_eps"),
        ("config-alpha-zero", lambda t: make_config(alpha=0), "alpha"),
        ("config-hidden-negative", lambda t: make_config(hidden=(-3,)), "hidden"),
        ("config-sigma-inf", lambda t: make_config(sigma_w2=float("inf")), "finite"),
        ("config-seed-negative", lambda t: make_config(seed=-1), "seed"),
        ("config-seed-too-large", lambda t: make_config(seed=99999999999999999999),
         "seed: Input should be less than or equal to 4294967295"),
        (
            "config-wrong-literal",
            lambda t: make_config(sharpness_method="adam"),
            "sharpness_method",
        ),
    ]
    return c


API_CASES = _api_cases()


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, call, words", API_CASES, ids=[_case_id(c) for c in API_CASES])
def test_api_bad_input_raises_one_line_flatprior_error(tmp_path, name, call, words):
    with pytest.raises(FlatpriorError) as info:
        call(tmp_path)
    msg = str(info.value)
    assert type(info.value) is FlatpriorError
    assert "\n" not in msg and msg.strip() == msg and msg, msg
    assert words in msg, msg
    assert "Traceback" not in msg


def test_matrix_is_large_enough():
    # the issue asks for >= 30 bad inputs across CLI and API; count only the passing ones
    passing = [c for c in API_CASES if not hasattr(c, "marks") or not c.marks]
    assert len(passing) + len(CLI_CASES) >= 30


# ---------------------------------------------------------------------------------------------
# the CLI table: argv (with {tmp} replaced by a prepared folder), words on the stderr line

CLI_CASES = [
    ("unknown-dataset", ["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    ("unknown-model", ["train", "--model", "mlp"], "unknown model 'mlp'"),
    ("unknown-optimizer", ["train", "--optimizer", "lion"], "unknown optimizer 'lion'"),
    ("unknown-measure", ["train", "--measures", "flatness"], "unknown measure"),
    ("unknown-sharpness-method", ["train", "--sharpness-method", "adam"], "sharpness_method"),
    ("unknown-prior-method", ["train", "--prior-method", "vi"], "prior_method"),
    ("unknown-option", ["train", "--n-trian", "5"], "No such option"),
    ("unknown-command", ["trian"], "No such command"),
    ("n-train-negative", ["train", "--n-train", "-5"], "n_train"),
    ("n-train-not-a-number", ["train", "--n-train", "abc"], "--n-train"),
    ("n-train-larger-than-data", ["train", "--n-train", "5000"], "only 1797"),
    ("n-attack-negative", ["train", "--n-attack", "-1"], "n_attack"),
    ("eps-zero", ["train", "--sharpness-eps", "0"], "sharpness_eps"),
    ("eps-negative", ["train", "--sharpness-eps", "-1e-4"], "sharpness_eps"),
    ("lr-zero", ["train", "--lr", "0"], "lr"),
    ("lr-nan", ["train", "--lr", "nan"], "lr"),
    ("batch-size-zero", ["train", "--batch-size", "0"], "batch_size"),
    ("max-epochs-zero", ["train", "--max-epochs", "0"], "max_epochs"),
    ("seed-negative", ["train", "--seed", "-3"], "seed"),
    ("fcn-width", ["run", "fig3", "--set", "width=20", "--dry-run"], "for an fcn set hidden"),
    ("cnn-hidden", ["run", "fig3", "--set", "model=cnn", "--set", "hidden=[100]", "--dry-run"],
     "drop hidden"),
    ("memory-budget-overflow", ["run", "fig2-boolean", "--memory-budget", "1e400GB", "--dry-run"],
     "too large"),
    ("mnist-missing", ["train", "--dataset", "mnist", "--data-root", "{tmp}/none"], "not found"),
    (
        "mnist-wrong-magic",
        ["train", "--dataset", "mnist", "--data-root", "{tmp}/badmagic"],
        "wrong magic",
    ),
    (
        "mnist-wrong-dims",
        ["train", "--dataset", "mnist", "--data-root", "{tmp}/baddims"],
        "[n, 28, 28]",
    ),
    (
        "cifar-truncated",
        ["train", "--dataset", "cifar10", "--data-root", "{tmp}/badcifar"],
        "not a whole number",
    ),
    ("unknown-spec", ["run", "fig99", "--dry-run"], "unknown spec 'fig99'"),
    ("unknown-spec-list", ["list", "fig99"], "unknown spec 'fig99'"),
    ("unknown-preset", ["run", "fig3", "--preset", "huge", "--dry-run"], "unknown preset"),
    ("unknown-variant", ["run", "fig3", "nosuch", "--dry-run"], "has no variant 'nosuch'"),
    ("override-unknown-field", ["run", "fig3", "--set", "n_trian=5", "--dry-run"], "n_trian"),
    ("override-wrong-type", ["run", "fig3", "--set", "n_train=abc", "--dry-run"], "n_train"),
    (
        "override-eps-zero",
        ["run", "fig3", "--set", "sharpness_eps=0", "--dry-run"],
        "sharpness_eps",
    ),
    ("override-empty-sweep", ["run", "fig3", "--set", "seed=[]", "--dry-run"], "empty list"),
    ("spec-file-not-toml", ["run", "{tmp}/bad.toml", "--dry-run"], "not valid TOML"),
    (
        "config-file-missing",
        ["run", "fig3", "--config", "{tmp}/none.toml", "--dry-run"],
        "not found",
    ),
    ("report-not-a-database", ["report", "{tmp}/notes.db"], "not a flatprior results database"),
    ("report-missing-database", ["report", "{tmp}/none.db"], "no results database"),
    # issue #17
    ("seed-too-large", ["train", "--seed", "99999999999999999999"], "less than or equal"),
    (
        "override-seed-too-large",
        ["run", "fig3", "--set", "seed=99999999999999999999", "--dry-run"],
        "less than or equal",
    ),
    ("config-not-utf8", ["run", "fig3", "--config", "{tmp}/latin1.toml", "--dry-run"],
     "not UTF-8"),
    ("config-is-folder", ["run", "fig3", "--config", "{tmp}", "--dry-run"], "is a folder"),
    ("spec-file-not-utf8", ["run", "{tmp}/latin1.toml", "--dry-run"], "not UTF-8"),
    ("save-model-missing-folder", ["train", "--save-model", "{tmp}/none/m.pt"],
     "does not exist"),
    ("save-model-is-folder", ["train", "--save-model", "{tmp}"], "is a folder"),
    ("download-unknown-dataset", ["download", "imagenet"], "unknown dataset to download"),
    ("download-bad-parts", ["download", "mnist", "--parts", "val"], "unknown --parts entry"),
]


@pytest.fixture
def bad_roots(tmp_path):
    write_mnist(tmp_path / "badmagic", images=idx_bytes(np.zeros((30, 28, 28)), type_code=0x0B))
    write_mnist(tmp_path / "baddims", images=idx_bytes(np.zeros((30, 28, 27))))
    write_cifar(tmp_path / "badcifar", test=cifar_bytes(2)[:-1], train=cifar_bytes(2))
    (tmp_path / "bad.toml").write_text("name = [unclosed\n")
    (tmp_path / "notes.db").write_text("my notes, not a database\n" * 50)
    (tmp_path / "latin1.toml").write_bytes(LATIN1_TOML)
    return tmp_path


def _argv(args, tmp):
    return [a.replace("{tmp}", str(tmp)) for a in args]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, args, words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_one_line_on_stderr(monkeypatch, capsys, bad_roots, name, args, words):
    from flatprior import cli

    monkeypatch.setattr(sys, "argv", ["flatprior", *_argv(args, bad_roots)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    captured = capsys.readouterr()
    assert info.value.code not in (0, None)
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and words in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "--n-train", "abc"], "--n-train"),  # was a rich traceback (typer._click)
        (["train", "--dataset", "mnist", "--data-root", "{tmp}/baddims"], "[n, 28, 28]"),
        (["train", "--seed", "99999999999999999999"], "less than or equal"),  # was torch's
        (["run", "fig3", "--config", "{tmp}/latin1.toml", "--dry-run"], "not UTF-8"),
    ],
    ids=["usage-error", "bad-file", "seed-overflow", "config-not-utf8"],
)
def test_cli_bad_input_real_process(bad_roots, args, words):
    p = subprocess.run(
        [sys.executable, "-m", "flatprior.cli", *_argv(args, bad_roots)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert words in lines[0]


def test_cli_error_with_markup_like_text_is_printed_verbatim(monkeypatch, capsys):
    """Messages containing '[n, 28, 28]' or '[/]' must not be eaten (or crash) as rich markup."""
    from flatprior import cli

    def boom(*a, **k):
        raise FlatpriorError("shape [n, 28, 28] in /tmp/[/]x [bold]")

    monkeypatch.setattr("flatprior.pipeline.make_config", boom)
    monkeypatch.setattr(sys, "argv", ["flatprior", "train"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: shape [n, 28, 28] in /tmp/[/]x [bold]"
