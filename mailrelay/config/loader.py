"""The loader: a TOML file, the command-line overrides and the defaults into a L{Config}.

L{loadConfig} reads the file and walks the schema's top table (L{mailrelay.config.keys.TOP}),
which reads each key from the command line, the file or its default, checks it, and builds
the frozen types.  Files the configuration names (C{ca_file}, C{password_file}, certificates)
are read or checked while loading, relative to the file's directory; passwords never appear
in messages nor in the C{repr} of the result.

Part of the config layer: it may import the values, L{mailrelay.smtp} and the stages.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from mailrelay.config.keys import OVERRIDE_OPTIONS, TOP
from mailrelay.config.schema import At, Source, Table
from mailrelay.config.types import Config
from mailrelay.errors import ConfigError, describeValue

__all__ = ["loadConfig", "readConfigFile"]


def readConfigFile(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the configuration file C{path}.

    @raise ConfigError: the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(
            f"cannot read the configuration file: {e.strerror or e}", file=os.fspath(path)
        ) from None


def _readFile(path: str, text: bytes | None = None) -> dict[str, Any]:
    """The TOML table in C{path}, or in C{text} (the file's bytes, already read).

    @raise ConfigError: the file cannot be read, is not UTF-8 or is not valid TOML.
    """
    if text is None:
        text = readConfigFile(path)
    try:
        return tomllib.loads(text.decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"TOML syntax error: {e}", file=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: {e}", file=path) from None


def _checkShapes(data: dict[str, Any], at: At) -> None:
    """Refuse, before any value is read, an unknown key at the top level or in one of its
    tables (not the arrays of tables, nor the plugins' tables)."""
    TOP.checkShape(data, at)
    for key in TOP.keys:
        table = key.parse
        if key.name in data and isinstance(table, Table):
            if not table.array and table.options is None:
                table.checkShape(data[key.name], at.child(key.name))


def loadConfig(
    path: str | os.PathLike[str] | None, overrides: dict | None = None, text: bytes | None = None
) -> Config:
    """Read, override and check the configuration.

    @param path: the TOML file, or C{None} for the built-in defaults.
    @param text: the bytes of C{path} when the caller has read them already (see
        L{readConfigFile}); the file is then not read again.
    @param overrides: command-line options, by the keys of L{OVERRIDE_OPTIONS}: C{"listen"},
        C{"relay_network"}, C{"accept_domain"} (lists of strings), C{"hostname"}, C{"spool"},
        C{"smarthost"} (strings; C{""} for no smarthost).  An option given replaces the file's
        (or default) value entirely, list and all; its listeners get default options; a
        relative C{spool} is relative to the current directory.  C{None} or an empty list
        means the option was not given.  The file's value of an overridden setting is ignored.
    @raise ConfigError: naming the file (or the option), the key and the value.
    """
    overrides = dict(overrides or {})
    for name in overrides:
        if name not in OVERRIDE_OPTIONS:
            raise ConfigError(
                f"unknown command-line override {describeValue(name)}; known: "
                + ", ".join(OVERRIDE_OPTIONS),
                key=str(name),
            )
    cwd = Path(os.path.abspath(os.getcwd()))
    if path is None:
        source = Source(None, cwd, cwd, overrides)
        data: dict[str, Any] = {}
    else:
        file = os.fspath(path)
        directory = Path(os.path.abspath(os.path.dirname(file) or "."))
        source = Source(file, directory, cwd, overrides)
        data = _readFile(file, text)
    at = At(source)
    _checkShapes(data, at)
    config: Config = TOP.read(data, at)
    return config
