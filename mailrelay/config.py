"""The relay's configuration: a TOML file, command-line overrides and the defaults.

L{loadConfig} reads the file (or nothing, for the built-in defaults), applies the options
given on the command line, checks every value and returns a frozen L{Config}.  Every problem
raises L{ConfigError} naming the file, the key as a dotted path (C{listeners[0].endpoint},
C{limits.recipients}, C{relay.networks[2]}) and the offending value, for example::

    /etc/mailrelay.toml: limits.recipients: must be a positive integer, not "ten"

Problems in command-line options name the option instead (C{--listen}) and no file.

See C{etc/mailrelay.toml} for a commented sample of every key.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mailrelay.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ENDPOINT = "tcp:2525:interface=127.0.0.1"
DEFAULT_SPOOL_DIRECTORY = "./mailrelay-spool"
DEFAULT_MIN_FREE_SPACE = 100 * 1024 * 1024
DEFAULT_RELAY_NETWORKS = ("127.0.0.0/8", "::1/128")
DEFAULT_MESSAGE_SIZE = 10240000
DEFAULT_MAX_RECIPIENTS = 100
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_DATA_TIMEOUT = 300.0
DEFAULT_MAX_ERRORS = 20
DEFAULT_MAX_HOPS = 50
DEFAULT_PLUGIN_TIMEOUT = 30.0
DEFAULT_HEADER_STAMPER = "default"
DEFAULT_SMTP_PORT = 25
BARE_NEWLINE_CHOICES = ("reject", "normalize")

#: The keys each table of the file may hold; C{""} is the top level.  The tables of
#: C{recipient_validators} and C{header_stampers} hold C{plugin}, C{timeout} and the
#: plugin's own options, so they are not listed here.
ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "": (
        "hostname",
        "spool",
        "relay",
        "limits",
        "dns",
        "listeners",
        "recipient_validators",
        "header_stampers",
    ),
    "spool": ("directory", "min_free_space"),
    "relay": ("networks", "accept_domains", "smarthost"),
    "limits": ("message_size", "recipients", "idle_timeout", "data_timeout", "errors", "hops"),
    "dns": ("reverse_lookups",),
    "listeners": ("endpoint", "bare_newline", "add_message_id", "add_date"),
}

#: The keys of a plugin table that the loader consumes; the others are the plugin's options.
PLUGIN_KEYS = ("plugin", "timeout")

#: The keys L{loadConfig} accepts in C{overrides}, with the command-line option each stands for.
OVERRIDE_OPTIONS: dict[str, str] = {
    "listen": "--listen",
    "hostname": "--hostname",
    "spool": "--spool",
    "relay_network": "--relay-network",
    "accept_domain": "--accept-domain",
    "smarthost": "--smarthost",
}

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_DIGITS = re.compile(r"[0-9]+\Z")


@dataclass(frozen=True)
class ListenerConfig:
    """One SMTP listener.

    @ivar endpoint: a Twisted server endpoint string, e.g. C{"tcp:2525:interface=127.0.0.1"}.
    @ivar bare_newline: what to do with a bare LF (or CR) in message data: C{"reject"} the
        message, or C{"normalize"} it to CRLF.
    @ivar add_message_id: add a C{Message-Id:} field to messages that lack one.
    @ivar add_date: add a C{Date:} field to messages that lack one.
    """

    endpoint: str
    bare_newline: str = "reject"
    add_message_id: bool = True
    add_date: bool = True

    def asOptions(self) -> dict[str, Any]:
        """The listener's options as a dict, as header stampers see them."""
        return {
            "bare_newline": self.bare_newline,
            "add_message_id": self.add_message_id,
            "add_date": self.add_date,
        }


@dataclass(frozen=True)
class PluginSpec:
    """One entry of a plugin list (C{[[recipient_validators]]}, C{[[header_stampers]]}).

    @ivar plugin: the plugin's name.
    @ivar options: the other keys of the table, passed to the plugin's C{build}.
    @ivar timeout: seconds the plugin may take to answer (key C{timeout}, consumed by the
        loader, never passed to the plugin).
    @ivar key: where the entry came from, e.g. C{"recipient_validators[1]"}, for messages:
        C{error.within(file=config.source, key=spec.key)}.
    """

    plugin: str
    options: dict = field(default_factory=dict, hash=False)
    timeout: float = DEFAULT_PLUGIN_TIMEOUT
    key: str = ""


@dataclass(frozen=True)
class Smarthost:
    """Where all outgoing mail goes instead of to the recipients' MX hosts.

    @ivar host: a lower-case host name (no trailing dot) or an IP address (IPv6 without brackets).
    @ivar port: the TCP port.
    @ivar mxLookup: C{True} when C{host} is a domain whose MX records are looked up
        (written without brackets); C{False} for C{"[host]"} (Postfix's relayhost convention:
        connect to the host's own addresses) and for IP addresses.
    """

    host: str
    port: int = DEFAULT_SMTP_PORT
    mxLookup: bool = True

    def __str__(self) -> str:
        if self.mxLookup:
            text = self.host
        else:
            text = f"[{self.host}]"
        if self.port != DEFAULT_SMTP_PORT or not self.mxLookup:
            text += f":{self.port}"
        return text


@dataclass(frozen=True)
class Config:
    """The relay's whole configuration, checked.

    @ivar source: the path of the configuration file as given, or C{None} for the defaults.
    @ivar configDir: the absolute directory of the file (the current directory without a file),
        against which the file's relative paths are resolved.
    @ivar hostname: this relay's host name (lower case, no trailing dot).
    @ivar spoolDirectory: the absolute path of the spool directory (it may not exist yet, but
        can be created).
    @ivar minFreeSpace: bytes that must stay free on the spool's file system.
    @ivar relayNetworks: clients in these networks may relay to any domain.
    @ivar acceptDomains: domains (normalised) accepted from anyone.
    @ivar smarthost: where outgoing mail goes, or C{None} for direct MX delivery.
    @ivar maxMessageSize: the largest message accepted, in bytes.
    @ivar maxRecipients: the most recipients accepted for one message.
    @ivar idleTimeout: seconds a client may stay silent between commands.
    @ivar dataTimeout: seconds a client may stay silent while sending message data.
    @ivar maxErrors: errors in one session before it is closed with 421.
    @ivar maxHops: the most C{Received:} fields a message may carry (mail loops).
    @ivar reverseDNS: look up the client's name (forward-confirmed) for C{Received:}.
    @ivar listeners: where to accept SMTP connections.
    @ivar recipientValidators: the recipient validator plugins, in order.
    @ivar headerStampers: the header stamper plugins, in order.
    """

    source: str | None
    configDir: Path
    hostname: str
    spoolDirectory: Path
    minFreeSpace: int
    relayNetworks: tuple[IPNetwork, ...]
    acceptDomains: tuple[str, ...]
    smarthost: Smarthost | None
    maxMessageSize: int
    maxRecipients: int
    idleTimeout: float
    dataTimeout: float
    maxErrors: int
    maxHops: int
    reverseDNS: bool
    listeners: tuple[ListenerConfig, ...]
    recipientValidators: tuple[PluginSpec, ...]
    headerStampers: tuple[PluginSpec, ...]


# ---------------------------------------------------------------------------------------------
# Describing values and keys in messages


def describeValue(value: Any, limit: int = 80) -> str:
    """Render C{value} the way it is written in TOML, shortened to about C{limit} characters.

    Strings come out in double quotes (C{"ten"}), booleans as C{true}/C{false}, arrays in
    brackets and tables as inline tables.
    """
    text = _render(value)
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text


def _render(value: Any) -> str:
    """Render C{value} as TOML-like text, without shortening."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_keyPart(k)} = {_render(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _keyPart(name: str) -> str:
    """One segment of a dotted key: bare when TOML allows it, quoted otherwise."""
    return name if _BARE_KEY.match(name) else json.dumps(name, ensure_ascii=False)


def joinKey(parent: str, name: str) -> str:
    """The dotted key of C{name} inside the table at C{parent} (C{""} for the top level)."""
    part = _keyPart(name)
    return f"{parent}.{part}" if parent else part


# ---------------------------------------------------------------------------------------------
# Parsing single values (usable on their own: they raise ValueError)


def parseNetwork(text: str) -> IPNetwork:
    """Parse an IP network: C{"192.0.2.0/24"}, C{"2001:db8::/32"}, or a bare address (C{/32},
    C{/128}).

    @raise ValueError: not a network, or host bits set (C{"10.0.0.1/8"}); the message names
        the value.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be an IP network as a string, not {describeValue(text)}")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"{describeValue(text)} is not an IP address or network "
                f'(such as "192.0.2.0/24", "2001:db8::/32" or "192.0.2.1"): {e}'
            ) from None
        raise ValueError(
            f"{describeValue(text)} has host bits set; did you mean {describeValue(str(loose))}?"
        ) from None


def hostnameProblem(text: str) -> str | None:
    """Why C{text} is not a syntactically valid host name, or C{None} when it is.

    A host name is dot-separated labels of ASCII letters, digits and hyphens, each 1 to 63
    characters long, not starting or ending with a hyphen; one trailing dot is allowed; the whole
    is at most 253 characters.  An IP address is not a host name.
    """
    if not text:
        return "a host name cannot be empty"
    name = text[:-1] if text.endswith(".") else text
    if len(name) > 253:
        return "a host name is at most 253 characters long"
    for label in name.split("."):
        if not label:
            return "a host name cannot have an empty label (two dots in a row, or a leading dot)"
        if len(label) > 63:
            return f"label {describeValue(label, 30)} is longer than 63 characters"
        if not _LABEL.match(label):
            return (
                f"label {describeValue(label)} may hold only letters, digits and hyphens, "
                "and cannot start or end with a hyphen"
            )
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return "an IP address is not a host name"
    if name.rsplit(".", 1)[-1].isdigit():
        return "the last label cannot be all digits (as in an IP address)"
    return None


def normaliseHostname(text: str) -> str:
    """Check a host name (see L{hostnameProblem}) and return it lower-cased, without a
    trailing dot.

    @raise ValueError: not a valid host name; the message names the value.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a host name (a string), not {describeValue(text)}")
    problem = hostnameProblem(text)
    if problem:
        raise ValueError(f"{describeValue(text)} is not a valid host name: {problem}")
    return text.rstrip(".").lower() if text.endswith(".") else text.lower()


def parseSmarthost(text: str) -> Smarthost:
    """Parse a smarthost: C{"host"}, C{"host:port"}, C{"[host]"}, C{"[host]:port"},
    C{"192.0.2.1:2525"}, C{"[2001:db8::1]:2525"}.

    Brackets mean "no MX lookup" (Postfix's relayhost convention); an IP address is never
    looked up.  The port defaults to 25.

    @raise ValueError: the message names the value and says what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a smarthost as a string, not {describeValue(text)}")

    def bad(reason: str) -> ValueError:
        return ValueError(
            f"{describeValue(text)} is not a valid smarthost: {reason} "
            '(use "host", "host:port", "[host]:port" or "[2001:db8::1]:port")'
        )

    portText: str | None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise bad('"[" without "]"')
        host = text[1:close]
        rest = text[close + 1 :]
        bracketed = True
        if not rest:
            portText = None
        elif rest.startswith(":"):
            portText = rest[1:]
        else:
            raise bad(f'unexpected {describeValue(rest)} after "]"')
    else:
        if text.count(":") > 1:
            raise bad("an IPv6 address must be written in brackets")
        host, colon, portText = text.partition(":")
        if not colon:
            portText = None
        bracketed = False

    port = DEFAULT_SMTP_PORT
    if portText is not None:
        if not _DIGITS.match(portText):
            raise bad(f"the port must be a number from 1 to 65535, not {describeValue(portText)}")
        port = int(portText)
        if not 1 <= port <= 65535:
            raise bad(f"the port must be from 1 to 65535, not {port}")
    if not host:
        raise bad("the host is missing")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return Smarthost(str(address), port, mxLookup=False)
    problem = hostnameProblem(host)
    if problem:
        raise bad(problem)
    return Smarthost(host.rstrip(".").lower() if host.endswith(".") else host.lower(), port,
                     mxLookup=not bracketed)


def checkEndpoint(text: str) -> None:
    """Check that Twisted can parse C{text} as a server endpoint description.

    The endpoint is built without a reactor and never listens.

    @raise ValueError: the message names the value and gives Twisted's complaint.
    """
    from twisted.internet.endpoints import serverFromString

    if not isinstance(text, str):
        raise ValueError(f"must be an endpoint string, not {describeValue(text)}")
    hint = '(e.g. "tcp:2525:interface=127.0.0.1", "tcp6:25:interface=\\:\\:1", "unix:/run/x.sock")'
    try:
        endpoint = serverFromString(None, text)
    except (ValueError, TypeError, KeyError, IndexError, OSError) as e:
        raise ValueError(
            f"{describeValue(text)} is not a valid server endpoint {hint}: {e}"
        ) from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ValueError(
            f"{describeValue(text)} is not a valid server endpoint: "
            f"port {port} is not from 0 to 65535"
        )


def spoolDirectoryProblem(path: Path) -> str | None:
    """Why C{path} cannot serve as the spool directory, or C{None} if it can.

    An existing directory must be writable and searchable; a missing one must be creatable:
    its nearest existing ancestor must be a writable, searchable directory.
    """
    where = describeValue(str(path))
    try:
        if path.exists():
            if not path.is_dir():
                return f"{where} exists but is not a directory"
            if not os.access(path, os.W_OK | os.X_OK):
                return f"directory {where} is not writable (it needs write and search permission)"
            return None
        if os.path.lexists(path):
            return f"{where} is a dangling symbolic link"
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"cannot create {where}: {describeValue(str(ancestor))} is not a directory"
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return (
                f"cannot create {where}: its parent {describeValue(str(ancestor))} "
                "is not writable"
            )
    except OSError as e:
        return f"cannot use {where}: {e.strerror or e}"
    return None


# ---------------------------------------------------------------------------------------------
# The loader


class _Loader:
    """Reads one file's table and the overrides into a L{Config}; every error names C{file}."""

    def __init__(self, file: str | None, configDir: Path) -> None:
        self.file = file
        self.configDir = configDir

    # -- errors

    def error(self, key: str | None, message: str, *, cli: bool = False) -> ConfigError:
        """A ConfigError at C{key}: in the file, or (C{cli}) on the command line."""
        return ConfigError(message, file=None if cli else self.file, key=key)

    # -- shapes

    def table(self, value: Any, key: str) -> dict[str, Any]:
        """C{value}, which must be a table."""
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table ([{key}]), not {describeValue(value)}")
        return value

    def checkKeys(self, table: dict[str, Any], key: str, allowed: Iterable[str]) -> None:
        """Refuse any key of C{table} (found at C{key}) not in C{allowed}."""
        allowed = tuple(allowed)
        for name in table:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {describeValue(close[0])}?)" if close else ""
                where = f"in [{key}]" if key else "at the top level"
                raise self.error(
                    joinKey(key, name),
                    f"unknown key {describeValue(name)}{hint}; "
                    f"the keys allowed {where} are: {', '.join(allowed)}",
                )

    def arrayOfTables(self, value: Any, key: str) -> list[dict[str, Any]]:
        """C{value}, which must be an array of tables (C{[[key]]})."""
        if not isinstance(value, list):
            raise self.error(
                key, f"must be an array of tables ([[{key}]]), not {describeValue(value)}"
            )
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(
                    f"{key}[{index}]", f"must be a table ([[{key}]]), not {describeValue(item)}"
                )
        return value

    def stringList(self, value: Any, key: str, *, cli: bool = False) -> list[tuple[str, str]]:
        """C{value}, an array of strings, as C{(key, string)} pairs (C{key[i]} in a file)."""
        if isinstance(value, str) and cli:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise self.error(key, f"must be an array of strings, not {describeValue(value)}",
                             cli=cli)
        result = []
        for index, item in enumerate(value):
            itemKey = key if cli else f"{key}[{index}]"
            if not isinstance(item, str):
                raise self.error(itemKey, f"must be a string, not {describeValue(item)}", cli=cli)
            result.append((itemKey, item))
        return result

    # -- scalars

    def string(self, value: Any, key: str, *, cli: bool = False) -> str:
        """C{value}, which must be a string."""
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {describeValue(value)}", cli=cli)
        return value

    def boolean(self, value: Any, key: str) -> bool:
        """C{value}, which must be C{true} or C{false}."""
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {describeValue(value)}")
        return value

    def integer(self, value: Any, key: str, *, minimum: int) -> int:
        """C{value}, an integer (not a boolean) no smaller than C{minimum} (0 or 1)."""
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.error(key, f"must be {what}, not {describeValue(value)}")
        return value

    def seconds(self, value: Any, key: str) -> float:
        """C{value}, a finite number (integer or float, not boolean) greater than zero."""
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise self.error(
                key, f"must be a positive number of seconds, not {describeValue(value)}"
            )
        return float(value)

    # -- settings

    def hostname(self, value: Any, key: str, *, cli: bool = False) -> str:
        """A host name for this relay."""
        try:
            return normaliseHostname(value)
        except ValueError as e:
            raise self.error(key, str(e), cli=cli) from None

    def spoolDirectory(self, value: Any, key: str, base: Path, *, cli: bool = False) -> Path:
        """The spool directory, resolved against C{base}, checked usable."""
        text = self.string(value, key, cli=cli)
        if not text:
            raise self.error(key, "must be a directory path, not an empty string", cli=cli)
        path = Path(os.path.abspath(base / os.path.expanduser(text)))
        problem = spoolDirectoryProblem(path)
        if problem:
            raise self.error(key, f"unusable spool directory: {problem}", cli=cli)
        return path

    def networks(self, value: Any, key: str, *, cli: bool = False) -> tuple[IPNetwork, ...]:
        """The relay networks."""
        result = []
        for itemKey, text in self.stringList(value, key, cli=cli):
            try:
                result.append(parseNetwork(text))
            except ValueError as e:
                raise self.error(itemKey, str(e), cli=cli) from None
        return tuple(result)

    def domains(self, value: Any, key: str, *, cli: bool = False) -> tuple[str, ...]:
        """The accepted domains, normalised and without duplicates."""
        items = self.stringList(value, key, cli=cli)
        if not items:
            return ()
        from mailrelay.address import normaliseDomain

        result: list[str] = []
        for itemKey, text in items:
            try:
                domain = normaliseDomain(text)
            except ValueError as e:
                raise self.error(
                    itemKey,
                    f"{describeValue(text)} is not a valid domain: {_domainProblem(e)}",
                    cli=cli,
                ) from None
            if domain not in result:
                result.append(domain)
        return tuple(result)

    def smarthost(self, value: Any, key: str, *, cli: bool = False) -> Smarthost | None:
        """The smarthost; an empty string means none."""
        text = self.string(value, key, cli=cli)
        if text == "":
            return None
        try:
            return parseSmarthost(text)
        except ValueError as e:
            raise self.error(key, str(e), cli=cli) from None

    def endpoint(self, value: Any, key: str, *, cli: bool = False) -> str:
        """A server endpoint description Twisted can parse."""
        text = self.string(value, key, cli=cli)
        try:
            checkEndpoint(text)
        except ValueError as e:
            raise self.error(key, str(e), cli=cli) from None
        return text

    def listeners(self, value: Any, key: str) -> tuple[ListenerConfig, ...]:
        """The C{[[listeners]]} tables."""
        tables = self.arrayOfTables(value, key)
        if not tables:
            raise self.error(
                key, "at least one listener is needed, not an empty array []"
            )
        result = []
        seen: dict[str, str] = {}
        for index, table in enumerate(tables):
            here = f"{key}[{index}]"
            self.checkKeys(table, here, ALLOWED_KEYS["listeners"])
            if "endpoint" not in table:
                raise self.error(
                    joinKey(here, "endpoint"),
                    f"is required in each [[{key}]] table (e.g. endpoint = "
                    f"{describeValue(DEFAULT_ENDPOINT)})",
                )
            endpointKey = joinKey(here, "endpoint")
            endpoint = self.endpoint(table["endpoint"], endpointKey)
            if endpoint in seen:
                raise self.error(
                    endpointKey,
                    f"{describeValue(endpoint)} is already listed as {seen[endpoint]}",
                )
            seen[endpoint] = endpointKey
            bareNewline = table.get("bare_newline", "reject")
            if bareNewline not in BARE_NEWLINE_CHOICES:
                raise self.error(
                    joinKey(here, "bare_newline"),
                    f'must be "reject" or "normalize", not {describeValue(bareNewline)}',
                )
            result.append(
                ListenerConfig(
                    endpoint=endpoint,
                    bare_newline=bareNewline,
                    add_message_id=self.boolean(
                        table.get("add_message_id", True), joinKey(here, "add_message_id")
                    ),
                    add_date=self.boolean(table.get("add_date", True), joinKey(here, "add_date")),
                )
            )
        return tuple(result)

    def cliListeners(self, value: Any, key: str) -> tuple[ListenerConfig, ...]:
        """Listeners from C{--listen}: default options for each."""
        result: list[ListenerConfig] = []
        for itemKey, text in self.stringList(value, key, cli=True):
            endpoint = self.endpoint(text, itemKey, cli=True)
            if any(listener.endpoint == endpoint for listener in result):
                raise self.error(
                    itemKey, f"{describeValue(endpoint)} is given twice", cli=True
                )
            result.append(ListenerConfig(endpoint))
        return tuple(result)

    def plugins(self, value: Any, key: str) -> tuple[PluginSpec, ...]:
        """A plugin list (C{[[recipient_validators]]}, C{[[header_stampers]]})."""
        result = []
        for index, table in enumerate(self.arrayOfTables(value, key)):
            here = f"{key}[{index}]"
            pluginKey = joinKey(here, "plugin")
            if "plugin" not in table:
                raise self.error(
                    pluginKey, f"is required in each [[{key}]] table: the name of the plugin"
                )
            name = self.string(table["plugin"], pluginKey)
            if not name:
                raise self.error(pluginKey, "must be a plugin name, not an empty string")
            timeout = self.seconds(
                table.get("timeout", DEFAULT_PLUGIN_TIMEOUT), joinKey(here, "timeout")
            )
            options = {k: v for k, v in table.items() if k not in PLUGIN_KEYS}
            result.append(PluginSpec(plugin=name, options=options, timeout=timeout, key=here))
        return tuple(result)


def _domainProblem(error: ValueError) -> str:
    """The text of a domain error, without the SMTP reply code an C{AddressError} carries."""
    reply = getattr(error, "reply", None)
    text = getattr(reply, "text", None)
    if not isinstance(text, str):
        return str(error)
    return text.removeprefix("Error: ")


def _readFile(path: str) -> dict[str, Any]:
    """The TOML table in C{path}.

    @raise ConfigError: the file cannot be read, is not UTF-8 or is not valid TOML.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"TOML syntax error: {e}", file=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: {e}", file=path) from None
    except OSError as e:
        raise ConfigError(
            f"cannot read the configuration file: {e.strerror or e}", file=path
        ) from None


def _given(overrides: dict[str, Any], name: str) -> bool:
    """Whether the command line gave option C{name}: not absent, not C{None}, not C{[]}."""
    value = overrides.get(name)
    return value is not None and value != [] and value != ()


def loadConfig(path: str | os.PathLike[str] | None, overrides: dict | None = None) -> Config:
    """Read, override and check the configuration.

    @param path: the TOML file, or C{None} for the built-in defaults.
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
        source = None
        configDir = cwd
        data: dict[str, Any] = {}
    else:
        source = os.fspath(path)
        configDir = Path(os.path.abspath(os.path.dirname(source) or "."))
        data = _readFile(source)

    load = _Loader(source, configDir)
    load.checkKeys(data, "", ALLOWED_KEYS[""])
    sections = {}
    for name in ("spool", "relay", "limits", "dns"):
        sections[name] = load.table(data.get(name, {}), name)
        load.checkKeys(sections[name], name, ALLOWED_KEYS[name])
    spool, relay, limits, dns = (sections[n] for n in ("spool", "relay", "limits", "dns"))

    # hostname
    if _given(overrides, "hostname"):
        hostname = load.hostname(overrides["hostname"], "--hostname", cli=True)
    elif "hostname" in data:
        hostname = load.hostname(load.string(data["hostname"], "hostname"), "hostname")
    else:
        fqdn = socket.getfqdn()
        try:
            hostname = normaliseHostname(fqdn)
        except ValueError as e:
            raise load.error(
                "hostname",
                f"the system's name from socket.getfqdn() will not do: {e}; "
                "set hostname in the configuration file or use --hostname",
            ) from None

    # spool
    if _given(overrides, "spool"):
        spoolDirectory = load.spoolDirectory(overrides["spool"], "--spool", cwd, cli=True)
    elif "directory" in spool:
        spoolDirectory = load.spoolDirectory(spool["directory"], "spool.directory", configDir)
    else:
        spoolDirectory = load.spoolDirectory(DEFAULT_SPOOL_DIRECTORY, "spool.directory", cwd)
    minFreeSpace = load.integer(
        spool.get("min_free_space", DEFAULT_MIN_FREE_SPACE), "spool.min_free_space", minimum=0
    )

    # relay
    if _given(overrides, "relay_network"):
        relayNetworks = load.networks(overrides["relay_network"], "--relay-network", cli=True)
    else:
        relayNetworks = load.networks(
            relay.get("networks", list(DEFAULT_RELAY_NETWORKS)), "relay.networks"
        )
    if _given(overrides, "accept_domain"):
        acceptDomains = load.domains(overrides["accept_domain"], "--accept-domain", cli=True)
    else:
        acceptDomains = load.domains(relay.get("accept_domains", []), "relay.accept_domains")
    if overrides.get("smarthost") is not None:
        smarthost = load.smarthost(overrides["smarthost"], "--smarthost", cli=True)
    elif "smarthost" in relay:
        smarthost = load.smarthost(relay["smarthost"], "relay.smarthost")
    else:
        smarthost = None

    # limits
    maxMessageSize = load.integer(
        limits.get("message_size", DEFAULT_MESSAGE_SIZE), "limits.message_size", minimum=1
    )
    maxRecipients = load.integer(
        limits.get("recipients", DEFAULT_MAX_RECIPIENTS), "limits.recipients", minimum=1
    )
    idleTimeout = load.seconds(
        limits.get("idle_timeout", DEFAULT_IDLE_TIMEOUT), "limits.idle_timeout"
    )
    dataTimeout = load.seconds(
        limits.get("data_timeout", DEFAULT_DATA_TIMEOUT), "limits.data_timeout"
    )
    maxErrors = load.integer(limits.get("errors", DEFAULT_MAX_ERRORS), "limits.errors", minimum=1)
    maxHops = load.integer(limits.get("hops", DEFAULT_MAX_HOPS), "limits.hops", minimum=1)

    # dns
    reverseDNS = load.boolean(dns.get("reverse_lookups", True), "dns.reverse_lookups")

    # listeners and plugins
    if _given(overrides, "listen"):
        listeners = load.cliListeners(overrides["listen"], "--listen")
    else:
        listeners = load.listeners(
            data.get("listeners", [{"endpoint": DEFAULT_ENDPOINT}]), "listeners"
        )
    recipientValidators = load.plugins(
        data.get("recipient_validators", []), "recipient_validators"
    )
    headerStampers = load.plugins(
        data.get("header_stampers", [{"plugin": DEFAULT_HEADER_STAMPER}]), "header_stampers"
    )

    return Config(
        source=source,
        configDir=configDir,
        hostname=hostname,
        spoolDirectory=spoolDirectory,
        minFreeSpace=minFreeSpace,
        relayNetworks=relayNetworks,
        acceptDomains=acceptDomains,
        smarthost=smarthost,
        maxMessageSize=maxMessageSize,
        maxRecipients=maxRecipients,
        idleTimeout=idleTimeout,
        dataTimeout=dataTimeout,
        maxErrors=maxErrors,
        maxHops=maxHops,
        reverseDNS=reverseDNS,
        listeners=listeners,
        recipientValidators=recipientValidators,
        headerStampers=headerStampers,
    )
