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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mailrelay.config.keys import DEFAULT_SPOOL, LIMITS, LISTENERS, OVERRIDE_OPTIONS, TOP
from mailrelay.config.schema import MISSING, At, Key, Source, Table, tableOf
from mailrelay.config.types import Config, ListenerView, LocalView
from mailrelay.config.values import defaultSpoolDirectory, spoolPath
from mailrelay.errors import ConfigError, describeValue
from mailrelay.namedfile import readError

__all__ = ["loadConfig", "loadLocalView", "readConfigFile"]

#: A configuration file is at most this big, less one octet (the sample is ~40 KiB).
_MAX_CONFIG_SIZE = 1 << 20


def readConfigFile(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the configuration file C{path}.

    @raise ConfigError: the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_CONFIG_SIZE)
    except OSError as e:
        raise ConfigError(
            f"cannot read the configuration file: {readError(e)}", file=os.fspath(path)
        ) from None
    if len(data) == _MAX_CONFIG_SIZE:  # (/dev/zero, a log given by mistake: not read on)
        raise ConfigError("not a configuration file: larger than 1 MiB", file=os.fspath(path))
    return data


def _readFile(path: str, text: bytes | None = None) -> dict[str, Any]:
    """The TOML table in C{path}, or in C{text} (the file's bytes, already read).

    @raise ConfigError: the file cannot be read, is not UTF-8 or is not valid TOML.
    """
    if text is None:
        text = readConfigFile(path)
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"TOML syntax error: {e}", file=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: {e}", file=path) from None
    _refuseNUL(data, path, "")
    return data


def _refuseNUL(value: Any, path: str, key: str) -> None:
    """Refuse a string holding a NUL character anywhere in C{value} (the file's table): no
    file name, address or other value can hold one."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ConfigError(
                f"{describeValue(value)} holds a NUL character (\\u0000)", file=path, key=key
            )
    elif isinstance(value, dict):
        for name, item in value.items():
            _refuseNUL(item, path, f"{key}.{name}" if key else name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuseNUL(item, path, f"{key}[{index}]")


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
    path: str | os.PathLike[str] | None,
    overrides: dict | None = None,
    text: bytes | None = None,
    *,
    listenerTLS: bool = True,
    relayUsers: Mapping[str, Mapping[str, str]] | None = None,
    relayFiles: Mapping[str, bytes] | None = None,
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
    @param listenerTLS: C{False}: the listeners' certificates and keys are not read (their
        C{certificate} is C{None}), nor the password file of their AUTH: for a process that
        serves no listener.
    @param relayUsers: the users the relay serves with, by password file (C{[auth]
        password_file}), for an acceptor process: served when that file is refused now
        (said in the log), so that it never fails to start on a file the relay kept
        serving through.
    @param relayFiles: the bytes of the listeners' certificates and keys the relay serves,
        by path, for an acceptor process: taken rather than the files read (see
        L{Source.relayFiles}).
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
        source = Source(None, cwd, cwd, overrides, listenerTLS, dict(relayUsers or {}),
                        dict(relayFiles or {}))
        data: dict[str, Any] = {}
    else:
        file = os.fspath(path)
        directory = Path(os.path.abspath(os.path.dirname(file) or "."))
        source = Source(file, directory, cwd, overrides, listenerTLS, dict(relayUsers or {}),
                        dict(relayFiles or {}))
        data = _readFile(file, text)
    at = At(source)
    _checkShapes(data, at)
    config: Config = TOP.read(data, at)
    return config


def overriddenKeys(text: bytes | None, overrides: dict | None) -> list[tuple[str, str]]:
    """The keys the configuration file (its bytes, C{text}, already loaded by
    L{loadConfig}) sets and a command-line option of C{overrides} replaces: C{(dotted key,
    option)} pairs (C{("relay.smarthost", "--smarthost")}), for the relay to say that the
    file's value is not used."""
    if not text or not overrides:
        return []
    data = tomllib.loads(text.decode("utf-8"))
    found = []
    for path, key, _ in TOP.walk():
        if key.cli is None or overrides.get(key.cli.name) in (None, []):
            continue
        table: Any = data
        for part in path.split("."):
            table = table.get(part) if isinstance(table, dict) else None
        if table is not None:
            found.append((path, key.cli.option))
    return found


def _keyValue(table: Table, name: str, data: dict[str, Any], at: At) -> Any:
    """Key C{name} of C{table} as the loader reads it: the file's value, else its default."""
    key: Key = table.key(name)
    if name in data:
        return key.parse(data[name], at.child(name))
    value = table.default(key, at.child(name))
    return None if value is MISSING else value


def loadLocalView(path: str | os.PathLike[str] | None) -> LocalView:
    """The settings a local command needs to reach the relay running on C{path}.

    The host name, the message size limit, each listener's endpoint, mode, TLS mode and PROXY
    setting, and the spool directory's path are read with the keys' own parsers and
    defaults, and the file's shape is checked as the relay checks it (an unknown key is
    refused); nothing else is read: not the certificates, password files or spool the other
    keys name, which the command's user may not be allowed to read or write.

    @param path: the relay's TOML file, or C{None} for the embedded default.
    @raise ConfigError: naming the file, the key and the value.
    """
    cwd = Path(os.path.abspath(os.getcwd()))
    data: dict[str, Any] = {}
    file = None
    directory = cwd
    if path is not None:
        file = os.fspath(path)
        directory = Path(os.path.abspath(os.path.dirname(file) or "."))
        data = _readFile(file)
    at = At(Source(file, directory, cwd))
    _checkShapes(data, at)
    hostname = _keyValue(TOP, "hostname", data, at)
    limits = tableOf(data.get("limits", {}), at.child("limits"))
    maxMessageSize = _keyValue(LIMITS, "message_size", limits, at.child("limits"))
    listenersAt = at.child("listeners")
    tables = data.get("listeners", TOP.key("listeners").default)
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise listenersAt.error(
            f"must be an array of tables ([[listeners]]), not {describeValue(tables)}"
        )
    if not tables and LISTENERS.empty is not None:
        raise listenersAt.error(LISTENERS.empty)
    listeners: list[ListenerView] = []
    for index, table in enumerate(tables):
        where = listenersAt.item(index)
        LISTENERS.checkShape(table, where)
        endpointKey = LISTENERS.key("endpoint")
        if "endpoint" not in table:
            raise where.child("endpoint").error(endpointKey.required or "is required")
        listeners.append(
            ListenerView(
                endpoint=_keyValue(LISTENERS, "endpoint", table, where),
                mode=_keyValue(LISTENERS, "mode", table, where),
                tlsMode=_keyValue(LISTENERS, "tls_mode", table, where)
                if "tls_mode" in table
                else None,
                proxyProtocol=bool(_keyValue(LISTENERS, "proxy_protocol", table, where)),
            )
        )
    spool = tableOf(data.get("spool", {}), at.child("spool"))
    spoolAt = at.child("spool").child("directory")
    spoolDirectory = (
        spoolPath(spool["directory"], spoolAt) if "directory" in spool
        else defaultSpoolDirectory(DEFAULT_SPOOL, spoolPath)(spoolAt)
    )  # (its path only: whether the relay's user may write there is not this user's business)
    return LocalView(file, hostname, maxMessageSize, tuple(listeners), str(spoolDirectory))
