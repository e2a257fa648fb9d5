"""End-to-end: sender routes ([[sender_routes]], Postfix's sender_dependent_relayhost_maps
with smtp_sender_dependent_authentication = yes).  The real relay, a smarthost and two
providers (aiosmtpd next hops requiring AUTH): the mail of each sender arrives at its own
provider, logged in as its own user; other senders' mail at the smarthost; a [[routes]]
rule for the recipient wins over the sender's route."""

from __future__ import annotations

import smtplib
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.test_e2e_outbound import (  # noqa: F401 - fixtures
    Recorder,
    _TCPController,
    config,
    dns,
    nexthop,
    relay,
    smtpRoute,
    submit,
)


class LoginRecorder(Recorder):
    """A L{Recorder} that also records, for each message accepted, the user the client
    logged in as (C{users}, in the order of C{accepted})."""

    def __init__(self) -> None:
        super().__init__()
        self.users: list[tuple[str, str | None]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.cond:
            self.users.append((envelope.mail_from, session.auth_data))
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def provider():
    """C{provider(accounts)}: an aiosmtpd next hop on 127.0.0.1 requiring AUTH (over plain
    text: the relay's routes say C{auth_without_tls}) for the C{user: password} pairs of
    C{accounts}: C{(LoginRecorder, port)}.  Stopped in teardown."""
    controllers: list[Any] = []

    def start(accounts: dict[str, str]) -> tuple[LoginRecorder, int]:
        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                          data: Any) -> AuthResult:
            if isinstance(data, LoginPassword):
                user = data.login.decode()
                if accounts.get(user) == data.password.decode():
                    return AuthResult(success=True, auth_data=user)
            return AuthResult(success=False, handled=False, message="535 5.7.8 go away")

        recorder = LoginRecorder()
        controller = _TCPController(recorder, hostname="127.0.0.1", port=0, ready_timeout=10,
                                    authenticator=authenticator, auth_required=True,
                                    auth_require_tls=False)
        controller.start()
        controllers.append(controller)
        return recorder, controller.port

    yield start
    for controller in controllers:
        controller.stop()


def senderRoute(sender: str, port: int, user: str) -> str:
    return (
        f'[[sender_routes]]\nsender = "{sender}"\nnexthop = "[127.0.0.1]:{port}"\n'
        f'tls = "none"\nauth_without_tls = true\nusername = "{user}"\n'
        f'password = "{user}-secret"\n'
    )


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_each_sender_through_its_own_provider_as_its_own_user(
    dns, relay, nexthop, provider,  # noqa: F811 - fixtures
) -> None:
    """@a.example's mail goes to provider A as user a; @b.example's to provider B as b, and
    boss@b.example's to B too but as b-boss (the address before the domain): deliveries to
    one next hop with other credentials do not share a connection.  Another sender's mail
    goes to the smarthost; a [[routes]] rule for the recipient wins over a sender route."""
    providerA, portA = provider({"a": "a-secret"})
    providerB, portB = provider({"b": "b-secret", "b-boss": "b-boss-secret"})
    smarthost, smarthostPort = nexthop()
    routed, routedPort = nexthop()
    r = relay(
        config(dns, routes=[smtpRoute("routed.test", routedPort)])
        + f'[relay]\nsmarthost = "[127.0.0.1]:{smarthostPort}"\n'
        + senderRoute("@a.example", portA, "a")
        + senderRoute("@B.example", portB, "b")
        + senderRoute("boss@b.example", portB, "b-boss")
    )
    message = b"Subject: sender routes\r\n\r\nhi\r\n"
    submit(r, "ann@a.example", ["x@one.test"], message)
    submit(r, "bob@b.example", ["y@one.test"], message)
    submit(r, "Boss@b.example", ["z@one.test"], message)
    submit(r, "cy@c.example", ["w@one.test"], message)
    submit(r, "ann@a.example", ["v@routed.test"], message)

    assert [m.mailFrom for m in providerA.waitTo("x@one.test")] == ["ann@a.example"]
    providerB.waitTo("y@one.test")
    providerB.waitTo("z@one.test")
    assert [m.mailFrom for m in smarthost.waitTo("w@one.test")] == ["cy@c.example"]
    assert [m.mailFrom for m in routed.waitTo("v@routed.test")] == ["ann@a.example"]
    assert providerA.users == [("ann@a.example", "a")]
    assert sorted(providerB.users) == [("Boss@b.example", "b-boss"), ("bob@b.example", "b")]
    assert len(providerA.accepted) == 1 and len(providerB.accepted) == 2
    for address in ("x@one.test", "y@one.test", "z@one.test", "w@one.test", "v@routed.test"):
        r.waitForLog(rf"to=<{address}>.*status=sent")


def test_postmaster_mail_a_sender_route_takes_is_accepted(
    dns, relay, nexthop,  # noqa: F811 - fixtures
) -> None:
    """No [queue] postmaster, nothing routing the relay's host name but its MX lookup: mail
    to postmaster@relay.test is refused at RCPT (550 5.1.1) as having nowhere to go -- but
    not from a sender whose sender route takes it to its relay host, as its delivery does
    (a [[routes]] rule for the recipient, then the sender route, then the smarthost, then
    MX: Postfix's trivial-rewrite resolve.c).  It was refused from every sender; the
    start-up warning names the senders it is accepted from."""
    hop, port = nexthop()
    text = config(dns) + (f'[[sender_routes]]\nsender = "@a.example"\n'
                          f'nexthop = "[127.0.0.1]:{port}"\ntls = "none"\n')
    r = relay(text)
    r.waitForLog(r"is refused \(550 5\.1\.1\) but from the senders of \[\[sender_routes\]\] "
                 r"that route it \(@a\.example\), and bounces")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        s.ehlo("client.test")
        assert s.mail("bob@b.example")[0] == 250
        assert s.rcpt("postmaster@relay.test") == (
            550, b"5.1.1 Recipient address rejected: this relay has no mailbox for its "
                 b"postmaster")
        s.rset()
        assert s.mail("alice@a.example")[0] == 250
        assert s.rcpt("postmaster@relay.test") == (250, b"2.1.5 Ok")
        assert s.rcpt("postmaster") == (250, b"2.1.5 Ok")
        code, reply = s.data(b"Subject: hello postmaster\r\n\r\nHello.\r\n")
        assert code == 250, reply
    (received,) = hop.waitTo("postmaster@relay.test")
    assert received.mailFrom == "alice@a.example"
    assert received.rcptTos == ["postmaster@relay.test"]  # (the same address twice: once)


def _canonicalRelay(dns: Any, relay: Any, nexthop: Any, tmp_path: Any,  # noqa: F811
                    text: str) -> tuple[Any, Any, Any]:
    """A relay whose sender route of @a.example goes to a next hop, with sender-canonical
    rewriting the envelope sender by a table of C{text}: the relay, the next hop, the
    table's path."""
    hop, port = nexthop()
    table = tmp_path / "canonical"
    table.write_text(text)
    r = relay(config(dns) + (f'[[sender_routes]]\nsender = "@a.example"\n'
                             f'nexthop = "[127.0.0.1]:{port}"\ntls = "none"\n'
                             f'[[plugins]]\nplugin = "sender-canonical"\nmap = "{table}"\n'
                             'classes = ["envelope_sender"]\n'))
    return r, hop, table


def _sendsToPostmaster(s: smtplib.SMTP, hop: Any, sender: str, routedAs: str) -> None:
    """Mail from C{sender} to postmaster@relay.test is accepted on C{s} and reaches C{hop}
    from C{routedAs}."""
    assert s.mail(sender)[0] == 250
    assert s.rcpt("postmaster@relay.test") == (250, b"2.1.5 Ok")
    code, reply = s.data(b"Subject: hello postmaster\r\n\r\nHello.\r\n")
    assert code == 250, reply
    (received,) = hop.waitTo("postmaster@relay.test")
    assert received.mailFrom == routedAs


def test_postmaster_mail_is_judged_by_the_sender_sender_canonical_makes(
    dns, relay, nexthop, tmp_path,  # noqa: F811 - fixtures
) -> None:
    """The postmaster rule at RCPT asks the routing table with the sender the delivery will
    route by: root@web1.internal, which sender-canonical rewrites to ops@a.example at the
    end of data, has its mail to postmaster accepted (the sender route of @a.example takes
    it, as it does at delivery), where it was refused as having nowhere to go."""
    r, hop, table = _canonicalRelay(dns, relay, nexthop, tmp_path, "root@web1.internal ops@a.example\n")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        s.ehlo("client.test")
        assert s.mail("bob@web1.internal")[0] == 250
        assert s.rcpt("postmaster@relay.test")[0] == 550
        s.rset()
        _sendsToPostmaster(s, hop, "root@web1.internal", "ops@a.example")


def test_postmaster_mail_is_judged_by_the_canonical_table_as_it_is_now(
    dns, relay, nexthop, tmp_path,  # noqa: F811 - fixtures
) -> None:
    """The sender-canonical map is read again when its file changes (no reload needed):
    the postmaster rule at RCPT asks with the map as it is then, as the message's filter
    will rewrite, not with the map the process read for its last message -- here the one
    of its start, as it only refused postmaster mail since."""
    r, hop, table = _canonicalRelay(dns, relay, nexthop, tmp_path, "bob@web1.internal bob@web1.internal\n")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        s.ehlo("client.test")
        assert s.mail("root@web1.internal")[0] == 250
        assert s.rcpt("postmaster@relay.test")[0] == 550
    table.write_text("root@web1.internal ops@a.example\n")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=15) as s:
        s.ehlo("client.test")
        _sendsToPostmaster(s, hop, "root@web1.internal", "ops@a.example")
