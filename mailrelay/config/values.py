"""One parser per type of value the configuration holds.

Two kinds of function live here:

  - the parsers of values with a notation of their own (networks, endpoints, spool
    directories), usable anywhere: they take the text and raise L{ValueError} with a message
    naming the value (the next hops', name servers', route domains' and maildir templates'
    are L{mailrelay.route.nexthop}'s, which the keys call through L{checked});
  - the schema's parsers (see L{mailrelay.config.schema}): C{parse(value, at)} checks the
    type the file gives, and raises the L{ConfigError} of C{at.error(...)}, which names the
    file and the key.  Integers and seconds have upper bounds (L{SECONDS_MAXIMUM}; each
    integer key gives its own), so that a typo or an overflow is refused at start-up rather
    than believed.

A value module: it imports only the values (L{mailrelay.address}, L{mailrelay.errors},
L{mailrelay.config.schema}), so that the stages may use it for their plugins' options.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from mailrelay.address import (
    DELIMITER_CHARACTERS,
    domainProblem,
    hostnameProblem,
    normaliseDomain,
    normaliseHostname,
    parseForwardPath,
)
from mailrelay.config.schema import At, Parser
from mailrelay.endpoints import passedSockets, sslArguments, systemdArguments
from mailrelay.errors import describeValue
from mailrelay.interfaces import PLATFORM_TRUST_STORE
from mailrelay.namedfile import readError, readNamedFile, runUserReadError
from mailrelay.pem import pemCertificates

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

#: The largest setting in seconds: beyond any sane one, and small enough that a time that far
#: ahead (a message's arrival plus queue.max_lifetime) is still a date.
SECONDS_MAXIMUM = 10**9



# ---------------------------------------------------------------------------------------------
# Parsing single values (usable on their own: they raise ValueError)


def parseNetwork(text: str) -> IPNetwork:
    """Parse an IP network: C{"192.0.2.0/24"}, C{"2001:db8::/32"}, or a bare address (C{/32},
    C{/128}).

    @raise ValueError: not a network, host bits set (C{"10.0.0.1/8"}), or an IPv4-mapped
        network that no client has (C{"::ffff:10.0.0.0/104"}); the message names the value.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be an IP network as a string, not {describeValue(text)}")
    try:
        network = ipaddress.ip_network(text, strict=True)
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
    mapped = network.network_address.ipv4_mapped if network.version == 6 else None
    if mapped is not None and network.prefixlen >= 96:
        # No client has such an address: an IPv4 client of an IPv6 socket (or one a PROXY
        # header names so) is known by its IPv4 address, as by Postfix.
        ipv4 = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
        raise ValueError(
            f"{describeValue(text)} is an IPv4-mapped IPv6 network; did you mean "
            f"{describeValue(str(ipv4))}? (IPv4 clients are known by their IPv4 address)"
        )
    return network


#: An endpoint's C{interface=} option whose value is an IPv6 address with its colons not
#: escaped (up to the next option, or the end).
_UNESCAPED_INTERFACE = re.compile(
    r"(?<=:)interface=(\[?[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\]?)(?=:\w+=|$)"
)


def _escapedInterface(text: str) -> str | None:
    """C{text} with the IPv6 address of its C{interface=} option escaped as Twisted needs it
    (C{tcp6:25:interface=\\:\\:1}), when it was written as is; else C{None}."""
    m = _UNESCAPED_INTERFACE.search(text)
    if m is None:
        return None
    try:
        ipaddress.IPv6Address(m.group(1).strip("[]"))
    except ValueError:
        return None
    escaped = m.group(1).strip("[]").replace(":", "\\:")
    return f"{text[: m.start(1)]}{escaped}{text[m.end(1) :]}"


def checkEndpoint(text: str, loadFiles: bool = True) -> None:
    """Check that Twisted can parse C{text} as a server endpoint description.

    The endpoint is built without a reactor and never listens.

    @param loadFiles: C{False}: an C{ssl:} endpoint's syntax only is checked, its
        certificate and key files not read (a process that serves no listener, running as
        a user who may not read them).
    @raise ValueError: the message names the value and gives Twisted's complaint.
    """
    from OpenSSL import SSL, crypto
    from twisted.internet.endpoints import serverFromString

    if not isinstance(text, str):
        raise ValueError(f"must be an endpoint string, not {describeValue(text)}")
    if text.startswith("systemd:"):
        problem = _systemdEndpointProblem(text[len("systemd:") :])
        if problem is not None:
            raise ValueError(f"{describeValue(text)} is not a valid systemd endpoint: {problem}")
        # Where systemd passed this process sockets (the relay, socket-activated), the
        # endpoint's must be among them; elsewhere (mailrelay check, mailrelay-sendmail, the
        # relay's child processes) nothing more can be known before the relay listens.
        problem = systemdSocketProblem(text) if passedSockets().inheritedDescriptors() else None
        if problem is not None:
            raise ValueError(f"{describeValue(text)}: {problem}")
        return
    hint = '(e.g. "tcp:2525:interface=127.0.0.1", "tcp6:25:interface=\\:\\:1", "unix:/run/x.sock")'
    try:
        if text.startswith("ssl:") and not loadFiles:
            port: Any = _sslEndpointPort(text)
        else:
            port = getattr(serverFromString(None, text), "_port", None)
    except (ValueError, TypeError, KeyError, IndexError, OSError, crypto.Error, SSL.Error) as e:
        # (OpenSSL's errors: an ssl: endpoint's certificate or key file it cannot read.)
        escaped = _escapedInterface(text)
        if escaped is not None:  # (Twisted's complaint: "got multiple values for argument")
            raise ValueError(
                f"{describeValue(text)} is not a valid server endpoint: escape each colon of "
                f"the IPv6 address with a backslash: '{escaped}' (quoted so, in single quotes: a "
                "TOML literal string keeps the backslashes, and so does a shell)"
            ) from None
        raise ValueError(
            f"{describeValue(text)} is not a valid server endpoint {hint}: {e}"
        ) from None
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ValueError(
            f"{describeValue(text)} is not a valid server endpoint: "
            f"port {port} is not from 0 to 65535"
        )


def _sslEndpointPort(text: str) -> int:
    """The port of the C{ssl:} endpoint C{text}, its arguments checked as Twisted's parser
    takes them, without reading its files.

    @raise TypeError: an argument it does not take, or no port.
    @raise ValueError: a port or backlog that is not a number.
    """
    given = sslArguments(text)
    int(given.get("backlog", 50))
    return int(given["port"])


def systemdSocketProblem(text: str) -> str | None:
    """Why the sockets systemd passed this process (L{passedSockets}) hold none for the
    C{systemd:} endpoint C{text} (its syntax right: L{checkEndpoint}), or C{None}: they hold
    its own."""
    passed = passedSockets()
    given = systemdArguments(text[len("systemd:") :])
    count = len(passed.inheritedDescriptors())
    if not count:
        return ("systemd passed this process no socket (LISTEN_FDS): a systemd: endpoint "
                "needs the relay started by a systemd socket unit")
    if "index" in given:
        index = int(given["index"])
        if index < count:
            return None
        sockets = "socket" if count == 1 else "sockets"
        return (f"systemd passed this process {count} {sockets} (LISTEN_FDS): there is no "
                f"index {index} (from 0)")
    names = passed.inheritedNamedDescriptors()
    if given["name"] in names:
        return None
    return (f"systemd passed this process no socket named {describeValue(given['name'])} "
            f"(its FileDescriptorName=; LISTEN_FDNAMES: {', '.join(names)})")


def _systemdEndpointProblem(arguments: str) -> str | None:
    """What is wrong with the arguments of a C{systemd:} endpoint (as Twisted's parser takes
    them: C{domain}, then C{index} or C{name}, by name or in that order), or C{None}."""
    try:
        given = systemdArguments(arguments)
    except ValueError as e:
        return str(e)
    domain = given.get("domain")
    if domain is None:
        return "it needs domain= (INET, INET6 or UNIX)"
    if domain not in ("INET", "INET6", "UNIX"):
        return f"domain {describeValue(domain)} is not one of INET, INET6, UNIX"
    if "index" in given and "name" in given:
        return "it takes index= or name=, not both"
    if "index" in given:
        index = given["index"]
        if not (index.isascii() and index.isdigit()):
            return f"index {describeValue(index)} is not an integer >= 0"
    elif not given.get("name"):
        return "it needs index= or name= (which socket systemd passes)"
    return None


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
# The schema's parsers: parse(value, at) raises at.error(...)


def checked(parse: Callable[[str], T]) -> Callable[[Any, At], T]:
    """The schema's parser of a string read by C{parse}, which raises L{ValueError}."""

    def checkedParse(value: Any, at: At) -> T:
        text = string(value, at)
        try:
            return parse(text)
        except ValueError as e:
            raise at.error(str(e)) from None

    return checkedParse


def raw(value: Any, at: At) -> Any:
    """The value as the file gives it, for the table's check to read."""
    return value


def string(value: Any, at: At) -> str:
    """A string."""
    if not isinstance(value, str):
        raise at.error(f"must be a string, not {describeValue(value)}")
    return value


def nonEmpty(what: str, hint: str = "") -> Parser:
    """A string that is not empty: C{what} it is (C{"a plugin name"}), for the message
    refusing C{""}, and C{hint}, said after it."""

    def parse(value: Any, at: At) -> str:
        text = string(value, at)
        if not text:
            raise at.error(f"must be {what}, not an empty string{hint}")
        return text

    return parse


def recipientDelimiter(value: Any, at: At) -> str:
    """The characters that separate a local part from its extension (C{"+"}: C{bob+lists} is
    C{bob}'s), each one of L{DELIMITER_CHARACTERS}; C{""}: none."""
    text = string(value, at)
    bad = sorted({c for c in text if c not in DELIMITER_CHARACTERS})
    if bad or len(text) > len(DELIMITER_CHARACTERS):
        raise at.error(
            f"must be characters out of {describeValue(DELIMITER_CHARACTERS)} (such as "
            f'"+"), not {describeValue(text)}'
        )
    return text


def boolean(value: Any, at: At) -> bool:
    """C{true} or C{false}."""
    if not isinstance(value, bool):
        raise at.error(f"must be true or false, not {describeValue(value)}")
    return value


def integer(minimum: int, maximum: int, reason: str = "", *, span: bool = False) -> Parser:
    """An integer (not a boolean) from C{minimum} to C{maximum}.

    @param reason: why the maximum, said after it (C{" (20 digits, RFC 1870)"}).
    @param span: say "an integer from C{minimum} to C{maximum}" in every message, instead of
        "a positive integer" (or "an integer >= 0") and, when too large, its maximum.
    """
    if span:
        what = f"an integer from {minimum} to {maximum}"
    else:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(value: Any, at: At) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise at.error(f"must be {what}, not {describeValue(value)}")
        if value > maximum:
            if span:
                raise at.error(f"must be {what}, not {describeValue(value)}")
            raise at.error(
                f"must be {what} no larger than {maximum}{reason}, not {describeValue(value)}"
            )
        return value

    return parse


def _seconds(value: Any, at: At, what: str, zero: bool) -> float:
    """A finite number (integer or float, not boolean) from 0 (or above it) to
    L{SECONDS_MAXIMUM}, as a float."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        raise at.error(f"must be {what}, not {describeValue(value)}")
    if value > SECONDS_MAXIMUM:
        raise at.error(
            f"must be {what} no larger than {SECONDS_MAXIMUM} (about 31 years), "
            f"not {describeValue(value)}"
        )
    return float(value)


def seconds(value: Any, at: At) -> float:
    """A number of seconds greater than zero."""
    return _seconds(value, at, "a positive number of seconds", zero=False)


def nonNegativeSeconds(value: Any, at: At) -> float:
    """A number of seconds, zero included."""
    return _seconds(value, at, "a number of seconds >= 0", zero=True)


#: The most acceptor processes C{[relay] processes} may ask for.
MAX_PROCESSES = 256


def processCount(value: Any, at: At) -> int | str:
    """C{[relay] processes}: a number of processes (1 to L{MAX_PROCESSES}) or C{"auto"}
    (as many as the relay may use cores: L{resolveProcessCount})."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PROCESSES:
        raise at.error(
            f'must be an integer from 1 to {MAX_PROCESSES} or "auto", not {describeValue(value)}'
        )
    return value


def resolveProcessCount(value: int | str) -> int:
    """The number of processes C{[relay] processes} asks for: C{"auto"} is the number of
    cores this process may run on (its CPU affinity, which C{taskset} and cgroups' cpusets
    narrow), at most L{MAX_PROCESSES}."""
    if value != "auto":
        return int(value)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_PROCESSES, cores))


def choice(*choices: str) -> Parser:
    """One of C{choices}."""
    listed = ", ".join(describeValue(c) for c in choices[:-1])

    def parse(value: Any, at: At) -> str:
        if not isinstance(value, str) or value not in choices:
            raise at.error(
                f"must be {listed} or {describeValue(choices[-1])}, not {describeValue(value)}"
            )
        return value

    return parse


def stringList(value: Any, at: At) -> list[tuple[At, str]]:
    """An array of strings, as C{(where, string)} pairs; a command-line option given as one
    string is a list of one."""
    if isinstance(value, str) and at.cli:
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise at.error(f"must be an array of strings, not {describeValue(value)}")
    return [(at.item(index), string(item, at.item(index))) for index, item in enumerate(value)]


def strings(value: Any, at: At) -> tuple[str, ...]:
    """An array of strings (for a plugin's options: C{["a", "b"]})."""
    return tuple(text for _, text in stringList(value, at))


def mailqUsers(value: Any, at: At) -> tuple[int, ...] | None:
    """C{"anyone"} (C{None}), or an array of local user names: their user ids, each once."""
    import pwd

    if value == "anyone":
        return None
    if not isinstance(value, (list, tuple)):
        raise at.error(f'must be "anyone" or an array of user names, not {describeValue(value)}')
    uids: dict[int, None] = {}
    for where, name in stringList(value, at):
        try:
            uids[pwd.getpwnam(name).pw_uid] = None
        except KeyError:
            raise where.error(f"no user {describeValue(name)} on this system") from None
    return tuple(uids)


def headerNames(value: Any, at: At) -> tuple[str, ...]:
    """An array of header field names (C{["Bcc", "Return-Path"]}), lower-cased, each once."""
    names: dict[str, None] = {}
    for where, text in stringList(value, at):
        if not re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", text):
            raise where.error(f"{describeValue(text)} is not a header field name")
        names[text.lower()] = None
    return tuple(names)


def fileName(value: Any, at: At) -> str:
    """A file's name, as an absolute path."""
    return at.path(nonEmpty("a file name")(value, at))


#: A host name for this relay, normalised.
hostname = checked(normaliseHostname)


def optionalHostname(value: Any, at: At) -> str | None:
    """A host name, or C{""} for none (C{None})."""
    return hostname(value, at) if string(value, at) else None


def systemHostname(at: At) -> str:
    """The system's host name (the default of C{hostname})."""
    fqdn = socket.getfqdn()
    try:
        return normaliseHostname(fqdn)
    except ValueError as e:
        raise at.error(
            f"the system's name from socket.getfqdn() will not do: {e}; "
            "set hostname in the configuration file or use --hostname"
        ) from None


def networks(value: Any, at: At) -> tuple[IPNetwork, ...]:
    """An array of IP networks (see L{parseNetwork})."""
    return tuple(checked(parseNetwork)(text, where) for where, text in stringList(value, at))


def ipAddresses(value: Any, at: At) -> tuple[str, ...]:
    """An array of IP addresses (C{"192.0.2.1"}, C{"2001:db8::1"}), normalised."""
    result: list[str] = []
    for where, text in stringList(value, at):
        try:
            address = str(ipaddress.ip_address(text))
        except ValueError:
            raise where.error(f"{describeValue(text)} is not an IP address") from None
        if address not in result:
            result.append(address)
    return tuple(result)


def domains(value: Any, at: At) -> tuple[str, ...]:
    """An array of domains, normalised and without duplicates."""
    result: list[str] = []
    for where, text in stringList(value, at):
        try:
            domain = normaliseDomain(text)
        except ValueError as e:
            raise where.error(
                f"{describeValue(text)} is not a valid domain: {domainProblem(e)}"
            ) from None
        if domain not in result:
            result.append(domain)
    return tuple(result)


def endpoint(value: Any, at: At) -> str:
    """A server endpoint description Twisted can parse (see L{checkEndpoint})."""
    text = string(value, at)
    # (Not in an acceptor process given the relay's files: they are what it serves.)
    loadFiles = at.source.listenerTLS and not at.source.relayFiles
    checked(partial(checkEndpoint, loadFiles=loadFiles))(text, at)
    return text


def spoolPath(value: Any, at: At) -> Path:
    """The spool directory's path, whether or not it is usable: where the C{mailrelay}
    command finds the relay (a user who may not write there may still ask it)."""
    return Path(at.path(nonEmpty("a directory path")(value, at)))


def spoolDirectory(value: Any, at: At) -> Path:
    """The spool directory, which must be usable (see L{spoolDirectoryProblem})."""
    path = spoolPath(value, at)
    problem = spoolDirectoryProblem(path)
    if problem:
        raise at.error(f"unusable spool directory: {problem}")
    return path


def defaultSpoolDirectory(
    text: str, parse: Callable[[Any, At], Path] = spoolDirectory
) -> Callable[[At], Path]:
    """The default of the spool directory: C{text}, relative to the current directory, read
    by C{parse}."""
    return lambda at: parse(text, replace(at, base=at.source.cwd))


def _readBytes(path: str, what: str, at: At) -> bytes:
    """The bytes of the file C{path}, which holds C{what} (for the message when it cannot be
    read), a file the relay's children read too: started as root to run as another user,
    that user must be able to read it (L{runUserReadError}), or each delivery process would
    refuse the configuration, restarted for ever while mail waits."""
    try:
        data = readNamedFile(path)
    except OSError as e:
        raise at.error(f"cannot read {what} {describeValue(path)}: {readError(e)}") from None
    refused = runUserReadError(path)
    if refused is not None:
        user, error = refused
        raise at.error(
            f"cannot read {what} {describeValue(path)} as user {user}, which the relay runs "
            f"as once started: {error.strerror} (let that user read it, e.g. by its group and "
            "mode 0640)"
        )
    return data


def caFile(value: Any, at: At) -> str | None:
    """A PEM CA bundle: C{None} for C{""}, else the absolute path of a readable file holding
    at least one PEM certificate."""
    text = string(value, at)
    if text == "":
        return None
    path = at.path(text)
    data = _readBytes(path, "the CA file", at)
    try:
        certificates = pemCertificates(data)  # each as delivery will load it
    except ValueError as e:
        raise at.error(f"the CA file {describeValue(path)}: {e}") from None
    if not certificates:
        raise at.error(
            f"the CA file {describeValue(path)} holds no PEM certificate "
            '(no "-----BEGIN CERTIFICATE-----" block; OpenSSL\'s "TRUSTED CERTIFICATE" '
            "form is not read: openssl x509 -in FILE -out NEW writes the plain one)"
        )
    return path


def routeCAFile(value: Any, at: At) -> str:
    """A route's (or the smarthost's) CA bundle, as L{caFile}; C{""} is
    L{PLATFORM_TRUST_STORE}: the platform's trust store, whatever the backend's default."""
    return caFile(value, at) or PLATFORM_TRUST_STORE


def secretFileName(value: Any, at: At) -> str | None:
    """A next hop's C{password_file} (C{[smarthost]}, an smtp or lmtp route): the name of a
    file whose first line is the password to log in with, as an absolute path; C{""}: none.
    The table's check reads it (L{readSecret}) once it knows a user name goes with it.  (Not
    C{[auth]}'s C{password_file}, a table of users and hashes.)"""
    text = string(value, at)
    return at.path(text) if text else None


def readSecret(path: str, at: At) -> str:
    """The secret in the file C{path}: its first line, without the line end.  The secret
    itself never appears in messages."""
    data = _readBytes(path, "the password file", at)
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        raise at.error(f"the password file {describeValue(path)} is not UTF-8 text") from None
    password = decoded.split("\n", 1)[0].removesuffix("\r")
    if not password:
        what = "is empty" if not decoded else "has an empty first line"
        raise at.error(
            f"the password file {describeValue(path)} {what} (its first line is the password)"
        )
    if "\0" in password:
        raise at.error(f"the password in {describeValue(path)} contains a NUL character")
    return password


def secret(value: Any, at: At) -> str | None:
    """A password written in the file (C{""}: none), never shown in messages."""
    if not isinstance(value, str):
        raise at.error("must be a string (the value is not shown here)")
    if "\0" in value:
        raise at.error("contains a NUL character (the value is not shown here)")
    return value or None


def userName(value: Any, at: At) -> str | None:
    """A user name to log in with (C{""}: none)."""
    text = string(value, at)
    if "\0" in text:
        raise at.error(f"{describeValue(text)} contains a NUL character")
    return text or None


def serverName(value: Any, at: At) -> str:
    """A name a TLS client may ask for: a host name, or C{"*."} and a domain, in lower case
    without a trailing dot."""
    text = string(value, at)
    name = text.lower().rstrip(".")
    problem = hostnameProblem(name[2:] if name.startswith("*.") else name)
    if problem:
        raise at.error(
            f'{describeValue(text)} is not a host name (or "*." and a domain): {problem}'
        )
    return name


def postmaster(value: Any, at: At) -> str | None:
    """A mailbox (C{""}: none); a bare C{postmaster} is postmaster at the relay's host name
    (C{hostname}, read before)."""
    text = string(value, at)
    if not text:
        return None
    try:
        return str(parseForwardPath(f"<{text}>", postmasterDomain=at.scope["hostname"]))
    except ValueError as e:
        raise at.error(
            f"{describeValue(text)} is not a valid address: {domainProblem(e)}"
        ) from None
