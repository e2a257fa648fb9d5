"""Tests for L{mailrelay.policy.validators} (also importable as C{mailrelay.validators}) and the
example C{sqlite-recipients} site plugin."""

from __future__ import annotations

import importlib.util
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.errors import ConfigError
from mailrelay.interfaces import (
    ACCEPT,
    CONTINUE,
    IMailRelayPlugin,
    IRecipientValidator,
    PluginContext,
    Verdict,
    VerdictKind,
)
from mailrelay.plugins import MailRelayPlugin, buildPlugin
from mailrelay.policy import validators
from twisted.plugins import mailrelay_plugin as dropin

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sqlite-recipients"

CLIENT = ClientInfo(address="192.0.2.10", port=40000, helo="client.example.net", esmtp=True)


def judge(validator: Any, address: str) -> Any:
    """Ask C{validator} about C{address}, as the server would after relay control."""
    envelope = Envelope(sender="sender@example.net", client=CLIENT)
    return validator.validateRecipient(CLIENT, envelope, Recipient(address, original=address))


def summary(verdict: Verdict) -> tuple[str, int | None, str | None, str | None]:
    """A verdict as C{(kind, code, enhanced, text)}, for table tests."""
    reply = verdict.reply
    if reply is None:
        return (verdict.kind.value, None, None, None)
    return (verdict.kind.value, reply.code, reply.enhanced, reply.text)


@pytest.fixture
def context(tmp_path: Path) -> PluginContext:
    return PluginContext(hostname="mx.example.net", configDir=tmp_path)


def configError(build: Any, options: Any, context: PluginContext, key: str, *fragments: str):
    """Assert C{build(options, context)} raises a ConfigError for C{key} mentioning C{fragments}."""
    with pytest.raises(ConfigError) as info:
        build(options, context)
    error = info.value
    assert error.key == key, str(error)
    for fragment in fragments:
        assert fragment in str(error), (fragment, str(error))
    return error


# ---------------------------------------------------------------------------------------------
# Plugin objects


@pytest.mark.parametrize(
    "plugin, name, options",
    [
        (dropin.acceptedDomainsPlugin, "accepted-domains", {"domains": ["example.com"]}),
        (dropin.recipientMapPlugin, "recipient-map", {"file": "map"}),
        (
            dropin.regexPlugin,
            "regex",
            {"rules": [{"pattern": "^x", "action": "reject"}]},
        ),
    ],
)
def test_pluginObjects(plugin: Any, name: str, options: dict, context: PluginContext) -> None:
    """Each built-in plugin object provides IMailRelayPlugin and builds a validator lazily."""
    (context.configDir / "map").write_text("user@example.com\n")
    verifyObject(IMailRelayPlugin, plugin)
    assert plugin.name == name
    assert plugin.provides is IRecipientValidator
    assert plugin.description
    assert isinstance(plugin.factory, str)
    assert plugin.factory.startswith("mailrelay.policy.validators:")
    validator = buildPlugin({name: plugin}, name, IRecipientValidator, options, context)
    verifyObject(IRecipientValidator, validator)
    assert repr(validator).startswith("<")


def test_oldPathServesTheDropinsPluginObjects(context: PluginContext) -> None:
    """The old path mailrelay.validators (docs/plugins.md) gives the dropin's plugin objects,
    the one definition of each, and its factory names still build."""
    import mailrelay.validators as old

    assert old.acceptedDomainsPlugin is dropin.acceptedDomainsPlugin
    assert old.recipientMapPlugin is dropin.recipientMapPlugin
    assert old.regexPlugin is dropin.regexPlugin
    assert old.buildRegex is validators.buildRegex
    plugin = MailRelayPlugin("old-regex", IRecipientValidator, "d", "mailrelay.validators:buildRegex")
    options = {"rules": [{"pattern": "^x", "action": "reject"}]}
    built = buildPlugin({"old-regex": plugin}, "old-regex", IRecipientValidator, options, context)
    assert isinstance(built, validators.RegexValidator)


@pytest.mark.parametrize("module", ["mailrelay.validators", "mailrelay.policy.validators"])
def test_importIsCheap(module: str) -> None:
    """Importing the validators does not import the reactor."""
    code = f"import sys, {module}; sys.exit('twisted.internet.reactor' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# accepted-domains

DOMAINS = ["Example.COM.", ".sub.example.org", "bücher.de", "[192.0.2.1]"]


@pytest.mark.parametrize(
    "address, continuing",
    [
        ("user@example.com", "accept"),
        ("User@example.com", "accept"),
        ('"john doe"@example.com', "accept"),
        ("user@mail.example.com", "other"),  # no leading dot: no subdomains
        ("user@example.com.evil.net", "other"),
        ("user@a.sub.example.org", "accept"),
        ("user@a.b.sub.example.org", "accept"),
        ("user@sub.example.org", "other"),  # ".sub.example.org" is for subdomains only
        ("user@xsub.example.org", "other"),
        ("user@example.org", "other"),
        ("user@xn--bcher-kva.de", "accept"),
        ("user@[192.0.2.1]", "accept"),
        ("user@example.net", "other"),
        ("postmaster", "other"),
    ],
)
@pytest.mark.parametrize("others", ["continue", "reject", None])
def test_acceptedDomains(
    address: str, continuing: str, others: str | None, context: PluginContext
) -> None:
    """Listed domains (and subdomains of dotted entries) are accepted; others per C{others}."""
    options: dict[str, Any] = {"domains": DOMAINS}
    if others is not None:
        options["others"] = others
    validator = validators.buildAcceptedDomains(options, context)
    verifyObject(IRecipientValidator, validator)
    verdict = judge(validator, address)
    if continuing == "accept":
        assert verdict == ACCEPT
    elif others == "reject":
        assert summary(verdict) == (
            "reject",
            550,
            "5.1.2",
            "Error: recipient domain not accepted here",
        )
    else:
        assert verdict == CONTINUE


def test_acceptedDomainsNormalised(context: PluginContext) -> None:
    """Entries are lower-cased, lose their trailing dot and become A-labels."""
    validator = validators.buildAcceptedDomains({"domains": DOMAINS}, context)
    assert validator.domains == {"example.com", "xn--bcher-kva.de", "[192.0.2.1]"}
    assert validator.parents == {".sub.example.org"}


@pytest.mark.parametrize(
    "options, key, fragments",
    [
        ({}, "domains", ["missing", "'domains'"]),
        (
            {"domains": ["example.com"], "domain": "x"},
            "domain",
            ["unknown option 'domain'", "'x'", "domains, others"],
        ),
        ({"domains": "example.com"}, "domains", ["list", "'example.com'"]),
        ({"domains": []}, "domains", ["non-empty", "[]"]),
        ({"domains": ["example.com", 3]}, "domains[1]", ["string", "3"]),
        ({"domains": ["exa mple.com"]}, "domains[0]", ["bad domain name", "'exa mple.com'"]),
        ({"domains": ["a..b"]}, "domains[0]", ["'a..b'"]),
        ({"domains": ["."]}, "domains[0]", ["'.'"]),
        ({"domains": ["*.example.com"]}, "domains[0]", ["'.example.com'", "'*.example.com'"]),
        ({"domains": ["x.com"], "others": "accept"}, "others", ["'continue'", "'accept'"]),
        ({"domains": ["x.com"], "others": True}, "others", ["True"]),
    ],
)
def test_acceptedDomainsConfigErrors(
    options: Any, key: str, fragments: list[str], context: PluginContext
) -> None:
    configError(validators.buildAcceptedDomains, options, context, key, *fragments)


def test_acceptedDomainsNotATable(context: PluginContext) -> None:
    configError(validators.buildAcceptedDomains, ["example.com"], context, None, "table")


# ---------------------------------------------------------------------------------------------
# recipient-map

MAP = """\
\ufeff# Recipient map for the tests.
  # an indented comment

alice@example.com
Bob@example.com          OK
carol@example.com        REJECT
dave@example.com         REJECT   Dave left; write to  erin@example.com # not a comment
frank@example.com        DEFER
grace@example.com        defer    Mailbox being moved
heidi@example.com        CONTINUE
"John Doe"@example.com   OK
"joe"@example.com        OK
postmaster@              OK
abuse@                   REJECT   Use the web form
@catchall.example        OK
known@catchall.example   REJECT
@deferred.example        DEFER
@Bücher.DE.              OK
"""

UNKNOWN = ("reject", 550, "5.1.1", "Error: user unknown in recipient table")


@pytest.mark.parametrize(
    "address, expected",
    [
        ("alice@example.com", ("accept", None, None, None)),
        ("ALICE@example.com", ("accept", None, None, None)),
        ("bob@example.com", ("accept", None, None, None)),
        ("carol@example.com", UNKNOWN),
        (
            "dave@example.com",
            ("reject", 550, "5.1.1", "Dave left; write to  erin@example.com # not a comment"),
        ),
        ("frank@example.com", ("defer", 450, "4.2.0", "Error: recipient temporarily unavailable")),
        ("grace@example.com", ("defer", 450, "4.2.0", "Mailbox being moved")),
        ("heidi@example.com", ("continue", None, None, None)),
        ('"john doe"@example.com', ("accept", None, None, None)),
        ("joe@example.com", ("accept", None, None, None)),
        ("nobody@example.com", UNKNOWN),
        ("postmaster@example.com", ("accept", None, None, None)),
        ("Postmaster@catchall.example", ("accept", None, None, None)),
        ("abuse@example.com", ("reject", 550, "5.1.1", "Use the web form")),
        ("anyone@catchall.example", ("accept", None, None, None)),
        ("known@catchall.example", UNKNOWN),  # the full address wins over the catch-all
        ("abuse@catchall.example", ("reject", 550, "5.1.1", "Use the web form")),
        ("x@deferred.example", ("defer", 450, "4.2.0", "Error: recipient temporarily unavailable")),
        ("x@xn--bcher-kva.de", ("accept", None, None, None)),
        # Domains the table does not mention: no opinion, even for user@ keys.
        ("alice@example.net", ("continue", None, None, None)),
        ("postmaster@example.net", ("continue", None, None, None)),
        ("abuse@example.net", ("continue", None, None, None)),
        ("alice@sub.example.com", ("continue", None, None, None)),
    ],
)
def test_recipientMap(address: str, expected: tuple, context: PluginContext) -> None:
    (context.configDir / "recipients").write_text(MAP, encoding="utf-8")
    validator = validators.buildRecipientMap({"file": "recipients"}, context)
    verifyObject(IRecipientValidator, validator)
    assert summary(judge(validator, address)) == expected


@pytest.mark.parametrize(
    "address, kind",
    [
        ("alice@example.com", "accept"),
        ("Alice@example.com", "reject"),
        ("Bob@example.com", "accept"),
        ("bob@example.com", "reject"),
        ("POSTMASTER@example.com", "reject"),
        ('"John Doe"@example.com', "accept"),
        ('"john doe"@example.com', "reject"),
    ],
)
def test_recipientMapCaseSensitive(address: str, kind: str, context: PluginContext) -> None:
    (context.configDir / "recipients").write_text(MAP, encoding="utf-8")
    validator = validators.buildRecipientMap(
        {"file": "recipients", "case_sensitive": True}, context
    )
    assert judge(validator, address).kind.value == kind


@pytest.mark.parametrize(
    "address, kind",
    [
        ("alice+news@example.com", "accept"),  # alice's
        ("alice-x+y@example.com", "accept"),
        ("dave+x@example.com", "reject"),  # dave's own refusal
        ("carol+x@example.com", "reject"),  # unknown, as carol
        ("abuse+x@example.com", "reject"),  # the abuse@ local-part key, as abuse
        ("owner-list@example.com", "reject"),  # never split at a "-": unknown
        ("anyone+x@catchall.example", "accept"),
    ],
)
def test_recipientMapDelimiter(address: str, kind: str, context: PluginContext) -> None:
    """recipient_delimiter (Postfix's, for lookup tables): a key for the whole address (or
    local part) first, then the user without its extension."""
    (context.configDir / "recipients").write_text(
        MAP + "alice-x+y@example.com OK\nowner@example.com OK\n", encoding="utf-8"
    )
    validator = validators.buildRecipientMap(
        {"file": "recipients", "recipient_delimiter": "+-"}, context
    )
    assert judge(validator, address).kind.value == kind


def test_recipientMapDelimiterRefused(context: PluginContext) -> None:
    (context.configDir / "recipients").write_text(MAP, encoding="utf-8")
    with pytest.raises(ConfigError, match="recipient_delimiter"):
        validators.buildRecipientMap({"file": "recipients", "recipient_delimiter": "@"}, context)


def test_recipientMapPaths(tmp_path: Path, context: PluginContext) -> None:
    """A relative C{file} is relative to the configuration directory; an absolute one is not."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "map").write_text("a@example.com\n")
    relative = validators.buildRecipientMap({"file": "sub/map"}, context)
    absolute = validators.buildRecipientMap(
        {"file": str(tmp_path / "sub" / "map")},
        PluginContext(hostname="mx", configDir=Path("/nonexistent")),
    )
    for validator in relative, absolute:
        assert judge(validator, "a@example.com") == ACCEPT
        assert judge(validator, "b@example.com").kind is VerdictKind.REJECT
    assert relative.source == str(tmp_path / "sub" / "map")


def test_recipientMapEmpty(context: PluginContext) -> None:
    """A map with no entries continues for everyone."""
    (context.configDir / "map").write_text("# nothing yet\n\n")
    validator = validators.buildRecipientMap({"file": "map"}, context)
    assert judge(validator, "a@example.com") == CONTINUE


@pytest.mark.parametrize(
    "line, fragments",
    [
        ("alice", ["user@domain, @domain or user@"]),
        ("@", ["user@domain, @domain or user@"]),
        ("alice@example.com ACCEPT", ["unknown action 'ACCEPT'", "OK, REJECT"]),
        ("alice@example.com 550 No", ["unknown action '550'"]),
        ("alice@example.com OK fine", ["OK takes no reply text"]),
        ("alice@example.com CONTINUE x", ["CONTINUE takes no reply text"]),
        ("alice@example.com REJECT tab\there", ["printable ASCII"]),
        ("alice@exa_mple..com", ["bad domain", "'exa_mple..com'"]),
        ("al(ce@example.com", ["bad local part", "'al(ce'"]),
        ("a@b@example.com", ["bad local part", "'a@b'"]),
        ('"unterminated@example.com OK', ["closing quote"]),
        ('"john"x@example.com OK', ["closing quote"]),
        ('"john"@example.com,OK', ["bad domain"]),
    ],
)
def test_recipientMapBadLines(line: str, fragments: list[str], context: PluginContext) -> None:
    """A bad line stops start-up, naming the file, the line number and the line."""
    path = context.configDir / "map"
    path.write_text(f"# comment\nok@example.com\n{line}\n", encoding="utf-8")
    configError(
        validators.buildRecipientMap,
        {"file": "map"},
        context,
        "file",
        f"{path}:3:",
        repr(line),
        *fragments,
    )


@pytest.mark.parametrize(
    "first, second",
    [
        ("alice@example.com", "ALICE@Example.COM. REJECT"),
        ('"joe"@example.com', "joe@example.com"),
        ("@example.com", "@EXAMPLE.com"),
        ("abuse@", "Abuse@ REJECT"),
    ],
)
def test_recipientMapDuplicates(first: str, second: str, context: PluginContext) -> None:
    (context.configDir / "map").write_text(f"{first}\n\n{second}\n")
    configError(
        validators.buildRecipientMap, {"file": "map"}, context, "file", ":3:", "line 1", second
    )


def test_recipientMapCaseSensitiveDuplicates(context: PluginContext) -> None:
    """Keys differing in case are distinct with C{case_sensitive}."""
    (context.configDir / "map").write_text("alice@example.com\nALICE@example.com REJECT\n")
    validator = validators.buildRecipientMap({"file": "map", "case_sensitive": True}, context)
    assert judge(validator, "alice@example.com") == ACCEPT
    assert judge(validator, "ALICE@example.com").kind is VerdictKind.REJECT


def test_recipientMapNotUTF8(context: PluginContext) -> None:
    path = context.configDir / "map"
    path.write_bytes(b"ok@example.com\nj\xf6rg@example.com\n")
    configError(
        validators.buildRecipientMap, {"file": "map"}, context, "file", f"{path}:2:", "UTF-8"
    )


def test_recipientMapUnreadable(context: PluginContext) -> None:
    missing = context.configDir / "missing.map"
    configError(
        validators.buildRecipientMap,
        {"file": "missing.map"},
        context,
        "file",
        repr(str(missing)),
        "No such file or directory",
    )
    configError(
        validators.buildRecipientMap,
        {"file": "."},
        context,
        "file",
        repr(str(context.configDir / ".")),
        "Is a directory",
    )


@pytest.mark.parametrize(
    "options, key, fragments",
    [
        ({}, "file", ["missing", "'file'"]),
        ({"file": ""}, "file", ["non-empty string", "''"]),
        ({"file": 3}, "file", ["3"]),
        (
            {"file": "map", "reload": True},
            "reload",
            ["unknown option 'reload'", "case_sensitive, file"],
        ),
        ({"file": "map", "case_sensitive": "no"}, "case_sensitive", ["true or false", "'no'"]),
    ],
)
def test_recipientMapConfigErrors(
    options: Any, key: str, fragments: list[str], context: PluginContext
) -> None:
    (context.configDir / "map").write_text("a@example.com\n")
    configError(validators.buildRecipientMap, options, context, key, *fragments)


def test_recipientMapInMemory() -> None:
    """L{parseRecipientMap} works on any lines, for callers with their own source."""
    table = validators.parseRecipientMap(["a@example.com", "@example.org REJECT Gone"], "mem")
    assert judge(table, "a@example.com") == ACCEPT
    assert summary(judge(table, "x@example.org")) == ("reject", 550, "5.1.1", "Gone")
    assert table.domains == {"example.com", "example.org"}
    assert "mem" in repr(table)


# ---------------------------------------------------------------------------------------------
# regex

RULES = [
    {"pattern": r"^postmaster@", "action": "accept"},
    {"pattern": r"^noreply@", "action": "reject", "text": "No replies, please"},
    {"pattern": r"[+].*@example\.com$", "action": "defer"},
    {
        "pattern": r"@old\.example\.com$",
        "action": "reject",
        "code": 551,
        "enhanced": "5.1.6",
        "text": "User has moved",
    },
    {"pattern": r"^list-", "action": "continue"},
    {"pattern": r"^(list|bounce)", "action": "reject"},
    {
        "pattern": r"^temp",
        "action": "defer",
        "code": 451,
        "enhanced": "4.3.2",
        "text": "System not accepting network messages",
    },
]


@pytest.mark.parametrize(
    "address, expected",
    [
        ("postmaster@example.com", ("accept", None, None, None)),
        ("PostMaster@example.net", ("accept", None, None, None)),
        ("noreply@example.com", ("reject", 550, "5.7.1", "No replies, please")),
        ("NoReply@example.com", ("reject", 550, "5.7.1", "No replies, please")),
        (
            "user+tag@example.com",
            (
                "defer",
                450,
                "4.7.1",
                "Error: recipient address temporarily rejected, try again later",
            ),
        ),
        ("user+tag@example.net", ("continue", None, None, None)),
        ("someone@old.example.com", ("reject", 551, "5.1.6", "User has moved")),
        ("list-foo@example.com", ("continue", None, None, None)),  # first match wins
        ("bounces@example.com", ("reject", 550, "5.7.1", "Error: recipient address rejected")),
        ("tempuser@example.com", ("defer", 451, "4.3.2", "System not accepting network messages")),
        ("alice@example.com", ("continue", None, None, None)),
    ],
)
def test_regex(address: str, expected: tuple, context: PluginContext) -> None:
    validator = validators.buildRegex({"rules": RULES}, context)
    verifyObject(IRecipientValidator, validator)
    assert summary(judge(validator, address)) == expected


def test_regexCaseSensitive(context: PluginContext) -> None:
    validator = validators.buildRegex({"rules": RULES, "case_sensitive": True}, context)
    assert judge(validator, "noreply@example.com").kind is VerdictKind.REJECT
    assert judge(validator, "NoReply@example.com") == CONTINUE
    assert [r.regex.flags & re.IGNORECASE for r in validator.rules] == [0] * len(RULES)


def rules(**rule: Any) -> dict[str, Any]:
    """Options with one rule: a reject of C{^x} changed by C{rule}."""
    return {
        "rules": [
            {"pattern": "^ok", "action": "accept"},
            {"pattern": "^x", "action": "reject", **rule},
        ]
    }


@pytest.mark.parametrize(
    "options, key, fragments",
    [
        ({}, "rules", ["missing", "'rules'"]),
        ({"rules": {"pattern": "x"}}, "rules", ["list", "'pattern'"]),
        ({"rules": []}, "rules", ["non-empty", "[]"]),
        ({"rules": [{"pattern": "^a", "action": "accept"}, "x"]}, "rules[1]", ["table", "'x'"]),
        ({"rules": [{"action": "accept"}]}, "rules[0].pattern", ["missing"]),
        ({"rules": [{"pattern": "^a"}]}, "rules[0].action", ["missing"]),
        ({"rules": [{"pattern": 1, "action": "reject"}]}, "rules[0].pattern", ["string", "1"]),
        (rules(pattern="a(b"), "rules[1].pattern", ["'a(b'", "missing ), unterminated subpattern"]),
        (rules(pattern="*x"), "rules[1].pattern", ["'*x'", "nothing to repeat"]),
        (rules(action="refuse"), "rules[1].action", ["'refuse'", "'reject'"]),
        (rules(flags="i"), "rules[1].flags", ["unknown option 'flags'", "code, enhanced"]),
        (rules(action="accept", text="hi"), "rules[1].text", ["sends no reply", "'hi'"]),
        (rules(action="continue", code=550), "rules[1].code", ["sends no reply", "550"]),
        (rules(action="accept", enhanced="5.7.1"), "rules[1].enhanced", ["'5.7.1'"]),
        (rules(code=450), "rules[1].code", ["5xx", "'reject'", "450"]),
        (rules(code=600), "rules[1].code", ["600"]),
        (rules(code="550"), "rules[1].code", ["'550'"]),
        (rules(code=True), "rules[1].code", ["True"]),
        (rules(action="defer", code=550), "rules[1].code", ["4xx", "'defer'", "550"]),
        (rules(enhanced="4.7.1"), "rules[1].enhanced", ["5.x.y", "550", "'4.7.1'"]),
        (rules(enhanced="5.7"), "rules[1].enhanced", ["'5.7'"]),
        (rules(enhanced="5.7.1000"), "rules[1].enhanced", ["'5.7.1000'"]),
        (rules(enhanced=571), "rules[1].enhanced", ["571"]),
        (rules(action="defer", enhanced="5.7.1"), "rules[1].enhanced", ["4.x.y", "'5.7.1'"]),
        (rules(text=""), "rules[1].text", ["empty", "''"]),
        (rules(text="two\nlines"), "rules[1].text", ["printable ASCII", "'two\\nlines'"]),
        (rules(text=5), "rules[1].text", ["string", "5"]),
        ({**rules(), "case_sensitive": 1}, "case_sensitive", ["true or false", "1"]),
        ({**rules(), "rule": []}, "rule", ["unknown option 'rule'", "case_sensitive, rules"]),
    ],
)
def test_regexConfigErrors(
    options: Any, key: str, fragments: list[str], context: PluginContext
) -> None:
    configError(validators.buildRegex, options, context, key, *fragments)


def test_configErrorLocated(context: PluginContext) -> None:
    """The loader's prefix joins the key a validator names (C{rules[1].pattern})."""
    with pytest.raises(ConfigError) as info:
        validators.buildRegex(rules(pattern="("), context)
    located = info.value.within(file="relay.toml", key="recipient_validators[2]")
    assert str(located).startswith("relay.toml: recipient_validators[2].rules[1].pattern: ")


# ---------------------------------------------------------------------------------------------
# The example site plugin, examples/sqlite-recipients


def loadExample(name: str, path: Path) -> ModuleType:
    """Import the example file C{path} as a module, without touching C{sys.path}."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sqliteRecipients() -> ModuleType:
    return loadExample("sqlite_recipients", EXAMPLE / "sqlite_recipients.py")


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "recipients.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE recipients (address TEXT PRIMARY KEY, action TEXT NOT NULL DEFAULT 'OK');
        CREATE TABLE domains (domain TEXT PRIMARY KEY);
        INSERT INTO domains VALUES ('example.com');
        INSERT INTO recipients VALUES ('alice@example.com', 'OK'), ('bob@example.com', 'REJECT'),
            ('carol@example.com', 'defer'), ('dave@example.com', 'CONTINUE'),
            ('eve@example.com', 'MAYBE'), ('fred@example.net', 'OK'),
            ('Gina@example.com', 'OK');
        """
    )
    db.commit()
    db.close()
    return path


def resultOf(d: Deferred) -> Any:
    """The result a Deferred already has; re-raise its failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has no result yet"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_exampleDropin() -> None:
    """The dropin exposes a lazy IMailRelayPlugin named sqlite-recipients."""
    assert not (EXAMPLE / "twisted" / "__init__.py").exists()
    assert not (EXAMPLE / "twisted" / "plugins" / "__init__.py").exists()
    dropin = loadExample(
        "sqlite_recipients_plugin", EXAMPLE / "twisted" / "plugins" / "sqlite_recipients_plugin.py"
    )
    plugin = dropin.sqliteRecipients
    verifyObject(IMailRelayPlugin, plugin)
    assert plugin.name == "sqlite-recipients"
    assert plugin.provides is IRecipientValidator
    assert plugin.factory == "sqlite_recipients:build"


@pytest.mark.parametrize(
    "address, caseSensitive, expected",
    [
        ("alice@example.com", False, ("accept", None, None, None)),
        ("Alice@example.com", False, ("accept", None, None, None)),
        ("Alice@example.com", True, UNKNOWN),
        ("bob@example.com", False, ("reject", 550, "5.1.1", "Error: recipient address rejected")),
        (
            "carol@example.com",
            False,
            ("defer", 450, "4.2.0", "Error: recipient temporarily unavailable"),
        ),
        ("dave@example.com", False, ("continue", None, None, None)),
        ("nobody@example.com", False, UNKNOWN),
        ("fred@example.net", False, ("accept", None, None, None)),
        ("nobody@example.net", False, ("continue", None, None, None)),
        ("gina@example.com", False, UNKNOWN),  # stored with capitals: never found lower-cased
        ("Gina@example.com", True, ("accept", None, None, None)),
    ],
)
def test_exampleValidator(
    sqliteRecipients: ModuleType,
    database: Path,
    context: PluginContext,
    address: str,
    caseSensitive: bool,
    expected: tuple,
) -> None:
    validator = sqliteRecipients.build(
        {"database": database.name, "case_sensitive": caseSensitive}, context
    )
    verifyObject(IRecipientValidator, validator)
    validator._deferToThread = maybeDeferred  # run the look-up synchronously
    d = judge(validator, address)
    assert isinstance(d, Deferred)
    assert summary(resultOf(d)) == expected


def test_exampleBadAction(
    sqliteRecipients: ModuleType, database: Path, context: PluginContext
) -> None:
    """An unknown action fails the Deferred, which the server turns into 451 4.3.0."""
    validator = sqliteRecipients.build({"database": str(database)}, context)
    validator._deferToThread = maybeDeferred
    with pytest.raises(ValueError, match="bad action 'MAYBE'"):
        resultOf(judge(validator, "eve@example.com"))


def test_exampleCustomQuery(
    sqliteRecipients: ModuleType, database: Path, context: PluginContext
) -> None:
    query = "SELECT 'REJECT' FROM recipients WHERE address = ? AND action = 'OK'"
    validator = sqliteRecipients.build({"database": database.name, "query": query}, context)
    validator._deferToThread = maybeDeferred
    assert resultOf(judge(validator, "alice@example.com")).kind is VerdictKind.REJECT
    assert resultOf(judge(validator, "bob@example.com")) == Verdict.reject(
        "Error: user unknown in recipient table", 550, "5.1.1"
    )


def test_exampleThreadPool(sqliteRecipients: ModuleType, database: Path, tmp_path: Path) -> None:
    """By default the look-up goes through the context reactor's thread pool."""
    calls: list[str] = []

    class FakeThreadPool:
        def callInThreadWithCallback(self, onResult: Any, f: Any, *args: Any) -> None:
            calls.append("thread")
            onResult(True, f(*args))

    class FakeReactor:
        def getThreadPool(self) -> FakeThreadPool:
            return FakeThreadPool()

        def callFromThread(self, f: Any, *args: Any) -> None:
            calls.append("callFromThread")
            f(*args)

    context = PluginContext(hostname="mx", configDir=tmp_path, reactor=FakeReactor())
    validator = sqliteRecipients.build({"database": database.name}, context)
    d = judge(validator, "alice@example.com")
    assert resultOf(d) == ACCEPT
    assert calls == ["thread", "callFromThread"]


@pytest.mark.parametrize(
    "options, key, fragments",
    [
        ({}, "database", ["missing", "'database'"]),
        ({"database": 1}, "database", ["1"]),
        ({"database": "db", "table": "x"}, "table", ["unknown option 'table'", "'x'", "query"]),
        ({"database": "db", "query": 5}, "query", ["5"]),
        ({"database": "db", "case_sensitive": "yes"}, "case_sensitive", ["'yes'"]),
        ({"database": "missing.sqlite"}, "database", ["missing.sqlite", "unable to open"]),
        ({"database": "notadb"}, "database", ["notadb", "not a database"]),
        (
            {"database": "db", "query": "SELECT action FROM nope WHERE a = ?"},
            "query",
            ["no such table: nope"],
        ),
        ({"database": "db", "query": "SELECT action FROM recipients"}, "query", ["bindings"]),
        ({"database": "db", "query": "UPDATE recipients SET action = ?"}, "query", ["readonly"]),
        ({"database": "nodomains"}, "database", ["domains(domain)", "no such table: domains"]),
    ],
)
def test_exampleConfigErrors(
    sqliteRecipients: ModuleType,
    database: Path,
    context: PluginContext,
    options: dict,
    key: str,
    fragments: list[str],
) -> None:
    database.rename(context.configDir / "db")
    (context.configDir / "notadb").write_bytes(b"this is not SQLite\n" * 100)
    db = sqlite3.connect(context.configDir / "nodomains")
    db.execute("CREATE TABLE recipients (address TEXT, action TEXT)")
    db.close()
    configError(sqliteRecipients.build, options, context, key, *fragments)
    assert not (context.configDir / "missing.sqlite").exists()
