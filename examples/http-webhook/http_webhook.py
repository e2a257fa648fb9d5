"""An example site delivery backend: each message is POSTed to an HTTP(S) web hook.

One request per delivery (one message, the recipients of one route): the message as the body
(C{Content-Type: message/rfc822}, CRLF lines, as spooled), the envelope in headers::

    POST /mail HTTP/1.1
    Content-Type: message/rfc822
    X-Mailrelay-Queue-Id: 01K1...
    X-Mailrelay-Sender: alice@example.org          (empty for a bounce)
    X-Mailrelay-Recipient: bob@hooks.example       (one header per recipient)
    Authorization: Bearer <the token of token_file>

What the hook answers decides for every recipient of the request:

  - 2xx: delivered (2.0.0);
  - 408, 429 and 5xx, or no answer (connection refused, TLS failure, the backend's timeout):
    deferred and retried (4.4.1 or 4.3.0);
  - any other 4xx: bounced (5.1.1 for 404 and 410, else 5.3.0).

The diagnostic is C{"http; <code> <reason>"}, as the DSN and the log show it.

Options (C{[[backends]]}, besides C{name}, C{plugin} and C{timeout}):

  - C{url} (required): C{http://} or C{https://} (certificates verified against the
    platform's trust store, their names checked by the relay: L{VerifyingPolicyForHTTPS});
  - C{token_file}: a file whose first line is a bearer token.

The message file is read in the reactor's thread pool; the request is made with Twisted's
own HTTP client (C{twisted.web.client.Agent}), never blocking; cancelling a delivery (the
backend's timeout) aborts the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from mailrelay.config.schema import Key, pluginOptions
from mailrelay.config.values import fileName, nonEmpty
from mailrelay.delivery import resultsForAll
from mailrelay.delivery.tls import describeTLSFailure, verifiedClientTLS
from mailrelay.errors import ConfigError
from mailrelay.interfaces import DeliveryStatus, IDeliveryBackend, PluginContext

log = Logger()

__all__ = ["VerifyingPolicyForHTTPS", "WebhookBackend", "build", "statusOf"]


def statusOf(code: int) -> tuple[DeliveryStatus, str]:
    """What an HTTP status code means for the recipients: a delivery status and its RFC 3463
    code."""
    if 200 <= code < 300:
        return DeliveryStatus.DELIVERED, "2.0.0"
    if code in (408, 429) or code >= 500:
        return DeliveryStatus.TRANSIENT, "4.4.1"
    if code in (404, 410):
        return DeliveryStatus.PERMANENT, "5.1.1"
    if 400 <= code < 500:
        return DeliveryStatus.PERMANENT, "5.3.0"
    return DeliveryStatus.TRANSIENT, "4.3.0"  # 1xx, 3xx: not followed, tried again later


@implementer(IDeliveryBackend)
class WebhookBackend:
    """POSTs each delivery to C{url} (see the module docstring).

    @ivar agent: an C{IAgent} (Twisted's C{Agent}; a fake one in tests).
    """

    def __init__(
        self, url: str, agent: Any, deferToThread: Any, token: str | None = None
    ) -> None:
        self.url = url.encode("ascii")
        self.agent = agent
        self.deferToThread = deferToThread
        self.token = token

    def deliver(
        self, envelope: Any, recipients: Sequence[Any], route: Any, messagePath: Path
    ) -> Deferred[list[Any]]:
        d: Deferred[Any] = self.deferToThread(messagePath.read_bytes)
        d.addCallback(self._post, envelope, recipients)
        d.addCallback(self._answered, envelope, recipients)
        d.addErrback(self._failed, envelope, recipients)
        return d

    def _post(self, message: bytes, envelope: Any, recipients: Sequence[Any]) -> Deferred[Any]:
        headers = Headers({
            b"Content-Type": [b"message/rfc822"],
            b"X-Mailrelay-Queue-Id": [str(envelope.queueID).encode("ascii")],
            b"X-Mailrelay-Sender": [envelope.sender.encode("utf-8")],
            b"X-Mailrelay-Recipient": [r.address.encode("utf-8") for r in recipients],
        })
        if self.token is not None:
            headers.addRawHeader(b"Authorization", b"Bearer " + self.token.encode("ascii"))
        body = FileBodyProducer(BytesIO(message))
        d: Deferred[Any] = self.agent.request(b"POST", self.url, headers, body)
        return d

    def _answered(self, response: Any, envelope: Any, recipients: Sequence[Any]) -> Deferred[Any]:
        status, code = statusOf(response.code)
        reason = response.phrase.decode("latin-1", "replace") if response.phrase else ""
        diagnostic = f"http; {response.code} {reason}".strip()
        log.info(
            "{queueID}: web hook answered {code} for {count} recipient(s)",
            queueID=envelope.queueID,
            code=response.code,
            count=len(recipients),
        )

        def results(_: object) -> list[Any]:
            return resultsForAll(recipients, status, code, diagnostic)

        # Read (and drop) the answer's body, so that the connection can be reused.
        return readBody(response).addBoth(results)

    def _failed(self, failure: Failure, envelope: Any, recipients: Sequence[Any]) -> Any:
        if failure.check(CancelledError):
            return failure  # the relay's timeout: it defers the recipients itself
        # (Agent wraps what broke the request: a TLS failure is said as the relay says it.)
        reasons = getattr(failure.value, "reasons", None) or [failure]
        error = "; ".join(describeTLSFailure(reason) for reason in reasons)
        log.warn(
            "{queueID}: web hook {url} not reached: {error}",
            queueID=envelope.queueID,
            url=self.url.decode("ascii"),
            error=error,
        )
        diagnostic = f"X-mailrelay; web hook not reached: {error}"
        return resultsForAll(recipients, DeliveryStatus.TRANSIENT, "4.4.1", diagnostic)


@implementer(IPolicyForHTTPS)
class VerifyingPolicyForHTTPS:
    """The TLS of C{https://} hooks for Twisted's C{Agent}: the chain verified against
    C{trustRoot} (by default the platform's trust store) and the host name checked by the
    relay's own C{verifiedClientTLS}, as for the MTA-STS policy fetches.  Not C{Agent}'s
    default (C{BrowserLikePolicyForHTTPS}): a certificate whose names Twisted cannot read (a
    wildcard over a whole top-level domain...) only makes it log an error, and the request
    goes on as verified, whatever the names."""

    def __init__(self, trustRoot: Any = None) -> None:
        self.trustRoot = trustRoot

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return verifiedClientTLS(hostname.decode("ascii"), self.trustRoot)


def _url(value: Any, at: Any) -> str:
    text = nonEmpty("a URL")(value, at)
    if not text.startswith(("http://", "https://")) or not text.isascii() or " " in text:
        raise at.error(f"must be an http:// or https:// URL, not {text!r}")
    return text


OPTIONS = pluginOptions(
    Key("url", _url, "Where to POST each message.", required="is required: the web hook's URL"),
    Key("token_file", fileName, "A file whose first line is a bearer token."),
)


def build(options: dict[str, Any], context: PluginContext) -> WebhookBackend:
    """The plugin's factory: options C{url} and C{token_file} (see the module docstring)."""
    read = context.readOptions(OPTIONS, options)
    token = None
    if read.tokenFile is not None:
        try:
            token = Path(read.tokenFile).read_text(encoding="ascii").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as e:
            message = f"cannot read a token from {read.tokenFile}: {e}"
            raise ConfigError(message, key="token_file") from None
    agent = Agent(context.reactor, contextFactory=VerifyingPolicyForHTTPS())
    return WebhookBackend(read.url, agent, context.deferToThread, token)
