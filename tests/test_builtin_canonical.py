"""The built-in C{sender-canonical} plugin: its table (Postfix's canonical(5) format and
lookup order), the rewriting of address header fields, and the filter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.logger import capturedLogs, formatEvent

from mailrelay.builtin.addressfields import Rewritten, rewriteAddresses
from mailrelay.builtin.canonical import SenderCanonical, defaultLocalDomains
from mailrelay.builtin.canonicalmap import MapFile, parseCanonicalMap
from mailrelay.errors import ConfigError
from mailrelay.interfaces import FilterResult, IMessageFilter
from mailrelay.testing import buildPlugin, makeClient, makeEnvelope, makeFilterContext

LOCAL = frozenset({"relay.example.net", "localhost"})

TABLE = """\
# the site's machines
root@web1.internal      ops@example.com
root                    postmaster@example.com
@web1.internal          @example.com
  # a comment inside
@app3.lan
    @example.com
Nagios@LOCALHOST        monitoring@example.com
"jo smith"@lan.internal  jo.smith@example.com
josé@lan.internal       jose@example.com
@Bücher.example         @example.com
"""


def table() -> object:
    return parseCanonicalMap(TABLE.splitlines(), "canonical")


@pytest.mark.parametrize(
    ("address", "result"),
    [
        ("root@web1.internal", "ops@example.com"),  # user@domain first
        ("ROOT@web1.internal", "ops@example.com"),  # keys ignore case
        ("www-data@web1.internal", "www-data@example.com"),  # @domain keeps the user
        ("WWW-Data@app3.lan", "WWW-Data@example.com"),  # (continued line; case kept)
        ("root@relay.example.net", "postmaster@example.com"),  # user: a local domain
        ("root@localhost", "postmaster@example.com"),
        ("nagios@localhost", "monitoring@example.com"),  # user@domain before user
        ("root@elsewhere.example", None),  # user: only for the local domains
        ("nobody@example.com", None),
        ('"jo smith"@lan.internal', "jo.smith@example.com"),
        ("josé@lan.internal", "jose@example.com"),  # UTF-8 local part (RFC 6531)
        ("hans@xn--bcher-kva.example", "hans@example.com"),  # IDNA: A-labels
        ("ops@example.com", None),
    ],
)
def test_lookup_order_is_canonical5s(address: str, result: str | None) -> None:
    """canonical(5) ADDRESS REWRITING: user@domain, then user when the domain is the
    relay's own, then @domain; an @domain result keeps the local part."""
    assert table().lookup(address, LOCAL) == result  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("address", "result"),
    [
        ("root+cron@web1.internal", "ops+cron@example.com"),  # user@domain, extension kept
        ("root+cron+x@web1.internal", "ops+cron+x@example.com"),  # (the first delimiter)
        ("root-cron@web1.internal", "ops-cron@example.com"),  # (any of the delimiters)
        ("www-data+x@web1.internal", "www-data+x@example.com"),  # @domain: the whole user
        ("root+x@relay.example.net", "postmaster+x@example.com"),  # user, a local domain
        ("Nagios+Disk@localhost", "monitoring+Disk@example.com"),
        ('"jo smith+x"@lan.internal', "jo.smith+x@example.com"),  # (quoted: unquoted first)
        ("+root@elsewhere.example", None),  # (a delimiter first is no extension)
        ("full+match@web1.internal", "whole@example.com"),  # user+ext@domain first, as is
        ("full+other@web1.internal", "bare+other@example.com"),
        ('"jo smith+a b"@lan.internal', '"jo.smith+a b"@example.com'),  # (quoted again)
        ("owner-list@web1.internal", "owner-list@example.com"),  # (never split: Postfix)
    ],
)
def test_address_extensions_are_looked_up_as_postfix_does(address: str, result: str | None
                                                          ) -> None:
    """With a recipient delimiter (C{[delivery] recipient_delimiter}), C{user+ext@domain}
    is looked up whole, then as C{user@domain} with the extension put back into the result
    (canonical(5) ADDRESS EXTENSION: Postfix's propagate_unmatched_extensions holds
    canonical); the same for C{user+ext} then C{user} in the local domains."""
    extra = ("full+match@web1.internal whole@example.com\nfull@web1.internal bare@example.com"
             "\nowner@web1.internal nobody@example.com\n")
    table = parseCanonicalMap((TABLE + extra).splitlines(), "canonical")
    assert table.lookup(address, LOCAL, "+-") == result
    # Without a delimiter (the default), the address is looked up whole.
    assert table.lookup("root+cron@web1.internal", LOCAL) == "root+cron@example.com"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("root@web1.internal\n", "canonical:1: a line is a pattern and its result"),
        ("\n# c\nroot a@b.example c@d.example\n", "canonical:3: text after the result"),
        ("root ops\n", "canonical:1: the result 'ops' must be user@domain or @domain"),
        ("root@ a@b.example\n", "canonical:1: bad pattern address 'root@'"),
        ("@bad_domain..x a@b.example\n", "canonical:1: bad pattern domain"),
        ("root @bad..x\n", "canonical:1: bad result domain"),
        ("a@b.example\tc@[192.0.2.1]\n", "canonical:1: bad result address"),
        ("<> a@b.example\n", "canonical:1: bad pattern user '<>' (bad sender address syntax: "
         "invalid character '<' in local part): '<> a@b.example'"),
        ("root a@b.example\nROOT c@d.example\n", "canonical:2: pattern given twice (first on line 1)"),
        ("x y@z.example\n@web1.internal a@b.example\n@WEB1.internal @c.example\n",
         "canonical:3: pattern given twice (first on line 2)"),
        # Postfix's readllines() warns "logical line must not start with whitespace" and
        # skips such a line: it continues no line before it.
        (" root a@b.example\n", "canonical:1: a logical line must not start with white space "
         "(it continues no line before it): ' root a@b.example'"),
        ("# site\n\n\t@web1.internal\n @b.example\nx y@z.example\n",
         "canonical:3: a logical line must not start with white space"),
    ],
)
def test_a_bad_line_is_named(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parseCanonicalMap(text.splitlines(), "canonical")
    assert raised.value.message.startswith(error) and raised.value.key == "map"


def test_the_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    """As the password file: a changed file is read again; a broken one keeps the table
    read before and says why, once."""
    path = tmp_path / "canonical"
    path.write_text("root@web1.internal ops@example.com\n")
    watched = MapFile(str(path))
    assert watched.current()[0].lookup("root@web1.internal", LOCAL) == "ops@example.com"
    path.write_text("root@web1.internal admin@example.com\n@app3.lan @example.com\n")
    table, problem = watched.current()
    assert problem is None and table.lookup("root@web1.internal", LOCAL) == "admin@example.com"
    path.write_text("root@web1.internal\n")
    os.utime(path, ns=(1, 1))
    table, problem = watched.current()
    assert problem is not None and problem.startswith(f"{path}:1: a line is a pattern")
    assert table.lookup("root@web1.internal", LOCAL) == "admin@example.com"
    assert watched.current() == (table, None)  # (said once)
    path.unlink()
    table, problem = watched.current()
    assert problem == f"cannot read the map {path}: No such file or directory"
    assert table.lookup("x@app3.lan", LOCAL) == "x@example.com"


def test_a_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read the map {tmp_path}/none: No such file"):
        MapFile(str(tmp_path / "none"))
    (tmp_path / "latin1").write_bytes(b"# ok\nroot@web1.internal jos\xe9@example.com\n")
    with pytest.raises(ConfigError, match=f"{tmp_path}/latin1:2: not UTF-8 text"):
        MapFile(str(tmp_path / "latin1"))


MAP = {
    "root@web1.internal": "ops@example.com",
    "www-data@app3.lan": "web@example.com",
    '"jo smith"@lan.internal': "jo@example.com",
    "josé@lan.internal": "jose@example.com",
}


def rewritten(field: bytes) -> Rewritten:
    return rewriteAddresses(field, MAP.get)


@pytest.mark.parametrize(
    ("field", "result"),
    [
        (b"From: root@web1.internal\r\n", b"From: ops@example.com\r\n"),
        (b"From: Root <root@web1.internal>\r\n", b"From: Root <ops@example.com>\r\n"),
        # display names, quoted or encoded, and comments: untouched
        (b'From: "Root, the (super) user" <root@web1.internal> (cron)\r\n',
         b'From: "Root, the (super) user" <ops@example.com> (cron)\r\n'),
        (b"From: =?utf-8?Q?R=C3=A9mi_root=40web1?= <root@web1.internal>\r\n",
         b"From: =?utf-8?Q?R=C3=A9mi_root=40web1?= <ops@example.com>\r\n"),
        (b"From: root@web1.internal (Cron Daemon)\r\n",
         b"From: ops@example.com (Cron Daemon)\r\n"),
        # several addresses, some not in the map; folded lines kept
        (b"Reply-To: a@example.org,\r\n\tRoot <root@web1.internal>,\r\n www-data@app3.lan\r\n",
         b"Reply-To: a@example.org,\r\n\tRoot <ops@example.com>,\r\n web@example.com\r\n"),
        # groups
        (b"Reply-To: Ops: root@web1.internal, b@example.org;, www-data@app3.lan\r\n",
         b"Reply-To: Ops: ops@example.com, b@example.org;, web@example.com\r\n"),
        (b"Reply-To: undisclosed-recipients:;\r\n", None),
        # case of the domain, quoted and UTF-8 local parts (RFC 6532), an obsolete route
        (b"From: <root@WEB1.Internal>\r\n", b"From: <ops@example.com>\r\n"),
        (b'From: Jo <"jo smith"@lan.internal>\r\n', b"From: Jo <jo@example.com>\r\n"),
        ("From: José <josé@lan.internal>\r\n".encode(), "From: José <jose@example.com>\r\n".encode()),
        (b"Sender: <@hop.example:root@web1.internal>\r\n", b"Sender: <@hop.example:ops@example.com>\r\n"),
        # nothing to change: other addresses, an unqualified one, the null address
        (b"From: Someone <someone@example.org>\r\n", None),
        (b"From: root\r\n", None),
        (b"From: <>\r\n", None),
    ],
)
def test_header_addresses_are_rewritten_in_place(field: bytes, result: bytes | None) -> None:
    """As Postfix's cleanup rewrites address tokens: the addr-spec changes, every other
    byte of the field stays (RFC 5322 3.4: display names, comments, groups, folding)."""
    outcome = rewritten(field)
    assert outcome.problem is None
    assert outcome.field == result


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        (b'From: "Root <root@web1.internal>\r\n', "unclosed '\"'"),
        (b"From: Root (cron <root@web1.internal>\r\n", "unclosed '('"),
        (b"From: Root <root@web1.internal\r\n", "unclosed '<'"),
        (b"From: Root <root@web1.internal> extra\r\n", "text after '<...>'"),
        (b"From: Ops: root@web1.internal\r\n", "a group without its ';'"),
        (b"From: root @ web1.internal\r\n", "white space or a comment inside an address"),
        (b"From: John Smith root@web1.internal\r\n", "white space or a comment inside"),
        (b"From: Root <root@web1..internal>\r\n", "bad address 'root@web1..internal'"),
    ],
)
def test_a_field_it_cannot_read_is_left_as_it_is(field: bytes, problem: str) -> None:
    outcome = rewritten(field)
    assert outcome.field is None and outcome.changes == ()
    assert outcome.problem is not None and problem in outcome.problem


ROOT_MESSAGE = (
    b"Received: from web1.internal by relay.test; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
    b"From: Cron Daemon <root@web1.internal>\r\n"
    b"To: admin@example.org\r\n"
    b"Reply-To: root@web1.internal, other@example.org\r\n"
    b"Resent-From: root@web1.internal\r\n"
    b"Subject: =?utf-8?Q?root@web1.internal?=\r\n"
    b"\r\n"
    b"root@web1.internal in the body\r\n"
)


def canonical(tmp_path: Path, table: str = "root@web1.internal ops@example.com\n",
              **options: object) -> SenderCanonical:
    (tmp_path / "canonical").write_text(table)
    plugin = buildPlugin("sender-canonical", {"map": "canonical", **options}, tmp_path,
                         interface=IMessageFilter, hostname="relay.test")
    assert isinstance(plugin, SenderCanonical)
    return plugin


def filtered(plugin: SenderCanonical, message: bytes = ROOT_MESSAGE, sender: str =
             "root@web1.internal", **client: object) -> FilterResult:
    env = makeEnvelope(sender, client=makeClient(**(client or {"relayAllowed": True})))
    box: list[object] = []
    with capturedLogs() as events:
        d = plugin.filterMessage(makeFilterContext(message, envelope=env))
        d.addBoth(box.append)
    filtered.events = [formatEvent(e) for e in events]  # type: ignore[attr-defined]
    (result,) = box
    assert isinstance(result, FilterResult)
    return result


def test_rewrites_the_envelope_sender_and_the_sender_fields_of_our_mail(tmp_path: Path) -> None:
    """canonical_classes = envelope_sender, header_sender; the fields: From:, Sender:,
    Reply-To: by default (not Resent-From:, nor Subject:, the body or trace fields)."""
    result = filtered(canonical(tmp_path))
    assert result.sender == "ops@example.com"
    assert result.replace == (
        (b"From: Cron Daemon <root@web1.internal>\r\n", b"From: Cron Daemon <ops@example.com>\r\n"),
        (b"Reply-To: root@web1.internal, other@example.org\r\n",
         b"Reply-To: ops@example.com, other@example.org\r\n"),
    )
    assert "01KTEST0000000000000000000: sender-canonical: From: <root@web1.internal> " \
           "rewritten to <ops@example.com>" in filtered.events  # type: ignore[attr-defined]


def test_the_relays_recipient_delimiter_splits_address_extensions(tmp_path: Path) -> None:
    """The plugin splits extensions at C{[delivery] recipient_delimiter} (the context's
    C{recipientDelimiter}), as Postfix's canonical maps use its C{recipient_delimiter}: the
    envelope sender and the header fields both keep their extension."""
    (tmp_path / "canonical").write_text("root@web1.internal ops@example.com\n")
    plugin = buildPlugin("sender-canonical", {"map": "canonical"}, tmp_path,
                         interface=IMessageFilter, hostname="relay.test",
                         recipientDelimiter="+")
    message = ROOT_MESSAGE.replace(b"<root@web1.internal>", b"<root+cron@web1.internal>")
    result = filtered(plugin, message, sender="root+cron@web1.internal")
    assert result.sender == "ops+cron@example.com"
    assert (b"From: Cron Daemon <root+cron@web1.internal>\r\n",
            b"From: Cron Daemon <ops+cron@example.com>\r\n") in result.replace
    # Without it (the default), root+cron is a user of its own: not in the table.
    assert filtered(canonical(tmp_path), message, sender="root+cron@web1.internal").sender is None


def test_the_classes_and_fields_are_chosen(tmp_path: Path) -> None:
    only = canonical(tmp_path, classes=["header_sender"], header_fields=["Resent-From"])
    result = filtered(only)
    assert result.sender is None
    assert result.replace == ((b"Resent-From: root@web1.internal\r\n",
                               b"Resent-From: ops@example.com\r\n"),)
    envelopeOnly = canonical(tmp_path, classes=["envelope_sender"])
    assert filtered(envelopeOnly) == FilterResult(sender="ops@example.com")


def test_headers_of_mail_from_outside_are_left_alone(tmp_path: Path) -> None:
    """As Postfix's local_header_rewrite_clients: only the headers of mail of ours (an
    authenticated client, one allowed to relay, or made here) are rewritten; the envelope
    sender always is."""
    plugin = canonical(tmp_path)
    assert filtered(plugin, relayAllowed=False) == FilterResult(sender="ops@example.com")
    assert filtered(plugin, authUser="web1").replace != ()


def test_the_null_sender_is_never_rewritten(tmp_path: Path) -> None:
    plugin = canonical(tmp_path, table="@web1.internal @example.com\n")
    assert filtered(plugin, sender="").sender is None


def test_an_8bit_result_for_a_message_without_smtputf8_is_not_used(tmp_path: Path) -> None:
    plugin = canonical(tmp_path, table="root@web1.internal josé@example.com\n")
    result = filtered(plugin)
    assert result == FilterResult()
    assert any("<root@web1.internal> not rewritten to <josé@example.com>: the message is not "
               "SMTPUTF8" in e for e in filtered.events)  # type: ignore[attr-defined]


def test_a_changed_map_is_used_from_the_next_message(tmp_path: Path) -> None:
    plugin = canonical(tmp_path)
    (tmp_path / "canonical").write_text("root@web1.internal admin@example.com\n")
    assert filtered(plugin).sender == "admin@example.com"
    (tmp_path / "canonical").write_text("root@web1.internal\n")
    assert filtered(plugin).sender == "admin@example.com"  # (the broken file: the old table)
    assert any("sender-canonical: the map changed but cannot be used" in e and ":1: a line is a "
               "pattern" in e for e in filtered.events)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({}, "map: is required"),
        ({"map": "none"}, "map: cannot read the map"),
        ({"map": "canonical", "classes": ["envelope_recipient"]},
         "classes[0]: \"envelope_recipient\" is not a class"),
        ({"map": "canonical", "classes": []}, "classes: must name"),
        ({"map": "canonical", "header_fields": ["To"]}, "header_fields[0]: \"To\" is not a sender"),
        ({"map": "canonical", "local_domains": ["bad..domain"]}, "local_domains[0]:"),
    ],
)
def test_bad_options_are_named(tmp_path: Path, options: dict[str, object], error: str) -> None:
    (tmp_path / "canonical").write_text("root ops@example.com\n")
    with pytest.raises(ConfigError) as raised:
        buildPlugin("sender-canonical", options, tmp_path)
    assert error in str(raised.value)


def test_a_bad_map_line_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        canonical(tmp_path, table="# site\nroot ops\n")
    assert str(raised.value) == (
        f"map: {tmp_path}/canonical:2: the result 'ops' must be user@domain or @domain: 'root ops'")


def test_local_domains_default_to_postfixs_mydestination(tmp_path: Path) -> None:
    plugin = canonical(tmp_path, table="nagios monitoring@example.com\n")
    assert plugin.localDomains == {"relay.test", "localhost.test", "localhost"}
    assert filtered(plugin, sender="nagios@localhost").sender == "monitoring@example.com"
    assert defaultLocalDomains("mx1.Example.COM") == (
        "mx1.example.com", "localhost.example.com", "localhost")


@pytest.mark.parametrize("canonicalFirst", [True, False])
def test_it_must_come_before_dkim_sign(tmp_path: Path, canonicalFirst: bool) -> None:
    """The signature must cover what leaves (RFC 6376 5.4: From: is signed): a
    sender-canonical entry after a dkim-sign one serving the message hook would break every
    signature, so the configuration is refused, naming both entries."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from twisted.internet.task import Clock

    from mailrelay.app.plugins import availablePlugins, pluginBuilder
    from mailrelay.config import loadConfig
    from mailrelay.config.plugins import buildHooks

    (tmp_path / "canonical").write_text("root@web1.internal ops@example.com\n")
    (tmp_path / "ed.pem").write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    entries = [
        '[[plugins]]\nplugin = "sender-canonical"\nmap = "canonical"\n',
        '[[plugins]]\nplugin = "dkim-sign"\nkeys = [{domain = "example.com", selector = "s", '
        'key_file = "ed.pem"}]\n',
    ]
    path = tmp_path / "relay.toml"
    path.write_text("".join(entries if canonicalFirst else entries[::-1]))
    config = loadConfig(str(path))
    build = pluginBuilder(config, Clock(), availablePlugins())
    if canonicalFirst:
        hooks = buildHooks(config, build, "relay")
        assert [c.name for c in hooks.serving("message")] == ["sender-canonical", "dkim-sign"]
        return
    with pytest.raises(ConfigError) as raised:
        buildHooks(config, build, "relay")
    assert str(raised.value) == (
        f"{path}: plugins[1]: sender-canonical must come before dkim-sign (plugins[0]): "
        "sender-canonical rewrites addresses or header fields and dkim-sign signs the "
        "message: the signature must cover them as they leave (RFC 6376 5.4)")


@pytest.mark.parametrize(
    ("classes", "refused"),
    [('["envelope_sender"]', False), ('["header_sender"]', True),
     ('["envelope_sender", "header_sender"]', True)],
)
def test_after_dkim_sign_only_a_header_rewriting_one_is_refused(
    tmp_path: Path, classes: str, refused: bool
) -> None:
    """A DKIM signature covers header fields and the body, never the envelope (RFC 6376
    3.7, 5.4): sender-canonical configured to rewrite only the envelope sender may come
    after dkim-sign, the start check asks the entry as configured (it declares
    IRewritingFilter only when it rewrites header fields)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from twisted.internet.task import Clock
    from zope.interface.verify import verifyObject

    from mailrelay.app.plugins import availablePlugins, pluginBuilder
    from mailrelay.config import loadConfig
    from mailrelay.config.plugins import buildHooks
    from mailrelay.interfaces import IMessageFilter, IRewritingFilter

    (tmp_path / "canonical").write_text("root@web1.internal ops@example.com\n")
    (tmp_path / "ed.pem").write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path = tmp_path / "relay.toml"
    path.write_text(
        '[[plugins]]\nplugin = "dkim-sign"\nkeys = [{domain = "example.com", selector = "s", '
        'key_file = "ed.pem"}]\n'
        f'[[plugins]]\nplugin = "sender-canonical"\nmap = "canonical"\nclasses = {classes}\n')
    config = loadConfig(str(path))
    build = pluginBuilder(config, Clock(), availablePlugins())
    if refused:
        with pytest.raises(ConfigError, match=r"plugins\[1\]: sender-canonical must come "
                                              r"before dkim-sign \(plugins\[0\]\)"):
            buildHooks(config, build, "relay")
        return
    hooks = buildHooks(config, build, "relay")
    [signer, canonical] = [c.plugin for c in hooks.serving("message")]
    assert verifyObject(IMessageFilter, canonical)
    assert not IRewritingFilter.providedBy(canonical)


def test_mailrelay_check_validates_the_map(tmp_path: Path) -> None:
    """mailrelay check builds the plugin as the relay would: a bad line of the table is one
    error line naming the configuration, the entry, the table file and its line."""
    import io

    from mailrelay.app.cli import main

    config = tmp_path / "relay.toml"
    config.write_text(
        f'[spool]\ndirectory = "{tmp_path / "spool"}"\n[dns]\nnameservers = ["127.0.0.1"]\n'
        # (Somewhere for postmaster mail: no warning about it before the error.)
        '[queue]\npostmaster = "postmaster@example.com"\n'
        '[[plugins]]\nplugin = "sender-canonical"\nmap = "canonical"\n')
    (tmp_path / "canonical").write_text("root@web1.internal ops@example.com\n@app3.lan\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["check", "--config", str(config)], out, err) == 1
    assert err.getvalue() == (
        f"mailrelay: configuration error: {config}: plugins[0].map: {tmp_path}/canonical:2: a "
        "line is a pattern and its result (user@domain, user or @domain, then user@domain or "
        "@domain): '@app3.lan'\n")
    (tmp_path / "canonical").write_text("root@web1.internal ops@example.com\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["check", "--config", str(config)], out, err) == 0
    assert out.getvalue() == f"mailrelay: configuration {config}: ok\n"


def test_sender_binding_judges_the_sender_as_the_client_sent_it(tmp_path: Path) -> None:
    """[auth.senders] judges MAIL FROM at MAIL, before the filter rewrites it at the end of
    data, as Postfix's smtpd checks smtpd_sender_login_maps before its cleanup rewrites: a
    user bound to root@web1.internal sends as it (and the mail leaves as ops@example.com),
    not as the rewritten address."""
    from tests.test_tls_auth import afterTLS, plain, tlsHarness

    h = tlsHarness(senders={"alice": ("root@web1.internal",)}, plugins=[canonical(tmp_path)])
    afterTLS(h)
    h.send(b"AUTH PLAIN " + plain("alice", "secret") + b"\r\n")
    with capturedLogs():
        assert h.send(b"MAIL FROM:<ops@example.com>\r\n")[0].startswith(b"553 5.7.1")
        h.send(b"RSET\r\n")
        lines = h.send(b"MAIL FROM:<root@web1.internal>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
                       b"From: Root <root@web1.internal>\r\n\r\nhi\r\n.\r\n")
    assert lines[-1].startswith(b"250 2.0.0 Ok: queued as "), lines
    envelope, data = h.spool.committed[lines[-1].rsplit(b" ", 1)[1].decode()]
    assert envelope.sender == "ops@example.com" and b"\r\nFrom: Root <ops@example.com>\r\n" in data


@pytest.mark.parametrize("smtputf8", [True, False])
def test_utf8_local_parts_and_8bit_fields_survive(tmp_path: Path, smtputf8: bool) -> None:
    """Through the intake: a UTF-8 sender (RFC 6531) is rewritten to a UTF-8 result; a field
    with 8-bit octets already (a raw UTF-8 display name, in a message without SMTPUTF8)
    keeps them, its address rewritten; nothing else of the message changes."""
    from mailrelay.envelope import ClientInfo, Envelope, Recipient
    from tests.test_intake import makeIntake, received

    plugin = canonical(tmp_path, table="josé@lan.internal  josé@example.com\n"
                                       "root@web1.internal ops@example.com\n")
    intake, spool, _ = makeIntake(filters=[plugin])
    sender = "josé@lan.internal" if smtputf8 else "root@web1.internal"
    env = Envelope(sender=sender, recipients=[Recipient("bob@example.org")], smtputf8=smtputf8,
                   client=ClientInfo("192.0.2.7", relayAllowed=True))
    field = f"From: José <{sender}>\r\n".encode()
    message = intake.open(env, env.client, {})
    message.write(b"Subject: hi\r\n" + field + b"\r\nbody\r\n")
    with capturedLogs():
        assert received(message.finish()).code == 250
    new = "josé@example.com" if smtputf8 else "ops@example.com"
    (stored, data), = spool.committed.values()
    assert stored.sender == new
    assert data == b"Subject: hi\r\n" + f"From: José <{new}>\r\n".encode() + b"\r\nbody\r\n"


def test_a_field_whose_line_would_grow_past_998_octets_is_left_as_it_is(tmp_path: Path) -> None:
    """A From: whose line the longer address would take past 998 octets (RFC 5322 2.1.1:
    the relay never writes such a line) is left as it is, said in the log, and the message
    is taken with its envelope sender rewritten -- not deferred at each try of the client
    for the filter's malformed answer."""
    from mailrelay.envelope import ClientInfo, Envelope, Recipient
    from tests.test_intake import makeIntake, received

    plugin = canonical(tmp_path, table="root@web1.internal a-much-longer-address@example.com\n")
    intake, spool, _ = makeIntake(filters=[plugin])
    env = Envelope(sender="root@web1.internal", recipients=[Recipient("bob@example.org")],
                   client=ClientInfo("192.0.2.7", relayAllowed=True))
    field = b"From: " + b"x" * 963 + b" <root@web1.internal>\r\n"
    assert len(field) == 990 + 2  # (998 octets at most, the CRLF left out)
    message = intake.open(env, env.client, {})
    message.write(b"Subject: hi\r\n" + field + b"\r\nbody\r\n")
    with capturedLogs() as events:
        reply = received(message.finish())
    assert reply.code == 250, reply
    (stored, data), = spool.committed.values()
    assert stored.sender == "a-much-longer-address@example.com"
    assert data == b"Subject: hi\r\n" + field + b"\r\nbody\r\n"
    assert any("sender-canonical: From: left as it is, a line would be longer than 998 "
               "octets" in formatEvent(e) for e in events)


def test_a_field_an_earlier_filter_added_is_rewritten_too(tmp_path: Path) -> None:
    """A sender field an earlier filter added (a site's filter appending Reply-To:) is in
    the message sender-canonical reads, and is rewritten where it stands like the client's
    own: the message is taken, not deferred for the filter's answer replacing a field
    "the message does not have"."""
    from mailrelay.envelope import ClientInfo, Envelope, Recipient
    from tests.test_intake import Filter, makeIntake, received

    def addsReplyTo(context: object) -> FilterResult:
        return FilterResult(prepend=(b"Sender: root@web1.internal\r\n",),
                            append=(b"Reply-To: root@web1.internal\r\n",))

    intake, spool, _ = makeIntake(filters=[Filter(addsReplyTo), canonical(tmp_path)])
    env = Envelope(sender="root@web1.internal", recipients=[Recipient("bob@example.org")],
                   client=ClientInfo("192.0.2.7", relayAllowed=True))
    message = intake.open(env, env.client, {})
    message.write(b"Subject: hi\r\nFrom: <root@web1.internal>\r\n\r\nbody\r\n")
    with capturedLogs():
        reply = received(message.finish())
    assert reply.code == 250, reply
    (stored, data), = spool.committed.values()
    assert stored.sender == "ops@example.com"
    assert data == (b"Sender: ops@example.com\r\nSubject: hi\r\nFrom: <ops@example.com>\r\n"
                    b"Reply-To: ops@example.com\r\n\r\nbody\r\n")
    assert stored.messageSize == len(data)
