"""Parsers of single values of the configuration (usable on their own: they raise
L{ValueError}).

A value module: it imports only the values (L{mailrelay.address}, L{mailrelay.errors}).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mailrelay.address import hostnameProblem
from mailrelay.errors import describeValue

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_SMTP_PORT = 25
#: The fields a C{maildir} route's directory template may use.
MAILDIR_FIELDS = ("local", "domain", "address")
DEFAULT_DNS_PORT = 53
_DIGITS = re.compile(r"[0-9]+\Z")
_TEMPLATE_FIELD = re.compile(r"\{([^{}/]*)\}")


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


def _parseServer(text: str, what: str, hint: str) -> tuple[str, int | None, bool, bool]:
    """Split C{"host"}, C{"host:port"}, C{"[host]"} or C{"[host]:port"} and check the parts.

    @param what: what C{text} is, for messages (C{"smarthost"}).
    @param hint: the notations allowed, for messages.
    @return: the host (lower case, no trailing dot; an IP address in canonical form, IPv6
        without brackets), the port or C{None}, whether the host was in brackets and whether it
        is an IP address.
    @raise ValueError: C{"<text> is not a valid <what>: <reason> <hint>"}.
    """

    def bad(reason: str) -> ValueError:
        return ValueError(f"{describeValue(text)} is not a valid {what}: {reason} {hint}")

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

    port = None
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
        return str(address), port, bracketed, True
    problem = hostnameProblem(host)
    if problem:
        raise bad(problem)
    return host.rstrip(".").lower() if host.endswith(".") else host.lower(), port, bracketed, False


def parseSmarthost(text: str) -> Smarthost:
    """Parse a smarthost: C{"host"}, C{"host:port"}, C{"[host]"}, C{"[host]:port"},
    C{"192.0.2.1:2525"}, C{"[2001:db8::1]:2525"}.

    Brackets mean "no MX lookup" (Postfix's relayhost convention); an IP address is never
    looked up.  The port defaults to 25.

    @raise ValueError: the message names the value and says what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a smarthost as a string, not {describeValue(text)}")
    host, port, bracketed, isAddress = _parseServer(
        text, "smarthost", '(use "host", "host:port", "[host]:port" or "[2001:db8::1]:port")'
    )
    return Smarthost(
        host,
        DEFAULT_SMTP_PORT if port is None else port,
        mxLookup=not (bracketed or isAddress),
    )


def parseNameserver(text: str) -> tuple[str, int]:
    """Parse a DNS resolver's address: C{"192.0.2.1"}, C{"127.0.0.1:5353"}, C{"::1"},
    C{"[::1]:53"}.  The port defaults to 53.

    @return: C{(address, port)}, the address in its canonical form (IPv6 without brackets).
    @raise ValueError: not an IP address with an optional port (host names are refused: a
        resolver cannot be found by name); the message names the value.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a name server address as a string, not {describeValue(text)}")
    try:
        return str(ipaddress.ip_address(text)), DEFAULT_DNS_PORT
    except ValueError:
        pass
    hint = '(use "192.0.2.1", "127.0.0.1:5353" or "[2001:db8::1]:53")'
    host, port, _, isAddress = _parseServer(text, "name server", hint)
    if not isAddress:
        raise ValueError(
            f"{describeValue(text)} is not a valid name server: {describeValue(host)} is not "
            f"an IP address (a name server is given by its address, not its name) {hint}"
        )
    return host, DEFAULT_DNS_PORT if port is None else port


def parseLMTPNexthop(text: str) -> str:
    """Parse an LMTP server: C{"host:port"}, C{"[host]:port"}, C{"[2001:db8::1]:port"} or
    C{"unix:/path/to/socket"}.

    The port is required (LMTP has no standard port).  An LMTP server's host is never looked
    up by MX, so brackets around a host name change nothing.

    @return: the canonical form: C{"host:port"} (host name in lower case, IPv4 address),
        C{"[IPv6]:port"} or C{"unix:/normalised/path"}.
    @raise ValueError: the message names the value and says what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be an LMTP server as a string, not {describeValue(text)}")
    hint = '(use "host:port", "[host]:port", "[2001:db8::1]:port" or "unix:/path/to/socket")'
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError(
                f"{describeValue(text)} is not a valid LMTP server: the socket path after "
                f'"unix:" must be absolute (start with "/") {hint}'
            )
        return "unix:" + os.path.normpath(path)
    host, port, _, _ = _parseServer(text, "LMTP server", hint)
    if port is None:
        raise ValueError(
            f"{describeValue(text)} is not a valid LMTP server: the port is missing "
            f"(LMTP has no default port) {hint}"
        )
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def checkMaildirTemplate(text: str) -> None:
    """Check a maildir directory template: a non-empty path in which C{{local}},
    C{{domain}} and C{{address}} stand for the recipient's local part, domain and address.

    The maildir backend replaces those three placeholders and leaves every other character as
    it is; any other C{{...}} (C{{user}}, C{{Local}}, C{{}}) is refused here as a likely
    mistake.

    @raise ValueError: the message names the value and says what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a directory template (a string), not {describeValue(text)}")
    if not text:
        raise ValueError("must be a directory template, not an empty string")
    for match in _TEMPLATE_FIELD.finditer(text):
        if match.group(1) not in MAILDIR_FIELDS:
            allowed = ", ".join("{" + name + "}" for name in MAILDIR_FIELDS)
            raise ValueError(
                f"{describeValue(text)} is not a valid directory template: unknown placeholder "
                f"{describeValue(match.group(0))} (the placeholders are {allowed})"
            )


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

