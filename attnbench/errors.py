"""Typed errors raised by the library. Only the CLI turns them into messages and exit codes."""

from __future__ import annotations


class AttnbenchError(Exception):
    """Base class of every error attnbench raises on bad input. The CLI exits with code 2."""


class SuiteError(AttnbenchError):
    """A suite file that cannot be read or does not validate.

    ``where`` names the file and ``key`` the key path inside it (``impls[2].sra.conv.sr_ratio``).
    """

    def __init__(self, message: str, where: str | None = None, key: str | None = None):
        self.where = where
        self.key = key
        prefix = ""
        if where:
            prefix += f"{where}: "
        if key:
            prefix += f"{key}: "
        super().__init__(prefix + message)


class UnknownImplError(AttnbenchError, KeyError):
    """A name that no registered implementation has."""

    def __init__(self, name: str, close: list[str], known: list[str]):
        self.name = name
        self.close = close
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"unknown implementation {name!r}{hint} (known: {', '.join(known)})")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ParamError(AttnbenchError, TypeError):
    """A parameter an implementation does not take, or a value of the wrong type."""


class RegistryError(AttnbenchError):
    """Two implementations registered under one name, or a malformed registration."""


class PluginError(AttnbenchError):
    """A plugin file or entry point that cannot be loaded."""


class DeviceError(AttnbenchError):
    """A device or dtype this machine cannot run (``device: cuda`` without a GPU, say)."""


class UnsupportedCaseError(AttnbenchError):
    """A shape an implementation cannot take (its ``supports`` check gave a reason)."""


class RunDirError(AttnbenchError):
    """A run folder that is missing, unreadable, or cannot be resumed."""
