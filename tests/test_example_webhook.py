"""The example site delivery backend, C{examples/http-webhook}: unit tests with a fake HTTP
agent, under the relay's queue manager (QueueHarness), and end to end in the real twistd
with a real HTTP server."""

from __future__ import annotations

import importlib
import os
import smtplib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from mailrelay.errors import ConfigError
from mailrelay.interfaces import DeliveryStatus, IDeliveryBackend, Route
from mailrelay.route.table import RouteRule
from mailrelay.testing import QueueHarness, buildPlugin, makeEnvelope
from tests.tlscerts import CA, handshake

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "http-webhook"


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example's module, found as the relay finds it (on PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import twisted.plugins

    monkeypatch.setattr(twisted.plugins, "__path__", [*twisted.plugins.__path__,
                                                      str(EXAMPLE / "twisted" / "plugins")])
    return importlib.import_module("http_webhook")


class Response:
    """Enough of an C{IResponse} for C{readBody}."""

    def __init__(self, code: int, phrase: bytes = b"", body: bytes = b"") -> None:
        self.code = code
        self.phrase = phrase
        self.headers = Headers()
        self.length = len(body)
        self.body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        protocol.dataReceived(self.body)
        from twisted.python.failure import Failure

        protocol.connectionLost(Failure(ResponseDone()))


class Agent:
    """Answers each request with the next of C{answers}, recording the requests."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[bytes, bytes, Headers, bytes]] = []

    def request(self, method: bytes, url: bytes, headers: Headers, body: Any) -> Deferred[Any]:
        chunks: list[bytes] = []

        class Consumer:
            def write(self, data: bytes) -> None:
                chunks.append(data)

        from twisted.internet.task import Cooperator

        body._cooperate = Cooperator(scheduler=lambda f: f()).cooperate  # at once
        body.startProducing(Consumer())
        self.requests.append((method, url, headers, b"".join(chunks)))
        answer = self.answers.pop(0)
        return answer if isinstance(answer, Deferred) else succeed(answer)


def backend(example: ModuleType, *answers: Any, token: str | None = None) -> Any:
    from twisted.internet.defer import maybeDeferred

    return example.WebhookBackend("https://hooks.example/mail", Agent(*answers), maybeDeferred,
                                  token)


def deliver(hook: Any, tmp_path: Path, recipients: list[str]) -> Any:
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: hi\r\n\r\nHello.\r\n")
    envelope = makeEnvelope("alice@example.org", recipients, queueID="01KQUEUEID0000000000000000")
    box: list[Any] = []
    hook.deliver(envelope, envelope.recipients, Route("webhook", "webhook"), path).addBoth(box.append)
    return box[0]


@pytest.mark.parametrize(
    ("code", "status", "rfc3463"),
    [
        (200, DeliveryStatus.DELIVERED, "2.0.0"),
        (204, DeliveryStatus.DELIVERED, "2.0.0"),
        (404, DeliveryStatus.PERMANENT, "5.1.1"),
        (403, DeliveryStatus.PERMANENT, "5.3.0"),
        (429, DeliveryStatus.TRANSIENT, "4.4.1"),
        (503, DeliveryStatus.TRANSIENT, "4.4.1"),
    ],
)
def test_the_answer_decides_for_every_recipient(
    example: ModuleType, tmp_path: Path, code: int, status: DeliveryStatus, rfc3463: str
) -> None:
    hook = backend(example, Response(code, b"Reason"), token="s3cret")
    results = deliver(hook, tmp_path, ["a@hooks.example", "b@hooks.example"])
    assert [(r.address, r.status, r.code) for r in results] == [
        ("a@hooks.example", status, rfc3463), ("b@hooks.example", status, rfc3463)
    ]
    assert results[0].diagnostic == f"http; {code} Reason"
    [(method, url, headers, body)] = hook.agent.requests
    assert (method, url, body) == (b"POST", b"https://hooks.example/mail",
                                   b"Subject: hi\r\n\r\nHello.\r\n")
    assert headers.getRawHeaders(b"X-Mailrelay-Recipient") == [b"a@hooks.example",
                                                                b"b@hooks.example"]
    assert headers.getRawHeaders(b"X-Mailrelay-Sender") == [b"alice@example.org"]
    assert headers.getRawHeaders(b"Authorization") == [b"Bearer s3cret"]


def test_an_unreachable_hook_defers(example: ModuleType, tmp_path: Path) -> None:
    hook = backend(example, fail(ConnectionRefusedError("hooks.example")))
    [result] = deliver(hook, tmp_path, ["a@hooks.example"])
    assert result.status is DeliveryStatus.TRANSIENT
    assert result.diagnostic.startswith("X-mailrelay; web hook not reached: Connection was refused")


def test_https_checks_the_names_of_the_hooks_certificate(example: ModuleType) -> None:
    """A certificate from a trusted CA whose names cannot be read (here a wildcard over a
    whole top-level domain, beside a name that is not the hook's) is refused: Twisted's own
    check (Agent's default policy) only logs that and goes on as verified."""
    ca = CA()
    policy = example.VerifyingPolicyForHTTPS(ca.trustRoot)
    failure = handshake(policy.creatorForNetloc(b"hook.test", 443),
                        ca.issue("x", ("other.test", "*.test")))
    assert failure is not None and "*.test" in str(failure.value)
    failure = handshake(policy.creatorForNetloc(b"hook.test", 443), ca.issue("x", ("other.test",)))
    assert failure is not None and "hook.test is not a name of the certificate" in str(
        failure.value)
    assert handshake(policy.creatorForNetloc(b"hook.test", 443),
                     ca.issue("x", ("hook.test",))) is None


def test_build_through_discovery_and_its_option_errors(example: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("abc\n")
    hook = buildPlugin("http-webhook", {"url": "https://h.example/x", "token_file": "token"},
                       tmp_path)
    verifyObject(IDeliveryBackend, hook)
    assert hook.token == "abc"
    with pytest.raises(ConfigError, match="url: is required"):
        buildPlugin("http-webhook", {}, tmp_path)
    with pytest.raises(ConfigError, match="url: must be an http:// or https:// URL"):
        buildPlugin("http-webhook", {"url": "ftp://x"}, tmp_path)
    with pytest.raises(ConfigError, match="token_file: cannot read a token from"):
        buildPlugin("http-webhook", {"url": "http://x", "token_file": "none"}, tmp_path)


def test_under_the_queue_manager_retries_then_bounces(example: ModuleType, tmp_path: Path) -> None:
    hook = backend(example, Response(503, b"Busy"), Response(410, b"Gone"))
    h = QueueHarness(tmp_path, {"webhook": hook}, routes=[RouteRule("*", "webhook")],
                     minBackoff=60)
    queueID = h.submit("alice@example.org", ["bob@hooks.example"])
    envelope = h.envelope(queueID)
    assert envelope is not None and envelope.recipients[0].lastResult == "http; 503 Busy"
    hook.agent.answers.append(Response(200))  # (for the bounce, routed to the hook too)
    h.clock.advance(60)
    [(dsn, message)] = h.notifications()
    assert b"Status: 5.1.1" in message and b"http; 410 Gone" in message


# -- end to end


class Hook(BaseHTTPRequestHandler):
    """A web hook answering each POST with the status its recipient's local part names."""

    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        recipients = self.headers.get_all("X-Mailrelay-Recipient") or []
        Hook.received.append({"recipients": recipients, "body": body,
                              "sender": self.headers["X-Mailrelay-Sender"],
                              "port": self.server.server_address[1]})
        code = int(recipients[0].split("@")[0].removeprefix("status")) if recipients else 500
        self.send_response(code, "Answer")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook():
    """C{start(sslContext=None)}: a L{Hook} server on 127.0.0.1 (over TLS with
    C{sslContext}), shut down in teardown: its port."""
    servers: list[ThreadingHTTPServer] = []

    def start(sslContext: Any = None) -> int:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        if sslContext is not None:
            server.socket = sslContext.wrap_socket(server.socket, server_side=True)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _hookRelay(relays: Any, url: str, **env: str) -> Any:
    """A started relay sending the mail for C{hooks.test} to the web hook at C{url}, the
    rest discarded; C{env}: more of its environment."""
    config = ("[dns]\nreverse_lookups = false\n"
              f'[[backends]]\nname = "webhook"\nplugin = "http-webhook"\nurl = "{url}"\n'
              "timeout = 20\n"
              '[[routes]]\ndomain = "hooks.test"\nbackend = "webhook"\n'
              '[[routes]]\ndomain = "*"\nbackend = "discard"\n')
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")])
    return relays(config, env=env).start()


def test_the_real_relay_posts_to_a_real_hook(relays, hook) -> None:
    r = _hookRelay(relays, f"http://127.0.0.1:{hook()}/mail")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.sendmail("alice@example.org", ["status200@hooks.test"],
                   "Subject: to the hook\r\n\r\nHello, hook.\r\n")
        s.sendmail("alice@example.org", ["status404@hooks.test"],
                   "Subject: to nobody\r\n\r\nHello?\r\n")
    r.waitForLog(r"to=<status200@hooks\.test>, relay=webhook, .*status=sent "
                 r"\(http; 200 Answer\)")
    r.waitForLog(r"to=<status404@hooks\.test>, .*status=bounced \(http; 404 Answer\)")
    delivered = next(m for m in Hook.received if m["recipients"] == ["status200@hooks.test"])
    assert delivered["sender"] == "alice@example.org"
    assert b"Subject: to the hook\r\n" in delivered["body"]
    assert delivered["body"].startswith(b"Received: from ")


@pytest.mark.parametrize(("names", "outcome"), [
    (("localhost",), "sent"),
    # Trusted, but names that cannot be checked (and none the hook's): never as verified.
    (("other.test", "*.test"), "deferred"),
])
def test_the_real_relay_checks_the_names_of_an_https_hook(
    relays, hook, tmp_path: Path, names: tuple[str, ...], outcome: str
) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = hook(context)
    # (SSL_CERT_FILE: the platform's trust store)
    r = _hookRelay(relays, f"https://localhost:{port}/mail",
                   SSL_CERT_FILE=str(tmp_path / "ca.pem"))
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as s:
        s.sendmail("alice@example.org", ["status200@hooks.test"],
                   "Subject: to the hook\r\n\r\nHello, hook.\r\n")
    m = r.waitForLog(r"to=<status200@hooks\.test>, relay=webhook, .*status=(\w+) (.*)")
    assert m.group(1) == outcome, m.group(0)
    if outcome == "deferred":
        assert ("web hook not reached: certificate host name mismatch (its names cannot "
                "be checked: ") in m.group(2), m.group(2)
        assert [h for h in Hook.received if h["port"] == port] == []
