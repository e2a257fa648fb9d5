"""The listener builder (L{mailrelay.receive.listener}): L{ListenerSettings}, what
L{buildListenerFactory} makes of them, the layers below SMTP, and the relay's and the test
kit's use of it."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailrelay.cleanup.intake import Intake
from mailrelay.policy import RecipientPolicy, RelayControl
from mailrelay.receive.auth import AuthPolicy, AuthSettings, MemoryAuthThrottle, makePortal
from mailrelay.receive.limits import ConnectionCount, MemoryRateLimiter
from mailrelay.receive.listener import (
    ListenerSettings,
    buildListenerFactory,
    wrapListenerFactory,
)
from mailrelay.receive.protocol import ListenerContext
from mailrelay.receive.proxy import ProxyProtocolFactory
from mailrelay.testing import MemoryChecker, MemorySpool, ServerHarness


def build(settings: ListenerSettings, **kw: object):
    clock = Clock()
    kw.setdefault("policy", RecipientPolicy(RelayControl([], [], "mx.test"), [], clock))
    kw.setdefault("intake", Intake(MemorySpool(), [], clock, "mx.test"))
    return buildListenerFactory(settings, clock=clock, **kw)  # type: ignore[arg-type]


def test_the_context_has_at_most_ten_fields() -> None:
    assert len(dataclasses.fields(ListenerContext)) <= 10


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"mode": "smtp"}, "mode must be one of relay, submission, submissions, not 'smtp'"),
        ({"tlsMode": "tls"}, "tlsMode must be one of none, starttls, implicit, not 'tls'"),
        ({"tlsMode": "starttls"}, "tlsMode 'starttls' needs tlsOptions (a certificate)"),
    ],
)
def test_settings_refuse_what_cannot_work(kw: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as e:
        ListenerSettings("mx.test", **kw)
    assert str(e.value) == message


def test_session_settings_follow_the_listener() -> None:
    settings = ListenerSettings(
        "mx.test",
        mode="submission",
        greetPause=2,
        tlsMode="starttls",
        tlsOptions=object(),
        maxRecipients=5,
    )
    session = settings.sessionSettings(("PLAIN",))
    assert session.requireAuth and session.rejectPregreet and session.starttls
    assert (session.hostname, session.maxRecipients, session.authMechanisms) == (
        "mx.test",
        5,
        ("PLAIN",),
    )
    plain = ListenerSettings("mx.test").sessionSettings(())
    assert not (plain.requireAuth or plain.rejectPregreet or plain.starttls)
    assert (
        ListenerSettings("mx.test", rejectUnauthPipelining=True).sessionSettings(()).rejectPregreet
    )
    assert (
        not ListenerSettings("mx.test", greetPause=1, rejectPregreet=False)
        .sessionSettings(())
        .rejectPregreet
    )
    assert ListenerSettings("mx.test", addDate=False).listenerOptions == {
        "add_message_id": True,
        "add_date": False,
        "bare_newline": "reject",
        "mode": "relay",
        "tls_mode": "none",
    }


def test_limits_only_with_a_limiter_and_auth_only_where_offered() -> None:
    auth = AuthPolicy(
        makePortal([MemoryChecker({})]),
        MemoryAuthThrottle(Clock()),
        AuthSettings(senders={"alice": ("@example.org",)}),
    )
    count = ConnectionCount(3)
    limiter = MemoryRateLimiter(Clock())
    settings = ListenerSettings(
        "mx.test",
        name="tcp:25",
        auth=True,
        messageRateLimit=9,
        limitExceptions=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    context = build(settings, auth=auth, limiter=limiter, connectionCount=count).context
    assert context.auth is auth and context.session.authMechanisms == auth.settings.mechanisms
    assert context.hooks.sender.senders == {"alice": ("@example.org",)}
    limits = context.limits
    assert limits is context.hooks.sender.limits and limits.limiter is limiter and limits.count is count
    assert (limits.listener, limits.active) == ("tcp:25", 3)
    assert limits.settings is settings  # the limits are the listener's settings, not a copy
    assert context.hooks.sender.hasFreeSpace == context.intake.hasFreeSpace
    context = build(dataclasses.replace(settings, auth=False), auth=auth).context
    assert context.auth is None and context.limits is None and context.session.authMechanisms == ()
    assert context.hooks.sender.senders == {}


def test_layers_below_smtp() -> None:
    options = CertificateOptions()
    plain = ListenerSettings("mx.test")
    factory = build(plain)
    assert wrapListenerFactory(plain, factory, Clock()) is factory
    settings = ListenerSettings(
        "mx.test",
        name="tcp:465",
        tlsMode="implicit",
        tlsOptions=options,
        proxyProtocol=True,
        proxyNetworks=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    wrapped = wrapListenerFactory(settings, factory, Clock())
    assert isinstance(wrapped, ProxyProtocolFactory) and wrapped.listenerName == "tcp:465"
    assert wrapped.networks == settings.proxyNetworks
    assert isinstance(wrapped.wrappedFactory, TLSMemoryBIOFactory)
    assert wrapped.wrappedFactory.wrappedFactory is factory


def test_harness_settings_are_the_listener_settings() -> None:
    h = ServerHarness(maxMessageSize=1000, greetPause=1, limits={"exceptions": (), "timeout": 2})
    settings = h.context.settings
    assert (settings.hostname, settings.name, settings.maxMessageSize) == (
        "relay.test",
        "test",
        1000,
    )
    assert h.limits is not None and h.limits.settings.limiterTimeout == 2
    assert h.limits.settings.limitExceptions == () and h.context.session.rejectPregreet
    assert ServerHarness().limits is None


@pytest.mark.parametrize(
    "kw,hint",
    [
        ({"tls": True}, "use tlsMode='starttls'"),
        ({"maxFailures": 3}, "use auth={'maxFailures': ...}"),
        ({"acceptDomains": ["a.example"]}, "use relay={'acceptDomains': [...]}"),
        ({"greetPuase": 1}, "use greetPause=..."),
        ({"limits": {"maxConnectionPerClient": 1}}, "use maxConnectionsPerClient=..."),
        ({"nothingLikeIt": 1}, "use a ListenerSettings field"),
    ],
)
def test_harness_names_the_setting_to_use(kw: dict[str, object], hint: str) -> None:
    with pytest.raises(TypeError) as e:
        ServerHarness(**kw)  # type: ignore[arg-type]
    assert str(e.value).endswith(hint), str(e.value)


def relayConfig(tmp_path: Path, text: str) -> Any:
    """The relay's L{Config} of C{text}, its spool under C{tmp_path}."""
    from mailrelay.config import loadConfig

    path = tmp_path / "relay.toml"
    path.write_text(text)
    return loadConfig(str(path), {"spool": str(tmp_path / "spool")})


def test_the_relay_maps_its_configuration(tmp_path: Path) -> None:
    config = relayConfig(
        tmp_path,
        'hostname = "mx.example.org"\n[relay]\nnetworks = ["192.0.2.0/24"]\n'
        '[[listeners]]\nendpoint = "tcp:2525"\ngreet_pause = 3\nreject_unauth_pipelining = false\n'
        'add_date = false\nnul_bytes = "normalize"\nmax_connections_per_client = 7\n'
        '[rate_limiter]\nplugin = "shared-limits"\ntimeout = 4\n',
    )
    (listener,) = config.listeners
    settings = listener.settings
    assert (settings.hostname, settings.name, settings.mode) == (
        "mx.example.org",
        "tcp:2525",
        "relay",
    )
    assert (settings.greetPause, settings.addDate, settings.nulBytes) == (3.0, False, "normalize")
    assert not settings.rejectUnauthPipelining and settings.rejectPregreet is None
    assert (settings.maxConnectionsPerClient, settings.limiterTimeout) == (7, 4.0)
    assert settings.limitExceptions == tuple(config.relayNetworks)
    assert (settings.idleTimeout, settings.maxMessageSize) == (
        config.idleTimeout,
        config.maxMessageSize,
    )


def test_the_relay_builds_one_intake_per_caller(tmp_path: Path) -> None:
    """C{makeIntake}: the intake of a configuration, for the listeners (telling the queue) or
    for a maker of notifications (telling nobody)."""
    from mailrelay.app.listeners import makeIntake

    config = relayConfig(
        tmp_path,
        'hostname = "mx.example.org"\n[limits]\nhops = 7\n'
        '[[header_stampers]]\nplugin = "default"\ntimeout = 3\n'
        '[[header_stampers]]\nplugin = "other"\n',
    )
    built: list[tuple[str, object]] = []

    def build(spec: object, interface: object) -> object:
        stamper = object()
        built.append((spec.plugin, interface))  # type: ignore[attr-defined]
        return stamper

    spool, clock, queued = MemorySpool(), Clock(), []
    intake = makeIntake(config, clock, build, spool, queued.append)
    assert (intake.spool, intake.clock, intake.hostname, intake.maxHops) == (
        spool,
        clock,
        "mx.example.org",
        7,
    )
    assert [(s.name, s.timeout) for s in intake.stampers] == [("default", 3.0), ("other", 30.0)]
    assert [name for name, _ in built] == ["default", "other"]
    assert intake.notify == queued.append
    assert makeIntake(config, clock, build, spool).notify is None


# The listen backlog ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "backlog"),
    [
        ("tcp:2525:interface=127.0.0.1", 1024),  # none set: the relay's default
        ("tcp6:2525:interface=\\:\\:1", 1024),
        ("tcp:2525:backlog=7:interface=127.0.0.1", 7),  # set: kept
        ("tcp:backlog=3000:2525", 3000),
    ],
)
def test_a_listener_listens_with_a_backlog_that_holds_bursts(description: str, backlog: int) -> None:
    """Twisted's default backlog (50) drops SYNs when a few hundred clients connect at once;
    a listener whose endpoint sets no C{backlog=} asks for 1024 (the kernel caps it at
    somaxconn); one that sets it gets what it set."""
    from twisted.internet.testing import MemoryReactor

    from mailrelay.app.listeners import ListenerService

    reactor = MemoryReactor()
    ListenerService(reactor, description, build(ListenerSettings(hostname="mx.test"))).listen()
    [(port, _, listened, interface)] = reactor.tcpServers
    assert (port, listened) == (2525, backlog)
    assert interface == ("::1" if description.startswith("tcp6") else "127.0.0.1" if "interface" in description else "")


def test_a_unix_listener_gets_the_default_backlog_too(tmp_path: Path) -> None:
    from twisted.internet.testing import MemoryReactor

    from mailrelay.app.listeners import ListenerService

    reactor = MemoryReactor()
    path = tmp_path / "smtp.sock"
    ListenerService(reactor, f"unix:{path}:mode=600", build(ListenerSettings(hostname="mx.test"))).listen()
    [(address, _, listened, mode, _)] = reactor.unixServers
    assert (address, listened, mode) == (str(path), 1024, 0o600)


def test_other_endpoint_types_are_left_alone() -> None:
    from mailrelay.app.listeners import withDefaultBacklog

    assert withDefaultBacklog("systemd:domain=INET:index=0") == "systemd:domain=INET:index=0"
    assert withDefaultBacklog("tcp:25:interface=192.0.2.1") == "tcp:backlog=1024:25:interface=192.0.2.1"
    assert withDefaultBacklog("tcp:25:backlog=5") == "tcp:25:backlog=5"


# A listener that cannot listen -------------------------------------------------------------


@pytest.mark.parametrize(
    "description", ["systemd:domain=INET:index=0", "systemd:domain=UNIX:name=smtp"]
)
def test_a_systemd_listener_without_its_socket_says_where_and_why(
    description: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A systemd: endpoint whose socket systemd did not pass (the relay not started by a
    socket unit): the error names where the endpoint is set, the endpoint and why.  It was
    an IndexError or a KeyError out of Twisted's parser: a traceback at start-up,
    "unexpected error: IndexError('list index out of range')" at a reload."""
    from twisted.internet.endpoints import _SystemdParser
    from twisted.internet.testing import MemoryReactor
    from twisted.python.systemd import ListenFDs

    from mailrelay.app.listeners import ListenError, ListenerService

    monkeypatch.setattr(_SystemdParser, "_sddaemon", ListenFDs([], ()))  # (none passed)
    listener = ListenerService(MemoryReactor(), description,
                               build(ListenerSettings(hostname="mx.test")),
                               where="relay.toml: listeners[1].endpoint")
    with pytest.raises(ListenError) as e:
        listener.listen()
    assert str(e.value) == (
        f"relay.toml: listeners[1].endpoint: cannot listen on {description}: systemd passed "
        "this process no socket (LISTEN_FDS): a systemd: endpoint needs the relay started by "
        "a systemd socket unit")


def test_a_unix_listener_whose_directory_is_missing_says_so(tmp_path: Path) -> None:
    """A C{unix:} listener whose directory does not exist (or is a file): the error names
    where it is set, the listener, the directory and what to do.  It was Twisted's lock
    file's error: "[Errno 2] No such file or directory: '10062' -> b'.../smtp.sock.lock'"."""
    from twisted.internet.testing import MemoryReactor

    from mailrelay.app.listeners import ListenError, ListenerService

    (tmp_path / "file").write_text("")
    for directory, problem in ((tmp_path / "missing", "does not exist"),
                               (tmp_path / "file", "is not a directory")):
        description = f"unix:{directory}/smtp.sock:mode=600"
        reactor = MemoryReactor()
        listener = ListenerService(reactor, description,
                                   build(ListenerSettings(hostname="mx.test")),
                                   where="relay.toml: listeners[1].endpoint")
        with pytest.raises(ListenError) as e:
            listener.listen()
        assert str(e.value) == (
            f"relay.toml: listeners[1].endpoint: cannot listen on {description}: the socket's "
            f"directory {directory} {problem}: create it (the relay makes its socket and a "
            "lock file beside it there), or name a socket in an existing directory")
        assert reactor.unixServers == []


def test_a_listener_on_a_port_in_use_says_where_it_is_set() -> None:
    import socket

    from twisted.internet import reactor

    from mailrelay.app.listeners import ListenError, ListenerService

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        description = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        listener = ListenerService(reactor, description,
                                   build(ListenerSettings(hostname="mx.test")),
                                   where="relay.toml: listeners[1].endpoint")
        with pytest.raises(ListenError) as e:
            listener.listen()
    message = str(e.value)
    assert message.startswith(
        f"relay.toml: listeners[1].endpoint: cannot listen on {description}: "), message
    assert "Address already in use" in message
