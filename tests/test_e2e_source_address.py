"""End-to-end: [delivery] source_address (Postfix's smtp_bind_address): the real relay
connects to its next hop from the address configured, which the next hop sees."""

from __future__ import annotations

from tests.test_e2e_outbound import (  # noqa: F401 - fixtures
    config,
    dns,
    nexthop,
    relay,
    smtpRoute,
    submit,
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
