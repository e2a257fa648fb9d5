"""The built-in recipient validators: accepted domains, a recipient map, regular expressions.

Each validator is built by a C{build*(options, context)} factory from its configuration table
and provides L{IRecipientValidator}.  The factories check every option and raise
L{ConfigError} naming the offending key and value, so that a bad configuration stops start-up
instead of misbehaving later.  The validators answer synchronously with a plain L{Verdict}.

Their plugin objects are the mailrelay dropin's (C{twisted/plugins/mailrelay_plugin.py}),
defined there once, with these factories named as C{"mailrelay.policy.validators:build..."}
strings: scanning the dropin does not import this module.  It never imports the reactor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.address import (
    DELIMITER_CHARACTERS,
    normaliseDomain,
    parseForwardPath,
    userParts,
)
from mailrelay.errors import ConfigError
from mailrelay.interfaces import (
    ACCEPT,
    CONTINUE,
    IRecipientValidator,
    PluginContext,
    Verdict,
)
from mailrelay.namedfile import readError

if TYPE_CHECKING:  # pragma: no cover
    from mailrelay.envelope import ClientInfo, Envelope, Recipient

log = Logger()

__all__ = [
    "DOMAIN_NOT_ACCEPTED_TEXT",
    "RECIPIENT_DEFER_TEXT",
    "USER_UNKNOWN_TEXT",
    "AcceptedDomains",
    "RecipientMap",
    "RegexRule",
    "RegexValidator",
    "buildAcceptedDomains",
    "buildRecipientMap",
    "buildRegex",
    "parseRecipientMap",
]

#: Default reply text for a recipient a recipient map does not know.
USER_UNKNOWN_TEXT = "Error: user unknown in recipient table"

#: Default reply text of a recipient map's C{DEFER} action.
RECIPIENT_DEFER_TEXT = "Error: recipient temporarily unavailable"

#: Reply text of C{accepted-domains} with C{others = "reject"}.
DOMAIN_NOT_ACCEPTED_TEXT = "Error: recipient domain not accepted here"

_ENHANCED_CODE = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})")


# ---------------------------------------------------------------------------------------------
# Option checking, shared by the factories.


def _checkOptions(
    options: Any, allowed: Iterable[str], required: Iterable[str] = (), prefix: str = ""
) -> None:
    """Check that C{options} is a table with only C{allowed} keys and every C{required} key.

    @param prefix: prepended to the keys named in errors (C{"rules[2]."}).
    @raise ConfigError: it is not.
    """
    allowed = sorted(allowed)
    if not isinstance(options, dict):
        raise ConfigError(
            f"must be a table with keys {', '.join(allowed)}, not {options!r}",
            key=prefix.rstrip(".") or None,
        )
    for name in options:
        if name not in allowed:
            raise ConfigError(
                f"unknown option {name!r} = {options[name]!r}; "
                f"allowed options: {', '.join(allowed)}",
                key=f"{prefix}{name}",
            )
    for name in required:
        if name not in options:
            raise ConfigError(f"missing required option {name!r}", key=f"{prefix}{name}")


def _getBool(options: dict[str, Any], name: str, default: bool, prefix: str = "") -> bool:
    """Return the boolean option C{name}, or C{default} when absent.

    @raise ConfigError: the value is not C{true} or C{false}.
    """
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"must be true or false, not {value!r}", key=f"{prefix}{name}")
    return value


def _getString(options: dict[str, Any], name: str, prefix: str = "") -> str:
    """Return the option C{name}, which must be a non-empty string.

    @raise ConfigError: it is not.
    """
    value = options[name]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be a non-empty string, not {value!r}", key=f"{prefix}{name}")
    return value


def _getChoice(
    options: dict[str, Any], name: str, choices: tuple[str, ...], default: str, prefix: str = ""
) -> str:
    """Return the option C{name}, which must be one of C{choices}, or C{default} when absent.

    @raise ConfigError: it is not.
    """
    value = options.get(name, default)
    if value not in choices:
        raise ConfigError(
            f"must be one of {', '.join(repr(c) for c in choices)}, not {value!r}",
            key=f"{prefix}{name}",
        )
    return value


def _replyTextProblem(text: str) -> str | None:
    """Say what makes C{text} unusable as SMTP reply text, or return C{None} if it is fine."""
    if not text:
        return "reply text must not be empty"
    if not all(" " <= c <= "~" for c in text):
        return "reply text must be printable ASCII on one line"
    return None


def _why(error: ValueError) -> str:
    """The text explaining C{error}: its reply text for an C{AddressError}, else its message."""
    reply = getattr(error, "reply", None)
    return reply.text if reply is not None else str(error)


def _normaliseLocalPart(localPart: str) -> str:
    """The canonical form of a local part, as recipients have it: C{"joe"} becomes C{joe} and
    other quoted-strings are quoted minimally, as in L{mailrelay.envelope.Recipient.address}.

    @raise ValueError: a bad local part (an L{mailrelay.address.AddressError}).
    """
    path = f"<{localPart}@example.invalid>"
    return parseForwardPath(path, utf8=True, postmasterDomain="example.invalid").localPart


def _recipientParts(recipient: Recipient) -> tuple[str, str]:
    """Split a canonical recipient address into its local part and (lower-case) domain.

    An address without a domain (C{<Postmaster>}) gives an empty domain.
    """
    address = recipient.address
    if "@" not in address:
        return address, ""
    local, _, domain = address.rpartition("@")
    return local, domain.lower()


# ---------------------------------------------------------------------------------------------
# accepted-domains


@implementer(IRecipientValidator)
class AcceptedDomains:
    """Accepts recipients in a list of domains.

    An entry C{"example.com"} matches that domain only; an entry C{".example.com"} (Postfix
    style) matches every subdomain of C{example.com} but not C{example.com} itself.  Other
    domains continue the chain, or are rejected (550 5.1.2) when C{rejectOthers} is set.

    @ivar domains: the exact domains.
    @ivar parents: the parent domains whose subdomains match, each with its leading dot.
    @ivar rejectOthers: reject recipients in other domains instead of continuing.
    """

    def __init__(
        self, domains: Iterable[str], parents: Iterable[str] = (), rejectOthers: bool = False
    ) -> None:
        self.domains = frozenset(domains)
        self.parents = frozenset(parents)
        self.rejectOthers = rejectOthers
        self._otherVerdict = (
            Verdict.reject(DOMAIN_NOT_ACCEPTED_TEXT, 550, "5.1.2") if rejectOthers else CONTINUE
        )

    def __repr__(self) -> str:
        return (
            f"<AcceptedDomains {len(self.domains)} domains, {len(self.parents)} parents, "
            f"others={'reject' if self.rejectOthers else 'continue'}>"
        )

    def matches(self, domain: str) -> bool:
        """Return C{True} when C{domain} (canonical) is one of the accepted domains."""
        if domain in self.domains:
            return True
        if self.parents:
            dot = domain.find(".")
            while dot != -1:
                if domain[dot:] in self.parents:
                    return True
                dot = domain.find(".", dot + 1)
        return False

    def validateRecipient(
        self, client: ClientInfo, envelope: Envelope, recipient: Recipient
    ) -> Verdict:
        """Accept C{recipient} when its domain is accepted; see the class docstring."""
        _, domain = _recipientParts(recipient)
        if domain and self.matches(domain):
            return ACCEPT
        return self._otherVerdict


def buildAcceptedDomains(options: dict[str, Any], context: PluginContext) -> AcceptedDomains:
    """Build an L{AcceptedDomains} from its options.

    Options: C{domains} (required, a list of domain names; C{".example.com"} matches the
    subdomains of C{example.com}) and C{others} (C{"continue"}, the default, or C{"reject"}).

    @raise ConfigError: an option is missing, unknown or wrong.
    """
    _checkOptions(options, ("domains", "others"), required=("domains",))
    entries = options["domains"]
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ConfigError(
            f"must be a non-empty list of domain names, not {entries!r}", key="domains"
        )
    normalise = normaliseDomain
    domains: set[str] = set()
    parents: set[str] = set()
    for i, entry in enumerate(entries):
        key = f"domains[{i}]"
        if not isinstance(entry, str):
            raise ConfigError(f"must be a domain name (a string), not {entry!r}", key=key)
        if entry.startswith("*."):
            raise ConfigError(
                f"wildcards are not supported: use {entry[1:]!r} to match the subdomains of "
                f"{entry[2:]!r}, not {entry!r}",
                key=key,
            )
        isParent = entry.startswith(".")
        try:
            domain = normalise(entry[1:] if isParent else entry)
        except ValueError as e:
            raise ConfigError(f"bad domain name {entry!r}: {_why(e)}", key=key) from e
        if isParent:
            parents.add("." + domain)
        else:
            domains.add(domain)
    others = _getChoice(options, "others", ("continue", "reject"), "continue")
    validator = AcceptedDomains(domains, parents, rejectOthers=(others == "reject"))
    log.debug("Built {validator!r}", validator=validator)
    return validator


# ---------------------------------------------------------------------------------------------
# recipient-map

#: A map key whose local part is a quoted-string: the quoted-string, "@" and the domain.
_QUOTED_KEY = re.compile(r'"(?:[^"\\]|\\.)*"@\S*')


@implementer(IRecipientValidator)
class RecipientMap:
    """Judges recipients with a table read from a file, like a Postfix recipient lookup table.

    Look-up order: the full address, then the local part alone (C{user@} keys) when the
    recipient's domain is one the table mentions, then the domain's catch-all (C{@domain}).
    With C{delimiters} (Postfix's C{recipient_delimiter}), the address and the local part
    are each looked for whole, then without their extension (L{userParts}: C{bob+news@} is
    C{bob@}'s unless the table has C{bob+news@}).
    A recipient in a mentioned domain that matches nothing is rejected (550 5.1.1); one in a
    domain the table does not mention continues the chain.

    Local parts are compared case-insensitively unless C{caseSensitive} is set; the keys
    given here are expected to be folded already (see L{parseRecipientMap}).

    @ivar addresses: verdicts by full address (C{local@domain}).
    @ivar localParts: verdicts by local part, for any mentioned domain.
    @ivar catchAlls: verdicts by domain.
    @ivar domains: the domains the table mentions.
    @ivar caseSensitive: compare local parts case-sensitively.
    @ivar source: where the table came from, for messages.
    """

    def __init__(
        self,
        addresses: dict[str, Verdict],
        localParts: dict[str, Verdict],
        catchAlls: dict[str, Verdict],
        caseSensitive: bool = False,
        source: str = "",
        delimiters: str = "",
    ) -> None:
        self.delimiters = delimiters
        self.addresses = addresses
        self.localParts = localParts
        self.catchAlls = catchAlls
        self.domains = frozenset(catchAlls) | frozenset(a.rpartition("@")[2] for a in addresses)
        self.caseSensitive = caseSensitive
        self.source = source
        self._unknown = Verdict.reject(USER_UNKNOWN_TEXT, 550, "5.1.1")

    def __repr__(self) -> str:
        return (
            f"<RecipientMap {self.source or '(memory)'}: {len(self.addresses)} addresses, "
            f"{len(self.localParts)} local parts, {len(self.domains)} domains>"
        )

    def validateRecipient(
        self, client: ClientInfo, envelope: Envelope, recipient: Recipient
    ) -> Verdict:
        """Look C{recipient} up in the table; see the class docstring."""
        local, domain = _recipientParts(recipient)
        if domain not in self.domains:
            return CONTINUE
        if not self.caseSensitive:
            local = local.lower()
        parts = userParts(local, self.delimiters)
        for part in parts:
            verdict = self.addresses.get(f"{part}@{domain}")
            if verdict is not None:
                return verdict
        for part in parts:
            verdict = self.localParts.get(part)
            if verdict is not None:
                return verdict
        return self.catchAlls.get(domain, self._unknown)


def _mapVerdict(action: str, text: str | None) -> Verdict | str:
    """Turn a map line's action and text into a verdict, or return what is wrong with them."""
    action = action.upper()
    if action in ("OK", "CONTINUE"):
        if text is not None:
            return f"{action} takes no reply text"
        return ACCEPT if action == "OK" else CONTINUE
    if action in ("REJECT", "DEFER"):
        if text is not None:
            problem = _replyTextProblem(text)
            if problem:
                return problem
        if action == "REJECT":
            return Verdict.reject(text or USER_UNKNOWN_TEXT, 550, "5.1.1")
        return Verdict.defer(text or RECIPIENT_DEFER_TEXT, 450, "4.2.0")
    return f"unknown action {action!r}; actions: OK, REJECT [text], DEFER [text], CONTINUE"


def _parseMapLine(line: str, caseSensitive: bool) -> tuple[str, str, Verdict]:
    """Parse one stripped, non-comment line of a recipient map.

    @return: the canonical (and, unless C{caseSensitive}, lower-cased) local part or C{""},
        the canonical domain or C{""}, and the verdict.
    @raise ValueError: the line is wrong; the message says why.
    """
    if line.startswith('"'):
        match = _QUOTED_KEY.match(line)
        if match is None:
            raise ValueError('a quoted local part needs its closing quote and then "@"')
        key, rest = match.group(), line[match.end() :]
        if rest and not rest[0].isspace():
            raise ValueError("the key must be followed by a space")
    else:
        words = line.split(None, 1)
        key, rest = words[0], words[1] if len(words) > 1 else ""

    local, at, domain = key.rpartition("@")
    if not at or not (local or domain):
        raise ValueError("the key must be user@domain, @domain or user@")
    if local:
        try:
            local = _normaliseLocalPart(local)
        except ValueError as e:
            raise ValueError(f"bad local part {local!r} ({_why(e)})") from e
        if not caseSensitive:
            local = local.lower()
    if domain:
        try:
            domain = normaliseDomain(domain)
        except ValueError as e:
            raise ValueError(f"bad domain {domain!r} ({_why(e)})") from e

    words = rest.split(None, 1)
    verdict = _mapVerdict(words[0] if words else "OK", words[1] if len(words) > 1 else None)
    if isinstance(verdict, str):
        raise ValueError(verdict)
    return local, domain, verdict


def parseRecipientMap(
    lines: Iterable[str], source: str = "", caseSensitive: bool = False
) -> RecipientMap:
    """Parse the lines of a recipient map into a L{RecipientMap}.

    Each line is C{KEY [ACTION [text...]]}; lines whose first non-blank character is C{#} and
    blank lines are ignored (a C{#} elsewhere is part of the line).  KEY is C{user@domain},
    C{@domain} (catch-all) or C{user@} (that local part in every domain of the table); a
    quoted-string local part (C{"john doe"@example.com}) may contain spaces.  Keys are
    brought to the canonical form of recipient addresses (C{"joe"@Example.COM} is
    C{joe@example.com}).  ACTION is C{OK} (the default), C{REJECT [text]}, C{DEFER [text]} or
    C{CONTINUE}, in any case.

    @param source: the file name, for error messages.
    @raise ConfigError: a line is wrong; the message gives C{source:lineno} and the line.
    """
    addresses: dict[str, Verdict] = {}
    localParts: dict[str, Verdict] = {}
    catchAlls: dict[str, Verdict] = {}
    seen: dict[str, int] = {}

    for lineno, rawLine in enumerate(lines, 1):
        line = rawLine.strip()
        if not line or line.startswith("#"):
            continue
        try:
            local, domain, verdict = _parseMapLine(line, caseSensitive)
            key = f"{local}@{domain}"
            if key in seen:
                raise ValueError(f"duplicate key {key!r} (first on line {seen[key]})")
        except ValueError as e:
            raise ConfigError(f"{source}:{lineno}: {e}: {line!r}", key="file") from e
        seen[key] = lineno
        if local and domain:
            addresses[key] = verdict
        elif domain:
            catchAlls[domain] = verdict
        else:
            localParts[local] = verdict

    return RecipientMap(addresses, localParts, catchAlls, caseSensitive, source)


def buildRecipientMap(options: dict[str, Any], context: PluginContext) -> RecipientMap:
    """Build a L{RecipientMap} from its options, reading the file now.

    Options: C{file} (required; relative to the configuration file's directory),
    C{case_sensitive} (default C{false}: local parts compare case-insensitively) and
    C{recipient_delimiter} (default C{""}; see L{RecipientMap}).

    @raise ConfigError: an option is missing, unknown or wrong, the file cannot be read, or
        one of its lines is wrong.
    """
    _checkOptions(options, ("file", "case_sensitive", "recipient_delimiter"), required=("file",))
    name = _getString(options, "file")
    caseSensitive = _getBool(options, "case_sensitive", False)
    delimiters = options.get("recipient_delimiter", "")
    if not isinstance(delimiters, str) or any(c not in DELIMITER_CHARACTERS for c in delimiters):
        raise ConfigError(
            f"must be characters out of {DELIMITER_CHARACTERS!r} (such as '+'), not "
            f"{delimiters!r}",
            key="recipient_delimiter",
        )
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = Path(context.configDir) / path
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot read recipient map {str(path)!r}: {readError(e)}", key="file"
        ) from e

    lines = []
    for lineno, rawLine in enumerate(data.splitlines(), 1):
        try:
            lines.append(rawLine.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}:{lineno}: not UTF-8 ({e.reason} at column {e.start + 1}): {rawLine!r}",
                key="file",
            ) from e
    table = parseRecipientMap(lines, str(path), caseSensitive)
    table.delimiters = delimiters
    log.info("Loaded {table!r}", table=table)
    return table


# ---------------------------------------------------------------------------------------------
# regex


class RegexRule:
    """One rule of a L{RegexValidator}: a compiled pattern and the verdict it gives.

    @ivar regex: the compiled pattern, searched for in the canonical address.
    @ivar verdict: the verdict when it is found.
    """

    def __init__(self, regex: re.Pattern[str], verdict: Verdict) -> None:
        self.regex = regex
        self.verdict = verdict

    def __repr__(self) -> str:
        return f"<RegexRule {self.regex.pattern!r} -> {self.verdict.kind.value}>"


@implementer(IRecipientValidator)
class RegexValidator:
    """Judges recipients by regular expressions searched for in their canonical address.

    The first rule whose pattern is found (C{re.search}) decides; no match continues the chain.

    @ivar rules: the L{RegexRule}s, in order.
    """

    def __init__(self, rules: Iterable[RegexRule]) -> None:
        self.rules = tuple(rules)

    def __repr__(self) -> str:
        return f"<RegexValidator {len(self.rules)} rules>"

    def validateRecipient(
        self, client: ClientInfo, envelope: Envelope, recipient: Recipient
    ) -> Verdict:
        """Return the verdict of the first rule matching C{recipient}, else C{CONTINUE}."""
        address = recipient.address
        for rule in self.rules:
            if rule.regex.search(address) is not None:
                return rule.verdict
        return CONTINUE


#: For each action of a regex rule: the allowed code range and default code, status and text.
_RULE_DEFAULTS: dict[str, tuple[range, int, str, str]] = {
    "reject": (range(500, 600), 550, "5.7.1", "Error: recipient address rejected"),
    "defer": (
        range(400, 500),
        450,
        "4.7.1",
        "Error: recipient address temporarily rejected, try again later",
    ),
}


def _buildRule(rule: Any, index: int, flags: int) -> RegexRule:
    """Build the L{RegexRule} configured by C{rule}, the table C{rules[index]}.

    @raise ConfigError: the table is wrong; the key named is C{rules[index].<option>}.
    """
    prefix = f"rules[{index}]."
    _checkOptions(
        rule, ("pattern", "action", "text", "code", "enhanced"), ("pattern", "action"), prefix
    )
    pattern = rule["pattern"]
    if not isinstance(pattern, str):
        raise ConfigError(
            f"must be a regular expression (a string), not {pattern!r}", key=prefix + "pattern"
        )
    try:
        regex = re.compile(pattern, flags)
    except re.error as e:
        raise ConfigError(f"bad regular expression {pattern!r}: {e}", key=prefix + "pattern") from e
    action = _getChoice(rule, "action", ("reject", "defer", "accept", "continue"), "", prefix)

    if action in ("accept", "continue"):
        for name in ("text", "code", "enhanced"):
            if name in rule:
                raise ConfigError(
                    f"a rule with action {action!r} sends no reply; remove {name} = {rule[name]!r}",
                    key=prefix + name,
                )
        return RegexRule(regex, ACCEPT if action == "accept" else CONTINUE)

    codes, code, enhanced, text = _RULE_DEFAULTS[action]
    code = rule.get("code", code)
    if isinstance(code, bool) or not isinstance(code, int) or code not in codes:
        raise ConfigError(
            f"must be a {codes.start // 100}xx code for action {action!r}, not {code!r}",
            key=prefix + "code",
        )
    enhanced = rule.get("enhanced", enhanced)
    match = _ENHANCED_CODE.fullmatch(enhanced) if isinstance(enhanced, str) else None
    if match is None or match.group(1) != str(code)[0]:
        raise ConfigError(
            f"must be an enhanced status code {str(code)[0]}.x.y matching code {code}, "
            f"not {enhanced!r}",
            key=prefix + "enhanced",
        )
    text = rule.get("text", text)
    problem = _replyTextProblem(text) if isinstance(text, str) else "must be a string"
    if problem:
        raise ConfigError(f"{problem}, not {text!r}", key=prefix + "text")
    if action == "reject":
        verdict = Verdict.reject(text, code, enhanced)
    else:
        verdict = Verdict.defer(text, code, enhanced)
    return RegexRule(regex, verdict)


def buildRegex(options: dict[str, Any], context: PluginContext) -> RegexValidator:
    """Build a L{RegexValidator} from its options.

    Options: C{rules} (required; a list of tables with C{pattern} and C{action}, which is
    C{"reject"}, C{"defer"}, C{"accept"} or C{"continue"}, and for C{reject}/C{defer} an
    optional C{text}, C{code} and C{enhanced}) and C{case_sensitive} (default C{false}).

    @raise ConfigError: an option is missing, unknown or wrong, or a pattern does not compile.
    """
    _checkOptions(options, ("rules", "case_sensitive"), required=("rules",))
    rules = options["rules"]
    if not isinstance(rules, (list, tuple)) or not rules:
        raise ConfigError(f"must be a non-empty list of rule tables, not {rules!r}", key="rules")
    flags = 0 if _getBool(options, "case_sensitive", False) else re.IGNORECASE
    validator = RegexValidator(_buildRule(rule, i, flags) for i, rule in enumerate(rules))
    log.debug("Built {validator!r}", validator=validator)
    return validator

