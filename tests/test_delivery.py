"""Delivery backends: maildir, discard, SMTP (fake connections, fake clock) and LMTP."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailrelay.delivery import BUILTIN_BACKENDS
from mailrelay.delivery.discard import DiscardBackend
from mailrelay.delivery.maildir import MaildirBackend, UnsafeAddress, mailboxPath
from mailrelay.envelope import Envelope, Recipient
from mailrelay.interfaces import (
    PLATFORM_TRUST_STORE,
    DeliveryStatus,
    IDeliveryBackend,
    RecipientResult,
    Route,
    RouteOptions,
)
from mailrelay.route import DeliveryFailure, MXHost, RouteRule, RoutingTable
from mailrelay.smtp.client import ClientSettings, SMTPConnectError
from mailrelay.smtp.clientsettings import DANEPolicy, TLSARecord

DELIVERED = DeliveryStatus.DELIVERED
TRANSIENT = DeliveryStatus.TRANSIENT
PERMANENT = DeliveryStatus.PERMANENT

MESSAGE = b"Subject: hi\r\nFrom: a@example.com\r\n\r\nline one\r\nline\rtwo\r\n"
CLEAN_MESSAGE = b"Subject: hi\r\nFrom: a@example.com\r\n\r\nline one\r\n.dot line\r\n"


def envelope(*addresses: str, sender: str = "alice@example.com") -> Envelope:
    return Envelope(
        sender=sender, recipients=[Recipient(address=a) for a in addresses], queueID="Q" * 20
    )


def result(d: defer.Deferred) -> Any:
    """The result of a Deferred that has fired."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def toMaildir(template: str) -> Route:
    """The route to the maildir backend with C{template}."""
    return Route("maildir", template)


@pytest.fixture
def messagePath(tmp_path: Path) -> Path:
    path = tmp_path / "message.eml"
    path.write_bytes(MESSAGE)
    return path


def test_builtin_names() -> None:
    assert BUILTIN_BACKENDS == ("smtp", "lmtp", "maildir", "discard")


# ---------------------------------------------------------------------------------------------
# The built-in backends are plugins, built like a site's


def test_builtin_backends_are_the_dropins_plugins() -> None:
    """The dropin has a lazy IDeliveryBackend plugin for each built-in backend, which the
    relay finds like any other plugin."""
    from mailrelay.app.plugins import availablePlugins

    installed = availablePlugins()
    for name in BUILTIN_BACKENDS:
        plugin = installed[name]
        assert plugin.provides is IDeliveryBackend
        assert plugin.factory == f"mailrelay.delivery.{name}:build"  # type: ignore[attr-defined]


def test_dropin_defines_the_validator_plugins() -> None:
    """The built-in validators' plugin objects are the dropin's own (it imports only values),
    with factories at their canonical paths, and they build."""
    from mailrelay.app.plugins import availablePlugins, buildPlugin
    from mailrelay.interfaces import IRecipientValidator
    from twisted.plugins import mailrelay_plugin as dropin

    installed = availablePlugins()
    for name, function in [
        ("accepted-domains", "buildAcceptedDomains"),
        ("recipient-map", "buildRecipientMap"),
        ("regex", "buildRegex"),
    ]:
        plugin = installed[name]
        plugins = (dropin.acceptedDomainsPlugin, dropin.recipientMapPlugin, dropin.regexPlugin)
        assert plugin in plugins
        assert plugin.provides is IRecipientValidator
        assert plugin.factory == f"mailrelay.policy.validators:{function}"  # type: ignore[attr-defined]
    validator = buildPlugin(
        installed, "accepted-domains", IRecipientValidator, {"domains": ["a.test"]}, _context()
    )
    verifyObject(IRecipientValidator, validator)


def test_dropin_imports_no_backend_and_no_reactor() -> None:
    """Scanning the dropin stays cheap: it imports no delivery or policy module and no
    reactor."""
    import subprocess
    import sys

    code = (
        "import sys, twisted.plugins.mailrelay_plugin\n"
        "print(sorted(m for m in sys.modules if m.startswith(('mailrelay.delivery',"
        " 'mailrelay.policy')) or m == 'twisted.internet.reactor'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _context(reactor: Any = None) -> Any:
    from mailrelay.interfaces import PluginContext

    return PluginContext(hostname="relay.test", configDir=Path("/"), reactor=reactor or Clock())


@pytest.mark.parametrize(
    ("nameservers", "resolvConf", "warned"),
    [
        ((("127.0.0.1", 53), ("::1", 5353)), None, None),
        ((("127.0.0.1", 53), ("192.0.2.53", 53), ("2001:db8::53", 53)), None,
         "[dns] nameservers: 192.0.2.53, 2001:db8::53"),
        ((), "nameserver 127.0.0.53\noptions edns0 trust-ad\n", None),
        ((), "nameserver 127.0.0.1\nnameserver 10.0.0.2\n", "{conf}: 10.0.0.2"),
    ],
)
def test_dane_warns_of_a_name_server_not_on_this_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nameservers: Any, resolvConf: str | None,
    warned: str | None,
) -> None:
    """DANE trusts the AD bit of the name servers' answers (as Postfix does, whatever
    resolv.conf's trust-ad says): one not on a loopback address is warned of at start, for
    [dns] nameservers as for those of resolv.conf (RFC 4035 4.9.3; Postfix's
    smtp_dns_support_level documentation)."""
    from mailrelay.app.plugins import availablePlugins, buildPlugin
    from mailrelay.route import mx

    conf = tmp_path / "resolv.conf"
    conf.write_text(resolvConf or "")
    monkeypatch.setattr(mx, "RESOLV_CONF", str(conf).encode())
    options = {"settings": SETTINGS, "nameservers": nameservers, "dane": True}
    with capturedLogs() as events:
        buildPlugin(availablePlugins(), "smtp", IDeliveryBackend, options, _context())
    warnings = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
    if warned is None:
        assert warnings == []
        return
    assert warnings == [
        "[delivery] dane = true trusts the AD bit of the answers of name servers not on this "
        f"host ({warned.format(conf=conf)}): an answer forged on the way to the relay would "
        "pass for DNSSEC-validated; use a validating resolver on a loopback address (RFC 4035 "
        "4.9.3)"
    ]


def test_builtin_backends_build_from_their_options() -> None:
    from mailrelay.app.plugins import availablePlugins, buildPlugin
    from mailrelay.delivery.lmtp import LMTPBackend
    from mailrelay.delivery.smtp import SMTPBackend

    installed = availablePlugins()
    context = _context()
    options = {
        "settings": SETTINGS,
        "nameservers": (("127.0.0.1", 5353),),
        "destination_concurrency": 3,
        "connection_cache_time": 0.5,
    }
    smtp = buildPlugin(installed, "smtp", IDeliveryBackend, options, context)
    # Postfix's smtp_mx_address_limit and smtp_mx_session_limit, unless given.
    assert (smtp.resolver.maxAddresses, smtp.mxSessionLimit) == (5, 2)
    limited = buildPlugin(installed, "smtp", IDeliveryBackend,
                          {**options, "mx_address_limit": 0, "mx_session_limit": 1}, context)
    assert (limited.resolver.maxAddresses, limited.mxSessionLimit) == (0, 1)
    own = buildPlugin(installed, "smtp", IDeliveryBackend,
                      {**options, "listeners": ("tcp:25:interface=192.0.2.9",),
                       "proxy_interfaces": ("198.51.100.1",)}, context)
    assert ("192.0.2.9", 25) in own.ownAddresses and ("198.51.100.1", 25) in own.ownAddresses
    assert ("192.0.2.10", 25) not in own.ownAddresses
    assert isinstance(smtp, SMTPBackend) and smtp.reactor is context.reactor
    assert (smtp.settings, smtp.destinationConcurrency, smtp.connectionCacheTime) == (
        SETTINGS,
        3,
        0.5,
    )
    assert smtp.resolver.resolver.servers == [("127.0.0.1", 5353)]
    lmtp = buildPlugin(
        installed, "lmtp", IDeliveryBackend, {"settings": SETTINGS, "concurrency": 4}, context
    )
    assert isinstance(lmtp, LMTPBackend) and lmtp.concurrency == 4
    # LMTP's defaults: no TLS, the platform's trust store, unless a route says otherwise.
    assert (lmtp.settings.lmtp, lmtp.settings.tls, lmtp.settings.caFile) == (True, "none", None)
    assert lmtp.settings.heloName == SETTINGS.heloName
    maildir = buildPlugin(installed, "maildir", IDeliveryBackend, {}, context)
    assert isinstance(maildir, MaildirBackend) and maildir.hostname == "relay.test"
    discard = buildPlugin(installed, "discard", IDeliveryBackend, {}, context)
    assert isinstance(discard, DiscardBackend)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("smtp", {}, "the built-in smtp backend needs its client settings (option 'settings'"),
        ("lmtp", {"settings": "x"}, "a ClientSettings), not 'x'"),
        ("lmtp", {"settings": ClientSettings(heloName="r.test"), "tls": "none"}, "no option 'tls'"),
        ("maildir", {"directory": "/m"},
         "has no option 'directory' (its options: create_mailboxes, recipient_delimiter)"),
        ("discard", {"x": 1}, "the built-in discard backend has no option 'x'"),
    ],
)
def test_builtin_backends_refuse_options_not_theirs(
    name: str, options: dict[str, Any], message: str
) -> None:
    from mailrelay.app.plugins import availablePlugins, buildPlugin
    from mailrelay.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        buildPlugin(availablePlugins(), name, IDeliveryBackend, options, _context())
    assert f"plugin {name!r}: " in str(e.value) and message in str(e.value)


def test_make_backends_builds_every_backend_through_the_plugin_builder(tmp_path: Path) -> None:
    from mailrelay.app.backends import makeBackends
    from mailrelay.config import loadConfig

    path = tmp_path / "mailrelay.toml"
    path.write_text(
        'hostname = "relay.test"\n'
        '[delivery]\nhelo_name = "out.test"\ndestination_concurrency = 7\n'
        'mx_address_limit = 0\nmx_session_limit = 3\nproxy_interfaces = ["2001:DB8::25"]\n'
        '[dns]\nnameservers = ["127.0.0.1:5353"]\n'
        '[[backends]]\nname = "hook"\nplugin = "webhook"\nurl = "https://x.test/"\n'
    )
    config = loadConfig(str(path))
    built: list[Any] = []

    def build(spec: Any, interface: Any) -> Any:
        built.append(spec)
        assert interface is IDeliveryBackend
        return DiscardBackend()

    backends = makeBackends(config, Clock(), build)
    assert list(backends) == [*BUILTIN_BACKENDS, "hook"]
    assert [(s.name, s.plugin, s.key) for s in built] == [
        ("smtp", "smtp", "delivery"),
        ("lmtp", "lmtp", "delivery"),
        ("maildir", "maildir", "delivery"),
        ("discard", "discard", "delivery"),
        ("hook", "webhook", "backends[0]"),
    ]
    smtp, lmtp = built[0].options, built[1].options
    assert smtp["settings"].heloName == "out.test" and smtp["settings"] is lmtp["settings"]
    assert smtp["nameservers"] == (("127.0.0.1", 5353),)
    assert (smtp["destination_concurrency"], lmtp["concurrency"]) == (7, 7)
    assert (smtp["mx_address_limit"], smtp["mx_session_limit"]) == (0, 3)
    assert smtp["proxy_interfaces"] == ("2001:db8::25",)
    assert smtp["listeners"] == tuple(listener.settings.name for listener in config.listeners)
    assert smtp["listeners"] == ("tcp:2525:interface=127.0.0.1",)  # (the default listener)
    assert built[4].options == {"url": "https://x.test/"}


@pytest.mark.parametrize("name", BUILTIN_BACKENDS)
def test_backends_table_cannot_use_a_builtin_backend(tmp_path: Path, name: str) -> None:
    """A [[backends]] table names a site backend's plugin; a built-in backend is named by
    routes directly and set up by [delivery] (it was an unknown plugin before it was one)."""
    from mailrelay.app.backends import makeBackends
    from mailrelay.config import loadConfig
    from mailrelay.errors import ConfigError

    path = tmp_path / "mailrelay.toml"
    path.write_text(f'[[backends]]\nname = "mine"\nplugin = "{name}"\n')
    with pytest.raises(ConfigError) as e:
        makeBackends(loadConfig(str(path)), Clock(), lambda spec, interface: DiscardBackend())
    assert e.value.key == "backends[0].plugin" and e.value.file == str(path)
    assert f"{name!r} is a built-in backend" in str(e.value)


# ---------------------------------------------------------------------------------------------
# discard


def test_discard(messagePath: Path) -> None:
    backend = DiscardBackend()
    verifyObject(IDeliveryBackend, backend)
    env = envelope("a@example.org", "b@example.org")
    results = result(backend.deliver(env, env.recipients, Route("discard", "discard"), messagePath))
    assert results == [
        RecipientResult("a@example.org", DELIVERED, "2.0.0", "X-mailrelay; discarded"),
        RecipientResult("b@example.org", DELIVERED, "2.0.0", "X-mailrelay; discarded"),
    ]


# ---------------------------------------------------------------------------------------------
# maildir


def syncThread(f: Any, *args: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args)


def maildir(createMailboxes: bool = True) -> MaildirBackend:
    return MaildirBackend(Clock(), deferToThread=syncThread, hostname="host/with:odd",
                          createMailboxes=createMailboxes)


@pytest.mark.parametrize(
    "template, userDir",
    [
        ("{root}/mail/{{domain}}/{{local}}/Maildir", "{root}/mail/example.org/bob"),
        ("{root}/{{local}}", "{root}/bob"),
        ("{root}/{{address}}/Maildir", "{root}/bob@example.org"),
    ],
)
def test_maildir_delivers_only_into_a_mailbox_that_exists(
    tmp_path: Path, messagePath: Path, template: str, userDir: str
) -> None:
    """By default ([delivery] create_mailboxes = false) a maildir route delivers only into
    a user's directory that exists -- the template up to its {local} or {address} part --
    as Postfix's virtual and local agents deliver only to users they know: any local part
    of a routed domain created a directory (remote senders could create them by the
    thousand, and mail to a mistyped name was kept where nobody reads it).  An unknown user
    bounces 5.1.1 and nothing is created."""
    template = template.format(root=tmp_path)
    userDir = userDir.format(root=tmp_path)
    env = envelope("Bob@example.org")
    with capturedLogs() as events:
        (r,) = result(maildir(False).deliver(env, env.recipients, toMaildir(template), messagePath))
    assert (r.status, r.code) == (PERMANENT, "5.1.1")
    assert r.diagnostic == "X-mailrelay; unknown user: no mailbox for Bob@example.org"
    assert not any(p.is_dir() for p in tmp_path.rglob("*"))  # nothing created
    assert any(userDir in formatEvent(e) for e in events)
    os.makedirs(userDir)
    (r,) = result(maildir(False).deliver(env, env.recipients, toMaildir(template), messagePath))
    assert r.status is DELIVERED
    (stored,) = list(Path(mailboxPath(template, "Bob@example.org"), "new").iterdir())
    assert b"Delivered-To: Bob@example.org" in stored.read_bytes()


def test_maildir_user_lookup_failure_defers(tmp_path: Path, messagePath: Path) -> None:
    """A user's directory that cannot be looked up (here a symbolic link loop: the same
    for a directory the relay may not search, or an I/O error) is not an unknown user:
    the recipient is deferred (4.3.0, the error named), never bounced 5.1.1 -- a
    permission mistake on /var/mail must not bounce every local user's mail."""
    template = str(tmp_path / "{local}" / "Maildir")
    os.symlink(tmp_path / "bob", tmp_path / "bob")
    env = envelope("bob@example.org")
    (r,) = result(maildir(False).deliver(env, env.recipients, toMaildir(template), messagePath))
    assert (r.status, r.code) == (TRANSIENT, "4.3.0")
    assert "Too many levels of symbolic links" in r.diagnostic
    assert str(tmp_path / "bob") in r.diagnostic


@pytest.mark.parametrize(
    "local, delimiters, parts",
    [
        ("bob+lists", "+", ["bob+lists", "bob"]),
        ("bob-lists+x", "+-", ["bob-lists+x", "bob"]),
        ("bob+", "+", ["bob+", "bob"]),
        ("+bob", "+", ["+bob"]),  # (a delimiter first is part of the name, as Postfix's)
        ("bob+lists", "", ["bob+lists"]),
        ("bob+lists", "-", ["bob+lists"]),
        # Postfix's split_addr: never owner-x or x-request when "-" is a delimiter, nor
        # postmaster and MAILER-DAEMON.
        ("owner-list", "-", ["owner-list"]),
        ("list-request", "-+", ["list-request"]),
        ("owner+x", "+", ["owner+x", "owner"]),
    ],
)
def test_userParts(local: str, delimiters: str, parts: list[str]) -> None:
    """The local parts a user is looked for under, in order: the whole, then without its
    extension (Postfix's table search order)."""
    from mailrelay.address import userParts

    assert userParts(local, delimiters) == parts


def test_maildir_a_user_with_a_delimiter_in_its_name_is_its_own(
    tmp_path: Path, messagePath: Path
) -> None:
    """Found by a bug hunt: with recipient_delimiter = "-+", mary-ann@ was written into
    mary's Maildir although mary-ann has one.  The whole local part is looked for first,
    then the user without the extension, as Postfix's virtual(8) searches its tables."""
    template = str(tmp_path / "{local}" / "Maildir")
    for user in ("mary", "mary-ann", "owner-list"):
        (tmp_path / user).mkdir()
    env = envelope("mary-ann@example.org", "mary-jo@example.org", "owner-list@example.org")
    backend = MaildirBackend(Clock(), deferToThread=syncThread, hostname="h",
                             recipientDelimiter="-+")
    results = result(backend.deliver(env, env.recipients, toMaildir(template), messagePath))
    assert [r.status for r in results] == [DELIVERED, DELIVERED, DELIVERED]
    assert len(list((tmp_path / "mary-ann" / "Maildir" / "new").iterdir())) == 1
    assert len(list((tmp_path / "mary" / "Maildir" / "new").iterdir())) == 1  # mary-jo's
    assert len(list((tmp_path / "owner-list" / "Maildir" / "new").iterdir())) == 1


def test_maildir_delivers_an_extension_to_its_user(tmp_path: Path, messagePath: Path) -> None:
    """[delivery] recipient_delimiter = "+" (Postfix's recipient_delimiter): bob+lists@ is
    bob's, in bob's Maildir; its Delivered-To: keeps the whole address."""
    template = str(tmp_path / "{domain}" / "{local}" / "Maildir")
    (tmp_path / "example.org" / "bob").mkdir(parents=True)
    env = envelope("Bob+Lists@example.org")
    backend = MaildirBackend(Clock(), deferToThread=syncThread, hostname="h",
                             recipientDelimiter="+")
    (r,) = result(backend.deliver(env, env.recipients, toMaildir(template), messagePath))
    assert r.status is DELIVERED, r
    (stored,) = list((tmp_path / "example.org" / "bob" / "Maildir" / "new").iterdir())
    assert b"Delivered-To: Bob+Lists@example.org\n" in stored.read_bytes()
    assert sorted(p.name for p in (tmp_path / "example.org").iterdir()) == ["bob"]


def test_maildir_one_copy_per_mailbox(tmp_path: Path, messagePath: Path) -> None:
    """Found by a bug hunt: Bob@, bob@ and BOB@ in one message were three copies in one
    Maildir (so were bob+a@ and bob+b@ with a delimiter); as Postfix's local(8), a mailbox
    gets one copy, every recipient of it delivered."""
    template = str(tmp_path / "{local}" / "Maildir")
    env = envelope("Bob@example.org", "bob@example.org", "bob+x@example.org", "carol@example.org")
    backend = MaildirBackend(Clock(), deferToThread=syncThread, hostname="h",
                             createMailboxes=True, recipientDelimiter="+")
    results = result(backend.deliver(env, env.recipients, toMaildir(template), messagePath))
    assert [(r.address, r.status) for r in results] == [
        ("Bob@example.org", DELIVERED), ("bob@example.org", DELIVERED),
        ("bob+x@example.org", DELIVERED), ("carol@example.org", DELIVERED)]
    assert len(list((tmp_path / "bob" / "Maildir" / "new").iterdir())) == 1
    assert len(list((tmp_path / "carol" / "Maildir" / "new").iterdir())) == 1


def test_maildir_one_mailbox_for_a_domain_is_created(tmp_path: Path, messagePath: Path) -> None:
    """A template without {local} or {address} is one mailbox for all the domain's mail:
    created when missing, as before."""
    env = envelope("bob@example.org")
    template = str(tmp_path / "{domain}" / "Maildir")
    (r,) = result(maildir(False).deliver(env, env.recipients, toMaildir(template), messagePath))
    assert r.status is DELIVERED
    assert (tmp_path / "example.org" / "Maildir" / "new").is_dir()


def test_maildir_delivers(tmp_path: Path, messagePath: Path) -> None:
    backend = maildir()
    verifyObject(IDeliveryBackend, backend)
    template = str(tmp_path / "mail" / "{domain}" / "{local}" / "Maildir")
    env = envelope("Bob@example.org", "carol@example.net")
    results = result(backend.deliver(env, env.recipients, toMaildir(template), messagePath))
    assert [r.status for r in results] == [DELIVERED, DELIVERED]
    assert results[0] == RecipientResult(
        "Bob@example.org", DELIVERED, "2.0.0", "X-mailrelay; delivered to maildir", final=True
    )  # final: a success notice says "delivered", not "relayed"

    box = tmp_path / "mail" / "example.org" / "bob" / "Maildir"
    for sub in ("tmp", "new", "cur"):
        assert (box / sub).is_dir()
        assert (box / sub).stat().st_mode & 0o777 == 0o700
    assert list((box / "tmp").iterdir()) == []
    (stored,) = list((box / "new").iterdir())
    assert stored.name.startswith(env.queueID + ".M")
    assert stored.name.endswith(".host\\057with\\072odd")
    assert stored.read_bytes() == (
        b"Return-Path: <alice@example.com>\nDelivered-To: Bob@example.org\n"
        b"Subject: hi\nFrom: a@example.com\n\nline one\nline\rtwo\n"
    )
    (other,) = list((tmp_path / "mail" / "example.net" / "carol" / "Maildir" / "new").iterdir())
    assert other.read_bytes().startswith(
        b"Return-Path: <alice@example.com>\nDelivered-To: carol@example.net\n"
    )
    # Another message gets another unique name.
    env.queueID = "R" * 20
    result(backend.deliver(env, env.recipients[:1], toMaildir(template), messagePath))
    assert len(list((box / "new").iterdir())) == 2


def test_maildir_null_sender_and_address_placeholder(tmp_path: Path, messagePath: Path) -> None:
    env = envelope('"John Doe"@example.org', sender="")
    template = str(tmp_path / "{address}")
    (r,) = result(maildir().deliver(env, env.recipients, toMaildir(template), messagePath))
    assert r.status is DELIVERED
    (stored,) = list((tmp_path / "john doe@example.org" / "new").iterdir())
    assert stored.read_bytes().startswith(
        b'Return-Path: <>\nDelivered-To: "John Doe"@example.org\n'
    )


def test_maildir_placeholders_in_an_address_are_not_expanded(
    tmp_path: Path, messagePath: Path
) -> None:
    """Found by a bug hunt: the placeholders were replaced one after the other, so that a
    local part holding one had it replaced too: {domain}@example.org was written into the
    mailbox of a user example.org.  Each is replaced once, in one pass."""
    assert mailboxPath("/m/{domain}/{local}/Maildir", "{domain}@example.org") == (
        "/m/example.org/{domain}/Maildir")
    assert mailboxPath("/m/{local}/{domain}", "{domain}@example.org") == "/m/{domain}/example.org"
    assert mailboxPath("/v/{address}/{domain}", '"{local}"@example.org') == (
        "/v/{local}@example.org/example.org")
    (tmp_path / "example.org" / "example.org").mkdir(parents=True)  # (a user example.org)
    env = envelope("{domain}@example.org")
    template = str(tmp_path / "{domain}" / "{local}" / "Maildir")
    (r,) = result(maildir(False).deliver(env, env.recipients, toMaildir(template), messagePath))
    assert (r.status, r.code) == (PERMANENT, "5.1.1")
    assert list((tmp_path / "example.org" / "example.org").iterdir()) == []


def test_maildir_crlf_split_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailrelay.delivery import maildir as module

    monkeypatch.setattr(module, "CHUNK", 3)
    path = tmp_path / "m.eml"
    body = b"ab\r\ncd\r\r\nef\r\n\r\nx\r"
    path.write_bytes(body)
    env = envelope("u@example.org")
    result(maildir().deliver(env, env.recipients, toMaildir(str(tmp_path / "box")), path))
    (stored,) = list((tmp_path / "box" / "new").iterdir())
    assert stored.read_bytes().split(b"\n", 2)[2] == body.replace(b"\r\n", b"\n")


def test_maildir_unsafe_local_parts(tmp_path: Path, messagePath: Path) -> None:
    template = str(tmp_path / "{domain}" / "{local}")
    for address in [
        '"../x"@example.org',
        '"a/b"@example.org',
        ".hidden@example.org",
        '"a\\\x00b"@example.org',
        '".."@example.org',
    ]:
        with pytest.raises(UnsafeAddress):
            mailboxPath(template, address)
    env = envelope('"../../etc"@example.org', "fine@example.org")
    results = result(maildir().deliver(env, env.recipients, toMaildir(template), messagePath))
    assert results[0].status is PERMANENT
    assert results[0].code == "5.1.3"
    assert results[1].status is DELIVERED
    assert sorted(p.name for p in (tmp_path / "example.org").iterdir()) == ["fine"]
    assert (
        mailboxPath("/m/{local}/{domain}", "X.Y@[IPv6:2001:db8::1]") == "/m/x.y/[IPv6:2001:db8::1]"
    )


def test_maildir_errors(tmp_path: Path, messagePath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = maildir()
    env = envelope("u@example.org")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    route = toMaildir(str(blocker / "{local}"))
    (r,) = result(backend.deliver(env, env.recipients, route, messagePath))
    assert (r.status, r.code) == (TRANSIENT, "4.3.0")
    assert r.diagnostic.startswith("X-mailrelay; cannot deliver to maildir: ")

    def full(*args: Any, **kw: Any) -> None:
        raise OSError(wanted, os.strerror(wanted))

    # A full file system is deferred; a mailbox over its quota or a file over its size
    # limit is returned at once, as Postfix's mbox_dsn (global/mbox_open.c) has them: they
    # were deferred (4.2.2, 4.3.0), the sender told nothing for the queue's 5 days.
    monkeypatch.setattr(os, "fsync", full)
    for wanted, status, code in [(errno.ENOSPC, TRANSIENT, "4.3.1"),
                                 (errno.EDQUOT, PERMANENT, "5.2.2"),
                                 (errno.EFBIG, PERMANENT, "5.2.2")]:
        route = toMaildir(str(tmp_path / "box"))
        (r,) = result(backend.deliver(env, env.recipients, route, messagePath))
        assert (r.status, r.code) == (status, code), wanted
        problem = OSError(wanted, os.strerror(wanted))
        assert r.diagnostic == f"X-mailrelay; cannot deliver to maildir: {problem}"
    assert list((tmp_path / "box" / "tmp").iterdir()) == []
    assert list((tmp_path / "box" / "new").iterdir()) == []


#: A BODY=BINARYMIME message whose binary part holds CRLF, a bare LF and CR, and NULs (the
#: start of a PNG file): taking its CRLF for line ends breaks it.
PAYLOAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\r\n\x00\xff"
BINARY_MESSAGE = (
    b"Subject: binary\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n"
    b"\r\n--B\r\nContent-Type: text/plain\r\n\r\nsee the image\r\n--B\r\n"
    b"Content-Type: image/png\r\nContent-Transfer-Encoding: binary\r\n\r\n" + PAYLOAD
    + b"\r\n--B--\r\n"
)


def binaryPart(stored: bytes) -> bytes:
    """The decoded content of the image/png part of C{stored} (a message with LF lines)."""
    import email
    import email.policy

    msg = email.message_from_bytes(stored, policy=email.policy.compat32)
    (part,) = [p for p in msg.walk() if p.get_content_type() == "image/png"]
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def test_a_conversion_given_up_removes_its_file_once_it_ends(tmp_path: Path) -> None:
    """A delivery cancelled (its time-out, the relay's stop) while its message was being
    converted to 7 bits in a thread: the thread's converted copy, made after nobody
    waited for it any more, was left in the temporary directory."""
    from mailrelay.delivery.common import convertTo7Bit

    work: defer.Deferred = defer.Deferred()
    d = convertTo7Bit(lambda f, *args: work, envelope("a@example.org"), [], tmp_path / "m",
                      "maildir", "BINARYMIME")
    d.cancel()
    with pytest.raises(defer.CancelledError):
        result(d)
    copy = tmp_path / "converted.eml"
    copy.write_bytes(b"x")
    work.callback((str(copy), 1))
    assert not copy.exists()


def test_maildir_converts_binarymime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a bug hunt: a BODY=BINARYMIME message had the CRLF of its binary part made
    LF with the message's line ends, and the image stored broken.  Its binary part is made
    base64 first, as for a next hop without BINARYMIME (L{mailrelay.delivery.mime}); one
    that cannot be converted (DKIM-signed) is returned with 5.6.3, nothing stored."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # (the converted copy's place)
    path = tmp_path / "m.eml"
    path.write_bytes(BINARY_MESSAGE)
    env = dataclasses.replace(envelope("bob@example.org"), body="BINARYMIME")
    route = toMaildir(str(tmp_path / "box"))
    (r,) = result(maildir().deliver(env, env.recipients, route, path))
    assert r.status is DELIVERED
    (stored,) = list((tmp_path / "box" / "new").iterdir())
    content = stored.read_bytes()
    assert binaryPart(content) == PAYLOAD
    assert b"Content-Transfer-Encoding: base64\n" in content and content.isascii()
    assert b"\r" not in content and b"\nsee the image\n" in content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", "m.eml"]  # (copy removed)
    assert path.read_bytes() == BINARY_MESSAGE

    path.write_bytes(b"DKIM-Signature: v=1; d=example.com\r\n" + BINARY_MESSAGE)
    with capturedLogs() as events:
        (r,) = result(maildir().deliver(env, env.recipients, toMaildir(str(tmp_path / "x")), path))
    assert (r.status, r.code) == (PERMANENT, "5.6.3")
    assert r.diagnostic == (
        "X-mailrelay; maildir does not support BINARYMIME, and the message cannot be "
        "converted to 7 bits: the message is DKIM-signed, and converting it would break the "
        "signature")
    assert not (tmp_path / "x").exists()
    assert any("cannot convert" in formatEvent(e) for e in events)


class MaildirThreadTests(unittest.TestCase):
    """Without an injected deferToThread the reactor's thread pool is used."""

    @defer.inlineCallbacks
    def test_real_thread(self) -> Any:
        from twisted.internet import reactor

        tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, tmp, True)
        path = tmp / "m.eml"
        path.write_bytes(MESSAGE)
        env = envelope("u@example.org")
        route = toMaildir(str(tmp / "box"))
        (r,) = yield MaildirBackend(reactor).deliver(env, env.recipients, route, path)
        self.assertIs(r.status, DELIVERED)
        self.assertEqual(len(list((tmp / "box" / "new").iterdir())), 1)


# ---------------------------------------------------------------------------------------------
# SMTP backend, with fake connections


def connectError(
    code: str, diagnostic: str, *, permanent: bool = False, remoteMTA: str | None = None
) -> SMTPConnectError:
    return SMTPConnectError(
        code=code, diagnostic=diagnostic, permanent=permanent, remoteMTA=remoteMTA
    )


class FakeConnection:
    """An SMTPConnection: C{replies} maps a recipient address to its result status/code."""

    def __init__(self, net: FakeNet, address: str, remoteMTA: str) -> None:
        self.net = net
        self.address = address
        self.remoteMTA = remoteMTA
        self.relay = remoteMTA.partition("; ")[2]  # (what the log's relay= names)
        self.extensions: dict[str, Any] = {"8BITMIME": ""}  # takes messages as they are
        self.usable = True
        self.sent: list[tuple[str, list[str]]] = []
        self.quitted = False
        self.aborted = False
        self.tlsSessionFailed = False
        self.broke = False

    def send(
        self,
        envelope: Envelope,
        recipients: list[Recipient],
        messagePath: Path,
        *,
        lineEndsChecked: bool = False,
    ) -> defer.Deferred:
        self.sent.append((envelope.queueID, [r.address for r in recipients]))
        behaviour = self.net.sendBehaviour.get(self.address, "ok")
        if behaviour == "hold":
            d: defer.Deferred = defer.Deferred()
            self.net.heldSends.append((d, self, recipients))
            return d
        return defer.succeed(self.net.results(self, recipients, behaviour))

    def quit(self) -> defer.Deferred:
        self.quitted = True
        self.usable = False
        return defer.succeed(None)

    def abort(self) -> None:
        self.aborted = True
        self.usable = False


class FakeNet:
    """A fake connectSMTP: per address, connect behaviour and send behaviour."""

    def __init__(self) -> None:
        self.connectBehaviour: dict[str, Any] = {}
        self.sendBehaviour: dict[str, str] = {}
        self.attempts: list[tuple[str, int, str, ClientSettings, Any]] = []
        self.connections: list[FakeConnection] = []
        self.heldConnects: list[tuple[defer.Deferred, str, str]] = []
        self.heldSends: list[tuple[defer.Deferred, FakeConnection, list]] = []
        #: Per address, EHLO keywords its connections offer besides 8BITMIME.
        self.extensions: dict[str, dict[str, str]] = {}

    def connect(
        self,
        reactor: Any,
        endpoint: Any,
        settings: ClientSettings,
        *,
        tlsHostname: str,
        remoteMTA: str | None = None,
    ) -> defer.Deferred:
        inner = getattr(endpoint, "_wrappedEndpoint", endpoint)
        address, port = inner._host, inner._port
        self.attempts.append((address, port, tlsHostname, settings, endpoint))
        behaviour = self.connectBehaviour.get(address, "ok")
        if isinstance(behaviour, Exception):
            return defer.fail(behaviour)
        if behaviour == "hold":
            d: defer.Deferred = defer.Deferred()
            self.heldConnects.append((d, address, remoteMTA or ""))
            return d
        return defer.succeed(self.newConnection(address, remoteMTA or ""))

    def newConnection(self, address: str, remoteMTA: str) -> FakeConnection:
        c = FakeConnection(self, address, remoteMTA)
        c.extensions.update(self.extensions.get(address, {}))
        self.connections.append(c)
        return c

    def results(
        self, conn: FakeConnection, recipients: list[Recipient], behaviour: str
    ) -> list[RecipientResult]:
        if "," in behaviour:  # one behaviour per recipient, in order ("ok,451,550")
            return [self.results(conn, [r], b)[0]
                    for r, b in zip(recipients, behaviour.split(","), strict=True)]
        if behaviour == "ok":
            return [
                RecipientResult(r.address, DELIVERED, "2.0.0", "smtp; 250 2.0.0 Ok", conn.remoteMTA)
                for r in recipients
            ]
        if behaviour == "451":
            return [
                RecipientResult(
                    r.address, TRANSIENT, "4.3.0", "smtp; 451 4.3.0 try later", conn.remoteMTA
                )
                for r in recipients
            ]
        if behaviour == "lost":
            conn.usable = False
            conn.broke = True
            return [
                RecipientResult(
                    r.address, TRANSIENT, "4.4.2", "X-mailrelay; connection lost", conn.remoteMTA
                )
                for r in recipients
            ]
        if behaviour == "tlslost-once":  # the TLS session breaks in this transaction
            self.sendBehaviour[conn.address] = "ok"
            conn.usable = False
            conn.tlsSessionFailed = True
            return [
                RecipientResult(
                    r.address, TRANSIENT, "4.4.2", "X-mailrelay; lost connection with mx",
                    conn.remoteMTA,
                )
                for r in recipients
            ]
        if behaviour == "mixed":
            return [
                RecipientResult(
                    r.address,
                    DELIVERED if i == 0 else TRANSIENT,
                    "2.0.0" if i == 0 else "4.2.0",
                    "smtp; x",
                    conn.remoteMTA,
                )
                for i, r in enumerate(recipients)
            ]
        if behaviour == "550":
            return [
                RecipientResult(
                    r.address, PERMANENT, "5.1.1", "smtp; 550 5.1.1 unknown", conn.remoteMTA
                )
                for r in recipients
            ]
        raise AssertionError(behaviour)


class FakeMX:
    """An MXResolver answering from a dict: nexthop -> list of MXHost or a DeliveryFailure."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def resolve(self, nexthop: str, *, limited: bool = True) -> defer.Deferred:
        self.asked.append(nexthop)
        answer = self.answers[nexthop]
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(list(answer))

    def limit(self, hosts: list[MXHost]) -> list[MXHost]:
        return hosts  # (no limit: the answers are what is tried)


HOSTS = {
    "example.org": [
        MXHost("mx1.example.org", "192.0.2.1", 25, 10),
        MXHost("mx1.example.org", "2001:db8::1", 25, 10),
        MXHost("mx2.example.org", "192.0.2.2", 25, 20),
    ],
    "example.net": [MXHost("mx.example.net", "192.0.2.30", 25, 10)],
    "[relay.example]:587": [MXHost("relay.example", "192.0.2.40", 587)],
    "nowhere.example": DeliveryFailure(
        permanent=True,
        code="5.1.2",
        diagnostic="X-mailrelay; domain nowhere.example does not exist",
    ),
    "nullmx.example": DeliveryFailure(
        permanent=True,
        code="5.1.10",
        diagnostic="X-mailrelay; domain nullmx.example does not accept mail (null MX)",
    ),
    "relay.nowhere.example": DeliveryFailure(
        permanent=True,
        code="5.1.2",
        diagnostic="X-mailrelay; domain relay.nowhere.example does not exist",
    ),
    "broken.example": DeliveryFailure(
        permanent=False, code="4.4.3", diagnostic="X-mailrelay; SERVFAIL"
    ),
}

SETTINGS = ClientSettings(heloName="relay.test")


def smtpBackend(**kw: Any) -> tuple[Any, FakeNet, Clock, FakeMX]:
    from mailrelay.delivery.smtp import SMTPBackend

    net = FakeNet()
    clock = Clock()
    mx = FakeMX(HOSTS)
    kw.setdefault("settings", SETTINGS)
    backend = SMTPBackend(clock, mx, connect=net.connect, **kw)
    return backend, net, clock, mx


def send(
    backend: Any,
    nexthop: str,
    *addresses: str,
    queueID: str | None = None,
    path: Path = Path("/nonexistent"),
    options: RouteOptions = RouteOptions(),
    backendName: str = "smtp",
    done: Any = None,
) -> defer.Deferred:
    """Deliver along C{Route(backendName, nexthop, options)} (reporting to C{done})."""
    env = envelope(*addresses)
    if queueID:
        env.queueID = queueID
    route = Route(backendName, nexthop, options)
    if done is not None:
        return backend.deliver(env, env.recipients, route, path, done=done)
    return backend.deliver(env, env.recipients, route, path)


def test_unexpected_error_of_a_delivery_defers_its_recipients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backend's delivery that fails unexpectedly (a bug) gives its recipients a transient
    4.3.0 with the error, logged; the Deferred never fails, and the next hop's slot is freed."""
    from twisted.logger import Logger

    from mailrelay.delivery import common

    events: list[dict] = []
    monkeypatch.setattr(common, "log", Logger(observer=events.append))
    limit = common.PerDestination(1, "SMTP")
    env = envelope("a@example.org", "b@example.org")

    def broken() -> defer.Deferred:
        return defer.fail(RuntimeError("oops"))

    results = result(limit.run("mx.example", env, env.recipients, broken))
    assert [(r.address, r.status, r.code) for r in results] == [
        ("a@example.org", TRANSIENT, "4.3.0"),
        ("b@example.org", TRANSIENT, "4.3.0"),
    ]
    assert results[0].diagnostic == "X-mailrelay; internal error: oops"
    assert limit.semaphores == {}
    (event,) = events
    assert event["log_failure"].check(RuntimeError)
    assert (event["queueID"], event["what"], event["nexthop"]) == ("Q" * 20, "SMTP", "mx.example")


def test_an_unexpected_send_failure_names_no_remote_mta() -> None:
    """Sending over a connection that fails unexpectedly (a bug of the relay's) defers the
    recipients with 4.3.0 naming no Remote-MTA: the server said nothing of it (Postfix's
    DSN_BY_LOCAL_MTA; RFC 3464 2.3.5); the connection is aborted."""
    backend, net, _, _ = smtpBackend()
    newConnection = net.newConnection

    def broken(address: str, remoteMTA: str) -> FakeConnection:
        connection = newConnection(address, remoteMTA)

        def send(*args: Any, **kw: Any) -> defer.Deferred:
            raise RuntimeError("oops")

        connection.send = send  # type: ignore[method-assign]
        return connection

    net.newConnection = broken  # type: ignore[method-assign]
    (r,) = result(send(backend, "example.net", "a@example.net"))
    assert (r.status, r.code, r.remoteMTA) == (TRANSIENT, "4.3.0", None), r
    assert r.diagnostic == "X-mailrelay; internal error: oops"
    assert net.connections[0].aborted


def test_a_next_hop_at_its_limit_holds_no_delivery_place() -> None:
    """With the queue's places of the deliveries in flight (C{[queue] delivery_limit}), a
    delivery takes one only once its next hop has a slot free: deliveries waiting for a busy
    next hop leave the places to other next hops.  Cancelled while waiting (for either), a
    delivery fails with L{DeliveryNotStarted}: nothing was sent."""
    from mailrelay.delivery import common
    from mailrelay.errors import DeliveryNotStarted
    from mailrelay.queue.attempt import DeliveryPlaces

    places = DeliveryPlaces(2)
    limit = common.PerDestination(1, "SMTP")
    limit.places = places
    env = envelope("a@example.org")
    running: list[defer.Deferred] = []

    def deliver() -> defer.Deferred:
        running.append(defer.Deferred())
        return running[-1]

    first = limit.run("busy.example", env, env.recipients, deliver)
    second = limit.run("busy.example", env, env.recipients, deliver)  # waits for its hop
    assert (len(running), places.running, places.waiting) == (1, 1, 0)
    other = limit.run("other.example", env, env.recipients, deliver)
    assert (len(running), places.running) == (2, 2)
    third = limit.run("third.example", env, env.recipients, deliver)  # waits for a place
    assert (len(running), places.waiting) == (2, 1)
    second.cancel()
    third.cancel()
    for cancelled in (second, third):
        with pytest.raises(DeliveryNotStarted):
            result(cancelled)
    assert (len(running), places.running, places.waiting) == (2, 2, 0)
    running[0].callback(["done"])
    assert result(first) == ["done"] and places.running == 1
    running[1].callback(["done"])
    assert result(other) == ["done"] and places.running == 0
    assert limit.semaphores == {}


def test_deliveries_ending_at_once_after_waiting_do_not_recurse() -> None:
    """Thousands of deliveries waiting for one next hop's slot, each ending at once when it
    gets it (the queue stopping: its places interrupted, none starts), all end, one after
    the other.  The slot freed by each was handed to the next from within the previous
    one's end, so that the waiters' ends nested: past a few hundred a RecursionError broke
    the chains, deliveries never ended, and the stopping delivery process never exited,
    keeping the queue lock from the one the relay had started."""
    from mailrelay.delivery import common
    from mailrelay.errors import DeliveryNotStarted
    from mailrelay.queue.attempt import DeliveryPlaces

    places = DeliveryPlaces(100)
    limit = common.PerDestination(1, "SMTP")
    limit.places = places
    env = envelope("a@example.org")
    first = defer.Deferred()
    running = limit.run("slow.example", env, env.recipients, lambda: first)
    waiting = [limit.run("slow.example", env, env.recipients, lambda: defer.succeed(["sent"]))
               for _ in range(3000)]
    places.interrupt()
    first.callback(["done"])
    assert result(running) == ["done"]
    for d in waiting:
        with pytest.raises(DeliveryNotStarted):
            result(d)
    assert limit.semaphores == {} and places.running == 0


def test_places_handed_on_by_deliveries_ending_at_once_do_not_recurse() -> None:
    """The same with the queue's places: thousands of deliveries waiting for a place, each
    ending at once (a next hop suspended), all end in turn, none nested in another."""
    from mailrelay.queue.attempt import DeliveryPlaces

    places = DeliveryPlaces(1)
    first = defer.Deferred()
    running = places.run(lambda: first)
    waiting = [places.run(defer.succeed, ["deferred"]) for _ in range(3000)]
    first.callback(["done"])
    assert result(running) == ["done"]
    assert [result(d) for d in waiting] == [["deferred"]] * 3000
    assert places.running == 0 and places.waiting == 0


def test_a_delivery_says_when_it_has_its_place() -> None:
    """C{started} is called once the delivery has its next hop's slot and its place among
    the queue's (the queue's L{Deliverer <mailrelay.queue.attempt.Deliverer>} starts the
    delivery's timeout then, not while it waits), and never for one cancelled waiting."""
    from mailrelay.delivery import common
    from mailrelay.queue.attempt import DeliveryPlaces

    places = DeliveryPlaces(1)
    limit = common.PerDestination(1, "SMTP")
    limit.places = places
    env = envelope("a@example.org")
    running: list[defer.Deferred] = []
    started: list[str] = []

    def deliver() -> defer.Deferred:
        running.append(defer.Deferred())
        return running[-1]

    first = limit.run("one.example", env, env.recipients, deliver,
                      started=lambda: started.append("first"))
    waiting = limit.run("two.example", env, env.recipients, deliver,
                        started=lambda: started.append("waiting"))
    cancelled = limit.run("three.example", env, env.recipients, deliver,
                          started=lambda: started.append("cancelled"))
    assert started == ["first"] and places.waiting == 2
    cancelled.cancel()
    running[0].callback(["done"])
    assert result(first) == ["done"] and started == ["first", "waiting"]
    running[1].callback(["done"])
    assert result(waiting) == ["done"] and started == ["first", "waiting"]


def test_smtp_keeps_no_more_idle_connections_than_delivery_places() -> None:
    """Connections kept for reuse add open files too: with the queue's places given, the
    SMTP backend keeps at most as many idle connections as there are places, quitting the
    oldest to make room."""
    from mailrelay.queue.attempt import DeliveryPlaces

    backend, net, clock, mx = smtpBackend(connectionCacheTime=10.0)
    backend.useDeliveryPlaces(DeliveryPlaces(2))
    for nexthop in ("example.net", "example.org", "[relay.example]:587"):
        assert result(send(backend, nexthop, "a@example.org"))[0].status is DELIVERED
        clock.advance(1)
    assert backend.idleConnections() == 2
    assert [c.quitted for c in net.connections] == [True, False, False]
    assert backend.idleConnections("example.net") == 0
    result(backend.close())


def test_smtp_provides_interface() -> None:
    backend, *_ = smtpBackend()
    verifyObject(IDeliveryBackend, backend)


def test_smtp_failover_order() -> None:
    backend, net, clock, mx = smtpBackend()
    net.connectBehaviour["192.0.2.1"] = connectError(
        "4.4.1", "X-mailrelay; connection refused by 192.0.2.1", remoteMTA="dns; mx1.example.org"
    )
    net.connectBehaviour["2001:db8::1"] = connectError(
        "5.3.0", "smtp; 554 5.3.0 go away", permanent=True, remoteMTA="dns; mx1.example.org"
    )
    results = result(send(backend, "example.org", "a@example.org", "b@example.org"))
    assert [r.status for r in results] == [DELIVERED, DELIVERED]
    assert [(a, p, t) for a, p, t, _, _ in net.attempts] == [
        ("192.0.2.1", 25, "mx1.example.org"),
        ("2001:db8::1", 25, "mx1.example.org"),
        ("192.0.2.2", 25, "mx2.example.org"),
    ]
    assert isinstance(net.attempts[0][4], TCP4ClientEndpoint)
    assert isinstance(net.attempts[1][4], TCP6ClientEndpoint)
    assert net.attempts[0][4]._timeout == SETTINGS.timeouts.connect
    assert net.connections[0].remoteMTA == "dns; mx2.example.org"
    assert net.connections[0].sent == [("Q" * 20, ["a@example.org", "b@example.org"])]


def test_smtp_source_address_by_family() -> None:
    """[delivery] source_address binds IPv4 connections, source_address6 IPv6 ones
    (Postfix's smtp_bind_address and smtp_bind_address6); without one of them the
    connections of that family are not bound."""
    settings = dataclasses.replace(SETTINGS, sourceAddress="192.0.2.100",
                                   sourceAddress6="2001:db8::100")
    backend, net, clock, mx = smtpBackend(settings=settings)
    net.connectBehaviour["192.0.2.1"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["2001:db8::1"] = connectError("4.4.1", "X-mailrelay; refused")
    assert result(send(backend, "example.org", "a@example.org"))[0].status is DELIVERED
    assert [(a, e._bindAddress) for a, _, _, _, e in net.attempts] == [
        ("192.0.2.1", ("192.0.2.100", 0)),
        ("2001:db8::1", ("2001:db8::100", 0)),
        ("192.0.2.2", ("192.0.2.100", 0)),
    ]
    settings = dataclasses.replace(SETTINGS, sourceAddress="192.0.2.100")
    backend, net, clock, mx = smtpBackend(settings=settings)
    net.connectBehaviour["192.0.2.1"] = connectError("4.4.1", "X-mailrelay; refused")
    assert result(send(backend, "example.org", "a@example.org"))[0].status is DELIVERED
    assert [e._bindAddress for *_, e in net.attempts] == [("192.0.2.100", 0), None]
    backend, net, clock, mx = smtpBackend(settings=dataclasses.replace(
        SETTINGS, tls="implicit", sourceAddress="192.0.2.100"))
    result(send(backend, "example.net", "a@example.net"))
    assert net.attempts[0][4]._wrappedEndpoint._bindAddress == ("192.0.2.100", 0)


def test_smtp_source_address_of_an_ipv4_mapped_mx_address() -> None:
    """An MX host at an IPv4-mapped address (::ffff:192.0.2.50) is an IPv4 destination (the
    relay takes it as one to find itself: OwnAddresses), so it is connected to as IPv4 and
    from [delivery] source_address, not from the system's choice through a dual-stack socket
    nor from source_address6 (Postfix's smtp_bind_address, smtp_bind_address_enforce)."""
    settings = dataclasses.replace(SETTINGS, sourceAddress="192.0.2.100",
                                   sourceAddress6="2001:db8::100")
    backend, net, clock, mx = smtpBackend(settings=settings)
    mx.answers = {"mapped.example": [MXHost("mx.mapped.example", "::ffff:192.0.2.50", 25, 10)]}
    assert result(send(backend, "mapped.example", "a@mapped.example"))[0].status is DELIVERED
    ((address, port, name, _, endpoint),) = net.attempts
    assert (address, port, name) == ("192.0.2.50", 25, "mx.mapped.example")
    assert isinstance(endpoint, TCP4ClientEndpoint)
    assert endpoint._bindAddress == ("192.0.2.100", 0)


def test_client_settings_source_addresses_are_checked() -> None:
    for bad, message in [
        (dict(sourceAddress="2001:db8::1"), "sourceAddress must be an IPv4 address"),
        (dict(sourceAddress="relay.example"), "sourceAddress must be an IPv4 address"),
        (dict(sourceAddress6="192.0.2.1"), "sourceAddress6 must be an IPv6 address"),
        (dict(sourceAddress6="::ffff:c000:201"), "sourceAddress6 must be an IPv6 address"),
    ]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(SETTINGS, **bad)


def test_smtp_unreachable_next_hop_is_suspended() -> None:
    """As many deliveries in a row as the destination concurrency that reach no server of a
    next hop suspend it for plaintextFallbackAge (the queue's min_backoff): deliveries to it
    are then deferred at once, with the reason, without connecting (Postfix's dead
    destination); then it is tried again, and one that reaches a server ends the count."""
    backend, net, clock, _ = smtpBackend(destinationConcurrency=2, plaintextFallbackAge=60,
                                         connectionCacheTime=0)
    refused = connectError("4.4.1", "X-mailrelay; connection refused by 192.0.2.30",
                           remoteMTA="dns; mx.example.net")
    net.connectBehaviour["192.0.2.30"] = refused
    for _ in range(2):
        (r,) = result(send(backend, "example.net", "a@example.net"))
        assert (r.status, r.diagnostic) == (TRANSIENT, refused.diagnostic)
    assert len(net.attempts) == 2
    (r,) = result(send(backend, "example.net", "a@example.net"))
    assert (r.status, r.code, r.diagnostic, r.reason, r.remoteMTA) == (
        TRANSIENT, "4.4.1", "X-mailrelay; connection refused by 192.0.2.30",
        "delivery temporarily suspended: connection refused by 192.0.2.30",
        "dns; mx.example.net",
    )
    assert len(net.attempts) == 2  # not tried
    assert result(send(backend, "example.org", "b@example.org"))[0].status == DELIVERED
    clock.advance(60)
    del net.connectBehaviour["192.0.2.30"]
    assert result(send(backend, "example.net", "a@example.net"))[0].status == DELIVERED
    net.connectBehaviour["192.0.2.30"] = refused
    assert result(send(backend, "example.net", "a@example.net"))[0].status == TRANSIENT
    net.sendBehaviour["192.0.2.30"] = "451"  # (a server answered: the count ends)
    del net.connectBehaviour["192.0.2.30"]
    assert result(send(backend, "example.net", "a@example.net"))[0].code == "4.3.0"
    net.connectBehaviour["192.0.2.30"] = refused
    (r,) = result(send(backend, "example.net", "a@example.net"))
    assert r.diagnostic == refused.diagnostic
    assert len(net.attempts) == 7


def test_a_suspension_after_a_servers_reply_says_what_the_server_said() -> None:
    """A next hop suspended after its server refused the session (421 to EHLO): the
    deliveries deferred meanwhile say what the failure said, as Postfix's qmgr defers them
    with the dead queue's saved DSN (qmgr_queue_throttle(), qmgr_defer_todo()): its status,
    its Remote-MTA, its diagnostic (type smtp: the reply, as the DSN's Diagnostic-Code), and
    its reason after "delivery temporarily suspended: " -- "host H said: <reply>", with the
    command it answered (qmgr_deliver.c).  The diagnostic was the reason, typed
    X-mailrelay."""
    backend, net, _, _ = smtpBackend(destinationConcurrency=1, connectionCacheTime=0)
    net.connectBehaviour["192.0.2.30"] = SMTPConnectError(
        "4.3.2", "smtp; 421 4.3.2 mx.example.net busy", remoteMTA="dns; mx.example.net",
        command="EHLO", remoteAddress="192.0.2.30")
    (first,) = result(send(backend, "example.net", "a@example.net"))
    (r,) = result(send(backend, "example.net", "a@example.net"))
    assert (r.status, r.code, r.diagnostic, r.reason, r.remoteMTA, r.command, r.relay) == (
        TRANSIENT, "4.3.2", "smtp; 421 4.3.2 mx.example.net busy",
        "delivery temporarily suspended: host mx.example.net[192.0.2.30] said: 421 4.3.2 "
        "mx.example.net busy", "dns; mx.example.net", "EHLO", None)
    # (The address the reply came from is carried, as the name: Postfix's namaddr.)
    assert (first.remoteAddress, r.remoteAddress) == ("192.0.2.30", "192.0.2.30")
    assert (first.diagnostic, first.command) == ("smtp; 421 4.3.2 mx.example.net busy", "EHLO")
    assert len(net.attempts) == 1


def test_a_source_address_that_cannot_be_bound_does_not_suspend_the_next_hop() -> None:
    """Two companies' sender routes to one provider, each from its own source address:
    company A's address gone from the host defers A's mail at each attempt (4.4.0, server
    configuration error), but does not make the provider unreachable: B's mail, from its
    own address, is neither suspended nor told of A's address.  (Postfix binds per
    transport, smtp_bind_address: a site binding two companies apart runs two transports,
    whose destinations its queue manager throttles apart.)"""
    from twisted.internet.error import ConnectBindError

    from mailrelay.delivery.connection import connectSMTP

    class Unbindable:
        """A client endpoint whose source address the host no longer has."""

        def __init__(self, endpoint: Any) -> None:
            self._bindAddress = endpoint._bindAddress

        def connect(self, factory: Any) -> defer.Deferred:
            return defer.fail(ConnectBindError(99, "Cannot assign requested address"))

    backend, net, clock, _ = smtpBackend(destinationConcurrency=2, plaintextFallbackAge=60,
                                         connectionCacheTime=0)
    fakeConnect = net.connect

    def connect(reactor: Any, endpoint: Any, settings: ClientSettings, **kw: Any) -> Any:
        if settings.sourceAddress == "192.0.2.101":
            return connectSMTP(reactor, Unbindable(endpoint), settings, **kw)
        return fakeConnect(reactor, endpoint, settings, **kw)

    backend._connect = connect
    companyA = RouteOptions(sourceAddress="192.0.2.101")
    companyB = RouteOptions(sourceAddress="192.0.2.102")
    for _ in range(3):
        (r,) = result(send(backend, "[relay.example]:587", "a@example.com", options=companyA))
        assert (r.status, r.code) == (TRANSIENT, "4.4.0"), r
        assert r.diagnostic.startswith(
            "X-mailrelay; cannot connect to relay.example from source address 192.0.2.101"), r
    (r,) = result(send(backend, "[relay.example]:587", "b@example.com", options=companyB))
    assert r.status is DELIVERED, r
    assert [a[3].sourceAddress for a in net.attempts] == ["192.0.2.102"]


def test_a_next_hop_unreachable_from_one_source_address_is_suspended_from_it_only() -> None:
    """Time-outs or refusals seen from one route's own source address suspend the next hop
    for that source address only: mail to it from another address (another route's, or
    [delivery]'s) is still tried, as Postfix's qmgr keeps dead destinations per transport
    and a bind address of its own is a transport of its own (smtp_bind_address in
    master.cf).  Both share the next hop's concurrency limit.  A flush of the next hop
    (resumeSuspended) resumes it from every source address."""
    backend, net, clock, _ = smtpBackend(destinationConcurrency=2, plaintextFallbackAge=60,
                                         connectionCacheTime=0)
    fakeConnect = net.connect
    refused = connectError("4.4.1", "X-mailrelay; connection refused by relay.example",
                           remoteMTA="dns; relay.example")

    def connect(reactor: Any, endpoint: Any, settings: ClientSettings, **kw: Any) -> Any:
        if settings.sourceAddress == "192.0.2.101":  # (a firewall drops this one's SYNs)
            net.attempts.append((None, None, None, settings, endpoint))
            return defer.fail(refused)
        return fakeConnect(reactor, endpoint, settings, **kw)

    backend._connect = connect
    companyA = RouteOptions(sourceAddress="192.0.2.101")
    nexthop = "[relay.example]:587"
    with capturedLogs() as events:
        for _ in range(2):
            (r,) = result(send(backend, nexthop, "a@example.com", options=companyA))
            assert (r.status, r.diagnostic) == (TRANSIENT, refused.diagnostic), r
    assert [formatEvent(e) for e in events if e["log_level"] is LogLevel.warn] == [
        "SMTP delivery to [relay.example]:587 from 192.0.2.101 temporarily suspended for 60s "
        "after 2 failure(s) in a row: X-mailrelay; connection refused by relay.example"]
    (r,) = result(send(backend, nexthop, "a@example.com", options=companyA))
    assert (r.reason or "").startswith("delivery temporarily suspended"), r
    assert len(net.attempts) == 2
    # From another source address, or the default one: tried, delivered.
    companyB = RouteOptions(sourceAddress="192.0.2.102")
    assert result(send(backend, nexthop, "b@example.com", options=companyB))[0].status is (
        DELIVERED)
    assert result(send(backend, nexthop, "c@example.com"))[0].status is DELIVERED
    assert [a[3].sourceAddress for a in net.attempts[2:]] == ["192.0.2.102", None]
    # A flush of the next hop resumes it from company A's address too.
    backend.resumeSuspended(nexthop)
    (r,) = result(send(backend, nexthop, "a@example.com", options=companyA))
    assert r.diagnostic == refused.diagnostic and len(net.attempts) == 5


def test_smtp_suspension_ends_on_time_after_a_step_back_of_the_clock() -> None:
    """A next hop suspended before a step back of the clock (NTP, date -s) is suspended
    for plaintextFallbackAge from the step at the latest, not until the clock reaches the
    last failure again (all its mail deferred, unattempted, for the size of the step)."""
    backend, net, clock, _ = smtpBackend(destinationConcurrency=1, plaintextFallbackAge=60,
                                         connectionCacheTime=0)
    refused = connectError("4.4.1", "X-mailrelay; connection refused by 192.0.2.30")
    net.connectBehaviour["192.0.2.30"] = refused
    assert result(send(backend, "example.net", "a@example.net"))[0].status == TRANSIENT
    clock.rightNow -= 3600
    (r,) = result(send(backend, "example.net", "a@example.net"))
    assert (r.reason or "").startswith("delivery temporarily suspended")
    del net.connectBehaviour["192.0.2.30"]
    clock.advance(60)
    assert result(send(backend, "example.net", "a@example.net"))[0].status == DELIVERED


def test_smtp_next_hop_that_stops_answering_is_suspended() -> None:
    """A connection lost or timed out in the transaction counts as a failure to reach the
    next hop (Postfix's smtp_stream_except throttles the destination): a server that accepts
    and then stalls is suspended as one that refuses is."""
    backend, net, _, _ = smtpBackend(destinationConcurrency=1, connectionCacheTime=0)
    net.sendBehaviour["192.0.2.30"] = "lost"
    (r,) = result(send(backend, "example.net", "a@example.net"))
    assert r.diagnostic == "X-mailrelay; connection lost"
    (r,) = result(send(backend, "example.net", "a@example.net"))
    assert (r.diagnostic, r.reason) == (
        "X-mailrelay; connection lost", "delivery temporarily suspended: connection lost")
    assert len(net.attempts) == 1


def test_smtp_next_hop_whose_hosts_all_stall_or_refuse_is_suspended() -> None:
    """A primary MX that stops answering in the transaction, then a backup that refuses the
    connection: no server of the next hop could be talked to, so it counts as not reached
    (and is suspended) as when the last host stalls; before, the stalled primary's deferral
    counted as reached and started the count again, so such a next hop was never
    suspended.  A host that answered (a 4xx to RCPT) still counts as reached."""
    backend, net, _, _ = smtpBackend(destinationConcurrency=1, connectionCacheTime=0)
    net.sendBehaviour["192.0.2.1"] = "lost"
    net.connectBehaviour["2001:db8::1"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["192.0.2.2"] = connectError("4.4.1", "X-mailrelay; refused")
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.diagnostic) == (TRANSIENT, "X-mailrelay; connection lost")
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert r.reason == "delivery temporarily suspended: connection lost"
    assert [a[0] for a in net.attempts] == ["192.0.2.1", "2001:db8::1", "192.0.2.2"]
    # The primary answering with a deferral: reached, never suspended.
    backend, net, _, _ = smtpBackend(destinationConcurrency=1, connectionCacheTime=0)
    net.sendBehaviour["192.0.2.1"] = "451"
    net.connectBehaviour["2001:db8::1"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["192.0.2.2"] = connectError("4.4.1", "X-mailrelay; refused")
    for _ in range(2):
        (r,) = result(send(backend, "example.org", "a@example.org"))
        assert r.status is TRANSIENT and "suspended" not in r.diagnostic, r
    assert len(net.attempts) == 6


def test_smtp_tls_failures_do_not_suspend() -> None:
    """Failures of one delivery's TLS (or AUTH) are not the next hop's: it stays usable."""
    backend, net, _, _ = smtpBackend(destinationConcurrency=1)
    net.connectBehaviour["192.0.2.30"] = SMTPConnectError(
        "4.7.4", "X-mailrelay; TLS is required, but was not offered by mx.example.net",
        remoteMTA="dns; mx.example.net")
    for _ in range(3):
        (r,) = result(send(backend, "example.net", "a@example.net"))
        assert "suspended" not in r.diagnostic
    assert len(net.attempts) == 3


def test_suspended_next_hop_defers_the_deliveries_waiting_for_a_slot() -> None:
    """Deliveries waiting for a slot of a next hop that becomes suspended are deferred at
    once when their turn comes."""
    backend, net, _, _ = smtpBackend(destinationConcurrency=1)
    net.connectBehaviour["192.0.2.30"] = "hold"
    first = send(backend, "example.net", "a@example.net")
    waiting = [send(backend, "example.net", f"w{n}@example.net") for n in range(3)]
    (held, _, _), = net.heldConnects
    held.errback(connectError("4.4.1", "X-mailrelay; connection to mx.example.net timed out"))
    assert result(first)[0].diagnostic == "X-mailrelay; connection to mx.example.net timed out"
    for d in waiting:
        (r,) = result(d)
        assert (r.diagnostic, r.reason) == (
            "X-mailrelay; connection to mx.example.net timed out",
            "delivery temporarily suspended: connection to mx.example.net timed out")
    assert len(net.attempts) == 1
    assert backend._perDestination.semaphores == {}


def test_lmtp_unreachable_server_is_suspended() -> None:
    from mailrelay.delivery.lmtp import LMTPBackend

    connects: list[Any] = []

    def connect(*a: Any, **kw: Any) -> defer.Deferred:
        connects.append(a)
        return defer.fail(connectError("4.4.1", "X-mailrelay; connection refused by lmtp"))

    backend = LMTPBackend(Clock(), SETTINGS, concurrency=1, connect=connect)
    first, second = (result(send(backend, "[192.0.2.9]:24", "a@example.org",
                                 backendName="lmtp"))[0] for _ in range(2))
    assert first.diagnostic == "X-mailrelay; connection refused by lmtp"
    # No server answered: no Remote-MTA (as the SMTP backend; Postfix's lmtp is its smtp).
    assert first.remoteMTA is None and second.remoteMTA is None
    assert (second.diagnostic, second.reason) == (
        "X-mailrelay; connection refused by lmtp",
        "delivery temporarily suspended: connection refused by lmtp")
    assert len(connects) == 1


MAY = ClientSettings(heloName="relay.test", tls="may")


def _mayBackend(
    tlsError: SMTPConnectError | None = None,
    settings: ClientSettings = MAY,
    plainError: SMTPConnectError | None = None,
) -> tuple[Any, FakeNet, Clock]:
    """An SMTP backend (C{plaintextFallbackAge} 300) whose connections with TLS (not C{tls =
    "none"}) fail with C{tlsError}, and those without with C{plainError}, if given; its
    clock well past 0."""
    from mailrelay.delivery.smtp import SMTPBackend

    net = FakeNet()

    def connect(reactor: Any, endpoint: Any, settings: ClientSettings, **kw: Any) -> Any:
        error = tlsError if settings.tls != "none" else plainError
        if error is not None:
            inner = getattr(endpoint, "_wrappedEndpoint", endpoint)
            net.attempts.append((inner._host, inner._port, kw["tlsHostname"], settings, endpoint))
            return defer.fail(error)
        return net.connect(reactor, endpoint, settings, **kw)

    clock = Clock()
    clock.advance(100_000)
    backend = SMTPBackend(
        clock, FakeMX(HOSTS), settings, connect=connect, plaintextFallbackAge=300
    )
    return backend, net, clock


def _deliverAged(backend: Any, clock: Clock, age: float, settings: ClientSettings = MAY) -> Any:
    """Deliver a message that arrived C{age} seconds ago, to [relay.example]:587."""
    env = envelope("a@example.org", "b@example.org")
    env.arrival = clock.seconds() - age
    route = Route("smtp", "[relay.example]:587", RouteOptions())
    return backend.deliver(env, env.recipients, route, Path("/nonexistent"))


HANDSHAKE_FAILED = SMTPConnectError(
    "4.7.5", "X-mailrelay; TLS handshake with relay.example[192.0.2.40] failed: bad record",
    tlsFailure=True,
)
SESSION_LOST = SMTPConnectError(
    "4.4.2", "X-mailrelay; lost connection with relay.example[192.0.2.40] while sending EHLO",
    tlsFailure=True,
)


@pytest.mark.parametrize("error", [HANDSHAKE_FAILED, SESSION_LOST], ids=["handshake", "session"])
def test_smtp_may_tls_failure_of_a_new_message_is_deferred(error: SMTPConnectError) -> None:
    """tls = "may" and a TLS handshake or session that fails: a message younger than the
    fallback age (the queue's min_backoff) is deferred, not sent in plaintext at once --
    as Postfix, which falls back only for mail queued at least $minimal_backoff_time, so a
    passing TLS trouble does not send the mail in the clear."""
    backend, net, clock = _mayBackend(error)
    results = result(_deliverAged(backend, clock, 299))
    assert [(r.status, r.code) for r in results] == [(TRANSIENT, error.code)] * 2
    assert [a[3].tls for a in net.attempts] == ["may"]
    assert net.connections == []


@pytest.mark.parametrize("error", [HANDSHAKE_FAILED, SESSION_LOST], ids=["handshake", "session"])
def test_smtp_may_tls_failure_of_an_older_message_goes_in_plaintext(
    error: SMTPConnectError,
) -> None:
    """... and one queued for at least that long is sent to the same address at once
    without TLS (Postfix's RETRY_AS_PLAINTEXT), with a line saying so."""
    from twisted.logger import capturedLogs, formatEvent

    backend, net, clock = _mayBackend(error)
    with capturedLogs() as events:
        results = result(_deliverAged(backend, clock, 300))
    assert [r.status for r in results] == [DELIVERED, DELIVERED]
    assert [(a[0], a[3].tls) for a in net.attempts] == [("192.0.2.40", "may"),
                                                         ("192.0.2.40", "none")]
    assert net.connections[0].sent == [("Q" * 20, ["a@example.org", "b@example.org"])]
    texts = [formatEvent(e) for e in events]
    assert any("trying relay.example[192.0.2.40]:587 again without TLS" in t
               for t in texts), texts


def test_smtp_may_tls_failure_never_goes_in_plaintext_with_credentials() -> None:
    """With a user name to log in with, never: the password would go in the clear."""
    settings = ClientSettings(heloName="relay.test", tls="may", username="u", password="p",
                              authWithoutTLS=True)
    backend, net, clock = _mayBackend(HANDSHAKE_FAILED, settings)
    results = result(_deliverAged(backend, clock, 10_000, settings))
    assert [r.status for r in results] == [TRANSIENT, TRANSIENT]
    assert [a[3].tls for a in net.attempts] == ["may"]


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
@pytest.mark.parametrize("age, plaintext", [(299, False), (300, True)])
def test_may_tls_session_broken_in_a_transaction(
    age: float, plaintext: bool, protocol: str
) -> None:
    """A TLS session that breaks in the transaction (lost, timed out) under tls = "may": the
    recipients left are sent again at once over a plaintext connection to the same address
    when the message is old enough (Postfix's PLAINTEXT_FALLBACK_OK_AFTER_TLS_SESSION_FAILURE);
    else deferred.  The same over LMTP."""
    if protocol == "smtp":
        backend, net, clock = _mayBackend()
        deliver = _deliverAged
    else:
        backend, net, clock = _mayLMTP()
        deliver = _deliverLMTPAged
    net.sendBehaviour["192.0.2.40"] = "tlslost-once"
    results = result(deliver(backend, clock, age))
    if plaintext:
        assert [r.status for r in results] == [DELIVERED, DELIVERED]
        assert [a[3].tls for a in net.attempts] == ["may", "none"]
        assert [c.sent for c in net.connections] == [[("Q" * 20, ["a@example.org",
                                                                   "b@example.org"])]] * 2
    else:
        assert [(r.status, r.code) for r in results] == [(TRANSIENT, "4.4.2")] * 2
        assert [a[3].tls for a in net.attempts] == ["may"]


LOOPY = {
    "self.example": [MXHost("relay.test", "192.0.2.9", 25, 10),
                     MXHost("mx2.self.example", "192.0.2.10", 25, 20)],
    "backup.example": [MXHost("mx1.backup.example", "192.0.2.11", 25, 10),
                       MXHost("relay.test.", "192.0.2.9", 25, 20),
                       MXHost("mx3.backup.example", "192.0.2.12", 25, 30)],
    "backuponly.example": [MXHost("mx1.backuponly.example", "192.0.2.11", 25, 10),
                           MXHost("Relay.Test", "192.0.2.9", 25, 20)],
}


def test_smtp_the_relay_in_the_mx_list() -> None:
    """RFC 5321 5.1: the relay itself among a domain's MX hosts (by its host name) is
    dropped with every less preferred host; itself the best, the mail 'loops back to
    myself' (5.4.6, bounced), as Postfix's smtp_find_self.  It relayed to a lower MX, or to
    itself fifty times until the hop count stopped it."""
    from mailrelay.delivery.smtp import SMTPBackend

    net = FakeNet()
    backend = SMTPBackend(Clock(), FakeMX({**HOSTS, **LOOPY}), SETTINGS, connect=net.connect,
                          selfName="relay.test")
    (r,) = result(send(backend, "self.example", "a@self.example"))
    assert (r.status, r.code) == (PERMANENT, "5.4.6"), r
    assert r.diagnostic == "X-mailrelay; mail for self.example loops back to myself"
    assert net.attempts == []
    net.connectBehaviour["192.0.2.11"] = connectError("4.4.1", "X-mailrelay; refused")
    (r,) = result(send(backend, "backup.example", "a@backup.example"))
    assert r.status is TRANSIENT and [a[0] for a in net.attempts] == ["192.0.2.11"]
    net.attempts.clear()
    net.connectBehaviour.clear()
    (r,) = result(send(backend, "backuponly.example", "a@backuponly.example"))
    assert r.status is DELIVERED and [a[0] for a in net.attempts] == ["192.0.2.11"]


def test_smtp_the_relay_in_the_mx_list_by_address() -> None:
    """An MX host whose address and port the relay listens on (or a proxy interface's) is
    the relay itself, whatever its name: dropped with every less preferred host; the best,
    a loop (5.4.6) -- as Postfix's smtp_find_self() compares the addresses with
    own_inet_addr_list() and proxy_inet_addr_list().  The relay connected to itself, and
    only its EHLO name could tell."""
    from mailrelay.delivery.smtp import SMTPBackend
    from mailrelay.route.ownaddr import OwnAddresses

    def backend(*listeners: str) -> tuple[SMTPBackend, FakeNet]:
        net = FakeNet()
        own = OwnAddresses(listeners, local=lambda: frozenset({"192.0.2.1", "2001:db8::1"}))
        return SMTPBackend(Clock(), FakeMX(HOSTS), SETTINGS, connect=net.connect,
                           selfName="relay.test", ownAddresses=own), net

    smtp, net = backend("tcp:25:interface=192.0.2.2")  # the backup MX
    net.connectBehaviour["192.0.2.1"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["2001:db8::1"] = connectError("4.4.1", "X-mailrelay; refused")
    (r,) = result(send(smtp, "example.org", "a@example.org"))
    assert r.status is TRANSIENT
    assert [a[0] for a in net.attempts] == ["192.0.2.1", "2001:db8::1"]
    smtp, net = backend("tcp:25")  # every local address: the best MX
    (r,) = result(send(smtp, "example.org", "a@example.org"))
    assert (r.status, r.code, r.diagnostic) == (
        PERMANENT, "5.4.6", "X-mailrelay; mail for example.org loops back to myself")
    assert net.attempts == []
    # Another port than the relay's: another server.
    smtp, net = backend("tcp:2525")
    assert result(send(smtp, "example.org", "a@example.org"))[0].status is DELIVERED
    smtp, net = backend("tcp:587:interface=192.0.2.40")  # a bracketed next hop
    (r,) = result(send(smtp, "[relay.example]:587", "a@example.com"))
    assert (r.status, r.code) == (PERMANENT, "5.4.6")


def test_smtp_the_relay_is_found_anywhere_in_its_preference_however_many_hosts_share_it(
) -> None:
    """Thirty MX hosts of one preference, the relay (by its address) one of them, wherever
    the shuffle puts it: the best MX is the relay, a loop (5.4.6), and no host is tried
    (RFC 5321 section 5.1: every host of its preference and less preferred is dropped;
    Postfix's smtp_find_self() over every address, then smtp_truncate_self()).  Before,
    the addresses were looked up only until five were known (the first ten hosts), and
    the relay further down was not seen: the mail went to a peer of its own preference."""
    from mailrelay.delivery.smtp import SMTPBackend
    from mailrelay.route.mx import MXResolver
    from tests.test_route import AAAA, MX, A
    from tests.test_route import FakeResolver as FakeDNS

    zone: dict[str, Any] = {"equal.example": [MX(10, f"mx{n}.equal.example")
                                              for n in range(30)]}
    for n in range(30):
        zone[f"mx{n}.equal.example"] = [A(f"192.0.2.{n + 1}"), AAAA(f"2001:db8::{n + 1}")]
    for n in range(30):
        net, clock = FakeNet(), Clock()
        backend = SMTPBackend(clock, MXResolver(FakeDNS(zone), clock), SETTINGS,
                              connect=net.connect, ownAddresses={(f"192.0.2.{n + 1}", 25)})
        (r,) = result(send(backend, "equal.example", "a@equal.example"))
        assert (r.status, r.code, net.attempts) == (PERMANENT, "5.4.6", []), n


def test_smtp_the_mx_address_limit_counts_after_the_relay_is_dropped() -> None:
    """[delivery] mx_address_limit counts the addresses left once the relay dropped itself
    (and the less preferred hosts), as Postfix's smtp_domain_addr() runs smtp_find_self()
    and smtp_truncate_self() before smtp_balance_inet_proto() cuts to
    smtp_mx_address_limit: the relay's own addresses took places under the limit, and
    fewer of the better hosts' were tried.  And the relay is looked for among all the
    addresses, not only those under the limit: one of a host's is a loop (5.4.6)."""
    from mailrelay.delivery.smtp import SMTPBackend
    from mailrelay.route.mx import MXResolver
    from tests.test_route import AAAA, MX, A
    from tests.test_route import FakeResolver as FakeDNS

    zone: dict[str, Any] = {
        "example.org": [MX(10, "mx1.example.org."), MX(20, "relay.test.")],
        "mx1.example.org": [A(f"192.0.2.{i}") for i in range(1, 5)],
        "relay.test": [AAAA("2001:db8::9"), AAAA("2001:db8::10")],
        "many.example": [A(f"192.0.2.{i}") for i in range(21, 27)],
    }
    net = FakeNet()
    for i in range(1, 5):
        net.connectBehaviour[f"192.0.2.{i}"] = connectError("4.4.1", "X-mailrelay; refused")
    clock = Clock()
    backend = SMTPBackend(clock, MXResolver(FakeDNS(zone), clock, maxAddresses=4), SETTINGS,
                          connect=net.connect, selfName="relay.test",
                          ownAddresses={("192.0.2.26", 25)})
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert r.status is TRANSIENT
    assert [a[0] for a in net.attempts] == [f"192.0.2.{i}" for i in range(1, 5)]
    net.attempts.clear()
    (r,) = result(send(backend, "many.example", "a@many.example"))
    assert (r.status, r.code) == (PERMANENT, "5.4.6"), r
    assert net.attempts == []


def test_smtp_a_loop_found_at_ehlo() -> None:
    """A host that answers EHLO with the relay's own name (SMTPConnectError.loop): 5.4.6
    bounced when it is the best MX, else a transient 4.4.6 (Postfix)."""
    loop = SMTPConnectError("5.4.6", "X-mailrelay; mx1.example.org[192.0.2.1] replied to EHLO "
                            "with my own hostname relay.test", permanent=True, loop=True)
    backend, net, clock, mx = smtpBackend()
    net.connectBehaviour["192.0.2.1"] = loop
    net.connectBehaviour["2001:db8::1"] = loop
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.code) == (PERMANENT, "5.4.6"), r
    assert r.diagnostic == "X-mailrelay; mail for example.org loops back to myself"
    net.connectBehaviour.clear()
    net.connectBehaviour["192.0.2.1"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["2001:db8::1"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["192.0.2.2"] = loop
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.code) == (TRANSIENT, "4.4.6"), r
    # Found at a backup MX of another name (NAT, a second name): RFC 5321 5.1, the less
    # preferred hosts are not tried either.
    backend, net, clock, mx = smtpBackend()
    mx.answers = {"backup.example": [
        MXHost("mx1.backup.example", "192.0.2.11", 25, 10),
        MXHost("other-name.backup.example", "192.0.2.9", 25, 20),
        MXHost("mx3.backup.example", "192.0.2.12", 25, 30),
    ]}
    net.connectBehaviour["192.0.2.11"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["192.0.2.9"] = loop
    (r,) = result(send(backend, "backup.example", "a@backup.example"))
    assert (r.status, r.code) == (TRANSIENT, "4.4.6"), r
    assert [a[0] for a in net.attempts] == ["192.0.2.11", "192.0.2.9"]


def test_smtp_a_loop_found_at_ehlo_after_a_host_took_some_recipients() -> None:
    """A best MX that answers EHLO with the relay's own name after another host of the same
    preference took some recipients and deferred the others: only those left loop (5.4.6);
    those delivered stay delivered (as Postfix's smtp_site_fail, which fails only the
    recipients left), never bounced after their delivery."""
    loop = SMTPConnectError("5.4.6", "X-mailrelay; mx1.example.org[2001:db8::1] replied to "
                            "EHLO with my own hostname relay.test", permanent=True, loop=True)
    backend, net, clock, mx = smtpBackend(connectionCacheTime=0)
    net.sendBehaviour["192.0.2.1"] = "ok,451"
    net.connectBehaviour["2001:db8::1"] = loop
    results = result(send(backend, "example.org", "a@example.org", "b@example.org"))
    assert [(r.status, r.code) for r in results] == [(DELIVERED, "2.0.0"),
                                                    (PERMANENT, "5.4.6")], results
    assert [a[0] for a in net.attempts] == ["192.0.2.1", "2001:db8::1"]


def test_smtp_all_hosts_fail() -> None:
    backend, net, clock, mx = smtpBackend()
    net.connectBehaviour["192.0.2.1"] = connectError(
        "4.4.1", "X-mailrelay; connection refused by 192.0.2.1"
    )
    net.connectBehaviour["2001:db8::1"] = connectError(
        "5.3.0", "smtp; 554 5.3.0 go away", permanent=True, remoteMTA="dns; mx1.example.org"
    )
    net.connectBehaviour["192.0.2.2"] = connectError(
        "4.4.2", "X-mailrelay; timed out connecting to 192.0.2.2"
    )
    results = result(send(backend, "example.org", "a@example.org"))
    # The error carrying a server reply is the most relevant; it is kept, as a transient one.
    assert results == [
        RecipientResult(
            "a@example.org", TRANSIENT, "4.3.0", "smtp; 554 5.3.0 go away", "dns; mx1.example.org"
        )
    ]
    net.connectBehaviour["2001:db8::1"] = connectError(
        "4.4.1", "X-mailrelay; connection refused by 2001:db8::1"
    )
    results = result(send(backend, "example.org", "a@example.org"))
    assert results == [
        RecipientResult(
            "a@example.org",
            TRANSIENT,
            "4.4.2",
            "X-mailrelay; timed out connecting to 192.0.2.2",
            None,
        )
    ]


def _refusedHello(host: str) -> SMTPConnectError:
    return SMTPConnectError("5.7.1", "smtp; 550 5.7.1 not you", permanent=True,
                            remoteMTA=f"dns; {host}", refusedSetup=True)


def test_smtp_hello_refused_by_the_last_host_bounces() -> None:
    """A 5xx to HELO from the last host to try returns the recipients, as Postfix's
    smtp_site_fail at the final server (it was deferred for the queue's lifetime, 5 days);
    from an earlier host it only moves on to the next.  A 5xx greeting or AUTH reply stays
    a deferral (Postfix's smtp_skip_5xx_greeting, smtp_sasl_auth_soft_bounce)."""
    backend, net, clock, mx = smtpBackend(connectionCacheTime=0, mxSessionLimit=0)
    net.connectBehaviour["192.0.2.1"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["2001:db8::1"] = _refusedHello("mx1.example.org")
    net.connectBehaviour["192.0.2.2"] = _refusedHello("mx2.example.org")
    assert result(send(backend, "example.org", "a@example.org", "b@example.org")) == [
        RecipientResult(a, PERMANENT, "5.7.1", "smtp; 550 5.7.1 not you", "dns; mx2.example.org")
        for a in ("a@example.org", "b@example.org")
    ]
    assert [a[0] for a in net.attempts] == ["192.0.2.1", "2001:db8::1", "192.0.2.2"]
    # The last host unreachable: deferred, with the refusal as the most telling diagnostic.
    net.connectBehaviour["192.0.2.2"] = connectError("4.4.1", "X-mailrelay; refused")
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.code, r.diagnostic) == (TRANSIENT, "4.7.1", "smtp; 550 5.7.1 not you")
    # Earlier hosts deferring every recipient do not save the mail from the last one's refusal.
    net.connectBehaviour.clear()
    net.sendBehaviour["192.0.2.1"] = "451"
    net.sendBehaviour["2001:db8::1"] = "451"
    net.connectBehaviour["192.0.2.2"] = _refusedHello("mx2.example.org")
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.code) == (PERMANENT, "5.7.1"), r
    # A 5xx greeting (or AUTH reply) from the last host: deferred.
    net.sendBehaviour.clear()
    net.connectBehaviour["192.0.2.1"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["2001:db8::1"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["192.0.2.2"] = connectError(
        "5.7.1", "smtp; 554 5.7.1 not you", permanent=True, remoteMTA="dns; mx2.example.org")
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.code, r.diagnostic) == (TRANSIENT, "4.7.1", "smtp; 554 5.7.1 not you")


def test_lmtp_hello_refused_bounces() -> None:
    """The LMTP server (the only one to try) refusing LHLO with a 5xx returns the
    recipients, as Postfix's lmtp; a 5xx greeting is deferred."""
    from mailrelay.delivery.lmtp import LMTPBackend

    errors = [_refusedHello("[::1]"), connectError("5.7.1", "smtp; 554 5.7.1 not you",
                                                    permanent=True, remoteMTA="dns; [::1]")]
    backend = LMTPBackend(Clock(), SETTINGS, connect=lambda *a, **kw: defer.fail(errors.pop(0)))
    (r,) = result(send(backend, "[::1]:2424", "a@example.org"))
    assert r == RecipientResult("a@example.org", PERMANENT, "5.7.1", "smtp; 550 5.7.1 not you",
                                "dns; [::1]")
    (r,) = result(send(backend, "[::1]:2424", "a@example.org"))
    assert (r.status, r.code) == (TRANSIENT, "4.7.1")


def test_smtp_unexpected_connect_exception_is_transient() -> None:
    backend, net, clock, mx = smtpBackend()
    net.connectBehaviour["192.0.2.30"] = RuntimeError("boom")
    (r,) = result(send(backend, "example.net", "a@example.net"))
    assert (r.status, r.code) == (TRANSIENT, "4.4.0")
    assert "boom" in r.diagnostic


def test_smtp_all_transient_tries_next_host() -> None:
    from twisted.logger import capturedLogs, formatEvent

    backend, net, clock, mx = smtpBackend(connectionCacheTime=0, mxSessionLimit=0)
    net.sendBehaviour["192.0.2.1"] = "451"
    net.sendBehaviour["2001:db8::1"] = "lost"
    with capturedLogs() as events:
        results = result(send(backend, "example.org", "a@example.org"))
    # The server as the log names servers, not its Remote-MTA field ("dns; mx1...").
    texts = [formatEvent(e) for e in events]
    assert any(t.endswith("every recipient deferred by mx1.example.org (smtp; 451 4.3.0 try "
                          "later); trying the next host")
               for t in texts), texts
    assert results[0].status is DELIVERED
    assert [c.address for c in net.connections] == ["192.0.2.1", "2001:db8::1", "192.0.2.2"]
    # Every host deferring: the last transaction's results.
    net.sendBehaviour["192.0.2.2"] = "451"
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.code, r.remoteMTA) == (TRANSIENT, "4.3.0", "dns; mx2.example.org")
    # Permanent: no next host.
    net.connections.clear()
    net.sendBehaviour["192.0.2.1"] = "550"
    results = result(send(backend, "example.org", "a@example.org"))
    assert results[0].status is PERMANENT
    assert len(net.connections) == 1
    assert all(c.quitted or c.aborted for c in net.connections)


def test_smtp_recipients_deferred_by_a_host_go_on_to_the_next() -> None:
    """The recipients a host defers (4xx to their RCPT; all of a transaction after a 4xx to
    its DATA) are tried at the next host of the same attempt, the others done there: Postfix
    keeps soft-failed recipients for the next server (smtp_trouble.c, SMTP_RCPT_KEEP) unless
    it is the last.  What the last host said is recorded; refused (5xx) recipients are not
    tried again, nor is any host after one found to be the relay itself."""
    backend, net, clock, mx = smtpBackend(connectionCacheTime=0, mxSessionLimit=0)
    net.sendBehaviour["192.0.2.1"] = "ok,451,550,451"
    net.sendBehaviour["2001:db8::1"] = "451,ok"
    rcpts = ("a@example.org", "b@example.org", "c@example.org", "d@example.org")
    with capturedLogs() as events:
        results = result(send(backend, "example.org", *rcpts))
    assert [(r.status, r.remoteMTA) for r in results] == [
        (DELIVERED, "dns; mx1.example.org"),
        (DELIVERED, "dns; mx2.example.org"),
        (PERMANENT, "dns; mx1.example.org"),
        (DELIVERED, "dns; mx1.example.org"),
    ]
    assert [(c.address, c.sent[0][1]) for c in net.connections] == [
        ("192.0.2.1", list(rcpts)),
        ("2001:db8::1", ["b@example.org", "d@example.org"]),
        ("192.0.2.2", ["b@example.org"]),
    ]
    texts = [formatEvent(e) for e in events]
    assert any(t.endswith("2 of 4 recipients deferred by mx1.example.org (smtp; 451 4.3.0 "
                          "try later); trying the next host") for t in texts), texts
    # Those a host delivered or refused are reported before the others go on (to be
    # recorded at once: see ClientBackend.deliver); the last host's are not.
    reported: list[list[tuple[str, Any]]] = []
    net.connections.clear()
    result(send(backend, "example.org", *rcpts,
                done=lambda rs: reported.append([(r.address, r.status) for r in rs])))
    assert reported == [[("a@example.org", DELIVERED), ("c@example.org", PERMANENT)],
                        [("d@example.org", DELIVERED)]]
    # The last host defers it too: its answer is recorded.
    net.connections.clear()
    net.sendBehaviour["192.0.2.2"] = "451"
    results = result(send(backend, "example.org", *rcpts))
    assert [(r.status, r.remoteMTA) for r in results] == [
        (DELIVERED, "dns; mx1.example.org"),
        (TRANSIENT, "dns; mx2.example.org"),
        (PERMANENT, "dns; mx1.example.org"),
        (DELIVERED, "dns; mx1.example.org"),
    ]
    # The last host unreachable: the deferral of the last server that answered; its 5xx to
    # HELO: returned, as the last host's answer.  The others keep their results.
    net.connectBehaviour["192.0.2.2"] = connectError("4.4.1", "X-mailrelay; refused")
    results = result(send(backend, "example.org", *rcpts))
    assert [(r.status, r.code) for r in results] == [
        (DELIVERED, "2.0.0"), (TRANSIENT, "4.3.0"), (PERMANENT, "5.1.1"), (DELIVERED, "2.0.0")]
    net.connectBehaviour["192.0.2.2"] = _refusedHello("mx2.example.org")
    results = result(send(backend, "example.org", *rcpts))
    assert [(r.status, r.code) for r in results] == [
        (DELIVERED, "2.0.0"), (PERMANENT, "5.7.1"), (PERMANENT, "5.1.1"), (DELIVERED, "2.0.0")]
    # DATA refused with a 4xx after one RCPT refused with a 5xx: the others go on.
    net.connectBehaviour.clear()
    net.connections.clear()
    net.sendBehaviour.update({"192.0.2.1": "550,451,451", "2001:db8::1": "ok",
                              "192.0.2.2": "ok"})
    results = result(send(backend, "example.org", *rcpts[:3]))
    assert [r.status for r in results] == [PERMANENT, DELIVERED, DELIVERED]
    assert [c.sent[0][1] for c in net.connections] == [list(rcpts[:3]), list(rcpts[1:3])]
    # A less preferred host found to be the relay itself: no host after it is tried.
    from mailrelay.delivery.smtp import SMTPBackend

    net = FakeNet()
    backend = SMTPBackend(Clock(), FakeMX({"backup.example": [
        MXHost("mx1.backup.example", "192.0.2.11", 25, 10),
        MXHost("other-name.backup.example", "192.0.2.9", 25, 20),
        MXHost("mx3.backup.example", "192.0.2.12", 25, 30),
    ]}), SETTINGS, connect=net.connect, connectionCacheTime=0)
    net.sendBehaviour["192.0.2.11"] = "ok,451"
    net.connectBehaviour["192.0.2.9"] = SMTPConnectError(
        "5.4.6", "X-mailrelay; loop", permanent=True, loop=True)
    results = result(send(backend, "backup.example", "a@backup.example", "b@backup.example"))
    assert [(r.status, r.code) for r in results] == [(DELIVERED, "2.0.0"), (TRANSIENT, "4.3.0")]
    assert [a[0] for a in net.attempts] == ["192.0.2.11", "192.0.2.9"]
    # A smarthost (one host): the deferred recipient waits for the next attempt.
    backend, net, clock, mx = smtpBackend(connectionCacheTime=0)
    net.sendBehaviour["192.0.2.40"] = "ok,451"
    results = result(send(backend, "[relay.example]:587", "a@example.org", "b@example.org"))
    assert [r.status for r in results] == [DELIVERED, TRANSIENT]
    assert [c.sent for c in net.connections] == [[("Q" * 20, ["a@example.org",
                                                               "b@example.org"])]]


def test_smtp_dns_failures() -> None:
    backend, net, clock, mx = smtpBackend()
    (r,) = result(send(backend, "nowhere.example", "a@nowhere.example"))
    assert r == RecipientResult(
        "a@nowhere.example",
        PERMANENT,
        "5.1.2",
        "X-mailrelay; domain nowhere.example does not exist",
    )
    (r,) = result(send(backend, "nullmx.example", "a@nullmx.example"))
    assert (r.status, r.code) == (PERMANENT, "5.1.10")
    # A next hop that is not the recipients' domain (a smarthost): kept, not bounced.
    (r,) = result(send(backend, "relay.nowhere.example", "a@example.com"))
    assert (r.status, r.code) == (TRANSIENT, "4.1.2")
    (r,) = result(send(backend, "broken.example", "a@broken.example"))
    assert (r.status, r.code, r.diagnostic) == (TRANSIENT, "4.4.3", "X-mailrelay; SERVFAIL")
    assert net.attempts == []


def test_smtp_connection_reuse() -> None:
    backend, net, clock, mx = smtpBackend(connectionCacheTime=2.0)
    assert result(send(backend, "example.net", "a@example.net", queueID="A"))[0].status is DELIVERED
    assert backend.idleConnections("example.net") == 1
    clock.advance(1.5)
    assert result(send(backend, "example.net", "b@example.net", queueID="B"))[0].status is DELIVERED
    assert len(net.connections) == 1
    assert mx.asked == ["example.net"]  # no DNS for a reused connection
    conn = net.connections[0]
    assert conn.sent == [("A", ["a@example.net"]), ("B", ["b@example.net"])]
    # The cache time restarts with each release.
    clock.advance(1.9)
    assert not conn.quitted
    clock.advance(0.2)
    assert conn.quitted
    assert backend.idleConnections() == 0
    result(send(backend, "example.net", "c@example.net"))
    assert len(net.connections) == 2
    # Other next hops do not share connections.
    result(send(backend, "[relay.example]:587", "c@example.com"))
    assert len(net.connections) == 3
    assert backend.idleConnections() == 2
    result(backend.close())
    assert backend.idleConnections() == 0
    assert all(c.quitted for c in net.connections)
    # After close, connections are not cached.
    result(send(backend, "example.net", "d@example.net"))
    assert net.connections[-1].quitted
    assert clock.getDelayedCalls() == []


def test_smtp_unusable_connection_not_reused() -> None:
    backend, net, clock, mx = smtpBackend()
    result(send(backend, "example.net", "a@example.net"))
    net.connections[0].usable = False  # the server closed it while idle
    result(send(backend, "example.net", "b@example.net"))
    assert len(net.connections) == 2
    assert net.connections[0].aborted
    assert clock.getDelayedCalls()[0].active()


def test_smtp_why_deferred_names_each_reason_once() -> None:
    """The line saying deferred recipients are sent again names their reasons, each once,
    at most three (a lost end of data says the message may be sent more than once)."""
    from mailrelay.delivery.smtp import _whyDeferred

    lost = "X-mailrelay; lost connection with mx[192.0.2.1] while sending end of data -- " \
        "message may be sent more than once"
    results = [RecipientResult("a@x", TRANSIENT, "4.4.2", lost),
               RecipientResult("b@x", DELIVERED, "2.0.0", "smtp; 250 ok"),
               RecipientResult("c@x", TRANSIENT, "4.4.2", lost)]
    assert _whyDeferred(results) == lost.removeprefix("X-mailrelay; ")
    many = [RecipientResult(f"{n}@x", TRANSIENT, "4.2.0", f"smtp; 450 {n}") for n in range(5)]
    assert _whyDeferred(many) == "smtp; 450 0; smtp; 450 1; smtp; 450 2; and 2 more"


def test_smtp_stale_reused_connection_retried_afresh() -> None:
    backend, net, clock, mx = smtpBackend()
    result(send(backend, "example.net", "a@example.net"))
    net.sendBehaviour["192.0.2.30"] = "lost"
    first = net.connections[0]

    def recover(*a: Any) -> None:
        net.sendBehaviour["192.0.2.30"] = "ok"

    # The reused connection loses the connection; a fresh one delivers.
    original = first.send

    def sendThenRecover(*a: Any, **kw: Any) -> defer.Deferred:
        d = original(*a, **kw)
        recover()
        return d

    first.send = sendThenRecover  # type: ignore[method-assign]
    (r,) = result(send(backend, "example.net", "b@example.net"))
    assert r.status is DELIVERED
    assert len(net.connections) == 2
    assert first.aborted


def test_smtp_a_message_needing_smtputf8_goes_on_to_a_host_that_offers_it() -> None:
    """A message that needs SMTPUTF8 (a UTF-8 address or header field) at a host that does
    not offer it: the next host is tried with every recipient; when the last host does not
    offer it either, every recipient of the delivery -- the ASCII ones too -- is returned
    with 5.6.7, and no Remote-MTA (the relay's own decision).  As Postfix's smtp_helo()
    (smtp_proto.c: "message requires SMTPUTF8, but no server was found that supports
    SMTPUTF8", SMTP_MISC_FAIL_SOFT_NON_FINAL, DSN_BY_LOCAL_MTA), which decides for the whole
    delivery request (DELIVERY_REQUIRES_SMTPUTF8).  The relay returned the message at the
    first host without SMTPUTF8."""
    from mailrelay.delivery.smtp import SMTPBackend

    net = FakeNet()
    clock = Clock()
    backend = SMTPBackend(clock, FakeMX(HOSTS), SETTINGS, connect=net.connect,
                          connectionCacheTime=0, mxSessionLimit=0)
    net.extensions["192.0.2.2"] = {"SMTPUTF8": ""}
    route = Route("smtp", "example.org", RouteOptions())

    def deliver(*addresses: str) -> list[RecipientResult]:
        env = Envelope(sender="alice@example.com", queueID="U" * 20, smtputf8=True,
                       recipients=[Recipient(a) for a in addresses], utf8Header=False)
        return result(backend.deliver(env, env.recipients, route, Path("/nonexistent")))

    with capturedLogs() as events:
        results = deliver("dørte@example.org", "bob@example.org")
    assert [(r.status, r.remoteMTA) for r in results] == [
        (DELIVERED, "dns; mx2.example.org")] * 2
    assert [(c.address, c.sent) for c in net.connections] == [
        ("192.0.2.1", []), ("2001:db8::1", []),
        ("192.0.2.2", [("U" * 20, ["dørte@example.org", "bob@example.org"])])]
    assert all(c.quitted for c in net.connections)
    texts = [formatEvent(e) for e in events]
    said = "mx1.example.org[192.0.2.1]:25 does not offer SMTPUTF8, which the message needs"
    assert any(said in t for t in texts), texts
    # No host offers it: every recipient returned, the ASCII one too.
    net.extensions.clear()
    net.connections.clear()
    results = deliver("dørte@example.org", "bob@example.org")
    assert [(r.address, r.status, r.code, r.remoteMTA) for r in results] == [
        ("dørte@example.org", PERMANENT, "5.6.7", None),
        ("bob@example.org", PERMANENT, "5.6.7", None)]
    assert results[0].diagnostic == (
        "X-mailrelay; the message needs SMTPUTF8, but no server of example.org offers it; "
        "the last tried was mx2.example.org")
    assert len(net.connections) == 3
    # Nothing of the message UTF-8: sent without SMTPUTF8 to the best host.
    net.connections.clear()
    assert [r.status for r in deliver("bob@example.org")] == [DELIVERED]
    assert [c.address for c in net.connections] == ["192.0.2.1"]


def test_smtp_mx_session_limit() -> None:
    """At most C{mxSessionLimit} sessions (2 by default, Postfix's smtp_mx_session_limit) in
    one delivery: the recipients deferred by the last of them stay deferred, no further host
    is tried.  A connection that failed (refused, no greeting, refused EHLO...) is no
    session, as Postfix does not count handshake errors; a reused connection is one."""
    hosts = [MXHost(f"mx{n}.many.example", f"192.0.2.{n + 1}", 25, n) for n in range(5)]
    backend, net, clock, mx = smtpBackend(connectionCacheTime=0)
    assert backend.mxSessionLimit == 2
    mx.answers = {**HOSTS, "many.example": hosts}
    net.connectBehaviour["192.0.2.1"] = connectError("4.4.1", "X-mailrelay; refused")
    for n in range(1, 5):
        net.sendBehaviour[f"192.0.2.{n + 1}"] = "451"
    (r,) = result(send(backend, "many.example", "a@many.example"))
    assert (r.status, r.remoteMTA) == (TRANSIENT, "dns; mx2.many.example")
    assert [c.address for c in net.connections] == ["192.0.2.2", "192.0.2.3"]
    assert [a[0] for a in net.attempts] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    # 0: no limit.
    backend, net, clock, mx = smtpBackend(connectionCacheTime=0, mxSessionLimit=0)
    mx.answers = {**HOSTS, "many.example": hosts}
    for n in range(5):
        net.sendBehaviour[f"192.0.2.{n + 1}"] = "451"
    result(send(backend, "many.example", "a@many.example"))
    assert len(net.connections) == 5
    # A reused connection counts: one fresh session is left after it.
    backend, net, clock, mx = smtpBackend(mxSessionLimit=2)
    mx.answers = {**HOSTS, "many.example": hosts}
    result(send(backend, "many.example", "a@many.example"))
    net.sendBehaviour["192.0.2.1"] = "ok,451"
    for n in range(1, 5):
        net.sendBehaviour[f"192.0.2.{n + 1}"] = "451"
    results = result(send(backend, "many.example", "b@many.example", "c@many.example"))
    assert [r.status for r in results] == [DELIVERED, TRANSIENT]
    assert [c.address for c in net.connections] == ["192.0.2.1", "192.0.2.2"]
    with pytest.raises(ValueError, match="mxSessionLimit"):
        smtpBackend(mxSessionLimit=-1)


def test_smtp_recipients_deferred_on_a_reused_connection_go_on_to_the_other_hosts() -> None:
    """A reused connection whose server defers some recipients (a 4xx to their RCPT): those
    go on to the next hop's other addresses in the same attempt, as on a fresh connection;
    the server that deferred them is not tried again (Postfix's smtp_reuse_session() drops a
    reused address from the list, smtp_update_addr_list(), and keeps soft-failed recipients
    for the next server, SMTP_RCPT_KEEP, unless that was the last).  Those it delivered or
    refused are reported first."""
    backend, net, clock, mx = smtpBackend()
    result(send(backend, "example.org", "a@example.org", queueID="A"))
    assert backend.idleConnections("example.org") == 1
    net.sendBehaviour["192.0.2.1"] = "ok,451"
    reported: list = []
    with capturedLogs() as events:
        results = result(send(backend, "example.org", "b@example.org", "c@example.org",
                              queueID="B", done=reported.append))
    assert [(r.status, r.remoteMTA) for r in results] == [
        (DELIVERED, "dns; mx1.example.org"), (DELIVERED, "dns; mx1.example.org")]
    assert [(c.address, c.sent) for c in net.connections] == [
        ("192.0.2.1", [("A", ["a@example.org"]), ("B", ["b@example.org", "c@example.org"])]),
        ("2001:db8::1", [("B", ["c@example.org"])]),
    ]
    assert reported == [[results[0]]]
    texts = [formatEvent(e) for e in events]
    assert any("1 of 2 recipients deferred on the reused connection to mx1.example.org" in t
               for t in texts), texts
    # The reused server was the next hop's only one: its deferral stands.
    result(send(backend, "example.net", "a@example.net", queueID="C"))
    net.sendBehaviour["192.0.2.30"] = "ok,451"
    results = result(send(backend, "example.net", "b@example.net", "c@example.net"))
    assert [(r.status, r.code) for r in results] == [(DELIVERED, "2.0.0"), (TRANSIENT, "4.3.0")]
    assert [c.address for c in net.connections].count("192.0.2.30") == 1


def test_smtp_recipients_deferred_on_a_reused_connection_keep_its_reply_when_no_other_host_answers(
) -> None:
    """A recipient a reused connection's server deferred, which no other host of the next
    hop can then be connected to: the server's reply (451) is its result, as on a fresh
    connection (a server's answer says more than a refusal), not the last connection
    error; and the next hop, whose server was talked to, is not counted unreachable (with
    destination_concurrency = 1 it was suspended, the next delivery deferred untried)."""
    backend, net, clock, mx = smtpBackend(destinationConcurrency=1)
    result(send(backend, "example.org", "a@example.org", queueID="A"))
    net.sendBehaviour["192.0.2.1"] = "ok,451"
    for address in ("2001:db8::1", "192.0.2.2"):
        net.connectBehaviour[address] = connectError("4.4.1", f"X-mailrelay; {address} refused")
    results = result(send(backend, "example.org", "b@example.org", "c@example.org",
                          queueID="B"))
    assert [(r.status, r.diagnostic) for r in results] == [
        (DELIVERED, results[0].diagnostic), (TRANSIENT, "smtp; 451 4.3.0 try later")]
    net.sendBehaviour["192.0.2.1"] = "ok"
    (r,) = result(send(backend, "example.org", "d@example.org", queueID="C"))
    assert r.status is DELIVERED, r


def test_smtp_recipients_deferred_on_a_reused_connection_when_the_relay_is_the_backup() -> None:
    """The relay is the next hop's backup MX: a recipient its primary deferred on a reused
    connection is deferred (the primary's 4xx stands), not bounced as a mail loop.  The
    relay and every less preferred host are dropped from the whole list, the reused
    address only then (Postfix's smtp_find_self() in smtp_domain_addr(), before
    smtp_reuse_session() drops the reused address): dropped first, the reused primary made
    the relay look like the best MX, a loop (5.4.6)."""
    backend, net, clock, mx = smtpBackend(selfName="relay.test")
    mx.answers["backup.example"] = [MXHost("mx.backup.example", "192.0.2.50", 25, 10),
                                    MXHost("relay.test", "192.0.2.51", 25, 20)]
    result(send(backend, "backup.example", "a@backup.example", queueID="A"))
    assert backend.idleConnections("backup.example") == 1
    net.sendBehaviour["192.0.2.50"] = "ok,451"
    results = result(send(backend, "backup.example", "b@backup.example", "c@backup.example",
                          queueID="B"))
    assert [(r.status, r.code) for r in results] == [(DELIVERED, "2.0.0"), (TRANSIENT, "4.3.0")]
    assert [c.address for c in net.connections] == ["192.0.2.50"]


def test_smtp_concurrency_limit() -> None:
    backend, net, clock, mx = smtpBackend(destinationConcurrency=2)
    net.sendBehaviour["192.0.2.30"] = "hold"
    d1 = send(backend, "example.net", "a@example.net", queueID="1")
    d2 = send(backend, "example.net", "b@example.net", queueID="2")
    d3 = send(backend, "example.net", "c@example.net", queueID="3")
    assert len(net.attempts) == 2
    assert len(net.heldSends) == 2
    # Another next hop is not held up.
    assert result(send(backend, "[relay.example]:587", "x@example.com"))[0].status is DELIVERED
    net.sendBehaviour["192.0.2.30"] = "ok"
    sendD, conn, rcpts = net.heldSends.pop(0)
    sendD.callback(net.results(conn, rcpts, "ok"))
    assert result(d1)[0].status is DELIVERED
    # The third delivery got the released connection: still two connections.
    assert result(d3)[0].status is DELIVERED
    assert [a[0] for a in net.attempts] == ["192.0.2.30", "192.0.2.30", "192.0.2.40"]
    assert conn.sent == [("1", ["a@example.net"]), ("3", ["c@example.net"])]
    sendD, conn2, rcpts = net.heldSends.pop(0)
    sendD.callback(net.results(conn2, rcpts, "ok"))
    assert result(d2)[0].status is DELIVERED
    assert backend._semaphores == {}


def test_smtp_route_options_over_defaults() -> None:
    """Each delivery's settings are the backend's defaults with its route's options."""
    backend, net, clock, mx = smtpBackend()
    options = RouteOptions(tls="required", caFile="/ca.pem", username="u", password="p")
    result(send(backend, "[relay.example]:587", "a@example.com", options=options))
    result(send(backend, "example.net", "a@example.net"))
    assert net.attempts[0][3] == dataclasses.replace(
        SETTINGS, tls="required", caFile="/ca.pem", username="u", password="p"
    )
    assert net.attempts[1][3] is SETTINGS


def test_smtp_route_source_address_over_delivery() -> None:
    """A route's (a sender route's) source address replaces [delivery]'s for its mail only:
    two companies relayed by one host leave from their own addresses."""
    backend, net, clock, mx = smtpBackend(
        settings=dataclasses.replace(SETTINGS, sourceAddress="192.0.2.100"))
    options = RouteOptions(sourceAddress="192.0.2.101", sourceAddress6="2001:db8::101")
    result(send(backend, "[relay.example]:587", "a@example.com", options=options))
    result(send(backend, "example.net", "a@example.net"))
    assert [(a[3].sourceAddress, a[3].sourceAddress6, a[4]._bindAddress)
            for a in net.attempts] == [
        ("192.0.2.101", "2001:db8::101", ("192.0.2.101", 0)),
        ("192.0.2.100", None, ("192.0.2.100", 0)),
    ]


def test_smtp_route_asking_for_the_platform_trust_store() -> None:
    """C{caFile = PLATFORM_TRUST_STORE} verifies with the platform's trust store even when
    the backend's default names a CA file (the smarthost's own, unset C{ca_file} must not
    become C{[delivery]}'s)."""
    mxCA = dataclasses.replace(SETTINGS, caFile="/mx-ca.pem")
    backend, net, clock, mx = smtpBackend(settings=mxCA)
    options = RouteOptions(tls="required", caFile=PLATFORM_TRUST_STORE)
    result(send(backend, "[relay.example]:587", "a@example.com", options=options))
    result(send(backend, "example.net", "a@example.net", options=RouteOptions(tls="required")))
    assert [(a[3].tls, a[3].caFile) for a in net.attempts] == [
        ("required", None),
        ("required", "/mx-ca.pem"),
    ]


def test_smtp_routes_to_one_nexthop_keep_their_settings() -> None:
    """A route whose next hop is the smarthost's does not change the smarthost's settings
    (issue 7: settings were looked up by the next hop's name, so smarthost mail configured
    tls = "required" went out with the route's tls = "none")."""
    table = RoutingTable(
        [RouteRule("plain.example", "smtp", "[relay.example]:587", RouteOptions(tls="none"))],
        smarthost="[relay.example]:587",
        smarthostOptions=RouteOptions(tls="required", caFile="/ca.pem"),
    )
    backend, net, clock, mx = smtpBackend()
    for address in ("a@example.com", "b@plain.example"):
        env = envelope(address)
        route = table.route(env, env.recipients[0])
        assert result(backend.deliver(env, env.recipients, route, Path("/x")))[0].status is DELIVERED
    assert [(a[3].tls, a[3].caFile) for a in net.attempts] == [
        ("required", "/ca.pem"),
        ("none", None),
    ]


def test_smtp_connections_reused_only_with_the_same_settings() -> None:
    backend, net, clock, mx = smtpBackend(connectionCacheTime=10)
    nexthop = "[relay.example]:587"
    required = RouteOptions(tls="required")
    alice = RouteOptions(tls="required", username="alice", password="pa")
    bob = RouteOptions(tls="required", username="bob", password="pb")
    wrongPassword = RouteOptions(tls="required", username="bob", password="other")
    for options in (RouteOptions(), required, alice, bob, wrongPassword):
        result(send(backend, nexthop, "a@example.com", options=options))
    # Five settings, five connections: none was reused for other settings.
    assert len(net.connections) == 5
    assert [a[3].username for a in net.attempts] == [None, None, "alice", "bob", "bob"]
    assert backend.idleConnections(nexthop) == 5
    # The same settings again: their own connection, no new one.
    result(send(backend, nexthop, "b@example.com", queueID="B", options=alice))
    result(send(backend, nexthop, "c@example.com", queueID="C", options=RouteOptions()))
    assert len(net.connections) == 5
    assert net.connections[2].sent[-1] == ("B", ["b@example.com"])
    assert net.connections[0].sent[-1] == ("C", ["c@example.com"])
    # Equal options built separately are the same settings.
    result(send(backend, nexthop, "d@example.com", queueID="D", options=RouteOptions("required")))
    assert net.connections[1].sent[-1] == ("D", ["d@example.com"])
    assert len(net.connections) == 5
    result(backend.close())
    assert backend.idleConnections() == 0


def test_smtp_concurrency_is_per_nexthop_whatever_the_settings() -> None:
    backend, net, clock, mx = smtpBackend(destinationConcurrency=1)
    net.sendBehaviour["192.0.2.40"] = "hold"
    nexthop = "[relay.example]:587"
    d1 = send(backend, nexthop, "a@example.com", options=RouteOptions(tls="none"))
    d2 = send(backend, nexthop, "b@example.com", options=RouteOptions(tls="required"))
    assert len(net.attempts) == 1  # the second waits for the next hop's only slot
    sendD, conn, rcpts = net.heldSends.pop(0)
    sendD.callback(net.results(conn, rcpts, "ok"))
    assert result(d1)[0].status is DELIVERED
    # It then gets a connection of its own: the idle one has other settings.
    assert [a[3].tls for a in net.attempts] == ["none", "required"]
    sendD, conn2, rcpts = net.heldSends.pop(0)
    assert conn2 is not conn
    sendD.callback(net.results(conn2, rcpts, "ok"))
    assert result(d2)[0].status is DELIVERED


def test_smtp_unusable_route_options_defer() -> None:
    """Options that cannot be applied (here: a backend whose settings refuse them) defer the
    recipients with the reason; nothing is sent with other settings."""
    backend, net, clock, mx = smtpBackend()

    class Refusing(RouteOptions):
        def changes(self) -> dict[str, Any]:
            return {"tls": "bogus"}

    (r,) = result(send(backend, "example.net", "a@example.net", options=Refusing()))
    assert (r.status, r.code) == (TRANSIENT, "4.3.5")
    assert "unusable options for the route to example.net: tls must be one of" in r.diagnostic
    assert net.attempts == []


def test_smtp_implicit_tls_wraps_endpoint() -> None:
    implicit = dataclasses.replace(SETTINGS, tls="implicit")
    backend, net, clock, mx = smtpBackend(settings=implicit)
    result(send(backend, "[relay.example]:587", "a@example.com"))
    endpoint = net.attempts[0][4]
    assert not isinstance(endpoint, TCP4ClientEndpoint)
    assert isinstance(endpoint._wrappedEndpoint, TCP4ClientEndpoint)
    assert net.attempts[0][2] == "relay.example"


def test_smtp_send_exception_is_transient() -> None:
    backend, net, clock, mx = smtpBackend()

    def broken(*a: Any) -> defer.Deferred:
        raise RuntimeError("bug")

    original = net.newConnection

    def brokenConnection(*a: Any) -> FakeConnection:
        c = original(*a)
        c.send = broken  # type: ignore[method-assign]
        return c

    net.newConnection = brokenConnection  # type: ignore[method-assign]
    results = result(send(backend, "example.net", "a@example.net"))
    assert (results[0].status, results[0].code) == (TRANSIENT, "4.3.0")
    assert net.connections[0].aborted


def test_smtp_cancel() -> None:
    """A caller's time-out cancels: the connection is aborted, no other host is tried."""
    backend, net, clock, mx = smtpBackend(destinationConcurrency=1)
    net.sendBehaviour["192.0.2.1"] = "hold"
    d1 = send(backend, "example.org", "a@example.org")
    d2 = send(backend, "example.org", "b@example.org")  # waits for the slot
    d2.cancel()
    with pytest.raises(defer.CancelledError):
        result(d2)
    d1.cancel()
    with pytest.raises(defer.CancelledError):
        result(d1)
    assert [a[0] for a in net.attempts] == ["192.0.2.1"]
    assert net.connections[0].aborted
    assert backend._semaphores == {}
    assert backend.idleConnections() == 0


# ---------------------------------------------------------------------------------------------
# LMTP backend


def test_lmtp_nexthop_without_port_is_deferred() -> None:
    """The LMTP backend reads its next hop with the configuration's parser: the port is
    required (there is no default 24), so a next hop without one defers with 4.3.5."""
    from mailrelay.delivery.lmtp import LMTPBackend

    calls: list[Any] = []
    backend = LMTPBackend(Clock(), SETTINGS, connect=lambda *a, **kw: calls.append(a))
    for nexthop in ["store.example", "[IPv6:::1]", "unix:relative/lmtp"]:
        (r,) = result(send(backend, nexthop, "a@example.org"))
        assert (r.status, r.code) == (TRANSIENT, "4.3.5")
        assert "is not a valid LMTP server" in r.diagnostic
    assert calls == []


@pytest.mark.parametrize(
    "options",
    [RouteOptions(sourceAddress="127.0.0.1"), RouteOptions(sourceAddress6="::1")],
)
def test_lmtp_route_with_a_source_address_is_deferred(options: RouteOptions) -> None:
    """A router's lmtp route with a source address (which LMTP connections are not bound
    to, and [[routes]] refuses) defers with 4.3.5 naming the option, logged with the queue
    id; nothing is sent from the system's choice of address instead."""
    from mailrelay.delivery.lmtp import LMTPBackend

    calls: list[Any] = []
    backend = LMTPBackend(Clock(), SETTINGS, connect=lambda *a, **kw: calls.append(a))
    with capturedLogs() as events:
        (r,) = result(send(backend, "[127.0.0.1]:24", "a@example.org", queueID="Q1",
                           options=options, backendName="lmtp"))
    assert (r.status, r.code) == (TRANSIENT, "4.3.5")
    name = "sourceAddress6" if options.sourceAddress6 else "sourceAddress"
    assert r.diagnostic == (
        "X-mailrelay; unusable options for the route to [127.0.0.1]:24: an lmtp route takes "
        f"no {name} (LMTP connections are not bound to a source address)")
    assert calls == []
    assert [formatEvent(e) for e in events if e["log_level"] is LogLevel.error] == [
        "Q1: the options of the LMTP route to [127.0.0.1]:24 cannot be used: an lmtp route "
        f"takes no {name} (LMTP connections are not bound to a source address)"]


def test_lmtp_with_fake_connection(tmp_path: Path) -> None:
    from mailrelay.delivery.lmtp import LMTPBackend

    net = FakeNet()
    calls: list[Any] = []

    def connect(reactor: Any, endpoint: Any, settings: ClientSettings, **kw: Any) -> defer.Deferred:
        calls.append((endpoint, settings, kw))
        if isinstance(endpoint, UNIXClientEndpoint):
            return defer.succeed(net.newConnection("unix", kw["remoteMTA"]))
        return net.connect(reactor, endpoint, settings, **kw)

    backend = LMTPBackend(Clock(), SETTINGS, connect=connect)
    verifyObject(IDeliveryBackend, backend)
    results = result(send(backend, f"unix:{tmp_path}/lmtp.sock", "a@example.org", "b@example.org"))
    assert [r.status for r in results] == [DELIVERED, DELIVERED]
    endpoint, settings, kw = calls[0]
    assert endpoint._path == f"{tmp_path}/lmtp.sock"
    assert settings.lmtp is True and settings.heloName == "relay.test"
    assert kw == {"tlsHostname": "localhost", "remoteMTA": f"X-unix; {tmp_path}/lmtp.sock"}
    assert net.connections[0].quitted
    result(send(backend, "[::1]:2424", "a@example.org"))
    assert isinstance(calls[1][0], TCP6ClientEndpoint)
    assert calls[1][2]["remoteMTA"] == "dns; [::1]"
    # Connection failures and bad next hops defer every recipient.
    net.connectBehaviour["192.0.2.5"] = connectError("5.3.0", "smtp; 554 5.3.0 no", permanent=True)
    (r,) = result(send(backend, "192.0.2.5:24", "a@example.org"))
    assert (r.status, r.code, r.diagnostic) == (TRANSIENT, "4.3.0", "smtp; 554 5.3.0 no")
    (r,) = result(send(backend, "a:b:c", "a@example.org"))
    assert (r.status, r.code) == (TRANSIENT, "4.3.5")
    assert backend._semaphores == {}
    # The route's options apply over the defaults, LMTP stays on.
    options = RouteOptions(tls="required", caFile="/ca.pem")
    result(send(backend, "[::1]:2424", "a@example.org", options=options, backendName="lmtp"))
    settings = calls[-1][1]
    assert (settings.lmtp, settings.tls, settings.caFile) == (True, "required", "/ca.pem")
    assert calls[1][1].tls == SETTINGS.tls  # the earlier delivery: the defaults


# ---------------------------------------------------------------------------------------------
# Real servers (aiosmtpd in a thread) with the real client


class _Handler:
    """An aiosmtpd handler: refuses unknown@, defers full@, records what it got."""

    def __init__(self, lmtp: bool) -> None:
        self.lmtp = lmtp
        self.messages: list[tuple[tuple, str, list[str], bytes]] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.startswith("unknown@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            (session.peer, envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        if not self.lmtp:
            return "250 2.0.0 queued"
        return "\r\n".join(
            "452 4.2.2 mailbox full" if r.startswith("full@") else "250 2.0.0 delivered"
            for r in envelope.rcpt_tos
        )


class RealServerTests(unittest.TestCase):
    """LMTP over a UNIX socket and SMTP over TCP, against aiosmtpd."""

    def setUp(self) -> None:
        # Not self.mktemp(): under pytest it would create directories in the working tree.
        self.tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.messagePath = self.tmp / "message.eml"
        self.messagePath.write_bytes(CLEAN_MESSAGE)

    def startServer(self, lmtp: bool) -> tuple[_Handler, str]:
        import socket

        from aiosmtpd.controller import Controller, UnixSocketController
        from aiosmtpd.lmtp import LMTP

        handler = _Handler(lmtp)
        if lmtp:

            class LMTPController(UnixSocketController):
                def factory(self) -> Any:
                    return LMTP(self.handler, **self.SMTP_kwargs)

            path = str(self.tmp / "lmtp.sock")
            controller: Any = LMTPController(handler, unix_socket=path)
            nexthop = f"unix:{path}"
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            controller = Controller(handler, hostname="127.0.0.1", port=port)
            nexthop = f"[127.0.0.1]:{port}"
        controller.start()
        self.addCleanup(controller.stop)
        return handler, nexthop

    @defer.inlineCallbacks
    def test_lmtp(self) -> Any:
        from twisted.internet import reactor

        from mailrelay.delivery.lmtp import LMTPBackend

        handler, nexthop = self.startServer(lmtp=True)
        backend = LMTPBackend(reactor, ClientSettings(heloName="relay.test", tls="none"))
        env = envelope("bob@example.org", "unknown@example.org", "full@example.org")
        route = Route("lmtp", nexthop)
        results = yield backend.deliver(env, env.recipients, route, self.messagePath)
        self.assertEqual(
            [(r.status, r.code) for r in results],
            [(DELIVERED, "2.0.0"), (PERMANENT, "5.1.1"), (TRANSIENT, "4.2.2")],
        )
        self.assertEqual(results[0].remoteMTA, f"X-unix; {nexthop[5:]}")
        ((_, sender, rcpts, content),) = handler.messages
        self.assertEqual(
            (sender, rcpts), ("alice@example.com", ["bob@example.org", "full@example.org"])
        )
        self.assertEqual(content, CLEAN_MESSAGE)
        yield backend.close()

    @defer.inlineCallbacks
    def test_smtp_reuses_connection(self) -> Any:
        from twisted.internet import reactor

        from mailrelay.delivery.smtp import SMTPBackend
        from mailrelay.route import MXResolver

        handler, nexthop = self.startServer(lmtp=False)
        backend = SMTPBackend(
            reactor,
            MXResolver(None, reactor),
            ClientSettings(heloName="relay.test", tls="none"),
            connectionCacheTime=5,
        )
        route = Route("smtp", nexthop)
        env = envelope("bob@example.org", "unknown@example.org")
        results = yield backend.deliver(env, env.recipients, route, self.messagePath)
        self.assertEqual([r.status for r in results], [DELIVERED, PERMANENT])
        self.assertEqual(results[0].remoteMTA, "dns; [127.0.0.1]")
        env = envelope("carol@example.org", sender="")
        (r,) = yield backend.deliver(env, env.recipients, route, self.messagePath)
        self.assertIs(r.status, DELIVERED)
        self.assertEqual(len(handler.messages), 2)
        # Both messages came over the same connection.
        self.assertEqual(handler.messages[0][0], handler.messages[1][0])
        self.assertEqual(handler.messages[1][1:3], ("<>", ["carol@example.org"]))
        self.assertEqual(backend.idleConnections(nexthop), 1)
        yield backend.close()
        self.assertEqual(backend.idleConnections(), 0)


def test_smtp_may_tls_session_broken_then_plaintext_refused_keeps_the_first_results() -> None:
    """The plaintext connection after a broken TLS session fails too: the recipients keep
    the deferral of the TLS session (logged, no exception)."""
    refused = SMTPConnectError("4.4.1", "X-mailrelay; connection refused by 192.0.2.40")
    backend, net, clock = _mayBackend(plainError=refused)
    net.sendBehaviour["192.0.2.40"] = "tlslost-once"
    results = result(_deliverAged(backend, clock, 300))
    assert [(r.status, r.code) for r in results] == [(TRANSIENT, "4.4.2")] * 2
    assert [a[3].tls for a in net.attempts] == ["may", "none"]


def _mayLMTP(tlsError: SMTPConnectError | None = None) -> tuple[Any, FakeNet, Clock]:
    """An LMTP backend (C{tls = "may"}, C{plaintextFallbackAge} 300) whose connections with
    TLS fail with C{tlsError}, if given; its clock well past 0."""
    from mailrelay.delivery.lmtp import LMTPBackend

    net = FakeNet()

    def connect(reactor: Any, endpoint: Any, settings: ClientSettings, **kw: Any) -> Any:
        if tlsError is not None and settings.tls != "none":
            net.attempts.append((endpoint._host, endpoint._port, kw["tlsHostname"], settings,
                                 endpoint))
            return defer.fail(tlsError)
        return net.connect(reactor, endpoint, settings, **kw)

    clock = Clock()
    clock.advance(100_000)
    settings = ClientSettings(heloName="relay.test", tls="may", lmtp=True)
    return LMTPBackend(clock, settings, connect=connect, plaintextFallbackAge=300), net, clock


def _deliverLMTPAged(backend: Any, clock: Clock, age: float) -> Any:
    env = envelope("a@example.org", "b@example.org")
    env.arrival = clock.seconds() - age
    return backend.deliver(env, env.recipients, Route("lmtp", "192.0.2.40:24", RouteOptions()),
                           Path("/nonexistent"))


@pytest.mark.parametrize("age, plaintext", [(299, False), (300, True)])
@pytest.mark.parametrize("error", [HANDSHAKE_FAILED, SESSION_LOST], ids=["handshake", "session"])
def test_lmtp_may_tls_failure_falls_back_as_smtp_does(
    error: SMTPConnectError, age: float, plaintext: bool
) -> None:
    """An LMTP route with tls = "may" whose STARTTLS handshake fails: a message queued for
    at least the fallback age (the queue's min_backoff) goes to the same server at once
    without TLS, as over SMTP; a younger one is deferred.  It was deferred every time, until
    it expired and bounced."""
    backend, net, clock = _mayLMTP(error)
    results = result(_deliverLMTPAged(backend, clock, age))
    if plaintext:
        assert [r.status for r in results] == [DELIVERED, DELIVERED]
        assert [a[3].tls for a in net.attempts] == ["may", "none"]
        assert net.connections[0].sent == [("Q" * 20, ["a@example.org", "b@example.org"])]
    else:
        assert [(r.status, r.code) for r in results] == [(TRANSIENT, error.code)] * 2
        assert [a[3].tls for a in net.attempts] == ["may"]


# ---------------------------------------------------------------------------------------------
# MTA-STS (RFC 8461) on deliveries by MX lookup


class FakeSTS:
    def __init__(self, policies: dict[str, Any]) -> None:
        self.policies = policies
        self.asked: list[str] = []

    def policy(self, domain: str) -> defer.Deferred:
        self.asked.append(domain)
        return defer.succeed(self.policies.get(domain))

    def unknown(self, domain: str) -> str | None:
        return None  # (every policy is had: it is given, or there is none)


def stsPolicy(mode: str, *mx: str) -> Any:
    from mailrelay.route.mtasts import STSPolicy

    return STSPolicy("example.org", "1", mode, mx, 86400, 0.0)


def test_mta_sts_enforce_sends_only_to_matching_mx_over_verified_tls() -> None:
    sts = FakeSTS({"example.org": stsPolicy("enforce", "mx2.example.org")})
    backend, net, _, _ = smtpBackend(mtaSTS=sts)
    results = result(send(backend, "example.org", "bob@example.org"))
    assert [r.status for r in results] == [DELIVERED]
    ((address, port, tlsHostname, settings, _),) = net.attempts
    assert (address, tlsHostname, settings.tls) == ("192.0.2.2", "mx2.example.org", "required")
    assert sts.asked == ["example.org"]


def test_mta_sts_enforce_without_a_matching_mx_defers() -> None:
    sts = FakeSTS({"example.org": stsPolicy("enforce", "*.example.net")})
    backend, net, _, _ = smtpBackend(mtaSTS=sts)
    with capturedLogs() as events:
        (r,) = result(send(backend, "example.org", "bob@example.org"))
    assert (r.status, r.code) == (TRANSIENT, "4.7.5")
    assert r.diagnostic == ("X-mailrelay; no MX host of example.org matches its MTA-STS policy "
                            "(mx: *.example.net)")
    assert net.attempts == []
    assert any("deferred" in formatEvent(e) for e in events)


def test_mta_sts_testing_logs_and_delivers_as_before() -> None:
    sts = FakeSTS({"example.org": stsPolicy("testing", "mx2.example.org")})
    backend, net, _, _ = smtpBackend(mtaSTS=sts)
    with capturedLogs() as events:
        results = result(send(backend, "example.org", "bob@example.org"))
    assert [r.status for r in results] == [DELIVERED]
    assert net.attempts[0][0] == "192.0.2.1" and net.attempts[0][3].tls == "may"
    assert any("MX host mx1.example.org matches no pattern" in formatEvent(e) for e in events)


def test_mta_sts_is_not_looked_up_for_bracketed_next_hops_or_tls_required_no() -> None:
    sts = FakeSTS({"example.org": stsPolicy("enforce", "nothing.example")})
    backend, net, _, _ = smtpBackend(mtaSTS=sts)
    assert result(send(backend, "[relay.example]:587", "bob@example.org"))[0].status is DELIVERED
    env = envelope("bob@example.org")
    env.tlsRequiredNo = True  # RFC 8689: the sender asks that TLS policies be ignored
    (r,) = result(backend.deliver(env, env.recipients, Route("smtp", "example.org"),
                                  Path("/nonexistent")))
    assert r.status is DELIVERED
    assert sts.asked == []


def test_smtp_partial_reuse_then_a_stalled_host_does_not_suspend_the_next_hop() -> None:
    """A reused connection whose server delivers one recipient and defers another, which
    then goes to a host that stops answering in the transaction: a server of the next hop
    answered in this delivery, so the next hop is not counted unreachable (Postfix sets
    SMTP_MISC_FLAG_COMPLETE_SESSION once a session completed, and smtp_bulk_fail() then
    sets no hop_status: qmgr throttles no destination)."""
    backend, net, clock, mx = smtpBackend(destinationConcurrency=1)
    result(send(backend, "example.org", "a@example.org", queueID="A"))
    net.sendBehaviour["192.0.2.1"] = "ok,451"
    net.sendBehaviour["2001:db8::1"] = "lost"
    net.sendBehaviour["192.0.2.2"] = "lost"
    results = result(send(backend, "example.org", "b@example.org", "c@example.org",
                          queueID="B"))
    assert [r.status for r in results] == [DELIVERED, TRANSIENT]
    net.sendBehaviour["192.0.2.1"] = "ok"
    (r,) = result(send(backend, "example.org", "d@example.org", queueID="C"))
    assert r.status is DELIVERED, r


def test_smtp_host_that_answered_then_a_stalled_one_does_not_suspend_the_next_hop() -> None:
    """On fresh connections too: the primary defers the recipient (a server answered), the
    backup stops answering in the transaction: the next hop was reached (Postfix's
    SMTP_MISC_FLAG_COMPLETE_SESSION), not suspended."""
    backend, net, _, _ = smtpBackend(destinationConcurrency=1, connectionCacheTime=0)
    net.sendBehaviour["192.0.2.1"] = "451"
    net.sendBehaviour["2001:db8::1"] = "lost"
    net.sendBehaviour["192.0.2.2"] = "lost"
    for _ in range(2):
        (r,) = result(send(backend, "example.org", "a@example.org"))
        assert r.status is TRANSIENT and "suspended" not in r.diagnostic, r


def test_smtp_refused_connection_to_the_only_host_is_logged_once() -> None:
    """A delivery whose only host refuses the connection logs that once, naming the host
    (Postfix's "connect to HOST[ADDR]:PORT: Connection refused"); the recipient's result
    line (the queue's) says the rest, as Postfix's one line per recipient: no line saying
    again that no host accepted the delivery."""
    backend, net, _, _ = smtpBackend(connectionCacheTime=0)
    net.connectBehaviour["192.0.2.30"] = connectError(
        "4.4.1", "X-mailrelay; connection refused by 192.0.2.30")
    with capturedLogs() as events:
        (r,) = result(send(backend, "example.net", "a@example.net", queueID="Q"))
    assert r.diagnostic == "X-mailrelay; connection refused by 192.0.2.30"
    texts = [formatEvent(e) for e in events]
    assert texts == ["Q: cannot use mx.example.net[192.0.2.30]:25 for example.net: 4.4.1 "
                     "X-mailrelay; connection refused by 192.0.2.30"], texts


# ---------------------------------------------------------------------------------------------
# DANE (RFC 7672) on deliveries by MX lookup


DANE_POLICY = DANEPolicy("_25._tcp.mx1.example.org", (TLSARecord(3, 1, 1, bytes(32)),),
                         ("mx1.example.org", "example.org"))


class FakeDANEMX(FakeMX):
    """A L{FakeMX} whose hosts are DNSSEC-secure, and whose TLSA records are C{policies}:
    host name -> L{DANEPolicy}, C{None} or a L{DeliveryFailure} (a lookup that failed)."""

    def __init__(self, policies: dict[str, Any]) -> None:
        super().__init__({k: [dataclasses.replace(h, secure=True) for h in v]
                          if isinstance(v, list) else v for k, v in HOSTS.items()})
        self.policies = policies
        self.looked: list[tuple[str, int, str]] = []

    def danePolicy(self, host: MXHost, domain: str) -> defer.Deferred:
        self.looked.append((host.name, host.port, domain))
        policy = self.policies.get(host.name)
        return defer.fail(policy) if isinstance(policy, Exception) else defer.succeed(policy)


def daneBackend(policies: dict[str, Any], **kw: Any) -> tuple[Any, FakeNet, Clock, FakeDANEMX]:
    from mailrelay.delivery.smtp import SMTPBackend

    net, clock, mx = FakeNet(), Clock(), FakeDANEMX(policies)
    clock.advance(100_000)
    kw.setdefault("dane", True)
    return SMTPBackend(clock, mx, SETTINGS, connect=net.connect, plaintextFallbackAge=0,
                       **kw), net, clock, mx


def test_dane_makes_tls_mandatory_and_matched_at_a_host_with_tlsa_records() -> None:
    """Postfix's "dane" level: a secure MX host with usable TLSA records is talked to over
    TLS that its records verify; one without them, opportunistically."""
    backend, net, _, mx = daneBackend({"mx1.example.org": DANE_POLICY})
    assert result(send(backend, "example.org", "bob@example.org"))[0].status is DELIVERED
    ((address, _, _, settings, _),) = net.attempts
    assert (address, settings.tls, settings.tlsa) == ("192.0.2.1", "required", DANE_POLICY)
    assert settings.verifiesTLS
    assert mx.looked == [("mx1.example.org", 25, "example.org")]
    backend, net, _, _ = daneBackend({})
    assert result(send(backend, "example.org", "bob@example.org"))[0].status is DELIVERED
    assert [(a[0], a[3].tls, a[3].tlsa) for a in net.attempts] == [("192.0.2.1", "may", None)]


def test_a_dane_failure_tries_the_next_mx_and_never_plaintext() -> None:
    """A certificate that does not match (4.7.5) is not followed by plaintext, even for
    mail old enough for "may"'s fallback; the next MX host is tried, as Postfix does."""
    mismatch = SMTPConnectError(
        "4.7.5", "X-mailrelay; TLS handshake with mx1.example.org[192.0.2.1] failed: DANE: "
        "the certificate of mx1.example.org matches no TLSA record of _25._tcp.mx1.example.org",
        tlsFailure=True)
    backend, net, _, mx = daneBackend({"mx1.example.org": DANE_POLICY}, connectionCacheTime=0)
    net.connectBehaviour = {"192.0.2.1": mismatch, "2001:db8::1": mismatch}
    env = envelope("bob@example.org")
    env.arrival = 0.0
    (r,) = result(backend.deliver(env, env.recipients, Route("smtp", "example.org",
                                                               RouteOptions()), Path("/x")))
    assert r.status is DELIVERED
    assert [(a[0], a[3].tls) for a in net.attempts] == [
        ("192.0.2.1", "required"), ("2001:db8::1", "required"), ("192.0.2.2", "may")]
    net.connectBehaviour["192.0.2.2"] = connectError("4.4.1", "X-mailrelay; refused")
    net.attempts.clear()
    env = envelope("bob@example.org")
    env.arrival = 0.0
    (r,) = result(backend.deliver(env, env.recipients, Route("smtp", "example.org",
                                                               RouteOptions()), Path("/x")))
    assert (r.status, r.code) == (TRANSIENT, "4.4.1")  # (the last host's error)
    # (One TLSA lookup a host name, for all its addresses, in each delivery.)
    assert mx.looked == [("mx1.example.org", 25, "example.org"),
                         ("mx2.example.org", 25, "example.org")] * 2
    assert [(a[0], a[3].tls) for a in net.attempts] == [
        ("192.0.2.1", "required"), ("2001:db8::1", "required"), ("192.0.2.2", "may")]


def test_a_failed_tlsa_lookup_defers_that_host() -> None:
    """Postfix: "TLSA lookup error for host:port" (4.7.5): the host is not used, neither
    with opportunistic TLS; the next one is."""
    error = DeliveryFailure(permanent=False, code="4.7.5",
                            diagnostic="X-mailrelay; TLSA lookup error for mx1.example.org:25")
    backend, net, _, _ = daneBackend({"mx1.example.org": error, "mx2.example.org": error})
    with capturedLogs() as events:
        (r,) = result(send(backend, "example.org", "bob@example.org"))
    assert (r.status, r.code, r.diagnostic) == (TRANSIENT, "4.7.5", error.diagnostic)
    assert net.attempts == []
    assert any("cannot use mx1.example.org[192.0.2.1]:25 for example.org: 4.7.5 "
               "X-mailrelay; TLSA lookup error" in formatEvent(e) for e in events)


@pytest.mark.parametrize("how", ["off", "bracketed", "tls-required-no", "route-tls", "insecure"])
def test_no_tlsa_lookup_where_dane_does_not_apply(how: str) -> None:
    """Only for MX lookups (the brief's and RFC 7672's case), under "may" (a route's own
    level stands, as a Postfix policy-table entry), not for a message saying
    "TLS-Required: No" (RFC 8689), not for hosts whose records were not validated."""
    backend, net, _, mx = daneBackend({"mx1.example.org": DANE_POLICY,
                                       "relay.example": DANE_POLICY}, dane=how != "off")
    env, nexthop, options = envelope("bob@example.org"), "example.org", RouteOptions()
    if how == "bracketed":
        nexthop = "[relay.example]:587"
    elif how == "tls-required-no":
        env.tlsRequiredNo = True
    elif how == "route-tls":
        options = RouteOptions(tls="none")
    elif how == "insecure":
        mx.answers["example.org"] = HOSTS["example.org"]
    (r,) = result(backend.deliver(env, env.recipients, Route("smtp", nexthop, options),
                                  Path("/x")))
    assert r.status is DELIVERED
    assert mx.looked == []
    assert net.attempts[0][3].tlsa is None


def test_a_dane_verified_connection_is_reused_for_the_same_next_hop_and_route() -> None:
    """A connection DANE verified (its TLSA records applied because the route's TLS is
    "may") is cached for the deliveries to the same next hop with the same route settings,
    as every other connection: they would apply DANE to that host too, and it was verified
    under it when it connected, at most connectionCacheTime ago (Postfix caches the session
    under the next hop and the TLS level asked, and enforces the policy on the connection
    before storing it: smtp_reuse_session(), smtp_key.c; smtp_tls_connection_reuse).
    Before, it was cached under its DANE settings, which no delivery asks for: never
    reused, an idle place taken until it expired.  Other settings (a route asking for
    TLS verified by CAs) do not take it."""
    backend, net, clock, mx = daneBackend({"mx1.example.org": DANE_POLICY},
                                          connectionCacheTime=10)
    assert result(send(backend, "example.org", "a@example.org", queueID="A"))[0].status \
        is DELIVERED
    assert result(send(backend, "example.org", "b@example.org", queueID="B"))[0].status \
        is DELIVERED
    assert len(net.connections) == 1 and net.attempts[0][3].tlsa == DANE_POLICY
    assert net.connections[0].sent == [("A", ["a@example.org"]), ("B", ["b@example.org"])]
    assert mx.asked == ["example.org"] and len(mx.looked) == 1  # (no DNS for a reuse)
    assert backend.idleConnections("example.org") == 1
    # A route asking for TLS verified by its CAs: a connection of its own.
    (r,) = result(send(backend, "example.org", "c@example.org", queueID="C",
                       options=RouteOptions(tls="required")))
    assert r.status is DELIVERED
    assert len(net.connections) == 2 and net.attempts[1][3].tlsa is None
    assert backend.idleConnections("example.org") == 2
    result(backend.close())


def test_a_connection_made_without_dane_for_tls_required_no_is_not_reused_under_dane() -> None:
    """A message saying "TLS-Required: No" (RFC 8689 section 4.2.2: DANE ignored) goes to a
    host with TLSA records over opportunistic TLS, unverified.  That connection is not
    cached for the next messages, which apply DANE to that host (Postfix keys its cached
    sessions by the TLS level enforced on them, smtp_key.c SMTP_KEY_FLAG_TLS_LEVEL): one
    to a host found securely (whose TLSA records were not asked) is closed.  Before, it was cached under the next hop and the route's "may" and carried
    the next message, unverified, to a host whose TLSA records asked for verification."""
    backend, net, clock, mx = daneBackend({"mx1.example.org": DANE_POLICY},
                                          connectionCacheTime=10)
    env = envelope("a@example.org")
    env.tlsRequiredNo = True
    (r,) = result(backend.deliver(env, env.recipients, Route("smtp", "example.org",
                                                               RouteOptions()), Path("/x")))
    assert r.status is DELIVERED and net.attempts[0][3].tlsa is None
    assert backend.idleConnections() == 0 and net.connections[0].quitted
    assert result(send(backend, "example.org", "b@example.org"))[0].status is DELIVERED
    assert [a[3].tlsa for a in net.attempts] == [None, DANE_POLICY]
    # A host found insecurely (DANE for no message): its connection is what every message
    # would make, reused.
    backend, net, clock, mx = daneBackend({"mx1.example.org": DANE_POLICY},
                                          connectionCacheTime=10)
    mx.answers["example.org"] = HOSTS["example.org"]
    (r,) = result(backend.deliver(env, env.recipients, Route("smtp", "example.org",
                                                               RouteOptions()), Path("/x")))
    result(send(backend, "example.org", "b@example.org"))
    assert len(net.connections) == 1
    result(backend.close())


def _crashAfterRename(box: Path) -> Path:
    """The one copy in C{box}'s new/ (as the attempt killed after it left it there)."""
    (stored,) = list((box / "new").iterdir())
    return stored


def _deliveredOnce(tmp_path: Path, messagePath: Path) -> tuple[Any, Path, Path]:
    """A message delivered to bob in the Maildir C{tmp_path}/Maildir: a function delivering
    it again (the retry), the Maildir, and the copy in its new/."""
    env = envelope("bob@example.org")
    backend = maildir()
    route = toMaildir(str(tmp_path / "Maildir"))
    result(backend.deliver(env, env.recipients, route, messagePath))
    box = tmp_path / "Maildir"
    return (lambda: result(backend.deliver(env, env.recipients, route, messagePath)), box,
            _crashAfterRename(box))


def test_maildir_a_retry_after_a_crash_after_the_rename_delivers_no_second_copy(
    tmp_path: Path, messagePath: Path
) -> None:
    """Found by a bug hunt (bench/exactly_once.py, kill -9 of the delivery process): a
    delivery killed after its copy reached new/ but before the spool recorded the recipient
    delivered wrote a second copy at the retry (names were time, pid and counter).  The
    name is now the queue id and the mailbox's hash, so the retry finds the copy: exactly
    once, as the spool's record is for the other backends."""
    template = str(tmp_path / "{local}" / "Maildir")
    env = envelope("bob@example.org", "carol@example.org")
    backend = maildir()
    first = result(backend.deliver(env, env.recipients, toMaildir(template), messagePath))
    assert [r.status for r in first] == [DELIVERED, DELIVERED]
    box = tmp_path / "bob" / "Maildir"
    stored = _crashAfterRename(box)
    assert stored.name.startswith(env.queueID + ".")
    # The spool has no record: the retry delivers both again (also the one listed twice).
    again = envelope("bob@example.org", "carol@example.org", "Bob@example.org")
    again.queueID = env.queueID
    results = result(backend.deliver(again, again.recipients, toMaildir(template), messagePath))
    assert [(r.status, r.code) for r in results] == [(DELIVERED, "2.0.0")] * 3
    assert list((box / "new").iterdir()) == [stored]
    assert len(list((tmp_path / "carol" / "Maildir" / "new").iterdir())) == 1
    assert list((box / "tmp").iterdir()) == []
    # Another message (another queue id) is another copy.
    other = envelope("bob@example.org")
    other.queueID = "R" * 20
    result(backend.deliver(other, other.recipients, toMaildir(template), messagePath))
    assert len(list((box / "new").iterdir())) == 2


def test_maildir_a_retry_after_a_crash_between_link_and_unlink(
    tmp_path: Path, messagePath: Path
) -> None:
    """Killed after the link into new/ and before tmp/'s name was removed, the copy since
    moved to cur/ by the user's mail reader (renamed with its ':2,' flags, here with a
    keyword 'a' as Dovecot's): the retry finds it there (tmp/ still holding the name says
    the attempt may have reached the link, so cur/ is listed) and removes the leftover in
    tmp/."""
    deliverAgain, box, stored = _deliveredOnce(tmp_path, messagePath)
    os.link(stored, box / "tmp" / stored.name)
    read = box / "cur" / (stored.name + ":2,Sa")
    stored.rename(read)
    (r,) = deliverAgain()
    assert (r.status, r.code) == (DELIVERED, "2.0.0")
    assert list((box / "new").iterdir()) == []
    assert list((box / "cur").iterdir()) == [read]
    assert list((box / "tmp").iterdir()) == []


def test_maildir_a_retry_after_a_crash_before_the_link_writes_the_copy(
    tmp_path: Path, messagePath: Path
) -> None:
    """Killed while writing tmp/: the retry writes the whole copy (over the partial one) and
    links it into new/; cur/ holding another message is not mistaken for it."""
    deliverAgain, box, stored = _deliveredOnce(tmp_path, messagePath)
    name = stored.name
    stored.unlink()
    (box / "tmp" / name).write_bytes(b"Return-Path: <al")
    (box / "cur" / "1.M1P1.other:2,S").write_bytes(b"another message")
    (r,) = deliverAgain()
    assert r.status is DELIVERED
    assert [p.name for p in (box / "new").iterdir()] == [name]
    assert (box / "new" / name).read_bytes().endswith(b"line one\nline\rtwo\n")
    assert list((box / "tmp").iterdir()) == []


def test_maildir_looks_in_cur_only_after_an_interrupted_attempt(
    tmp_path: Path, messagePath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cur/ (which can be big) is listed only when tmp/ holds the copy's name: never on a
    first attempt, nor on a retry whose copy is in new/."""
    listed: list[str] = []
    scandir = os.scandir

    def recording(path: Any = ".") -> Any:
        listed.append(str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", recording)
    template = str(tmp_path / "Maildir")
    env = envelope("bob@example.org")
    backend = maildir()
    for _ in range(2):
        (r,) = result(backend.deliver(env, env.recipients, toMaildir(template), messagePath))
        assert r.status is DELIVERED
    assert listed == []


def test_maildir_copy_of_a_message_without_a_queue_id_is_deferred(
    tmp_path: Path, messagePath: Path
) -> None:
    """The copy's name is the queue id's: without one (never in the queue) two messages
    could share it, so the recipient is deferred, not lost in another's name."""
    env = envelope("bob@example.org")
    env.queueID = None
    (r,) = result(maildir().deliver(env, env.recipients, toMaildir(str(tmp_path / "M")),
                                    messagePath))
    assert (r.status, r.code) == (TRANSIENT, "4.3.0")
    assert "queue id None" in r.diagnostic


@pytest.mark.parametrize("info", [":2,", ":2,S", ":2,RS", ":2,DFPRST"])
def test_maildir_a_retry_finds_the_copy_a_reader_moved_with_standard_flags(
    tmp_path: Path, messagePath: Path, info: str
) -> None:
    """Killed after tmp/ was emptied and before the spool's record (the widest window: 46
    copies twice in 5 kills of bench/exactly_once.py), the copy then moved to cur/ by a mail
    reader before the restarted process retried: the retry looks for the names the
    specification's flags can give it (':2,' and each subset of DFPRST in ASCII order: 64
    names, no listing of cur/) and writes no second copy."""
    deliverAgain, box, stored = _deliveredOnce(tmp_path, messagePath)
    read = box / "cur" / (stored.name + info)
    stored.rename(read)
    (r,) = deliverAgain()
    assert (r.status, r.code) == (DELIVERED, "2.0.0")
    assert list((box / "new").iterdir()) == []
    assert list((box / "cur").iterdir()) == [read]


# Fallback relays (Postfix's smtp_fallback_relay)

FALLBACK = ("[relay.example]:587",)


def _refuseAll(net: FakeNet, *addresses: str) -> None:
    for address in addresses:
        net.connectBehaviour[address] = connectError(
            "4.4.1", f"X-mailrelay; connection refused by {address}")


def test_fallback_relay_takes_what_no_mx_host_took() -> None:
    """When every MX host of the recipients' domain fails for a temporary reason, the
    recipients still pending are tried at the fallback relays in order, in the same
    delivery (Postfix's smtp_fallback_relay, smtp_connect.c: the fallback sites appended to
    the next hop's); the results name the fallback that took them."""
    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK, connectionCacheTime=0)
    _refuseAll(net, "192.0.2.1", "2001:db8::1", "192.0.2.2")
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.remoteMTA) == (DELIVERED, "dns; relay.example")
    assert [a[:3] for a in net.attempts] == [
        ("192.0.2.1", 25, "mx1.example.org"), ("2001:db8::1", 25, "mx1.example.org"),
        ("192.0.2.2", 25, "mx2.example.org"), ("192.0.2.40", 587, "relay.example")]
    assert mx.asked == ["example.org", "[relay.example]:587"]
    # A 4xx to some recipients: those go on, those delivered or refused do not.
    net.connectBehaviour.clear()
    net.sendBehaviour.update({"192.0.2.1": "ok,451,550", "2001:db8::1": "451",
                              "192.0.2.2": "451"})
    del net.attempts[:]
    reported: list[RecipientResult] = []
    results = result(send(backend, "example.org", "a@example.org", "b@example.org",
                          "c@example.org", done=reported.extend))
    assert [(r.address, r.status, r.remoteMTA) for r in results] == [
        ("a@example.org", DELIVERED, "dns; mx1.example.org"),
        ("b@example.org", DELIVERED, "dns; relay.example"),
        ("c@example.org", PERMANENT, "dns; mx1.example.org")]
    assert net.connections[-1].sent == [("Q" * 20, ["b@example.org"])]
    assert {r.address for r in reported} >= {"a@example.org", "c@example.org"}


def test_fallback_relay_not_for_a_5xx_nor_a_domain_that_takes_no_mail() -> None:
    """A 5xx from the destination's server is final: never sent to the fallback (Postfix:
    only soft-failed recipients are kept, SMTP_RCPT_KEEP); so are a domain that does not
    exist and a null MX (RFC 7505: it takes no mail)."""
    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK)
    net.sendBehaviour["192.0.2.1"] = "550"
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.code) == (PERMANENT, "5.1.1")
    for domain in ("nowhere.example", "nullmx.example"):
        (r,) = result(send(backend, domain, f"a@{domain}"))
        assert r.status is PERMANENT
    assert "[relay.example]:587" not in mx.asked
    assert [a[0] for a in net.attempts] == ["192.0.2.1"]


def test_fallback_relay_after_a_dns_failure_and_refused_hello() -> None:
    """A temporary DNS failure goes on to the fallback; so does a 5xx to HELO from the
    destination's last host, which is not the final server when a fallback follows
    (Postfix's SMTP_MISC_FLAG_FINAL_NEXTHOP is set for the last site only)."""
    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK)
    (r,) = result(send(backend, "broken.example", "a@broken.example"))
    assert (r.status, r.remoteMTA) == (DELIVERED, "dns; relay.example")
    net.connectBehaviour["192.0.2.1"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["2001:db8::1"] = connectError("4.4.1", "X-mailrelay; refused")
    net.connectBehaviour["192.0.2.2"] = _refusedHello("mx2.example.org")
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.remoteMTA) == (DELIVERED, "dns; relay.example")


def test_fallback_relays_in_order_and_what_the_last_said() -> None:
    """The fallback relays are tried in order; when none takes the mail, it is deferred
    with what the last one said.  The last fallback relay refusing HELO with a 5xx defers
    the mail (4.3.5), as Postfix's 'smtp_fallback_relay configuration problem'."""
    backend, net, clock, mx = smtpBackend(
        fallbackRelay=("[relay.example]:587", "example.net"), connectionCacheTime=0)
    _refuseAll(net, "192.0.2.1", "2001:db8::1", "192.0.2.2", "192.0.2.40")
    net.sendBehaviour["192.0.2.30"] = "451"
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.diagnostic, r.remoteMTA) == (
        TRANSIENT, "smtp; 451 4.3.0 try later", "dns; mx.example.net")
    assert [a[0] for a in net.attempts][-2:] == ["192.0.2.40", "192.0.2.30"]
    net.connectBehaviour["192.0.2.30"] = _refusedHello("mx.example.net")
    with capturedLogs() as events:
        (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.code) == (TRANSIENT, "4.3.5")
    assert any("fallback relay example.net" in formatEvent(e)
               and "configuration problem" in formatEvent(e) for e in events)


def test_fallback_relay_only_for_the_recipients_domain_unless_the_route_sets_one() -> None:
    """The backend's fallback relays are for mail to the recipients' own domain's MX hosts,
    not for a relay host (a smarthost, a route's own next hop: Postfix's fallback relay
    is for destinations that cannot be found or reached); a route's own fallback_relay
    applies to its mail whatever its next hop."""
    backend, net, clock, mx = smtpBackend(fallbackRelay=("example.net",))
    _refuseAll(net, "192.0.2.1", "2001:db8::1", "192.0.2.2")
    (r,) = result(send(backend, "example.org", "a@other.example"))
    assert r.status is TRANSIENT
    assert "example.net" not in mx.asked
    (r,) = result(send(backend, "example.org", "a@other.example",
                       options=RouteOptions(fallbackRelay=FALLBACK)))
    assert (r.status, r.remoteMTA) == (DELIVERED, "dns; relay.example")
    assert "example.net" not in mx.asked


def test_fallback_relay_not_used_when_the_relay_is_an_mx_host() -> None:
    """A relay that is itself an MX host of the destination does not hand its mail to a
    fallback relay (Postfix 2.2 and later: i_am_mx sets SMTP_MISC_FLAG_FINAL_NEXTHOP, and
    so does a loop), which could send it back: a mail loop."""
    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK, selfName="mx2.example.org")
    _refuseAll(net, "192.0.2.1", "2001:db8::1")
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert r.status is TRANSIENT
    assert "[relay.example]:587" not in mx.asked


def test_fallback_relay_keeps_verified_tls_the_destination_requires() -> None:
    """The fallback relay is tried with the route's TLS settings and the policy of its own
    name (Postfix looks up smtp_tls_policy_maps by the fallback's name), raised to
    verified TLS when the destination's MTA-STS policy was enforced on its MX hosts: a
    fallback never carries the mail with less than the destination demands."""
    from mailrelay.route.mtasts import STSPolicy

    class Policies:
        def policy(self, domain: str) -> defer.Deferred:
            return defer.succeed(
                STSPolicy(domain, "1", "enforce", ("*.example.org",), 86400, 0.0))

    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK, mtaSTS=Policies(),
                                          connectionCacheTime=0)
    _refuseAll(net, "192.0.2.1", "2001:db8::1", "192.0.2.2")
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert r.status is DELIVERED
    assert [(a[0], a[3].tls) for a in net.attempts] == [
        ("192.0.2.1", "required"), ("2001:db8::1", "required"), ("192.0.2.2", "required"),
        ("192.0.2.40", "required")]
    # The destination suspended (its hosts not tried): still verified at the fallback.
    for _ in range(backend.destinationConcurrency):
        result(send(backend, "example.org", "a@example.org"))
    del net.attempts[:]
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert r.status is DELIVERED
    assert [(a[0], a[3].tls) for a in net.attempts] == [("192.0.2.40", "required")]
    # Without a policy the route's own level stands; under DANE, when the destination's
    # hosts were not looked up (a DNS failure), TLS is required there too.
    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK)
    _refuseAll(net, "192.0.2.1", "2001:db8::1", "192.0.2.2")
    result(send(backend, "example.org", "a@example.org"))
    assert net.attempts[-1][3].tls == SETTINGS.tls
    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK, dane=True)
    result(send(backend, "broken.example", "a@broken.example"))
    assert [(a[0], a[3].tls) for a in net.attempts] == [("192.0.2.40", "required")]


def test_fallback_relay_connections_are_cached_and_limited_under_its_own_name() -> None:
    """A fallback relay's connection is cached under the fallback's next hop (reused by the
    next delivery that goes there, never by one to the destination), and the fallback
    delivery takes a slot of the fallback's own next hop once the destination's is
    released (no delivery holds two slots: none waits for another's)."""
    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK, destinationConcurrency=1)
    _refuseAll(net, "192.0.2.1", "2001:db8::1", "192.0.2.2")
    net.sendBehaviour["192.0.2.40"] = "hold"
    first = send(backend, "example.org", "a@example.org")
    assert set(backend._perDestination.semaphores) == {"[relay.example]:587"}
    held, conn, _ = net.heldSends.pop()
    held.callback(net.results(conn, [Recipient("a@example.org")], "ok"))
    assert result(first)[0].status is DELIVERED
    assert backend.idleConnections("[relay.example]:587") == 1
    assert backend.idleConnections("example.org") == 0
    net.sendBehaviour["192.0.2.40"] = "ok"
    (r,) = result(send(backend, "example.org", "b@example.org"))
    assert r.status is DELIVERED
    assert len(net.connections) == 1 and net.connections[0].sent[-1][1] == ["b@example.org"]


def test_fallback_relay_is_checked_at_start_and_at_delivery() -> None:
    """A fallback relay that is no SMTP next hop is refused when the backend is built
    (naming it), and a router's route carrying one is deferred (4.3.5)."""
    from mailrelay.delivery.smtp import SMTPBackend

    with pytest.raises(ValueError, match=r"fallback relay.*\[bad"):
        SMTPBackend(Clock(), FakeMX(HOSTS), SETTINGS, fallbackRelay=("[bad",))
    backend, net, clock, mx = smtpBackend()
    (r,) = result(send(backend, "example.org", "a@example.org",
                       options=RouteOptions(fallbackRelay=("[bad",))))
    assert (r.status, r.code) == (TRANSIENT, "4.3.5")
    assert net.attempts == []


def test_a_delivery_cut_short_before_its_fallback_relay_keeps_its_results() -> None:
    """A delivery cancelled (the queue's stop) while waiting for its fallback relay's slot
    ends with what the destination said: it did start, and what it did is known."""
    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK, destinationConcurrency=1)
    _refuseAll(net, "192.0.2.1", "2001:db8::1", "192.0.2.2")
    net.sendBehaviour["192.0.2.40"] = "hold"
    busy = send(backend, "[relay.example]:587", "x@example.com")
    waiting = send(backend, "example.org", "a@example.org")
    waiting.cancel()
    (r,) = result(waiting)
    assert (r.status, r.diagnostic) == (TRANSIENT, "X-mailrelay; connection refused by 192.0.2.2")
    held, conn, rcpts = net.heldSends.pop()
    held.callback(net.results(conn, rcpts, "ok"))
    assert result(busy)[0].status is DELIVERED
    assert [a[0] for a in net.attempts].count("192.0.2.40") == 1


def test_a_delivery_the_destination_took_asks_nothing_more_for_its_fallback() -> None:
    """When the destination took every recipient, nothing is done for the fallback relays:
    not even the destination's MTA-STS policy is asked for again."""
    asked: list[str] = []

    class Policies:
        def policy(self, domain: str) -> defer.Deferred:
            asked.append(domain)
            return defer.succeed(None)

    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK, mtaSTS=Policies())
    assert result(send(backend, "example.org", "a@example.org"))[0].status is DELIVERED
    assert asked == ["example.org"]
    assert "[relay.example]:587" not in mx.asked


def test_a_requiretls_message_skips_a_fallback_relay_not_found_securely() -> None:
    """A REQUIRETLS message (RFC 8689 section 4.2.1) is not returned because a fallback
    relay found by an MX lookup that cannot be secured does not qualify: that fallback is
    skipped, the next one (a relay host) tried with verified TLS, and without one the
    destination's deferral stands."""
    backend, net, clock, mx = smtpBackend(connectionCacheTime=0)
    net.connectBehaviour["192.0.2.40"] = connectError(
        "4.4.1", "X-mailrelay; connection refused by 192.0.2.40")
    env = dataclasses.replace(envelope("a@example.org"), requireTLS=True)
    route = Route("smtp", "[relay.example]:587",
                  RouteOptions(fallbackRelay=("example.net", "[192.0.2.2]")))
    mx.answers = {**HOSTS, "[192.0.2.2]": [MXHost("192.0.2.2", "192.0.2.2", 25)]}
    (r,) = result(backend.deliver(env, env.recipients, route, Path("/nonexistent")))
    assert r.status is DELIVERED
    assert [(a[0], a[3].tls) for a in net.attempts] == [
        ("192.0.2.40", "required"), ("192.0.2.2", "required")]
    assert "example.net" not in mx.asked
    route = Route("smtp", "[relay.example]:587", RouteOptions(fallbackRelay=("example.net",)))
    (r,) = result(backend.deliver(env, env.recipients, route, Path("/nonexistent")))
    assert (r.status, r.diagnostic) == (
        TRANSIENT, "X-mailrelay; connection refused by 192.0.2.40")


def test_fallback_relay_configuration_problem_names_the_server_that_refused() -> None:
    """The 4.3.5 deferral of a refusal by the last fallback relay (Postfix's
    'smtp_fallback_relay configuration problem') keeps the address of the server that said
    it and where it was, as every other result of a server's reply does: the notices and
    the queue listing name it 'mx.example.net[192.0.2.30]' (smtp_proto.c's namaddr)."""
    backend, net, clock, mx = smtpBackend(
        fallbackRelay=("example.net",), connectionCacheTime=0)
    _refuseAll(net, "192.0.2.1", "2001:db8::1", "192.0.2.2")
    refused = _refusedHello("mx.example.net")
    refused.remoteAddress, refused.relay = "192.0.2.30", "mx.example.net[192.0.2.30]:25"
    net.connectBehaviour["192.0.2.30"] = refused
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.code, r.remoteMTA) == (TRANSIENT, "4.3.5", "dns; mx.example.net")
    assert (r.remoteAddress, r.relay) == ("192.0.2.30", "mx.example.net[192.0.2.30]:25")


def test_fallback_relay_not_used_for_a_suspended_destination_the_relay_is_an_mx_of() -> None:
    """A relay that is an MX host of the destination does not hand its mail to a fallback
    relay (Postfix's i_am_mx): not at the first attempt, and not either once the
    destination is suspended (its hosts not tried, so not looked up: it is looked up for
    this), where the fallback relay could send the mail back here -- a loop."""
    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK, selfName="mx2.example.org")
    _refuseAll(net, "192.0.2.1", "2001:db8::1")
    for _ in range(backend.destinationConcurrency + 1):
        (r,) = result(send(backend, "example.org", "a@example.org"))
        assert r.status is TRANSIENT
    assert "delivery temporarily suspended" in (r.reason or "")
    assert "[relay.example]:587" not in mx.asked
    assert "192.0.2.40" not in [a[0] for a in net.attempts]
    # Another destination, suspended, whose MX hosts are not this relay: the fallback.
    backend, net, clock, mx = smtpBackend(fallbackRelay=FALLBACK, connectionCacheTime=0)
    _refuseAll(net, "192.0.2.1", "2001:db8::1", "192.0.2.2")
    for _ in range(backend.destinationConcurrency):
        result(send(backend, "example.org", "a@example.org"))
    del net.attempts[:]
    (r,) = result(send(backend, "example.org", "a@example.org"))
    assert (r.status, r.remoteMTA) == (DELIVERED, "dns; relay.example")
    assert [a[0] for a in net.attempts] == ["192.0.2.40"]
