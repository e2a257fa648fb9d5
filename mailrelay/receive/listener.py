"""One listener built from its settings: the one builder of the relay's listeners
(L{mailrelay.app.listeners}) and of the test kit's (L{mailrelay.testing.ServerHarness}).

L{ListenerSettings} is what the configuration says about one listener, in the form the
runtime uses; L{buildListenerFactory} makes the factory of its SMTP sessions from it and the
shared parts (recipient policy, intake, AUTH, rate limiter, clock, resolver, sessions), and
L{wrapListenerFactory} adds the layers below SMTP (implicit TLS, the PROXY protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime

from mailrelay.interfaces import IIntake, IRateLimiter
from mailrelay.policy.chain import RecipientPolicy
from mailrelay.policy.hooks import SessionHooks
from mailrelay.receive.limits import ConnectionCount, LimitSettings, ListenerLimits
from mailrelay.receive.protocol import ListenerContext, Sessions, SMTPServerFactory
from mailrelay.smtp.server import BARE_NEWLINE_REJECT, SessionSettings

if TYPE_CHECKING:  # pragma: no cover
    from mailrelay.receive.auth import AuthPolicy

#: A listener's role (C{mode}; the configuration's C{mode} key takes these values):
#: C{"relay"} (MX or relay for the relay networks and accepted domains, AUTH optional),
#: C{"submission"} (RFC 6409, port 587: AUTH required before MAIL) and C{"submissions"}
#: (RFC 8314, port 465: the same over implicit TLS).
LISTENER_MODES = ("relay", "submission", "submissions")
#: A listener's TLS (C{tlsMode}; the configuration's C{tls_mode}): none, STARTTLS
#: (RFC 3207), or TLS from the first byte.
LISTENER_TLS_MODES = ("none", "starttls", "implicit")


@dataclass(frozen=True)
class ListenerSettings(LimitSettings):
    """Everything that makes one listener's sessions what they are (the shared parts aside).

    Identity and mode:
      - C{hostname}: this relay's name (greeting, C{Received:}); C{name}: the listener's
        (its endpoint), in the log and the limit counters' keys; C{mode}: one of
        L{LISTENER_MODES} (not C{relay}: MAIL needs AUTH first).
    The session (see L{SessionSettings}): C{maxMessageSize}, C{maxRecipients}, C{maxErrors},
      C{softErrorLimit}, C{errorSleepTime}, C{junkCommandLimit}, C{recipientOvershootLimit},
      C{bareNewline}, C{nulBytes}, C{chunking}, C{binaryMIME}; C{auth}: AUTH is offered
      (when the relay has AUTH at all);
      C{authWithoutTLS}; C{rejectUnauthPipelining}; C{rejectPregreet} (C{None}: when
      C{greetPause} is set or C{rejectUnauthPipelining}).
    Stamping: C{addMessageID}, C{addDate}: the built-in stamper may add those fields.
    Timeouts, in seconds: C{idleTimeout} (between commands), C{dataTimeout} (in DATA),
      C{greetPause} (before the greeting), C{maxSessionTime} (0: none),
      C{reverseLookupTimeout}; C{minDataRate}: bytes per second a client must keep up in
      DATA (0: only C{dataTimeout}).
    TLS: C{tlsMode}, one of L{LISTENER_TLS_MODES}; C{tlsOptions}: the server TLS options (an
      C{IOpenSSLServerConnectionCreator}), needed unless C{tlsMode} is C{none};
      C{endpointTLS}: the TLS options of an C{ssl:} endpoint (its C{privateKey=},
      C{certKey=} ..., read with the configuration), TLS from the first byte whatever
      C{tlsMode}, or C{None}.
    Limits (the fields of L{LimitSettings}, keyword only; applied when the listener has a rate
      limiter): C{maxConnections}, C{maxConnectionsPerClient}, C{connectionRateLimit},
      C{messageRateLimit}, C{userMessageRateLimit}, C{rateWindow}, C{ipv6PrefixLength},
      C{limitExceptions} (networks), C{limiterTimeout}.
    PROXY: C{proxyProtocol}: connections start with a PROXY header, from C{proxyNetworks}
      only.

    @raise ValueError: a mode or TLS mode that does not exist, or TLS without options.
    """

    hostname: str
    name: str = ""
    mode: str = "relay"
    maxMessageSize: int = 10240000
    maxRecipients: int = 100
    maxErrors: int = 20
    softErrorLimit: int = 10
    errorSleepTime: float = 1.0
    junkCommandLimit: int = 100
    recipientOvershootLimit: int = 1000
    bareNewline: str = BARE_NEWLINE_REJECT
    nulBytes: str = BARE_NEWLINE_REJECT
    chunking: bool = True
    binaryMIME: bool = False
    auth: bool = False
    authWithoutTLS: bool = False
    rejectUnauthPipelining: bool = False
    rejectPregreet: bool | None = None
    addMessageID: bool = True
    addDate: bool = True
    idleTimeout: float = 300.0
    dataTimeout: float = 300.0
    greetPause: float = 0.0
    maxSessionTime: float = 0.0
    minDataRate: int = 0
    reverseLookupTimeout: float = 10.0
    tlsMode: str = "none"
    tlsOptions: Any = None
    endpointTLS: Any = None
    proxyProtocol: bool = False
    proxyNetworks: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in LISTENER_MODES:
            raise ValueError(f"mode must be one of {', '.join(LISTENER_MODES)}, not {self.mode!r}")
        if self.tlsMode not in LISTENER_TLS_MODES:
            raise ValueError(
                f"tlsMode must be one of {', '.join(LISTENER_TLS_MODES)}, not {self.tlsMode!r}"
            )
        if self.tlsMode != "none" and self.tlsOptions is None:
            raise ValueError(f"tlsMode {self.tlsMode!r} needs tlsOptions (a certificate)")

    @cached_property
    def listenerOptions(self) -> dict[str, Any]:
        """The options header stampers see (L{mailrelay.interfaces.StampContext})."""
        return {
            "add_message_id": self.addMessageID,
            "add_date": self.addDate,
            "bare_newline": self.bareNewline,
            "mode": self.mode,
            "tls_mode": self.tlsMode,
        }

    def sessionSettings(
        self, authMechanisms: tuple[str, ...], hooks: SessionHooks | None = None
    ) -> SessionSettings:
        """The settings of the sans-IO session, offering C{authMechanisms} (C{()}: no AUTH)
        and the ESMTP extensions of C{hooks} (asking at HELO when it has a helo hook)."""
        rejectPregreet = self.rejectPregreet
        if rejectPregreet is None:
            rejectPregreet = self.rejectUnauthPipelining or self.greetPause > 0
        return SessionSettings(
            hostname=self.hostname,
            maxMessageSize=self.maxMessageSize,
            maxRecipients=self.maxRecipients,
            maxErrors=self.maxErrors,
            softErrorLimit=self.softErrorLimit,
            errorSleepTime=self.errorSleepTime,
            junkCommandLimit=self.junkCommandLimit,
            recipientOvershootLimit=self.recipientOvershootLimit,
            bareNewline=self.bareNewline,
            nulBytes=self.nulBytes,
            starttls=self.tlsMode == "starttls",
            authMechanisms=authMechanisms,
            authWithoutTLS=self.authWithoutTLS,
            requireAuth=self.mode != "relay",
            rejectUnauthPipelining=self.rejectUnauthPipelining,
            rejectPregreet=rejectPregreet,
            checkHelo=hooks is not None and hooks.helo is not None,
            extensions=hooks.extensions if hooks is not None else (),
            chunking=self.chunking,
            binaryMIME=self.binaryMIME,
        )

    def limits(
        self, limiter: IRateLimiter, clock: IReactorTime, count: ConnectionCount | None
    ) -> ListenerLimits:
        """The L{ListenerLimits} of this listener (these settings), counting through
        C{limiter}."""
        return ListenerLimits(
            hostname=self.hostname,
            listener=self.name,
            limiter=limiter,
            clock=clock,
            settings=self,
            count=count if count is not None else ConnectionCount(),
        )


def buildListenerFactory(
    settings: ListenerSettings,
    *,
    policy: RecipientPolicy,
    intake: IIntake,
    clock: IReactorTime,
    auth: AuthPolicy | None = None,
    limiter: IRateLimiter | None = None,
    resolver: Any = None,
    sessions: Sessions | None = None,
    connectionCount: ConnectionCount | None = None,
    hooks: SessionHooks | None = None,
) -> SMTPServerFactory:
    """The factory of one listener's SMTP sessions (below it, L{wrapListenerFactory}'s
    layers).

    @param policy: the L{RecipientPolicy} (relay control and validators).
    @param intake: the L{mailrelay.interfaces.IIntake} messages enter the spool through.
    @param clock: an C{IReactorTime}.
    @param auth: the relay's L{mailrelay.receive.auth.AuthPolicy}, or C{None} without AUTH;
        used only when C{settings.auth}.
    @param limiter: the L{mailrelay.interfaces.IRateLimiter} the limits count through, or
        C{None} for no limits at all.
    @param resolver: an C{IResolver} for reverse lookups, or C{None} to skip them.
    @param sessions: the relay's L{mailrelay.receive.protocol.Sessions}, for a graceful stop.
    @param connectionCount: the listener's count of open connections, kept across a reload.
    @param hooks: the site's plugins of the connect, HELO, MAIL and DATA hooks and the ESMTP
        extensions (L{SessionHooks}), shared by the relay's listeners; C{None}: none.
    """
    hooks = hooks if hooks is not None else SessionHooks()
    listenerAuth = auth if settings.auth else None
    limits = None if limiter is None else settings.limits(limiter, clock, connectionCount)
    context = ListenerContext(
        settings=settings,
        session=settings.sessionSettings(
            listenerAuth.settings.mechanisms if listenerAuth else (), hooks
        ),
        policy=policy,
        intake=intake,
        clock=clock,
        auth=listenerAuth,
        limits=limits,
        resolver=resolver,
        sessions=sessions,
        hooks=hooks.forListener(
            listenerAuth.settings.senders if listenerAuth is not None else {},
            limits,
            intake.hasFreeSpace,
            clock,
        ),
    )
    return SMTPServerFactory(context)


def wrapListenerFactory(settings: ListenerSettings, factory: Any, clock: Any) -> Any:
    """C{factory} (from L{buildListenerFactory}) under the listener's transport layers: TLS
    from the first byte (C{tlsMode} C{implicit}, or an C{ssl:} endpoint's C{endpointTLS}),
    then the PROXY protocol.  (The TLS layer is the factory's, not the listening port's:
    the acceptor processes share the socket, and a reload's factory brings its
    certificate.)"""
    tls = settings.tlsOptions if settings.tlsMode == "implicit" else settings.endpointTLS
    if tls is not None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(tls, False, factory)
    if settings.proxyProtocol:
        from mailrelay.receive.proxy import ProxyProtocolFactory

        factory = ProxyProtocolFactory(
            factory, settings.proxyNetworks, clock, listenerName=settings.name
        )
    return factory
