"""An example site router: the recipients of some domains go to an LMTP server, as a small
file says.

The file has one domain a line, and what to do with its recipients::

    # domain              LMTP server, or REJECT / DEFER [text]
    example.com           unix:/run/dovecot/lmtp
    .example.com          [10.0.0.5]:24             # every subdomain of example.com
    old.example.com       REJECT this domain is no longer served here
    moving.example.com    DEFER mailboxes are being moved

The domain is written as in a C{[[routes]]} table: C{example.com} (that domain),
C{.example.com} (its subdomains, not itself) or C{*} (every domain); the most specific line
wins.  The LMTP server is written as in an C{lmtp} route (C{host:port}, C{[host]:port},
C{unix:/path}).  C{REJECT} bounces the recipient (5.1.2), C{DEFER} keeps it queued (4.3.2),
each with the text as the diagnostic.  A recipient whose domain no line matches is left to
the next router, and at the end to mailrelay's routes (the router answers C{None}).

The file is read when the relay starts and each time it reloads its configuration
(SIGHUP), and every line is checked then: a bad line stops the start (or the reload) with a
message naming the file, the line and what is wrong.  Routing itself is a look-up in memory,
so the router answers at once, without a Deferred.

Options (C{[[routers]] plugin = "lmtp-domains"}):

    - C{file}: the file, relative to the configuration file's directory (required).

See README.md beside this file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.errors import ConfigError, PermanentFailure, TransientFailure
from mailrelay.interfaces import IRouter, PluginContext, Route
from mailrelay.route.nexthop import parseLMTPNexthop, parseRouteDomain

if TYPE_CHECKING:  # pragma: no cover
    from mailrelay.envelope import Envelope, Recipient

log = Logger()

#: The backend the routes name: mailrelay's built-in LMTP backend.
BACKEND = "lmtp"
#: The status and default text of a C{REJECT} line (RFC 3463 X.1.2: bad destination system).
REJECT = ("5.1.2", "domain {domain} is not served here")
#: The status and default text of a C{DEFER} line (X.3.2: system not accepting messages).
DEFER = ("4.3.2", "domain {domain} is not accepting mail now")


@dataclass(frozen=True)
class Entry:
    """What one line of the file says: a route, or a refusal (C{REJECT}, C{DEFER}).

    @ivar route: where the domain's recipients go, or C{None} for a refusal.
    @ivar action: C{"REJECT"} or C{"DEFER"} for a refusal, else C{""}.
    @ivar text: the refusal's diagnostic text, or C{""} for the default.
    """

    route: Route | None
    action: str = ""
    text: str = ""

    def answer(self, domain: str) -> Route:
        """The route, or raise the refusal for a recipient in C{domain}."""
        if self.route is not None:
            return self.route
        code, default = REJECT if self.action == "REJECT" else DEFER
        diagnostic = "X-mailrelay; " + (self.text or default.format(domain=domain))
        if self.action == "REJECT":
            raise PermanentFailure(code=code, diagnostic=diagnostic)
        raise TransientFailure(code=code, diagnostic=diagnostic)


@implementer(IRouter)
class LMTPDomains:
    """Routes the recipients of the domains of a file (see the module docstring).

    @ivar entries: what each domain pattern says, by pattern (C{"example.com"},
        C{".example.com"}, C{"*"}).
    @ivar source: the file, for messages.
    """

    def __init__(self, entries: dict[str, Entry], source: str = "") -> None:
        self.entries = entries
        self.source = source

    def __repr__(self) -> str:
        return f"<LMTPDomains {self.source or '(memory)'}: {len(self.entries)} domains>"

    def lookup(self, domain: str) -> Entry | None:
        """The most specific entry for C{domain}: the domain itself, then its parents'
        subdomain patterns, nearest first, then C{"*"}."""
        if not domain:
            return None  # <postmaster>: not ours to route
        entry = self.entries.get(domain)
        rest = domain
        while entry is None and "." in rest and not domain.startswith("["):
            rest = rest.split(".", 1)[1]
            entry = self.entries.get("." + rest)
        return entry if entry is not None else self.entries.get("*")

    def route(self, envelope: Envelope, recipient: Recipient) -> Route | None:
        """The recipient's LMTP route, C{None} (not one of the file's domains), or raise
        its domain's refusal (L{PermanentFailure}, L{TransientFailure})."""
        entry = self.lookup(recipient.domain)
        return None if entry is None else entry.answer(recipient.domain)


def parseLine(line: str) -> tuple[str, Entry]:
    """Parse one line (stripped, not a comment): C{DOMAIN SERVER}, C{DOMAIN REJECT [text]}
    or C{DOMAIN DEFER [text]}.

    @raise ValueError: the line is wrong; the message says why.
    """
    words = line.split(None, 2)
    if len(words) < 2:
        raise ValueError("want a domain and an LMTP server (or REJECT or DEFER)")
    pattern = parseRouteDomain(words[0])
    action = words[1].upper()
    if action in ("REJECT", "DEFER"):
        text = words[2] if len(words) > 2 else ""
        if not text.isprintable():
            raise ValueError(f"the text of {action} must be printable")
        return pattern, Entry(None, action, text)
    if len(words) > 2:
        raise ValueError(f"unexpected {words[2]!r} after the LMTP server")
    return pattern, Entry(Route(BACKEND, str(parseLMTPNexthop(words[1]))))


def parseDomains(lines: Iterable[str], source: str = "") -> LMTPDomains:
    """Parse the file's lines into an L{LMTPDomains}; C{#} starts a comment, to the end of
    the line, and blank lines are skipped.

    @raise ConfigError: a line is wrong, or gives a domain again; the message names
        C{source:lineno} and the line.
    """
    entries: dict[str, Entry] = {}
    first: dict[str, int] = {}
    for lineno, rawLine in enumerate(lines, 1):
        line = rawLine.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            pattern, entry = parseLine(line)
            if pattern in first:
                raise ValueError(f"{pattern!r} is already on line {first[pattern]}")
        except ValueError as e:
            raise ConfigError(f"{source}:{lineno}: {e}: {line!r}", key="file") from None
        entries[pattern] = entry
        first[pattern] = lineno
    return LMTPDomains(entries, source)


def build(options: dict[str, Any], context: PluginContext) -> LMTPDomains:
    """Build an L{LMTPDomains} from its options, reading and checking the file now.

    @raise ConfigError: an option is missing, unknown or wrong, the file cannot be read, or
        one of its lines is wrong.
    """
    for key in options:
        if key != "file":
            raise ConfigError(
                f"unknown option {key!r} = {options[key]!r}; allowed options: file", key=key
            )
    if "file" not in options:
        raise ConfigError("missing required option 'file'", key="file")
    name = options["file"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"must be a file name (a string), not {name!r}", key="file")
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = Path(context.configDir) / path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {str(path)!r}: {e}", key="file") from e
    router = parseDomains(text.splitlines(), str(path))
    log.info("Routing {router!r}", router=router)
    return router
