"""The values of the hook framework: notes and extension parameters stored with the envelope,
the plugin context (options read with the configuration's machinery, objects kept across
reloads, the thread hand-off), the hook table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailrelay.config.schema import Key, Table, pluginOptions
from mailrelay.config.values import choice, fileName, integer, stringList
from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.errors import ConfigError
from mailrelay.interfaces import (
    HOOKS,
    HOOKS_BY_NAME,
    IDataPolicy,
    IDeliveryObserver,
    MailRelayPlugin,
    PluginContext,
    providedBy,
)


def test_notes_and_parameters_are_stored_with_the_envelope() -> None:
    client = ClientInfo("192.0.2.7", notes={"dnsbl": {"listed": False, "zones": ["a.test"]}})
    envelope = Envelope(
        sender="a@example.com",
        recipients=[Recipient("b@example.org", parameters={"X-PRIO": 3})],
        client=client,
        parameters={"MT-PRIORITY": 2},
        notes={"spf": "pass", "score": 1.5, "none": None},
    )
    back = Envelope.fromJSON(envelope.toJSON())
    assert back.client is not None
    assert back.client.notes == {"dnsbl": {"listed": False, "zones": ["a.test"]}}
    assert back.notes == {"spf": "pass", "score": 1.5, "none": None}
    assert back.parameters == {"MT-PRIORITY": 2}
    assert back.recipients[0].parameters == {"X-PRIO": 3}


def test_an_envelope_without_notes_still_loads() -> None:
    data = json.loads(Envelope(sender="a@example.com", client=ClientInfo("192.0.2.1")).toJSON())
    for d in (data, data["client"]):
        del d["notes"]
    del data["parameters"]
    back = Envelope.fromDict(data)
    assert back.notes == {} and back.parameters == {}
    assert back.client is not None and back.client.notes == {}


def test_damaged_notes_are_refused_when_loaded() -> None:
    data = json.loads(Envelope(client=ClientInfo("192.0.2.1")).toJSON())
    data["client"]["notes"] = ["not", "an", "object"]
    with pytest.raises(ValueError, match=r"client\.notes: .* is not a JSON object"):
        Envelope.fromDict(data)


def test_notes_that_are_not_json_fail_serialisation() -> None:
    with pytest.raises(TypeError):
        Envelope(notes={"when": object()}).toJSON()


def test_the_hook_table_names_each_hook_once() -> None:
    assert [h.name for h in HOOKS] == [
        "connect", "helo", "esmtp", "mail", "rcpt", "data", "message", "queue", "delivery",
    ]
    assert HOOKS_BY_NAME["data"].interface is IDataPolicy
    assert HOOKS_BY_NAME["delivery"].process == "delivery"
    for hook in HOOKS:
        if hook.method is not None:
            assert hook.method in hook.interface.names(), hook


def test_a_plugin_may_declare_several_interfaces() -> None:
    one = MailRelayPlugin("a", IDataPolicy, "", factory=lambda o, c: None)
    two = MailRelayPlugin("b", (IDataPolicy, IDeliveryObserver), "", factory=lambda o, c: None)
    assert providedBy(one) == (IDataPolicy,)
    assert providedBy(two) == (IDataPolicy, IDeliveryObserver)


def context(tmp_path: Path, **kwargs: object) -> PluginContext:
    return PluginContext(hostname="relay.test", configDir=tmp_path, **kwargs)  # type: ignore[arg-type]


def test_keep_returns_the_same_object_across_contexts_sharing_kept(tmp_path: Path) -> None:
    kept: dict[str, object] = {}
    first = context(tmp_path, kept=kept).keep("grey:table", dict)
    first["x"] = 1
    assert context(tmp_path, kept=kept).keep("grey:table", dict) is first
    assert context(tmp_path).keep("grey:table", dict) == {}


def test_defer_to_thread_runs_at_once_without_a_thread_pool(tmp_path: Path) -> None:
    ctx = context(tmp_path, reactor=Clock())
    got: list[object] = []
    ctx.deferToThread(lambda a, b=0: a + b, 2, b=3).addCallback(got.append)
    assert got == [5]


OPTIONS = pluginOptions(
    Key("zones", stringList, "The lists.", required="is required: the DNS lists to ask"),
    Key("action", choice("reject", "tag"), "What a listing does.", default="reject"),
    Key("max_age", integer(1, 100), "Days."),
    Key("whitelist", fileName, "A file."),
)


def test_read_options_with_the_configuration_machinery(tmp_path: Path) -> None:
    got = context(tmp_path).readOptions(OPTIONS, {"zones": ["a.test"], "whitelist": "w.txt"})
    assert [text for _, text in got.zones] == ["a.test"]
    assert got.action == "reject"
    assert got.maxAge is None
    assert got.whitelist == str(tmp_path / "w.txt")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "zones: is required: the DNS lists to ask"),
        (
            {"zones": [], "actoin": "tag"},
            "actoin: unknown key \"actoin\" (did you mean \"action\"?); the keys allowed in "
            "the plugin's options are: zones, action, max_age, whitelist",
        ),
        ({"zones": [], "max_age": 0}, "max_age: must be a positive integer, not 0"),
        ({"zones": [], "action": "drop"}, 'action: must be "reject" or "tag", not "drop"'),
    ],
)
def test_read_options_refuses_with_the_key(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        context(tmp_path, source="relay.toml").readOptions(OPTIONS, options)
    assert str(e.value) == f"relay.toml: {message}"


@dataclass(frozen=True)
class GreyOptions:
    delay: int = 300
    expire: int = 86400


def test_read_options_into_a_dataclass(tmp_path: Path) -> None:
    schema = Table(
        (Key("delay", integer(0, 3600), "Seconds."), Key("expire", integer(1, 10**7), "S.")),
        target=GreyOptions,
    )
    assert context(tmp_path).readOptions(schema, {"delay": 60}) == GreyOptions(60, 86400)


@pytest.mark.parametrize(
    "enhanced",
    ["5.7.1\r\n250 2.0.0 ok", "5.7.1\n250 ok", "5.7.1 x", "5.7", "5.a.1", "5.1234.1", " 5.7.1"],
)
def test_a_reply_refuses_a_malformed_enhanced_status(enhanced: str) -> None:
    """A plugin's reply (through Verdict.reject, defer or its own Reply) cannot carry a
    second reply line in its enhanced status code: 'Verdict.reject("x", 550, "5.7.1\\r\\n250
    2.0.0 ok")' put '550 5.7.1' and '250 2.0.0 ok x' on the wire for one command (SMTP reply
    injection).  An RFC 3463 code or nothing is taken; the plugin's error is then refused
    as any bad answer is (451, logged naming it)."""
    from mailrelay.interfaces import Reply, Verdict

    with pytest.raises(ValueError, match="enhanced status"):
        Reply(550, enhanced, "x")
    with pytest.raises(ValueError):
        Verdict.reject("x", 550, enhanced)
    assert Reply(550, "5.7.1", "x").toBytes() == b"550 5.7.1 x\r\n"
    assert Reply(220, "", "hi").toBytes() == b"220 hi\r\n"


def test_a_plugin_exiting_in_build_is_a_configuration_error(tmp_path: Path) -> None:
    """A plugin whose build calls sys.exit (SystemExit) is refused naming it, as any other
    exception from build: 'mailrelay check' exited with its status and printed nothing."""
    from mailrelay.config.plugins import buildPlugin
    from mailrelay.interfaces import IRecipientValidator, MailRelayPlugin
    from mailrelay.testing import makePluginContext

    def build(options: Any, context: Any) -> Any:
        raise SystemExit(3)

    plugin = MailRelayPlugin("exits", IRecipientValidator, "exits in build", build)
    with pytest.raises(ConfigError) as e:
        buildPlugin({"exits": plugin}, "exits", IRecipientValidator, {},
                    makePluginContext(tmp_path))
    assert "plugin 'exits' failed to build: SystemExit: 3" in str(e.value), str(e.value)


def test_an_unknown_plugin_names_the_dropins_that_failed_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site dropin that fails to import (a module it needs is missing) has none of its
    plugins installed: the configuration naming one was refused as "unknown plugin", the
    dropin's traceback somewhere above it (or not at all, on a daemon's standard error).
    The error now says which dropin failed and why."""
    import twisted.plugins
    from mailrelay.config.plugins import availablePlugins, buildPlugin
    from mailrelay.interfaces import IRecipientValidator
    from mailrelay.testing import makePluginContext

    site = tmp_path / "site" / "twisted" / "plugins"
    site.mkdir(parents=True)
    dropin = site / "acme_broken_plugin.py"
    dropin.write_text(
        "from mailrelay.interfaces import IRecipientValidator, MailRelayPlugin\n"
        "import acme_ldap_client_not_installed\n"
        "acme = MailRelayPlugin('acme-ldap', IRecipientValidator, 'x', 'acme:build')\n"
    )
    monkeypatch.setattr(twisted.plugins, "__path__", [*twisted.plugins.__path__, str(site)])
    with pytest.raises(ConfigError) as e:
        buildPlugin(availablePlugins(), "acme-ldap", IRecipientValidator, {},
                    makePluginContext(tmp_path))
    message = str(e.value)
    assert "unknown plugin 'acme-ldap'" in message, message
    assert (f"a dropin failed to import (its plugins are missing): {dropin}: "
            "ModuleNotFoundError: No module named 'acme_ldap_client_not_installed'") in message


def test_a_dropin_that_fails_to_import_is_one_line_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dropin that fails to import was logged by Twisted's scan as "Unhandled Error" with
    its traceback, at every scan (each start, reload, process), even when none of its
    plugins is used: now one line, naming the file and the error, once per process; the
    other plugins are found as before."""
    from twisted.logger import capturedLogs, formatEvent

    import twisted.plugins
    from mailrelay.config import plugins as configPlugins

    site = tmp_path / "site" / "twisted" / "plugins"
    site.mkdir(parents=True)
    dropin = site / "acme_once_plugin.py"
    dropin.write_text("import acme_ldap_client_not_installed\n")
    monkeypatch.setattr(twisted.plugins, "__path__", [*twisted.plugins.__path__, str(site)])
    monkeypatch.setattr(configPlugins, "_reportedDropins", set(), raising=False)
    with capturedLogs() as events:
        assert "accepted-domains" in configPlugins.availablePlugins()
        assert "accepted-domains" in configPlugins.availablePlugins()
    assert [e for e in events if e.get("log_failure") or e.get("isError")] == []
    (line,) = [formatEvent(e) for e in events if str(dropin) in formatEvent(e)]
    assert line == (f"plugin dropin {dropin} failed to import, its plugins are not installed: "
                    "ModuleNotFoundError: No module named 'acme_ldap_client_not_installed'")
    import twisted.plugin
    from twisted.python import log as legacyLog

    assert twisted.plugin.log is legacyLog  # (put back after each scan)


def dropinsOfOneName(tmp_path: Path, file: str, plugin: str) -> list[Path]:
    """Two plugin directories, C{tmp_path/first} and C{tmp_path/second}, each with a dropin
    C{file} declaring a recipient validator named C{plugin.format(directory)}."""
    dropins = []
    for name in ("first", "second"):
        directory = tmp_path / name / "twisted" / "plugins"
        directory.mkdir(parents=True)
        dropins.append(directory / file)
        dropins[-1].write_text(
            "from mailrelay.interfaces import IRecipientValidator, MailRelayPlugin\n"
            f"p = MailRelayPlugin({plugin.format(name)!r}, IRecipientValidator, 'x', 'x:build')\n"
        )
    return dropins


def test_an_unknown_plugin_names_a_dropin_hidden_by_another_of_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two plugin directories each with a dropin of the same file name (two sites'
    site_plugin.py): Python imports the first only, and the other's plugins were missing
    without a word (\"unknown plugin\").  The error now names the hidden dropin."""
    import twisted.plugins
    from mailrelay.config.plugins import availablePlugins, buildPlugin
    from mailrelay.interfaces import IRecipientValidator
    from mailrelay.testing import makePluginContext

    dropins = dropinsOfOneName(tmp_path, "acme_site_plugin.py", "acme-{}")
    # (The first directory twice, as a path entry may be: it hides nothing.)
    monkeypatch.setattr(twisted.plugins, "__path__", [
        *twisted.plugins.__path__, str(dropins[0].parent), *(str(d.parent) for d in dropins)])
    available = availablePlugins()
    assert "acme-first" in available and "acme-second" not in available
    with pytest.raises(ConfigError) as e:
        buildPlugin(available, "acme-second", IRecipientValidator, {},
                    makePluginContext(tmp_path))
    assert (f"; a dropin is hidden by another of its name (its plugins are missing): "
            f"{dropins[1]}, hidden by {dropins[0]}: rename one") in str(e.value), str(e.value)
    assert str(e.value).count(", hidden by ") == 1, str(e.value)


@pytest.mark.parametrize(
    ("interface", "table"),
    [("IHeaderStamper", "[[header_stampers]]"), ("IRouter", "[[routers]]"),
     ("IDeliveryBackend", "[[backends]]"), ("IRateLimiter", "[rate_limiter]")],
)
def test_a_plugin_of_another_table_in_plugins_is_named_with_its_table(
    interface: str, table: str
) -> None:
    """A header stamper (a router, a backend...) named in a [[plugins]] table serves none of
    its hooks: the error showed the built object's repr ('<sitehooks.Stamp object at
    0x7f...> serves none of the hooks'), not the plugin's name, nor where it belongs."""
    from zope.interface import directlyProvides

    import mailrelay.interfaces
    from mailrelay.config.plugins import PluginEntry

    class Other:
        pass

    other = Other()
    directlyProvides(other, getattr(mailrelay.interfaces, interface))
    with pytest.raises(ValueError) as e:
        PluginEntry.serving("site-other", other)
    assert str(e.value).startswith(
        "plugin 'site-other' serves none of the hooks of [[plugins]] (connect, "), str(e.value)
    assert str(e.value).endswith(
        f"): it provides {interface}, which a {table} table names"), str(e.value)


def test_reply_lines_are_ascii_and_at_most_512_octets() -> None:
    """A reply's text from a plugin or a DNS list (a TXT record) went out as given: raw
    UTF-8 before any SMTPUTF8, and one 100,000-octet line (RFC 5321 4.5.3.1.5: 512 octets a
    reply line, CRLF included).  Non-ASCII becomes '?', and a long line is cut."""
    from mailrelay.interfaces import Reply

    assert Reply(554, "5.7.1", "réjeté ☃").toBytes() == b"554 5.7.1 r?jet? ?\r\n"
    wire = Reply(554, "5.7.1", "x" * 100_000 + "\nsecond").toBytes()
    lines = wire.split(b"\r\n")[:-1]
    assert [len(line) + 2 for line in lines] == [512, len(b"554 5.7.1 second") + 2]
    assert lines[0].startswith(b"554-5.7.1 xxx") and lines[1] == b"554 5.7.1 second"


def test_reply_text_carries_no_control_characters() -> None:
    """RFC 5321 4.2: a reply's text is HT and SP to "~" only.  A plugin's (or a DNS list's)
    text with a NUL, an escape sequence or DEL went on the wire as given (Postfix refuses a
    milter reply with a NUL as malformed): each such character is now '?', as non-ASCII
    is; a tab stays."""
    from mailrelay.interfaces import Reply

    assert Reply(550, "5.7.1", "a\x00b\x1b[31mred\x7f\tend").toBytes() == (
        b"550 5.7.1 a?b?[31mred?\tend\r\n")
    assert Reply(550, "5.7.1", "one\x0b\x0c\ntwo").toBytes() == (
        b"550-5.7.1 one??\r\n550 5.7.1 two\r\n")
