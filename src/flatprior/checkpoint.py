"""Model checkpoints that cannot execute code: weights-only torch files, written atomically.

A checkpoint is one file written by ``torch.save`` holding only plain containers, strings and
tensors::

    {"format": "flatprior-checkpoint", "version": 1,
     "metadata": "<JSON text: config, library versions, parameter shapes>",
     "state_dict": {name: tensor, ...}}

and is read back with ``torch.load(..., weights_only=True)``, whose restricted unpickler refuses
any other object, so a forged file (e.g. a pickle whose ``__reduce__`` runs a command) raises
:class:`~flatprior.errors.FlatpriorError` instead of executing anything. The metadata is stored
as JSON text rather than as Python objects for the same reason.

Writing goes to a temporary file in the destination folder, is flushed and fsync'ed, and only
then renamed over the destination with ``os.replace`` (atomic on POSIX), so a crash or a full
disk leaves either the old checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatprior._versions import versions
from flatprior.errors import FlatpriorError, check_finite_tensor

FORMAT = "flatprior-checkpoint"
VERSION = 1

__all__ = ["load_checkpoint", "read_checkpoint_metadata", "safe_output_path", "save_checkpoint"]


def safe_output_path(out_dir: str | os.PathLike, name: str | os.PathLike) -> Path:
    """``out_dir / name``, refusing any ``name`` that would write outside ``out_dir``.

    Rejects absolute paths, ``..`` components, and symlinks (in ``out_dir`` or below) that
    resolve to a place outside ``out_dir``. Use it for every file name that comes from a
    config, a spec or a record before writing.

    Raises:
        FlatpriorError: the resolved path is not inside ``out_dir``.
    """
    root = Path(out_dir).expanduser()
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or str(name).strip() in ("", "."):
        raise FlatpriorError(
            f"output name {str(name)!r} must be a relative path inside {root} (no '..', not "
            "absolute); give a plain file name"
        )
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise FlatpriorError(
            f"output name {str(name)!r} resolves to {target}, outside {root.resolve()} "
            "(a symlink?); give a plain file name"
        )
    return target


def check_writable_file(path: str | os.PathLike, what: str = "--save-model") -> Path:
    """Fail now, before any work, if a file cannot be created at ``path``.

    The folder must exist and take a new file: a temporary file is created and removed there
    (``os.access`` says yes to root on a read-only mount; creating a file is the real test).

    Raises:
        FlatpriorError: missing folder, ``path`` is a folder, or the folder refuses new files.
    """
    dest = Path(path).expanduser()
    if dest.is_dir():
        raise FlatpriorError(f"{what} {dest} is a folder; give a file name like model.pt")
    if not dest.parent.is_dir():
        raise FlatpriorError(
            f"{what} {dest}: folder {dest.parent} does not exist; create it or choose another path"
        )
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".flatprior-check-")
        os.close(fd)
        os.remove(tmp)
    except OSError as exc:
        raise FlatpriorError(
            f"{what} {dest}: cannot write in {dest.parent} ({exc.strerror}); make it writable or "
            "choose another path"
        ) from None
    return dest


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    config: dict[str, Any],
    out_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``model.state_dict()`` and JSON metadata to ``path`` atomically.

    Args:
        model: the network; every parameter and buffer must be finite.
        path: destination file (conventionally ``*.pt``). With ``out_dir`` it is taken
            relative to ``out_dir`` and must stay inside it (:func:`safe_output_path`).
        config: JSON-serialisable description from which ``build_model`` (see
            :func:`load_checkpoint`) can rebuild the architecture, e.g. a run config dict.
        out_dir: optional folder the checkpoint must be written into.

    Returns:
        The path written.

    Raises:
        FlatpriorError: non-finite weights, a config that is not JSON, a path outside
            ``out_dir``, a missing folder, or an OS error while writing (disk full, read-only
            folder); in every case an existing checkpoint at ``path`` is left untouched.
    """
    if not isinstance(model, nn.Module):
        raise FlatpriorError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, dict):
        raise FlatpriorError(f"config must be a dict (e.g. a run config), got {type(config)}")
    dest = safe_output_path(out_dir, path) if out_dir is not None else Path(path).expanduser()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for name, t in state.items():
        if t.is_floating_point():
            check_finite_tensor(f"model weight {name!r}", t)
    try:
        meta = json.dumps(
            {
                "config": config,
                "model_class": type(model).__qualname__,
                "shapes": {k: list(v.shape) for k, v in state.items()},
                "versions": versions(),
            },
            default=_json_default,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise FlatpriorError(f"checkpoint config is not JSON-serialisable ({exc})") from None
    payload = {"format": FORMAT, "version": VERSION, "metadata": meta, "state_dict": state}
    folder = dest.parent
    if not folder.is_dir():
        raise FlatpriorError(f"cannot write checkpoint {dest}: folder {folder} does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{dest.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        tmp = None
    except OSError as exc:
        raise FlatpriorError(
            f"cannot write checkpoint {dest} ({exc.strerror or exc}); free disk space or choose a "
            "writable folder"
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _read(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FlatpriorError(f"checkpoint {p} not found; check the path")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise on junk
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "refused"
        raise FlatpriorError(
            f"{p} is not a flatprior checkpoint: it holds objects other than tensors, which are "
            f"never unpickled ({first[:120]}); use a file written by save_checkpoint"
        ) from None
    except Exception as exc:  # noqa: BLE001
        # the restricted unpickler reports malformed input with whatever it hits (KeyError,
        # IndexError, struct.error, RuntimeError, BadZipFile, ...); none of it executed code
        if isinstance(exc, MemoryError):
            raise
        msg = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise FlatpriorError(
            f"cannot read checkpoint {p} ({msg}); the file is truncated or not a checkpoint"
        ) from None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != FORMAT
        or not isinstance(payload.get("state_dict"), dict)
        or not isinstance(payload.get("metadata"), str)
    ):
        raise FlatpriorError(f"{p} is not a flatprior checkpoint; use a file from save_checkpoint")
    if payload.get("version") != VERSION:
        raise FlatpriorError(
            f"{p} is checkpoint format version {payload.get('version')!r}; this flatprior reads "
            f"version {VERSION}"
        )
    try:
        meta = json.loads(payload["metadata"])
    except ValueError:
        raise FlatpriorError(f"{p}: checkpoint metadata is not JSON; file corrupted") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise FlatpriorError(f"{p}: checkpoint metadata has no config; file corrupted")
    payload["metadata"] = meta
    return payload


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint: ``config``, ``model_class``, ``shapes``, ``versions``."""
    return _read(path)["metadata"]


def load_checkpoint(
    path: str | os.PathLike, build_model: Callable[[dict[str, Any]], nn.Module]
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint written by :func:`save_checkpoint`.

    The file is read with ``torch.load(..., weights_only=True)`` (no arbitrary unpickling).

    Args:
        path: the checkpoint file.
        build_model: ``config -> nn.Module`` building the (freshly initialised) architecture
            from the stored config, e.g. ``lambda c: make_model(c["model"], shape, ...)``.

    Returns:
        ``(model, metadata)``: the model in eval mode with the stored weights (strict match of
        names and shapes), and the metadata dict.

    Raises:
        FlatpriorError: missing, truncated or forged file; a pickle with non-tensor objects;
            weights that do not fit the rebuilt architecture; NaN/inf weights.
    """
    payload = _read(path)
    meta, state = payload["metadata"], payload["state_dict"]
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise FlatpriorError(f"{path}: state_dict entry {name!r} is not a tensor; corrupted")
        if t.is_floating_point():
            check_finite_tensor(f"checkpoint weight {name!r}", t)
    model = build_model(meta["config"])
    if not isinstance(model, nn.Module):
        raise FlatpriorError("build_model must return a torch.nn.Module")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or wrong:
        detail = "; ".join(
            s
            for s in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {extra[:3]}" if extra else "",
                f"shape mismatch {wrong[:3]}" if wrong else "",
            )
            if s
        )
        raise FlatpriorError(
            f"checkpoint {path} does not fit the rebuilt model ({detail}); build the "
            "architecture from the checkpoint's own config"
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, meta
