"""End-to-end over IPv6: the real C{twistd -n mailrelay} on C{::1} and C{[::]} listeners,
with IPv6 and IPv4 clients."""

from __future__ import annotations

import json
import re
import smtplib
import socket
from pathlib import Path

import pytest

from tests.harness import RelayProcess
from tests.test_e2e_inbound import relay  # noqa: F401, F811 - the fixture: relays that hold their mail


def _hasIPv6Loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _hasIPv6Loopback(), reason="no IPv6 loopback address")


def send(host: str, port: int, recipient: str = "bob@example.org") -> str:
    """One message from C{host}'s side to the relay at C{port}; its queue id."""
    with smtplib.SMTP(host, port, local_hostname="client.example", timeout=10) as client:
        client.sendmail("alice@example.com", [recipient], b"Subject: hi\r\n\r\nHi.\r\n")
        code, text = client.noop()
    assert code == 250, text
    return text.decode()


def queued(r: RelayProcess) -> list[tuple[dict, bytes]]:
    return [(json.loads((r.spool / "queue" / f"{q}.json").read_text()),
             (r.spool / "queue" / f"{q}.eml").read_bytes()) for q in r.queued()]


def test_an_ipv4_client_of_a_listener_on_every_address_is_known_by_its_ipv4_address(relay) -> None:  # noqa: F811
    """Where IPv6 sockets take IPv4 too (Linux's default), an IPv4 client of a C{[::]}
    listener comes as C{::ffff:127.0.0.1}: the log, the envelope and C{Received:} say
    127.0.0.1, as Postfix's smtpd does."""
    if Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() != "0":
        pytest.skip("IPv6 sockets take no IPv4 connections here (net.ipv6.bindv6only = 1)")
    r = relay(None, "--listen", r"tcp6:0:interface=\:\:", "--relay-network", "127.0.0.0/8")
    send("127.0.0.1", r.port)
    r.waitForLog(r"disconnect from ")
    ((envelope, message),) = queued(r)
    assert envelope["client"]["address"] == "127.0.0.1"
    assert re.match(rb"Received: from client\.example \(\S+ \[127\.0\.0\.1\]\)", message), message[:80]
    log = r.log()
    assert "connect from 127.0.0.1:" in log and " client=127.0.0.1 " in log
    assert "ffff" not in log
