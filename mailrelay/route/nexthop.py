"""Next hops: one parser for each kind of value that says where mail goes.

The configuration loader and the runtime use the same parsers, so a value the loader accepted
is read the same way at delivery time, and every message names the value and says what is
wrong (the loader adds the file and the key):

  - L{parseSMTPNexthop}: an SMTP next hop or smarthost, C{"example.org"} (MX lookup),
    C{"example.org:2525"}, C{"[smtp.example.net]:587"} (no MX lookup, Postfix's relayhost
    convention), C{"192.0.2.1:2525"}, C{"[2001:db8::1]:2525"}, C{"[IPv6:2001:db8::1]"}, as an
    L{SMTPNexthop};
  - L{parseLMTPNexthop}: an LMTP server, C{"host:port"} (the port is required: LMTP has no
    standard port) or C{"unix:/path/to/socket"}, as an L{LMTPNexthop};
  - L{parseNameserver}: a DNS resolver's address, C{"192.0.2.1"}, C{"[::1]:53"};
  - L{parseRouteDomain}: the domain pattern of a route, C{"example.org"}, C{".example.org"}
    (its subdomains) or C{"*"};
  - L{parseSenderKey}: the sender a sender route is for, C{"user@example.org"},
    C{"@example.org"} or C{"<>"} (the null sender);
  - L{checkMaildirTemplate}: a C{maildir} route's directory template.

Each raises C{ValueError} with a message such as C{'"host:0" is not a valid smarthost: the
port must be from 1 to 65535, not 0 (use ...)'}.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from mailrelay.address import domainProblem, hostnameProblem, normaliseDomain, parseSenderPattern
from mailrelay.errors import describeValue

__all__ = [
    "DEFAULT_DNS_PORT",
    "DEFAULT_SMTP_PORT",
    "MAILDIR_FIELDS",
    "LMTPNexthop",
    "SMTPNexthop",
    "checkMaildirTemplate",
    "parseLMTPNexthop",
    "parseNameserver",
    "NULL_SENDER_KEY",
    "parseRouteDomain",
    "parseSMTPNexthop",
    "parseSenderKey",
]

DEFAULT_SMTP_PORT = 25
DEFAULT_DNS_PORT = 53
#: The key a sender route for the null sender has (Postfix's
#: C{empty_address_relayhost_maps_lookup_key}).
NULL_SENDER_KEY = "<>"
#: The fields a C{maildir} route's directory template may use.
MAILDIR_FIELDS = ("local", "domain", "address")

_DIGITS = re.compile(r"[0-9]+\Z")
_TEMPLATE_FIELD = re.compile(r"\{([^{}/]*)\}")
_SMTP_HINT = '(use "host", "host:port", "[host]:port" or "[2001:db8::1]:port")'
_LMTP_HINT = '(use "host:port", "[host]:port", "[2001:db8::1]:port" or "unix:/path/to/socket")'
_NAMESERVER_HINT = '(use "192.0.2.1", "127.0.0.1:5353" or "[2001:db8::1]:53")'
_ROUTE_DOMAIN_HINT = (
    ' (a route\'s domain is "example.org" for that domain, ".example.org" for its '
    'subdomains or "*" for every domain)'
)


@dataclass(frozen=True)
class _Server:
    """A C{host[:port]} split and checked by L{_parseServer}."""

    host: str
    port: int | None
    bracketed: bool
    isAddress: bool


def _parseServer(text: str, what: str, hint: str, *, strict: bool = True) -> _Server:
    """Split C{"host"}, C{"host:port"}, C{"[host]"}, C{"[host]:port"} or
    C{"[IPv6:address]:port"} and check the parts.

    @param what: what C{text} is, for messages (C{"smarthost"}).
    @param hint: the notations allowed, for messages.
    @param strict: check a host name as a host name (L{hostnameProblem}); when C{False}, as
        a mail domain (L{normaliseDomain}: what a recipient's domain may be, such as an
        all-digit last label).
    @return: the host (lower case, no trailing dot; an IP address in canonical form, IPv6
        without brackets nor C{"IPv6:"} tag), the port or C{None}, whether the host was in
        brackets and whether it is an IP address.
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
    if bracketed and host[:5].lower() == "ipv6:":
        # An RFC 5321 address literal, as a recipient domain "[IPv6:2001:db8::1]" is.
        try:
            return _Server(str(ipaddress.IPv6Address(host[5:])), port, True, True)
        except ValueError:
            raise bad(f'{describeValue(host[5:])} after "IPv6:" is not an IPv6 address') from None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return _Server(str(address), port, bracketed, True)
    if not strict:
        try:
            return _Server(normaliseDomain(host), port, bracketed, False)
        except ValueError as e:
            raise bad(domainProblem(e)) from None
    problem = hostnameProblem(host)
    if problem:
        raise bad(problem)
    name = host.rstrip(".").lower() if host.endswith(".") else host.lower()
    return _Server(name, port, bracketed, False)


# ---------------------------------------------------------------------------------------------
# SMTP


@dataclass(frozen=True)
class SMTPNexthop:
    """Where an SMTP delivery goes: a domain's MX hosts, or one host.

    @ivar host: a lower-case host name (no trailing dot) or an IP address (IPv6 without
        brackets).
    @ivar port: the TCP port.
    @ivar mxLookup: C{True} when C{host} is a domain whose MX records are looked up
        (written without brackets); C{False} for C{"[host]"} (Postfix's relayhost convention:
        connect to the host's own addresses) and for IP addresses.
    """

    host: str
    port: int = DEFAULT_SMTP_PORT
    mxLookup: bool = True

    def __str__(self) -> str:
        """The next hop in the notation L{parseSMTPNexthop} reads (C{"[relay.example]:587"})."""
        if self.mxLookup:
            text = self.host
        else:
            text = f"[{self.host}]"
        if self.port != DEFAULT_SMTP_PORT or not self.mxLookup:
            text += f":{self.port}"
        return text


def parseSMTPNexthop(text: str, *, what: str = "next hop", strict: bool = True) -> SMTPNexthop:
    """Parse an SMTP next hop: C{"host"}, C{"host:port"}, C{"[host]"}, C{"[host]:port"},
    C{"192.0.2.1:2525"}, C{"[2001:db8::1]:2525"}, C{"[IPv6:2001:db8::1]"}.

    Brackets mean "no MX lookup" (Postfix's relayhost convention); an IP address is never
    looked up.  The port defaults to 25.

    @param what: what C{text} is, for messages: C{"smarthost"} for the configuration's
        smarthost and C{smtp} routes' next hops.
    @param strict: C{True} checks a host name as one (labels of letters, digits and hyphens,
        the last not all digits); C{False} as a mail domain, for the next hops a router made
        of a recipient's domain (which the address parser checked already, by RFC 5321's
        rules).
    @raise ValueError: the message names the value and says what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a {what} as a string, not {describeValue(text)}")
    server = _parseServer(text, what, _SMTP_HINT, strict=strict)
    return SMTPNexthop(
        server.host,
        DEFAULT_SMTP_PORT if server.port is None else server.port,
        mxLookup=not (server.bracketed or server.isAddress),
    )


# ---------------------------------------------------------------------------------------------
# LMTP


@dataclass(frozen=True)
class LMTPNexthop:
    """Where an LMTP delivery goes: a TCP server (C{host}, C{port}) or a UNIX socket
    (C{path}).

    @ivar host: a lower-case host name (no trailing dot, never looked up by MX) or an IP
        address (IPv6 without brackets); C{""} for a UNIX socket.
    @ivar port: the TCP port; C{0} for a UNIX socket.
    @ivar path: the absolute, normalised path of the UNIX socket; C{""} for TCP.
    """

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        """The canonical form: C{"host:port"}, C{"[2001:db8::1]:port"} or C{"unix:/path"}."""
        if self.path:
            return "unix:" + self.path
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parseLMTPNexthop(text: str) -> LMTPNexthop:
    """Parse an LMTP server: C{"host:port"}, C{"[host]:port"}, C{"[2001:db8::1]:port"} or
    C{"unix:/path/to/socket"}.

    The port is required (LMTP has no standard port).  An LMTP server's host is never looked
    up by MX, so brackets around a host name change nothing.

    @raise ValueError: the message names the value and says what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be an LMTP server as a string, not {describeValue(text)}")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(
                f"{describeValue(text)} is not a valid LMTP server: the socket path after "
                f'"unix:" must be absolute (start with "/") {_LMTP_HINT}'
            )
        return LMTPNexthop(path=os.path.normpath(path))
    server = _parseServer(text, "LMTP server", _LMTP_HINT)
    if server.port is None:
        raise ValueError(
            f"{describeValue(text)} is not a valid LMTP server: the port is missing "
            f"(LMTP has no default port) {_LMTP_HINT}"
        )
    return LMTPNexthop(server.host, server.port)


# ---------------------------------------------------------------------------------------------
# Name servers, route domains, maildir templates


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
    server = _parseServer(text, "name server", _NAMESERVER_HINT)
    if not server.isAddress:
        raise ValueError(
            f"{describeValue(text)} is not a valid name server: {describeValue(server.host)} is "
            f"not an IP address (a name server is given by its address, not its name) "
            f"{_NAMESERVER_HINT}"
        )
    return server.host, DEFAULT_DNS_PORT if server.port is None else server.port


def parseRouteDomain(text: str) -> str:
    """Parse a route's domain pattern: C{"*"} (every domain), C{".example.org"} (every
    subdomain of example.org, not example.org itself) or C{"example.org"} (that domain; also
    an address literal such as C{"[192.0.2.1]"}).

    @return: the pattern with its domain in canonical form (lower case, A-labels, no trailing
        dot).
    @raise ValueError: the message names the value and says what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a route domain as a string, not {describeValue(text)}")
    if text == "*":
        return text
    subdomains = text.startswith(".")
    try:
        if subdomains and text[1:2] == "[":
            raise ValueError("an address literal has no subdomains")
        domain = normaliseDomain(text[1:] if subdomains else text)
    except ValueError as e:
        raise ValueError(
            f"{describeValue(text)} is not a valid domain: {domainProblem(e)}{_ROUTE_DOMAIN_HINT}"
        ) from None
    return "." + domain if subdomains else domain


def parseSenderKey(text: str) -> str:
    """Parse the sender a sender route is for: an address (C{"user@example.org"}), a domain
    (C{"@example.org"}: every address in that domain, not its subdomains) or C{"<>"} (the
    null sender), as Postfix's C{sender_dependent_relayhost_maps} keys.

    @return: the key in the form a sender is looked up by: lower case (Postfix's tables fold
        the key), the domain in canonical form (A-labels, no trailing dot).
    @raise ValueError: the message names the value and says what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a sender as a string, not {describeValue(text)}")
    if text == NULL_SENDER_KEY:
        return text
    try:
        pattern = parseSenderPattern(text)
        if pattern is None:
            raise ValueError("it is empty")
        return pattern.lower()
    except ValueError as e:
        raise ValueError(
            f'{describeValue(text)} is not an address, "@domain" or "<>" (the null sender): '
            f"{domainProblem(e)}"
        ) from None


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
