"""End-to-end: [delivery] source_address (Postfix's smtp_bind_address): the real relay
connects to its next hop from the address configured, which the next hop sees."""

from __future__ import annotations

from typing import Any

from tests.test_e2e_outbound import (  # noqa: F401 - fixtures
    Recorder,
    _TCPController,
    config,
    dns,
    nexthop,
    relay,
    smtpRoute,
    submit,
    waitResult,
)


def test_the_next_hop_sees_the_source_address(dns, relay, nexthop) -> None:  # noqa: F811
    """Bound to 127.0.0.2, the relay's connection to a next hop on 127.0.0.1 comes from
    127.0.0.2; without source_address, from the system's choice (127.0.0.1)."""
    hop, port = nexthop()
    bound = relay(config(dns, delivery={"source_address": "127.0.0.2"},
                         routes=[smtpRoute("one.test", port)]))
    submit(bound, "alice@example.com", ["bob@one.test"], b"Subject: bound\r\n\r\nhi\r\n")
    (message,) = hop.waitTo("bob@one.test")
    assert message.peer[0] == "127.0.0.2"
    bound.waitForLog(r"to=<bob@one\.test>.*status=sent")
    unbound = relay(config(dns, routes=[smtpRoute("one.test", port)]))
    submit(unbound, "alice@example.com", ["carol@one.test"], b"Subject: free\r\n\r\nhi\r\n")
    (message,) = hop.waitTo("carol@one.test")
    assert message.peer[0] == "127.0.0.1"


def test_a_sender_route_has_its_own_source_address(dns, relay, nexthop) -> None:  # noqa: F811
    """A sender route's source_address replaces [delivery]'s for its sender's mail only:
    two companies relayed by one host leave from their own addresses."""
    hop, port = nexthop()
    r = relay(
        config(dns, delivery={"source_address": "127.0.0.2"})
        + f'[relay]\nsmarthost = "[127.0.0.1]:{port}"\n'
        + f'[[sender_routes]]\nsender = "@a.example"\nnexthop = "[127.0.0.1]:{port}"\n'
        + 'source_address = "127.0.0.3"\n'
    )
    submit(r, "ann@a.example", ["x@one.test"], b"Subject: a\r\n\r\nhi\r\n")
    submit(r, "bob@b.example", ["y@one.test"], b"Subject: b\r\n\r\nhi\r\n")
    assert [m.peer[0] for m in hop.waitTo("x@one.test")] == ["127.0.0.3"]
    assert [m.peer[0] for m in hop.waitTo("y@one.test")] == ["127.0.0.2"]


def test_an_ipv4_mapped_next_hop_is_reached_from_the_source_address(
    dns, relay, nexthop  # noqa: F811
) -> None:
    """A next hop at an IPv4-mapped address ([::ffff:127.0.0.1]) is an IPv4 one: the relay
    reaches it from [delivery] source_address, never from the system's choice."""
    hop, port = nexthop()
    r = relay(config(dns, delivery={"source_address": "127.0.0.2"}, routes=[
        {"domain": "one.test", "backend": "smtp", "nexthop": f"[::ffff:127.0.0.1]:{port}"}]))
    submit(r, "alice@example.com", ["bob@one.test"], b"Subject: mapped\r\n\r\nhi\r\n")
    (message,) = hop.waitTo("bob@one.test")
    assert message.peer[0] == "127.0.0.2"
    r.waitForLog(r"to=<bob@one\.test>.*status=sent")


class _RefusesOneAddress(Recorder):
    """A next hop whose EHLO from 127.0.0.3 gets a 421 (a server that will not serve that
    address); from any other address, an ordinary one."""

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        if session.peer[0] == "127.0.0.3":
            return ["421 4.3.2 not from 127.0.0.3"]
        session.host_name = hostname
        return responses


def test_a_next_hop_refusing_one_source_address_is_suspended_from_it_only(
    dns, relay  # noqa: F811
) -> None:
    """A next hop that refuses the relay from one route's source address is suspended from
    that address only (Postfix keeps dead destinations per transport, and a bind address is
    a transport's): the mail of the route from another address still goes at once."""
    hop = _TCPController(_RefusesOneAddress(), hostname="127.0.0.1", port=0, ready_timeout=10)
    hop.start()
    try:
        bound = smtpRoute("a.test", hop.port) | {"source_address": "127.0.0.3"}
        r = relay(config(dns, delivery={"destination_concurrency": 1},
                         routes=[bound, smtpRoute("b.test", hop.port)]))
        qid = submit(r, "alice@example.com", ["x@a.test"], b"Subject: a\r\n\r\nhi\r\n")
        m = waitResult(r, qid, "x@a.test")
        assert m["status"] == "deferred", m[0]
        r.waitForLog(rf"SMTP delivery to \[127\.0\.0\.1\]:{hop.port} from 127\.0\.0\.3 "
                     r"temporarily suspended for \d+s after 1 failure\(s\) in a row: ")
        qid = submit(r, "alice@example.com", ["y@b.test"], b"Subject: b\r\n\r\nhi\r\n")
        m = waitResult(r, qid, "y@b.test")
        assert m["status"] == "sent", m[0]
        assert [m.peer[0] for m in hop.handler.waitTo("y@b.test")] == ["127.0.0.1"]
        assert hop.handler.to("x@a.test") == []
    finally:
        hop.stop()
