"""Suite files (YAML) -> a validated :class:`Suite` -> the grid of :class:`Case` records.

Everything a run needs is checked here, before anything runs: unknown keys, wrong types, unknown
implementations, parameters an implementation does not take, shapes no implementation can take.
Each problem is a :class:`SuiteError` naming the file and the key path.
"""

from __future__ import annotations

import difflib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from . import registry
from .errors import AttnbenchError, ParamError, SuiteError, UnknownImplError
from .schema import DEVICE_PATTERN, DTYPE_BYTES, MODES, cell_id


def _as_list(v: Any) -> Any:
    return v if isinstance(v, list) else [v]


def _listof(t: Any) -> Any:
    return Annotated[list[t], BeforeValidator(_as_list), Field(min_length=1)]


PosInt = Annotated[int, Field(gt=0)]
DtypeName = Literal[("auto",) + tuple(DTYPE_BYTES)]  # type: ignore[valid-type]
ModeName = Literal[MODES]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TimingSettings(_Strict):
    """How long to warm up and how many timed calls to make (chosen by time, within bounds)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    warmup_s: Annotated[float, Field(ge=0)] = 0.1
    target_s: Annotated[float, Field(gt=0)] = 0.5
    min_repeats: PosInt = 5
    max_repeats: PosInt = 100
    l2_flush: bool = True  # GPU: evict L2 before each timed call
    cuda_graph: bool = False  # GPU, forward mode: time replays of a captured CUDA graph
    sentinel: bool = True  # time a fixed small matmul before each cell: the device's speed drift over the run
    min_sample_s: Annotated[float, Field(ge=0)] = 0.1  # fast calls: more than max_repeats, for this much of samples
    steady_s: Annotated[float, Field(ge=0)] = 0.1  # GPU: back-to-back calls without flush (0: off)


class BudgetSettings(_Strict):
    """Limits per cell: cells predicted or found to exceed them are recorded as ``over_budget``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    cell_time_s: Annotated[float, Field(gt=0)] = 30.0
    memory_fraction: Annotated[float, Field(gt=0, le=1)] = 0.6
    cell_timeout_s: Annotated[float, Field(gt=0)] = 600.0  # isolation: process only; a worker past it is killed


class ShapeSpec(_Strict):
    """One explicit shape: an image side, its patch (effective stride), channels and heads."""

    name: str = ""
    resolution: PosInt
    patch: PosInt | None = None  # default: the suite's patch
    dim: PosInt
    heads: PosInt


class SuiteModel(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    device: Annotated[str, Field(pattern=DEVICE_PATTERN)] = "auto"
    dtype: _listof(DtypeName) = ["auto"]
    mode: _listof(ModeName) = ["forward"]
    batch: _listof(PosInt) = [1]
    dim: _listof(PosInt) | None = None
    heads: _listof(PosInt) | None = None
    patch: PosInt = 4
    resolution: _listof(PosInt) | None = None
    shapes: Annotated[list[ShapeSpec], Field(min_length=1)] | None = None  # instead of resolution x dim x heads
    impls: list[Any] = []  # attention implementations (at least one of impls and models)
    models: list[Any] = []  # whole timm models, each {model: name, attention: ...} (see attnbench.models)
    plugins: list[str] = []
    seed: int = 0
    threads: PosInt | None = None
    tf32: bool | None = None  # CUDA float32 matmul/conv in TF32; null leaves torch's setting
    sdpa_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    compile: bool = False  # run the module under torch.compile (compile time recorded apart)
    isolation: Literal["none", "process"] = "none"  # process: each cell in a fresh worker with a time-out
    executor: Literal["inprocess", "gpus", "ray"] = "inprocess"  # where cells run: attnbench.executors
    find_max_batch: bool = False  # halve `batch` on out-of-memory until a call fits; measure there
    measure_peaks: bool = True  # measure the device's matmul peak and copy bandwidth once per run
    pairs: list[Annotated[list[str], Field(min_length=2, max_length=2)]] = []  # [faster?, baseline] speed-up plots
    timing: TimingSettings = TimingSettings()
    budget: BudgetSettings = BudgetSettings()


_MODELS = {"": SuiteModel, "timing": TimingSettings, "budget": BudgetSettings, "shapes": ShapeSpec}


@dataclass(frozen=True)
class Shape:
    name: str
    resolution: int
    patch: int
    dim: int
    heads: int


def shapes_of(model: SuiteModel) -> list[Shape]:
    """The suite's shapes: its ``shapes`` list as given, or dim x heads x resolution (ascending)."""
    if model.shapes:
        return [Shape(s.name, s.resolution, s.patch or model.patch, s.dim, s.heads) for s in model.shapes]
    return [Shape("", res, model.patch, dim, heads)
            for dim, heads in itertools.product(model.dim, model.heads) for res in sorted(set(model.resolution))]


@dataclass(frozen=True)
class ImplEntry:
    """One entry of a suite's ``impls`` list: a registered name and the parameters set for it."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in self.params) + ")"


@dataclass(frozen=True)
class ModelEntry:
    """One entry of a suite's ``models`` list: a timm model and the attention swapped into it."""

    model: str
    attention_label: str  # "timm", a design's name, or role=design pairs
    attention_json: str
    patch: int
    dim: int
    heads: int
    kwargs_json: str = ""  # timm.create_model's extra arguments, JSON

    @property
    def label(self) -> str:
        kw = ",".join(f"{k}={v}" for k, v in json.loads(self.kwargs_json).items()) if self.kwargs_json else ""
        return f"{self.model}" + (f"({kw})" if kw else "") + f"[{self.attention_label}]"


@dataclass(frozen=True)
class Case:
    """One cell of the grid: everything needed to build, run and identify a measurement."""

    impl: str
    label: str
    family: str
    params: tuple[tuple[str, Any], ...]
    resolution: int
    patch: int
    shape: str
    grid_h: int
    grid_w: int
    batch: int
    dim: int
    heads: int
    dtype: str
    mode: str
    device: str
    model: str = ""  # a whole-model cell: the timm model; impl is then its attention rules' label
    attention: str = ""  # a whole-model cell: its attention rules as JSON (attnbench.models.rules_json)
    model_kwargs: str = ""  # a whole-model cell: timm.create_model's extra arguments as JSON

    @property
    def tokens(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def series(self) -> tuple:
        """The cells that differ only in resolution form one series (one curve)."""
        return (self.label, self.batch, self.dim, self.heads, self.dtype, self.mode, self.device)

    @property
    def cell_id(self) -> str:
        """The cell's identity (:func:`attnbench.schema.cell_id`): resume, compare and baselines match on it."""
        return cell_id(asdict(self))


@dataclass
class Suite:
    model: SuiteModel
    path: Path | None
    entries: list[ImplEntry]
    raw: dict[str, Any] = field(default_factory=dict)
    plugin_paths: list[str] = field(default_factory=list)  # resolved, for worker processes
    model_entries: list[ModelEntry] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.model.name

    def cases(self, device: str, dtypes: list[str]) -> list[Case]:
        """The grid: impl entries x dtype x mode x batch x shapes (resolutions ascending within a series)."""
        m = self.model
        out = []
        for entry in self.entries:
            spec = registry.get_spec(entry.name)
            for dtype, mode, batch in itertools.product(dtypes, m.mode, m.batch):
                for sh in shapes_of(m):
                    g = sh.resolution // sh.patch
                    out.append(Case(impl=entry.name, label=entry.label, family=spec.family, params=entry.params,
                                    resolution=sh.resolution, patch=sh.patch, shape=sh.name, grid_h=g, grid_w=g,
                                    batch=batch, dim=sh.dim, heads=sh.heads, dtype=dtype, mode=mode, device=device))
        for entry in self.model_entries:
            for dtype, mode, batch in itertools.product(dtypes, m.mode, m.batch):
                for res in sorted(set(m.resolution or [])):
                    out.append(Case(impl=entry.attention_label, label=entry.label, family="model", params=(),
                                    resolution=res, patch=entry.patch, shape="", grid_h=res // entry.patch,
                                    grid_w=res // entry.patch, batch=batch, dim=entry.dim, heads=entry.heads,
                                    dtype=dtype, mode=mode, device=device, model=entry.model,
                                    attention=entry.attention_json, model_kwargs=entry.kwargs_json))
        return out


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format_pydantic(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = _key(loc)
        if e["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
            allowed = list(_MODELS.get(parent, SuiteModel).model_fields)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((key, f"unknown key{hint} (allowed here: {', '.join(allowed)})"))
        elif e["type"] == "missing":
            problems.append((key, "required key is missing"))
        else:
            problems.append((key, f"{e['msg']} (got {e.get('input')!r})"))
    return problems


def _parse_entry(item: Any, i: int, where: str) -> ImplEntry:
    key = f"impls[{i}]"
    if isinstance(item, str):
        name, params = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, params = next(iter(item.items()))
        params = {} if params is None else params
        if not isinstance(name, str) or not isinstance(params, dict):
            raise SuiteError("expected 'name' or {name: {param: value, ...}}", where, key)
        key = f"{key}.{name}"
    else:
        raise SuiteError(f"expected 'name' or {{name: {{param: value, ...}}}}, got {item!r}", where, key)
    try:
        spec = registry.get_spec(name)
        registry.check_params(spec, params)
    except (UnknownImplError, ParamError) as exc:
        raise SuiteError(str(exc), where, key) from None
    return ImplEntry(name=name, params=tuple(sorted(params.items())))


def load_plugins(paths: list[str], base: Path | None, where: str) -> list[str]:
    """Load each plugin file (paths relative to the suite's folder); return the resolved paths."""
    resolved = []
    for i, p in enumerate(paths):
        path = Path(p)
        if not path.is_absolute() and base is not None:
            path = base / path
        try:
            registry.load_plugin_file(path)
        except AttnbenchError as exc:
            raise SuiteError(str(exc), where, f"plugins[{i}]") from None
        resolved.append(str(path.resolve()))
    return resolved


def _raise(problems: list[tuple[str, str]], where: str) -> None:
    """One SuiteError for all problems: ``file: key: message`` for one, a line per problem for several."""
    if len(problems) == 1:
        raise SuiteError(problems[0][1], where, problems[0][0] or None)
    raise SuiteError("\n" + "\n".join(f"  {k}: {m}" if k else f"  {m}" for k, m in problems), where)


def parse_suite(data: Any, path: Path | None = None) -> Suite:
    """Validate a suite given as a mapping (already read from YAML); every problem found is reported."""
    where = str(path) if path is not None else "<suite>"
    if not isinstance(data, dict):
        raise SuiteError(f"a suite must be a mapping of keys, got {type(data).__name__}", where)
    try:
        model = SuiteModel.model_validate(data)
    except ValidationError as exc:
        problems = _format_pydantic(exc)
        if isinstance(data.get("impls"), list) and not data.get("plugins"):  # entries need no valid model
            for i, item in enumerate(data["impls"]):
                try:
                    _parse_entry(item, i, where)
                except SuiteError as entry_exc:
                    problems.append((entry_exc.key or f"impls[{i}]",
                                     str(entry_exc).split(f"{entry_exc.key}: ", 1)[-1]))
        _raise(problems, where)
    problems: list[tuple[str, str]] = []
    if model.timing.min_repeats > model.timing.max_repeats:
        problems.append(("timing", f"min_repeats {model.timing.min_repeats} exceeds max_repeats "
                                   f"{model.timing.max_repeats}"))
    if not model.impls and not model.models:
        problems.append(("impls", "give at least one attention implementation (impls) or whole model (models)"))
    grid_keys = [k for k in ("resolution", "dim", "heads") if getattr(model, k) is not None]
    if model.models and not model.impls:  # a models-only suite needs image sizes only
        grid_keys = grid_keys + [k for k in ("dim", "heads") if k not in grid_keys] if model.resolution else []
    grid_ok = True
    if model.shapes is not None and grid_keys:
        problems.append(("shapes", f"give either shapes or {'/'.join(grid_keys)}, not both"))
        grid_ok = False
    if model.shapes is None and len(grid_keys) < 3:
        missing = [k for k in ("resolution", "dim", "heads") if k not in grid_keys]
        problems.append((missing[0], "required key is missing (or give shapes: a list of {resolution, dim, heads})"))
        grid_ok = False
    plugin_paths = []
    for i, plugin in enumerate(model.plugins):
        try:
            plugin_paths += load_plugins([plugin], path.parent if path is not None else None, where)
        except SuiteError as exc:
            problems.append((f"plugins[{i}]", str(exc).split("plugins[0]: ", 1)[-1]))
    entries: list[ImplEntry] = []
    failed_entries = False
    for i, item in enumerate(model.impls):
        try:
            entries.append(_parse_entry(item, i, where))
        except SuiteError as exc:
            problems.append((exc.key or f"impls[{i}]", str(exc).split(f"{exc.key}: ", 1)[-1]))
            failed_entries = True
    model_entries: list[ModelEntry] = []
    if model.models and model.shapes is not None:
        problems.append(("models", "whole models take image sizes from resolution, not shapes"))
    for i, item in enumerate(model.models):
        try:
            from .models import parse_entry

            model_entries.append(ModelEntry(**parse_entry(item, sorted(set(model.resolution or [])), where,
                                                          f"models[{i}]")))
        except SuiteError as exc:
            problems.append((exc.key or f"models[{i}]", str(exc).split(f"{exc.key}: ", 1)[-1]))
    names = {e.label for e in entries} | {e.name for e in entries} | {e.label for e in model_entries}
    for i, pair in enumerate(model.pairs):
        for name in pair:
            if name not in names and not failed_entries:
                problems.append((f"pairs[{i}]", f"{name!r} is not an implementation of this suite "
                                                f"(have: {', '.join(sorted(names))})"))
    for i, res in enumerate(model.resolution or [] if model.impls else []):
        if res % model.patch:
            problems.append((f"resolution[{i}]", f"resolution {res} is not a multiple of patch {model.patch}"))
    for i, sh in enumerate(model.shapes or []):
        if sh.resolution % (sh.patch or model.patch):
            problems.append((f"shapes[{i}]", f"resolution {sh.resolution} is not a multiple of patch "
                                             f"{sh.patch or model.patch}"))
    shapes = shapes_of(model) if grid_ok and model.impls else []
    for dim, heads in dict.fromkeys((sh.dim, sh.heads) for sh in shapes):
        if dim % heads:
            problems.append(("shapes" if model.shapes else "heads", f"dim {dim} is not divisible by heads {heads}"))
    # Build each configuration once on the meta device: constructor checks (bad values) fail here.
    import torch

    for i, entry in enumerate(entries):
        spec = registry.get_spec(entry.name)
        for dim, heads in sorted({(sh.dim, sh.heads) for sh in shapes if sh.dim % sh.heads == 0}):
            try:
                with torch.device("meta"):
                    spec.build(dim=dim, heads=heads, **dict(entry.params))
            except (ValueError, TypeError, AssertionError) as exc:
                problems.append((f"impls[{i}]", f"{entry.name} cannot be built with dim={dim}, heads={heads}: {exc}"))
                break
    if problems:
        _raise(problems, where)
    return Suite(model=model, path=path, entries=entries, raw=data, plugin_paths=plugin_paths,
                 model_entries=model_entries)


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; raise :class:`SuiteError` naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError("suite file not found", str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SuiteError(f"not valid YAML: {at}{problem}", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"cannot be read: {exc}", str(path)) from None
    return parse_suite(data, path)
