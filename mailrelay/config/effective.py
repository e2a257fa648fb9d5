"""The effective configuration, as C{mailrelay check -n} prints it (Postfix's C{postconf
-n}): every key the file or the command line sets, in TOML, and every other key's default
as a comment.  Loading the text printed gives the same configuration (for a file in the same
directory: relative paths stay as written, relative to the file's directory).

Passwords written in the file are never printed.  A key whose default is worked out from
others (a listener's C{tls_mode} from its C{mode} and certificate) says so instead of
showing a value.

Part of the config layer: it reads the schema (L{mailrelay.config.keys}) and the loader's
TOML reading.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from mailrelay.config.keys import TOP
from mailrelay.config.loader import _readFile
from mailrelay.config.schema import MISSING, At, Computed, Key, Source, Table, given
from mailrelay.config.values import secret

__all__ = ["effectiveConfiguration", "tomlValue"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")

#: A key's doc saying how its default is worked out: "(default: the certificate's file)".
_DERIVED = re.compile(r"\(default: ([^)]*)\)")
#: An index in a key's path (C{listeners[1]}), which a TOML table header does not write.
_INDEX = re.compile(r"\[\d+\]")


def _simple(value: Any) -> bool:
    """Whether C{value} is what a file could say: a string, number, boolean or a list of
    them (not a runtime object a check made)."""
    if isinstance(value, (list, tuple)):
        return all(_simple(v) for v in value)
    return isinstance(value, (str, int, float, bool, Enum))


def tomlKey(name: str) -> str:
    """C{name} as a TOML key: bare when it can be, else quoted."""
    return name if _BARE_KEY.match(name) else json.dumps(name, ensure_ascii=False)


def tomlValue(value: Any) -> str:
    """C{value} (what TOML reads: strings, numbers, booleans, lists, tables; paths and
    enums too) in TOML's syntax.

    @raise ValueError: a value TOML cannot write (C{None}, a float that is not finite).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return tomlValue(value.value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"TOML cannot write {value!r}")
        return repr(value)
    if isinstance(value, (str, Path)):
        # JSON's escapes are TOML's (\", \\, \n, \uXXXX...).
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, Mapping):
        items = ", ".join(f"{tomlKey(str(k))} = {tomlValue(v)}" for k, v in value.items())
        return "{" + items + "}" if items else "{}"
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(tomlValue(v) for v in value) + "]"
    if value is None:
        raise ValueError("TOML has no null")
    return tomlValue(str(value))


class _Writer:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.lines: list[str] = []

    def table(self, table: Table, raw: Mapping[str, Any], at: At, header: str | None) -> None:
        """The keys of one table, C{header} (C{[name]}, C{[[name]]}) first; its tables
        after its keys, as TOML wants."""
        if header is not None:
            self.lines += ["", header]
        nested: list[tuple[Key, Table]] = []
        for key in table.keys:
            if isinstance(key.parse, Table):
                nested.append((key, key.parse))
                continue
            self.key(table, key, raw, at)
        for included in table.includes:
            for key in included.keys:
                if key.name in raw:
                    self.key(included, key, raw, at)
        if table.options is not None:
            for name, value in raw.items():
                if name not in table.names:
                    self.lines.append(f"{tomlKey(name)} = {tomlValue(value)}")
        for key, inner in nested:
            self.nested(table, key, inner, raw, at)

    def key(self, table: Table, key: Key, raw: Mapping[str, Any], at: At) -> None:
        name = tomlKey(key.name)
        overrides = self.source.overrides
        if key.cli is not None and given(overrides, key.cli.name):
            value = overrides[key.cli.name]
            if isinstance(value, str) and key.cli.name == "spool":
                value = os.path.abspath(self.source.cwd / value)
            self.lines.append(f"{name} = {tomlValue(value)}  # {key.cli.option}")
            return
        if key.name in raw:
            if key.parse is secret:
                self.lines.append(f"# {name} = (set in the file; not shown)")
            else:
                self.lines.append(f"{name} = {tomlValue(raw[key.name])}")
            return
        derived = _DERIVED.search(key.doc)
        default = self.default(table, key, at)
        if derived is not None:
            self.lines.append(f"# {name}: not set (default: {derived.group(1)})")
        elif default is MISSING:
            self.lines.append(f"# {name}: not set (its default depends on other keys)")
        elif default is None:
            self.lines.append(f"# {name}: not set")
        else:
            self.lines.append(f"# {name} = {default}  (default)")

    @staticmethod
    def default(table: Table, key: Key, at: At) -> Any:
        """The default of C{key} in TOML (or C{None}: none; L{MISSING}: worked out from
        other keys)."""
        if isinstance(key.default, Computed):
            value = key.default.compute(at.child(key.name))
        elif key.default is not MISSING:
            value = key.default
        else:
            value = table.default(key, at.child(key.name))
            if value is None:
                return None
            if value is MISSING or not _simple(value):
                return MISSING
        try:
            return tomlValue(value)
        except ValueError:
            return None

    def nested(
        self, table: Table, key: Key, inner: Table, raw: Mapping[str, Any], at: At
    ) -> None:
        # A table header names no index: within an array of tables ([[listeners]]) it is
        # the last element's, which is the one being written ([[listeners.tls_certificates]]).
        path = key.name if not at.key else _INDEX.sub("", f"{at.key}.{key.name}")
        overrides = self.source.overrides
        if key.cli is not None and given(overrides, key.cli.name):
            # --listen: one table per endpoint, with its defaults.
            for endpoint in overrides[key.cli.name]:
                self.lines += ["", f"[[{path}]]  # {key.cli.option}"]
                self.lines.append(f"endpoint = {tomlValue(endpoint)}")
            return
        if key.name in raw:
            value, isDefault = raw[key.name], False
        elif key.default is not MISSING and not isinstance(key.default, Computed):
            value, isDefault = key.default, True
        else:
            if not inner.array:
                self.lines += ["", f"# [{path}]: not set"]
            return
        if inner.array:
            if not value:
                self.lines += ["", f"# [[{path}]]: none" + ("  (default)" if isDefault else "")]
            for index, item in enumerate(value):
                where = at.child(key.name).item(index)
                header = f"[[{path}]]" + ("  # (default)" if isDefault else "")
                self.table(inner, item, where, header)
            return
        self.table(inner, value, at.child(key.name), f"[{path}]")


def effectiveConfiguration(
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None = None,
    text: bytes | None = None,
) -> str:
    """The effective configuration of the file C{path} (C{None}: the embedded default)
    with the command-line C{overrides}, as TOML text (see the module's docstring).  Call it
    on a configuration that loads (L{mailrelay.config.loadConfig}): the values are shown as
    written, not checked again.

    @param text: the file's bytes, when already read.
    """
    cwd = Path(os.path.abspath(os.getcwd()))
    overrides = dict(overrides or {})
    if path is None:
        source = Source(None, cwd, cwd, overrides)
        data: dict[str, Any] = {}
        title = "the embedded default"
    else:
        file = os.fspath(path)
        directory = Path(os.path.abspath(os.path.dirname(file) or "."))
        source = Source(file, directory, cwd, overrides)
        data = _readFile(file, text)
        title = os.path.abspath(file)
    writer = _Writer(source)
    writer.lines += [
        f"# The effective configuration of {title}",
        "# (keys not set are shown with their defaults, commented out;",
        f"# relative paths are relative to {source.directory})",
    ]
    writer.table(TOP, data, At(source), None)
    return "\n".join(writer.lines) + "\n"
