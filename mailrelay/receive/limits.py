"""Abuse limits of one listener: concurrent connections in total and per client address,
connection and message rates per client address, message rate per authenticated user.

The defaults and the replies follow Postfix: at most 100 connections at once on a listener
(C{default_process_limit}) and 50 from one address (C{smtpd_client_connection_count_limit});
rates off by default, counted in windows of 60 seconds (C{anvil_rate_time_unit}); clients in
the exception networks (by default the relay networks, as Postfix's
C{smtpd_client_event_limit_exceptions} defaults to C{$mynetworks}) are exempt from the
per-address limits.  Beyond a connection limit the client gets C{421 4.7.0 <host> Error: too
many connections from <ip>} and the connection is closed; beyond a message rate, MAIL gets
C{450 4.7.1 Error: too much mail from <ip>}.

The counters that may be shared by several relays (per address and per user) live behind
L{mailrelay.interfaces.IRateLimiter}; L{MemoryRateLimiter} is the in-memory default.  The
total per listener is this process's own resource and is counted here.  A limiter that fails
or is slow is logged and its limit skipped (fail open): limits never stop mail for want of
their store.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.address import clientIP
from mailrelay.interfaces import IRateLimiter
from mailrelay.metrics import boundedAnswer, heldText
from mailrelay.policy.chain import ADDRESS_CACHE_SIZE
from mailrelay.smtp.replies import Reply

log = Logger()

#: Seconds an L{IRateLimiter} answer may take before the limit is skipped for that event.
LIMITER_TIMEOUT = 5.0

#: Postfix's C{smtpd} process limit is 100, but its 101st client waits in the listen queue,
#: not refused; a session here costs a few KiB, not a process: 1000 holds a burst of several
#: hundred clients at once (one file descriptor each: see C{LimitNOFILE}).
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 50
DEFAULT_RATE_WINDOW = 60.0
#: IPv6 clients are counted by network of this prefix length (Postfix >= 3.8's
#: C{smtpd_client_ipv6_prefix_length}): one host has a whole /64 or more to connect from.
DEFAULT_IPV6_PREFIX_LENGTH = 84


@dataclass(frozen=True)
class Refusal:
    """Why a connection or a MAIL command is refused.

    @ivar reply: what the client is told.
    @ivar reason: what the log says (the count and the limit).
    """

    reply: Reply
    reason: str


@implementer(IRateLimiter)
class MemoryRateLimiter:
    """L{IRateLimiter} in memory, for one relay process.

    At most C{maxEntries} rate windows are kept; beyond that the least recently counted are
    forgotten first, so that a scan from many addresses cannot exhaust memory.
    """

    def __init__(self, clock: Any, maxEntries: int = 100000) -> None:
        self.clock = clock
        self.maxEntries = maxEntries
        self._open: dict[str, int] = {}
        #: key -> (count, end of its window); dict order is by the last event.
        self._windows: dict[str, tuple[int, float]] = {}

    def acquire(self, key: str) -> int:
        count = self._open.get(key, 0) + 1
        self._open[key] = count
        return count

    def release(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def hit(self, key: str, window: float) -> int:
        now = self.clock.seconds()
        entry = self._windows.pop(key, None)
        if entry is None or now >= entry[1]:
            count, end = 1, now + window
        else:
            # (At most a window from now: one counted before the clock was stepped back
            # would go on until the clock reached its end again.)
            count, end = entry[0] + 1, min(entry[1], now + window)
        self._windows[key] = (count, end)
        # Forget windows that have ended, oldest activity first (a few per event), and the
        # least recently counted beyond maxEntries.
        for _ in range(2):
            first = next(iter(self._windows))
            if first == key or self._windows[first][1] > now:
                break
            del self._windows[first]
        while len(self._windows) > self.maxEntries:
            del self._windows[next(iter(self._windows))]
        return count

    def sessions(self, key: str) -> int:
        """The sessions open for C{key} (for tests)."""
        return self._open.get(key, 0)


def clientNetwork(address: str, ipv6PrefixLength: int = DEFAULT_IPV6_PREFIX_LENGTH) -> str:
    """What a client is counted as: an IPv4 address (also IPv4-mapped IPv6) by itself, an
    IPv6 address by its network of C{ipv6PrefixLength} bits (C{"2001:db8::/84"}; 128: the
    address alone), anything else (a UNIX socket's peer) as it is."""
    addr = clientIP(address)
    if addr is None:
        return address
    if addr.version == 6 and ipv6PrefixLength < 128:
        return str(ipaddress.ip_network(f"{addr}/{ipv6PrefixLength}", strict=False))
    return str(addr)


@dataclass
class ConnectionCount:
    """The connections open now on one listener; kept across a reload, so that connections
    made before it still count (and are uncounted when they end)."""

    value: int = 0


@dataclass(frozen=True, kw_only=True)
class LimitSettings:
    """The abuse limits of one listener, as configured: the one place their defaults are
    written (L{mailrelay.receive.listener.ListenerSettings} is one).  A limit of C{0} is no
    limit.

    @ivar maxConnections: connections open at once on this listener, from anyone.
    @ivar maxConnectionsPerClient: connections open at once from one client address.
    @ivar connectionRateLimit: connections from one address per C{rateWindow}.
    @ivar messageRateLimit: MAIL commands from one address per C{rateWindow}.
    @ivar userMessageRateLimit: MAIL commands from one authenticated user per C{rateWindow}
        (whatever its address: exceptions do not apply).
    @ivar rateWindow: seconds.
    @ivar ipv6PrefixLength: IPv6 clients are counted together by network of this length
        (128: each address alone); IPv4 clients by address.
    @ivar limitExceptions: client networks exempt from the per-address limits.
    @ivar limiterTimeout: seconds a limiter answer may take before the limit is skipped.
    """

    maxConnections: int = DEFAULT_MAX_CONNECTIONS
    maxConnectionsPerClient: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    connectionRateLimit: int = 0
    messageRateLimit: int = 0
    userMessageRateLimit: int = 0
    rateWindow: float = DEFAULT_RATE_WINDOW
    ipv6PrefixLength: int = DEFAULT_IPV6_PREFIX_LENGTH
    limitExceptions: tuple[Any, ...] = ()
    limiterTimeout: float = LIMITER_TIMEOUT


@dataclass
class ListenerLimits:
    """The limits of one listener at work, shared by its sessions.

    @ivar hostname: this relay's name, for the 421 replies.
    @ivar listener: the listener's name (its endpoint), part of every limiter key: counts are
        per listener, as Postfix's anvil counts per service.
    @ivar limiter: the L{IRateLimiter}.
    @ivar clock: an C{IReactorTime} (for the limiter's time-out).
    @ivar settings: the limits (L{LimitSettings}).
    @ivar count: the L{ConnectionCount} of this listener (L{active}).
    """

    hostname: str
    listener: str
    limiter: IRateLimiter
    clock: IReactorTime
    settings: LimitSettings = field(default_factory=LimitSettings)
    count: ConnectionCount = field(default_factory=ConnectionCount)

    @property
    def active(self) -> int:
        """Connections open now on this listener."""
        return self.count.value

    @active.setter
    def active(self, value: int) -> None:
        self.count.value = value

    def __post_init__(self) -> None:
        # Decided once per address for the life of these settings (a reload makes new ones).
        self.isExempt = lru_cache(maxsize=ADDRESS_CACHE_SIZE)(  # type: ignore[method-assign]
            self._isExempt
        )

    def isExempt(self, address: str) -> bool:
        """Is C{address} in an exception network (or not an IP address at all: a UNIX
        socket's peer)?"""
        return self._isExempt(address)

    def _isExempt(self, address: str) -> bool:
        addr = clientIP(address)
        if addr is None:
            return True
        networks = self.settings.limitExceptions
        return any(addr.version == net.version and addr in net for net in networks)

    def key(self, kind: str, value: str) -> str:
        """The limiter key of C{value} (an address, a user) for one kind of count."""
        return f"{self.listener} {kind} {value}"

    def clientKey(self, kind: str, address: str) -> str:
        """The limiter key of a client address (see L{clientNetwork})."""
        return self.key(kind, clientNetwork(address, self.settings.ipv6PrefixLength))

    def admit(self, address: str) -> Admission:
        """The bookkeeping of one new connection from C{address}: call
        L{Admission.check}, and L{Admission.release} when the connection ends."""
        return Admission(self, address)

    def tooManyConnections(self, address: str) -> Reply:
        return Reply(421, "4.7.0", f"{self.hostname} Error: too many connections from {address}")

    def checkMail(self, address: str, user: str | None) -> Deferred:
        """Count one MAIL command from C{address} (and C{user}, when authenticated).

        @return: a Deferred firing with a L{Refusal} (450 4.7.1) when a message rate is
            exceeded, else C{None}.
        """
        d: Deferred = succeed(None)
        if self.settings.messageRateLimit and not self.isExempt(address):
            d.addCallback(
                lambda _: self._rate(
                    self.clientKey("mail", address),
                    self.settings.messageRateLimit,
                    Reply(450, "4.7.1", f"Error: too much mail from {address}"),
                    "message rate",
                )
            )
        if user is not None and self.settings.userMessageRateLimit:

            def userRate(refusal: Refusal | None) -> Any:
                if refusal is not None:
                    return refusal
                return self._rate(
                    self.key("mail-user", user),
                    self.settings.userMessageRateLimit,
                    Reply(450, "4.7.1", f"Error: too much mail from user {user}"),
                    f"message rate of user {user}",
                )

            d.addCallback(userRate)
        return d

    def _rate(self, key: str, limit: int, reply: Reply, what: str) -> Deferred:
        window = self.settings.rateWindow

        def judge(count: int | None) -> Refusal | None:
            if count is None or count <= limit:
                return None
            return Refusal(reply, f"{what} {count} in {window:g}s is over the limit of {limit}")

        return self.ask("hit", self.limiter.hit, key, window).addCallback(judge)

    def ask(self, what: str, call: Callable[..., Any], *args: Any) -> Deferred:
        """Call the limiter; a Deferred firing with its answer, or with C{None} (logged) when
        it fails or does not answer within C{timeout} seconds (also when its call held the
        reactor past the timeout, so that the timer could not fire, and then answered: that
        answer came too late, and is not believed)."""
        timeout = self.settings.limiterTimeout
        started = time.perf_counter()
        d, held = boundedAnswer(maybeDeferred(call, *args), timeout, self.clock, started)

        def failed(failure: Failure) -> None:
            if failure.check(TimeoutError):
                log.error(
                    "rate limiter {what}({key}) did not answer within {timeout:g}s{held}, "
                    "limit not applied",
                    what=what,
                    key=args[0],
                    timeout=timeout,
                    held=heldText(held),
                )
                return None
            log.error(
                "rate limiter {what}({key}) failed, limit not applied: {error}",
                what=what,
                key=args[0],
                error=failure.getErrorMessage() or failure.type.__name__,
            )
            return None

        def counted(answer: Any) -> Any:
            # acquire and hit answer a count (IRateLimiter); anything else is no answer.
            if what != "release" and not (
                type(answer) is int and answer >= 0  # (a bool is no count)
            ):
                log.error(
                    "rate limiter {what}({key}) answered {answer!r}, not a count: limit not "
                    "applied",
                    what=what,
                    key=args[0],
                    answer=answer,
                )
                return None
            return answer

        return d.addCallbacks(counted, failed)


class Admission:
    """The limits' bookkeeping of one connection: counted on L{check}, uncounted on
    L{release} (at most once, also when the limiter answers after the connection ended)."""

    def __init__(self, limits: ListenerLimits, address: str) -> None:
        self.limits = limits
        self.address = address
        self._counted = False
        self._acquired = False
        self._released = False

    def check(self) -> Deferred:
        """Count the connection.

        @return: a Deferred firing with a L{Refusal} when it is over a limit, else C{None}.
        """
        limits = self.limits
        settings = limits.settings
        limits.active += 1
        self._counted = True
        if settings.maxConnections and limits.active > settings.maxConnections:
            return succeed(
                Refusal(
                    Reply(421, "4.7.0", f"{limits.hostname} Error: too many connections"),
                    f"{limits.active} connections on the listener is over the limit of "
                    f"{settings.maxConnections}",
                )
            )
        if limits.isExempt(self.address):
            return succeed(None)
        key = limits.clientKey("conn", self.address)
        # (Its own key: a limiter may keep one counter per key, as a store does.)
        rateKey = limits.clientKey("conn-rate", self.address)
        d: Deferred = succeed(None)
        if settings.maxConnectionsPerClient:
            d = limits.ask("acquire", self._acquire, key)

        def rate(count: int | None) -> Any:
            if count is not None and count > settings.maxConnectionsPerClient:
                # Counted like any other connection, refused or not (as anvil does).
                if settings.connectionRateLimit:
                    limits.ask("hit", limits.limiter.hit, rateKey, settings.rateWindow)
                return Refusal(
                    limits.tooManyConnections(self.address),
                    f"{count} connections at once is over the limit of "
                    f"{settings.maxConnectionsPerClient}",
                )
            if not settings.connectionRateLimit:
                return None
            return limits._rate(
                rateKey, settings.connectionRateLimit, limits.tooManyConnections(self.address),
                "connection rate",
            )

        return d.addCallback(rate)

    def _acquire(self, key: str) -> Any:
        """The limiter's C{acquire}, the session taken as counted once it answers a count,
        whether that answer is then believed or not (one after its call held the reactor
        past the timeout, or after the timeout, is not: L{ListenerLimits.ask}): every
        C{acquire} that answered is matched by one C{release} (L{IRateLimiter}), as smtpd
        sends anvil its disconnect whatever connect answered.  The timeout cancels the
        Deferred returned here, never the limiter's own: one that ignores a cancel (no
        canceller, or one that does nothing) still answers, and that count is seen."""
        answer = maybeDeferred(self.limits.limiter.acquire, key).addCallback(self._gotCount)
        waiting: Deferred = Deferred()

        def forward(result: Any) -> None:
            if not waiting.called:  # (else given up: cancelled at the timeout)
                waiting.callback(result)

        answer.addBoth(forward)
        return waiting

    def _gotCount(self, count: Any) -> Any:
        if type(count) is int and count >= 0:
            self._acquired = True
            if self._released:  # the connection ended while the limiter was counting
                self._release()
        return count

    def _release(self) -> None:
        if self._acquired:
            self._acquired = False
            limits = self.limits
            limits.ask("release", limits.limiter.release, limits.clientKey("conn", self.address))

    def release(self) -> None:
        """The connection ended."""
        if self._released:
            return
        self._released = True
        if self._counted:
            self.limits.active -= 1
        self._release()
