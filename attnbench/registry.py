"""Names -> implementation classes, and the discovery of plugins.

An implementation is an ``nn.Module`` subclass registered with :func:`register`. Its constructor
takes ``dim`` and ``heads`` and then keyword parameters with defaults; those defaults define the
parameters a suite may set. ``forward`` maps x of shape (B, H, W, C) to (B, H', W', C).

The contract, :class:`AttentionImpl`, also names the optional methods the harness uses when a class
defines them (:data:`OPTIONAL_METHODS`); which ones a class has is resolved once, at registration,
into :attr:`ImplSpec.optional`:

- ``flops_analytic(batch, height, width) -> int``: forward FLOPs of the matmul-type operations
  (linear, conv, the two attention matmuls), 2 FLOPs per multiply-accumulate.
- ``supports(height, width) -> str | None``: a reason when the token grid cannot be taken.
- ``supports_device(device_type) -> str | None``: a reason when the device (``cuda``, ``cpu``) cannot run
  the module at its size (FlexAttention on CUDA: head dimensions of 16 or more).
- ``reparameterize() -> nn.Module | None``: the merged inference form (a new module, or None after
  merging in place); measured in ``forward`` mode, the training form in ``train`` mode.
- ``output_size(height, width) -> (H', W')``: the output grid, when it differs from the input's.

A class attribute ``default_text = {"shift": "window // 2"}`` says what a sentinel default (``-1``)
means; ``attnbench list`` shows it instead of the sentinel.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from .errors import ParamError, PluginError, RegistryError, UnknownImplError

ENTRY_POINT_GROUP = "attnbench.impls"


@runtime_checkable
class AttentionImpl(Protocol):
    """What a registered class provides: ``__init__(self, dim, heads, **params_with_defaults)`` and
    ``forward(x)``, x (B, H, W, C) -> (B, H', W', C). The methods of :class:`OptionalMethods` are
    used where a class defines them."""

    def forward(self, x: Any) -> Any: ...


class OptionalMethods(Protocol):
    """The optional part of the contract (see the module docstring for what each returns)."""

    def flops_analytic(self, batch: int, height: int, width: int) -> int: ...

    def supports(self, height: int, width: int) -> str | None: ...

    def supports_device(self, device_type: str) -> str | None: ...

    def reparameterize(self) -> Any: ...

    def output_size(self, height: int, width: int) -> tuple[int, int]: ...


OPTIONAL_METHODS = ("flops_analytic", "supports", "supports_device", "reparameterize", "output_size")


@dataclass(frozen=True)
class ImplSpec:
    """What the registry knows of one implementation."""

    name: str
    family: str
    algorithm: str  # implementations with one algorithm compute one function, one state_dict layout
    cls: type
    params: dict[str, Any] = field(default_factory=dict)  # parameter -> default
    description: str = ""
    source: str = "builtin"
    optional: frozenset[str] = frozenset()  # the OPTIONAL_METHODS the class defines
    default_text: dict[str, str] = field(default_factory=dict)  # parameter -> its effective default, in words

    def build(self, dim: int, heads: int, **params: Any):
        check_params(self, params)
        return self.cls(dim=dim, heads=heads, **params)

    def has(self, method: str) -> bool:
        """Whether the class defines the optional method ``method`` (one of :data:`OPTIONAL_METHODS`)."""
        if method not in OPTIONAL_METHODS:
            raise KeyError(f"{method!r} is not an optional method of the contract ({', '.join(OPTIONAL_METHODS)})")
        return method in self.optional


_REGISTRY: dict[str, ImplSpec] = {}
_builtins_loaded = False
_entry_points_loaded = False


def _params_of(cls: type) -> dict[str, Any]:
    sig = inspect.signature(cls.__init__)
    params: dict[str, Any] = {}
    names = list(sig.parameters)
    if names[:3] != ["self", "dim", "heads"]:
        raise RegistryError(f"{cls.__qualname__}.__init__ must start with (self, dim, heads, ...), got {names}")
    for name, p in list(sig.parameters.items())[3:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise RegistryError(f"{cls.__qualname__}: parameter {name!r} needs a default")
        params[name] = p.default
    return params


def register(name: str, *, family: str | None = None, algorithm: str | None = None,
             source: str = "builtin") -> Callable[[type], type]:
    """Class decorator: register an attention module under ``name`` (``family.variant``).

    ``algorithm`` groups implementations that compute the same function with the same
    parameter layout (tests check they agree); it defaults to the family.
    """
    if "." not in name:
        raise RegistryError(f"implementation name {name!r} must look like 'family.variant'")
    fam = family or name.split(".", 1)[0]

    def deco(cls: type) -> type:
        if not callable(getattr(cls, "forward", None)):
            raise RegistryError(f"{cls.__qualname__} has no forward method")
        doc = inspect.getdoc(cls) or ""
        spec = ImplSpec(name=name, family=fam, algorithm=algorithm or fam, cls=cls,
                        params=_params_of(cls), description=doc.strip().splitlines()[0] if doc else "",
                        source=getattr(sys.modules.get(cls.__module__), "__attnbench_source__", source),
                        optional=frozenset(m for m in OPTIONAL_METHODS if callable(getattr(cls, m, None))),
                        default_text=dict(getattr(cls, "default_text", {}) or {}))
        old = _REGISTRY.get(name)
        if old is not None and (old.cls.__qualname__, old.source) != (cls.__qualname__, spec.source):
            raise RegistryError(f"implementation {name!r} is registered twice "
                                f"({old.cls.__module__}.{old.cls.__qualname__} and {cls.__module__}.{cls.__qualname__})")
        _REGISTRY[name] = spec
        cls.impl_name = name
        return cls

    return deco


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("attnbench.impls")


def load_entry_points() -> None:
    """Import every installed package's ``attnbench.impls`` entry point (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken third-party package must say which one
            raise PluginError(f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r} "
                              f"failed to load: {type(exc).__name__}: {exc}") from exc


def load_plugin_file(path: str | Path) -> list[str]:
    """Import a Python file whose classes register implementations; return the names it added."""
    path = Path(path).resolve()
    if not path.is_file():
        raise PluginError(f"plugin file {str(path)!r} does not exist")
    _load_builtins()
    before = set(_REGISTRY)
    mod_name = "attnbench_plugin_" + "".join(c if c.isalnum() else "_" for c in str(path))
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {str(path)!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    module.__attnbench_source__ = str(path)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise PluginError(f"plugin file {str(path)!r} failed to import: {type(exc).__name__}: {exc}") from exc
    return sorted(set(_REGISTRY) - before) or [n for n, s in _REGISTRY.items() if s.source == str(path)]


def specs() -> dict[str, ImplSpec]:
    _load_builtins()
    load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def list_impls(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` is a shell-style filter (``'swin.*'``)."""
    import fnmatch

    names = list(specs())
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def get_spec(name: str) -> ImplSpec:
    all_specs = specs()
    if name not in all_specs:
        known = list(all_specs)
        raise UnknownImplError(name, difflib.get_close_matches(name, known, n=3, cutoff=0.5), known)
    return all_specs[name]


def _type_ok(default: Any, value: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def check_params(spec: ImplSpec, params: dict[str, Any]) -> None:
    """Raise :class:`ParamError` for a parameter ``spec`` does not take or a value of the wrong type."""
    for key, value in params.items():
        if key not in spec.params:
            allowed = ", ".join(f"{k}={v!r}" for k, v in spec.params.items()) or "none"
            close = difflib.get_close_matches(key, list(spec.params), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParamError(f"{spec.name} takes no parameter {key!r}{hint} (parameters: {allowed})")
        default = spec.params[key]
        if not _type_ok(default, value):
            raise ParamError(f"{spec.name} parameter {key!r} must be {type(default).__name__} "
                             f"(default {default!r}), got {type(value).__name__} {value!r}")


def create(name: str, dim: int, heads: int, **params: Any):
    """Build the registered implementation ``name`` as an ``nn.Module``.

    The module maps x of shape (B, H, W, C=dim) to (B, H', W', C).
    """
    return get_spec(name).build(dim=dim, heads=heads, **params)
