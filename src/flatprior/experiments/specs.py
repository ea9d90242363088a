"""Experiment specs: one validated description per paper figure, shipped as TOML files.

A spec names what it reproduces, a ``base`` run configuration (fields of
:class:`flatprior.config.RunConfig`), a ``sweep`` (a grid: field -> list of values), presets
(``quick`` for a laptop CPU, ``paper`` for the study's sizes) that override base and sweep, and
optional variants (e.g. ``fig3``: ``mnist-fcn``, ``cifar-fcn``, ``cifar-resnet``). Layers are
applied in the order

    spec.base/sweep < variant.base/sweep < preset < variant's preset < user overrides

and every point of the grid is validated as a ``RunConfig`` before anything runs.

Sweep axes are lists, or ``{range = [start, stop]}`` / ``{range = [start, stop, step]}``.
User overrides (``--set field=value`` or a TOML file): a scalar fixes a field (and removes it
from the sweep); a list for a scalar field (``--set seed=[0,1,2]``) makes it a sweep axis; for
tuple fields (``hidden``, ``measures``) a list is the value and a list of lists a sweep.
"""

from __future__ import annotations

import difflib
import itertools
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flatprior.errors import FlatpriorError

PRESETS = ("quick", "paper")
ANALYSES = ("attack", "epochs", "boolean", "psgd")


MAX_RUNS = 1_000_000  # grid-size cap: beyond it a sweep is a typo, not an experiment


def _expand_axis(name: str, v: Any) -> list[Any]:
    if isinstance(v, dict):
        if set(v) != {"range"} or not 2 <= len(v["range"]) <= 3:
            raise ValueError(f"sweep axis {name}: use a list or {{range = [start, stop, step]}}")
        try:
            r = range(*[int(a) for a in v["range"]])
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"sweep axis {name}: range needs integers [start, stop, step], got {v['range']!r}"
            ) from None
        # size first: list(range(0, 10**9)) would exhaust memory before any check
        if len(r) == 0:
            raise ValueError(
                f"sweep axis {name}: range {v['range']!r} is empty (stop must exceed start)"
            )
        if len(r) > MAX_RUNS:
            raise ValueError(
                f"sweep axis {name}: range {v['range']!r} has {len(r)} values, more than the "
                f"{MAX_RUNS} runs a sweep may have; narrow the range"
            )
        return list(r)
    if not isinstance(v, list) or not v:
        raise ValueError(f"sweep axis {name} must be a non-empty list, got {v!r}")
    return list(v)


#: sweep axes longer than this are shown in the spec's range form (``flatprior list``, dry runs)
_SHOW_AS_RANGE_FROM = 21


def sweep_for_display(sweep: dict[str, list[Any]]) -> dict[str, Any]:
    """``sweep`` with each long run of evenly spaced integers in the spec's own range form.

    ``seed = [0, 1, ..., 99999]`` becomes ``{"range": [0, 100000]}`` (``[start, stop, step]``
    when the step is not 1), exactly what a spec file may write, so printing a 1e5-run sweep
    takes one line instead of 100 000 numbers; short or irregular axes are kept as lists.
    """
    out: dict[str, Any] = {}
    for name, values in sweep.items():
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        step = values[1] - values[0] if ints and len(values) >= _SHOW_AS_RANGE_FROM else 0
        if step and all(b - a == step for a, b in zip(values, values[1:], strict=False)):
            stop = values[-1] + step
            out[name] = {"range": [values[0], stop] if step == 1 else [values[0], stop, step]}
        else:
            out[name] = values
    return out


def _unknown_field_hint(name: str, value: Any = None) -> str:
    """What to write instead of an unknown run field: its new name if renamed, or a close one."""
    from flatprior.config import RunConfig
    from flatprior.errors import RENAMED_PARAMETERS, renamed_message

    if name in RENAMED_PARAMETERS:
        return f" ({renamed_message(name, value)})"
    close = difflib.get_close_matches(name, list(RunConfig.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_fields(where: str, fields: dict) -> None:
    from flatprior.config import RunConfig

    for n, v in fields.items():
        if n not in RunConfig.model_fields:
            raise ValueError(f"{where}: unknown run field {n!r}{_unknown_field_hint(n, v)}")


class _Layer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    base: dict[str, Any] = {}
    sweep: dict[str, Any] = {}

    @field_validator("sweep")
    @classmethod
    def _axes(cls, v):
        return {k: _expand_axis(k, a) for k, a in v.items()}

    @model_validator(mode="after")
    def _fields(self):
        _check_fields("base", self.base)
        _check_fields("sweep", self.sweep)
        return self


class PresetSpec(_Layer):
    """Overrides of one preset (``quick`` or ``paper``).

    ``prior_samples``: Boolean specs: random networks the report samples for P(f) by default
    (``flatprior report --boolean-samples`` overrides it).
    """

    prior_samples: int | None = Field(default=None, ge=0)


class VariantSpec(_Layer):
    """A variant of a spec (e.g. the network/data system) with its own preset overrides."""

    needs: str | None = None
    presets: dict[str, PresetSpec] = {}

    @field_validator("presets")
    @classmethod
    def _known_presets(cls, v):
        bad = set(v) - set(PRESETS)
        if bad:
            raise ValueError(f"unknown preset(s) {sorted(bad)}; presets are {list(PRESETS)}")
        return v


class ExperimentSpec(_Layer):
    """A named, validated experiment (see the module docstring for the layering).

    Attributes:
        name: what ``flatprior run NAME`` takes.
        title: one line for ``flatprior list``.
        reproduces: the paper figure(s).
        analysis: ``attack`` (measure vs generalization error over the attack-set sweep),
            ``epochs`` (per-epoch curves), ``boolean`` (per-function flatness vs log P(f)),
            ``psgd`` (how often SGD finds each function vs its Bayesian posterior P_B(f | S)).
        needs: what must be present to run it (data files), shown by ``flatprior list``.
        group_by: run fields the correlations are split by (besides those that vary).
        boolean_top: ``boolean`` analysis: how many of the most frequent functions to keep.
        ensemble: the spec's default for ``flatprior run --ensemble``: ``auto`` (train
            compatible runs together as ensembles) for the Boolean specs, whose 1e5 batch-1
            runs need it and whose runs agree with the per-run path; ``off`` (one task per run)
            elsewhere, where long float32 training can amplify the rounding difference of
            batched matmuls until a run stops at another epoch.
    """

    name: str
    title: str
    reproduces: str
    analysis: Literal["attack", "epochs", "boolean", "psgd"] = "attack"
    needs: str | None = None
    group_by: list[str] = ["optimizer"]
    boolean_top: int = 1000
    ensemble: Literal["auto", "off"] = "off"
    presets: dict[str, PresetSpec]
    variants: dict[str, VariantSpec] = {}

    @field_validator("presets")
    @classmethod
    def _both_presets(cls, v):
        if set(v) != set(PRESETS):
            raise ValueError(f"a spec needs exactly the presets {list(PRESETS)}, got {sorted(v)}")
        return v


@dataclass
class Resolved:
    """A spec resolved to concrete run configurations."""

    spec: ExperimentSpec
    variant: str | None
    preset: str
    base: dict[str, Any]
    sweep: dict[str, list[Any]]
    configs: list = field(default_factory=list)  # list[RunConfig]
    needs: str | None = None

    @property
    def n_runs(self) -> int:
        """Number of grid points (``len(configs)`` once built)."""
        return math.prod(len(v) for v in self.sweep.values())

    @property
    def label(self) -> str:
        """Name under which the runs are grouped in a store, e.g. ``fig3/mnist-fcn@quick``."""
        v = f"/{self.variant}" if self.variant else ""
        return f"{self.spec.name}{v}@{self.preset}"

    def sharpness_settings(self, with_eps: bool = True) -> str:
        """How this preset measures sharpness, e.g. ``eps 0.0001, ascent 100 ep + L-BFGS-B``."""
        from flatprior.config import RunConfig

        def get(name):
            if name in self.base:
                return self.base[name]
            if name in self.sweep:
                return self.sweep[name][0]
            return RunConfig.model_fields[name].default

        measures = set(get("measures")) | (set(get("epoch_measures")) if get("measure_every")
                                           else set())
        parts = []
        if "sharpness" in measures:
            parts.append(f"ascent {get('sharpness_epochs')} ep" if get("sharpness_method") == "sgd"
                         else "L-BFGS-B")
        if "sharpness_lbfgsb" in measures:
            parts.append("L-BFGS-B")
        if not parts:
            return "-"
        text = " + ".join(dict.fromkeys(parts))
        return f"eps {get('sharpness_eps'):g}, {text}" if with_eps else text

    def info(self) -> dict[str, Any]:
        """JSON-able description stored alongside the runs (for the report)."""
        return {
            "label": self.label,
            "name": self.spec.name,
            "variant": self.variant,
            "preset": self.preset,
            "title": self.spec.title,
            "reproduces": self.spec.reproduces,
            "description": self.spec.description,
            "analysis": self.spec.analysis,
            "group_by": list(self.spec.group_by),
            "boolean_top": self.spec.boolean_top,
            "prior_samples": self.spec.presets[self.preset].prior_samples,
            "needs": self.needs,
            "base": self.base,
            "sweep": self.sweep,
            "n_runs": len(self.configs),
        }


# -- loading --------------------------------------------------------------------------------------
def _spec_dir():
    return resources.files("flatprior.experiments").joinpath("specs")


def _parse_spec(text: str, where: str) -> ExperimentSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FlatpriorError(f"{where}: not valid TOML ({exc})") from None
    try:
        return ExperimentSpec(**data)
    except ValidationError as exc:
        raise FlatpriorError(f"{where}: invalid spec: {_short(exc)}") from None


def _short(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "spec"
        parts.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def list_specs() -> dict[str, ExperimentSpec]:
    """All specs shipped with the package, by name (sorted by file name)."""
    out = {}
    for f in sorted(_spec_dir().iterdir(), key=lambda p: p.name):
        if f.name.endswith(".toml"):
            s = _parse_spec(f.read_text(encoding="utf-8"), f"spec file {f.name}")
            out[s.name] = s
    return out


def _read_toml_text(p: Path, what: str) -> str:
    """The text of a user's TOML file.

    One line naming the fix if it is missing, a folder, unreadable or not UTF-8 (TOML files
    are UTF-8 by definition).
    """
    if p.is_dir():
        raise FlatpriorError(f"{what} {p} is a folder; give a .toml file")
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FlatpriorError(f"{what} {p} not found") from None
    except UnicodeDecodeError as exc:
        raise FlatpriorError(
            f"{what} {p} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise FlatpriorError(f"cannot read {what} {p} ({exc.strerror}); check it") from None


def load_spec(name: str) -> ExperimentSpec:
    """A shipped spec by name, or a spec TOML file by path (``something.toml``)."""
    if name.endswith(".toml"):
        p = Path(name).expanduser()
        return _parse_spec(_read_toml_text(p, "spec file"), f"spec file {p}")
    specs = list_specs()
    if name not in specs:
        close = difflib.get_close_matches(name, list(specs), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FlatpriorError(
            f"unknown spec {name!r}{hint}; `flatprior list` shows them: {', '.join(specs)}"
        )
    return specs[name]


# -- overrides ------------------------------------------------------------------------------------
def _tuple_field(name: str) -> bool:
    from flatprior.config import RunConfig

    ann = RunConfig.model_fields[name].annotation
    return getattr(ann, "__origin__", None) is tuple


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax (``200``, ``1e-3``, ``true``, ``[0, 1]``), else a string.

    A sweep's range form ``{range = [0, 1000]}`` parses to a table (swept by the resolver).
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["n_train=200", "optimizer=adam"]`` -> ``{"n_train": 200, "optimizer": "adam"}``."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise FlatpriorError(f"--set {item!r}: use --set FIELD=VALUE, e.g. --set n_train=200")
        out[name] = parse_value(value.strip())
    return out


def load_overrides(path: str | Path) -> dict[str, Any]:
    """Overrides from a TOML file: top-level ``field = value`` and an optional ``[sweep]``."""
    p = Path(path).expanduser()
    try:
        data = tomllib.loads(_read_toml_text(p, "--config file"))
    except tomllib.TOMLDecodeError as exc:
        raise FlatpriorError(f"--config {p}: not valid TOML ({exc})") from None
    sweep = data.pop("sweep", {})
    if not isinstance(sweep, dict):
        raise FlatpriorError(f"--config {p}: 'sweep' must be a table of field = [values]")
    for k, v in sweep.items():
        data[k] = {"__sweep__": v}
    return data


def _apply_override(base: dict, sweep: dict, name: str, value: Any) -> None:
    from flatprior.config import RunConfig

    if name not in RunConfig.model_fields:
        raise FlatpriorError(
            f"override {name}: unknown run field{_unknown_field_hint(name, value)}; valid fields: "
            f"{', '.join(RunConfig.model_fields)}"
        )
    if isinstance(value, dict) and "range" in value:  # --set 'seed={range=[0, 1000]}'
        value = {"__sweep__": value}
    if isinstance(value, dict) and "__sweep__" in value:
        try:
            sweep[name] = _expand_axis(name, value["__sweep__"])
        except ValueError as exc:
            raise FlatpriorError(f"override {exc}") from None
        base.pop(name, None)
        return
    tup = _tuple_field(name)
    if tup and isinstance(value, str):
        value = [] if value in ("none", "") else [s.strip() for s in value.split(",") if s.strip()]
    is_axis = isinstance(value, list) and (
        not tup or (bool(value) and all(isinstance(v, list) for v in value))
    )
    if is_axis:
        if not value:
            raise FlatpriorError(f"override {name}: an empty list gives no runs")
        sweep[name] = list(value)
        base.pop(name, None)
    else:
        base[name] = value
        sweep.pop(name, None)


# -- resolution -----------------------------------------------------------------------------------
def _validated_axis(proto, base: dict, first: dict, name: str, values: list) -> list:
    """The values of one sweep axis as validated by RunConfig (each value checked once)."""
    from pydantic import TypeAdapter

    from flatprior.config import RunConfig, make_config

    has_validator = any(
        name in d.info.fields or "*" in d.info.fields
        for d in RunConfig.__pydantic_decorators__.field_validators.values()
    )
    if has_validator or len(values) < 50:
        return [getattr(make_config(**base, **{**first, name: v}), name) for v in values]
    # long plain axes (e.g. 100 000 seeds): check type and bounds with one TypeAdapter
    from typing import Annotated

    finfo = RunConfig.model_fields[name]
    ta = TypeAdapter(list[Annotated[finfo.annotation, *finfo.metadata]])
    try:
        return ta.validate_python(list(values))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise FlatpriorError(f"invalid run config: {name}: {err['msg']}") from None


def resolve(
    spec: ExperimentSpec | str,
    preset: str = "quick",
    variant: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    build: bool = True,
) -> Resolved:
    """Resolve a spec + preset + variant + overrides into validated :class:`RunConfig` s.

    With ``build=False`` only ``base`` and ``sweep`` are filled (no validation of the grid).

    Raises:
        FlatpriorError: unknown preset/variant, unknown field, wrong type or out-of-range value
            (one line, naming the field).
    """
    from flatprior.config import RunConfig, make_config

    if isinstance(spec, str):
        spec = load_spec(spec)
    if preset not in PRESETS:
        raise FlatpriorError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if spec.variants:
        if variant is None:
            variant = next(iter(spec.variants))
        if variant not in spec.variants:
            raise FlatpriorError(
                f"spec {spec.name} has no variant {variant!r}; choose one of "
                f"{', '.join(spec.variants)}"
            )
    elif variant is not None:
        raise FlatpriorError(f"spec {spec.name} has no variants (got {variant!r})")
    layers: list[_Layer] = [spec]
    needs = spec.needs
    if variant is not None:
        v = spec.variants[variant]
        layers.append(v)
        needs = v.needs or needs
    layers.append(spec.presets[preset])
    if variant is not None and preset in spec.variants[variant].presets:
        layers.append(spec.variants[variant].presets[preset])
    base: dict[str, Any] = {}
    sweep: dict[str, list[Any]] = {}
    for layer in layers:
        for k, val in layer.base.items():
            base[k] = val
            sweep.pop(k, None)
        for k, axis in layer.sweep.items():
            sweep[k] = axis
            base.pop(k, None)
    for k, val in (overrides or {}).items():
        _apply_override(base, sweep, k, val)
    if not build:  # only the layering (e.g. to count runs for `flatprior list`)
        return Resolved(spec, variant, preset, base, sweep, [], needs)
    names = list(sweep)
    for n in names:
        if not sweep[n]:
            raise FlatpriorError(f"spec {spec.name}: sweep axis {n} is empty; give it values")
    n_runs = math.prod(len(sweep[n]) for n in names)
    if n_runs > MAX_RUNS:
        sizes = " x ".join(f"{n}={len(sweep[n])}" for n in names)
        raise FlatpriorError(
            f"spec {spec.name}: the sweep has {n_runs} runs ({sizes}), more than {MAX_RUNS}; "
            "shrink the sweep axes"
        )
    first = {n: sweep[n][0] for n in names}
    proto = make_config(**base, **first)
    if RunConfig.__pydantic_decorators__.model_validators:
        # cross-field rules: validate every grid point
        configs = [
            make_config(**base, **dict(zip(names, combo, strict=True)))
            for combo in itertools.product(*(sweep[n] for n in names))
        ]
    else:
        # fields are validated independently: validate each axis value once, then combine
        # (a 100 000-run grid resolves in a fraction of a second)
        axes = [_validated_axis(proto, base, first, n, sweep[n]) for n in names]
        configs = [
            proto.model_copy(update=dict(zip(names, combo, strict=True)))
            for combo in itertools.product(*axes)
        ]
    keys = [c.key() for c in configs]
    if len(set(keys)) < len(keys):
        raise FlatpriorError(f"spec {spec.name}: the sweep repeats a configuration")
    return Resolved(spec, variant, preset, base, sweep, configs, needs)
