"""attnbench: what each vision-transformer attention design costs as the image grows.

Public API::

    attnbench.create(name, dim=96, heads=3, **params)  # nn.Module: (B, H, W, C) -> (B, H', W', C)
    attnbench.list_impls(pattern=None)                  # registered names
    attnbench.register("family.variant")                # class decorator for your own implementation
    attnbench.run_suite("suites/resolution_sweep.yaml") # measure a suite, rows written as they finish
    attnbench.load_results(run_dir)                     # a run folder as a pandas DataFrame
"""

from __future__ import annotations

from typing import Any

from .errors import (AttnbenchError, DeviceError, ParamError, PluginError, RegistryError, RunDirError,
                     SuiteError, UnknownImplError, UnsupportedCaseError)
from .registry import create, get_spec, list_impls, load_plugin_file, register, specs
from .store import load_results

__version__ = "0.1.0"

__all__ = [
    "create", "list_impls", "register", "get_spec", "specs", "load_plugin_file", "load_results", "run_suite",
    "load_suite", "AttnbenchError", "DeviceError", "ParamError", "PluginError", "RegistryError", "RunDirError",
    "SuiteError", "UnknownImplError", "UnsupportedCaseError",
]


def run_suite(*args: Any, **kwargs: Any):
    """See :func:`attnbench.runner.run_suite` (imported lazily: it pulls in torch)."""
    from .runner import run_suite as _run

    return _run(*args, **kwargs)


def load_suite(path: Any):
    """See :func:`attnbench.suite.load_suite`."""
    from .suite import load_suite as _load

    return _load(path)
