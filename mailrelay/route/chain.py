"""The router chain: the site's routers (C{[[routers]]}), in order, before the routing table.

Each router (an L{IRouter} plugin) is asked in the order the configuration lists them; the
first that answers a L{Route} decides, and when every router falls through (C{None} or
C{CONTINUE}), the routing table (L{mailrelay.route.table.RoutingTable}: C{[[routes]]}, the
smarthost, MX) routes the recipient.  A router may also raise a L{TransientFailure}
(the recipient is deferred) or a L{PermanentFailure} (it bounces); later routers and the table
are then not asked.

A router that fails in any other way, answers anything else, or does not answer within its
C{timeout} (its Deferred is then cancelled) defers the recipient, with a
L{TransientFailure}: routing fails closed, so a broken router never sends mail where the
table would (a router often exists to keep some mail away from there).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.envelope import Envelope, Recipient
from mailrelay.errors import DeliveryFailure, TransientFailure
from mailrelay.interfaces import CONTINUE, IRouter, Route
from mailrelay.metrics import boundedAnswer, heldText

log = Logger()

__all__ = ["ConfiguredRouter", "RouterChain", "chainRouters"]

#: The status of a recipient whose router failed or timed out (RFC 3463 X.4.3: a directory
#: or routing server failure).
ROUTER_FAILED = "4.4.3"
#: The status of a recipient whose router answered something that is not an answer (a bug
#: in the router: X.3.5, the system is incorrectly configured).
ROUTER_MISBEHAVED = "4.3.5"


@dataclass(frozen=True)
class ConfiguredRouter:
    """One entry of the chain.

    @ivar name: the plugin's name, for the log and the diagnostics.
    @ivar router: the router, providing L{IRouter}.
    @ivar timeout: seconds one answer of the router may take.
    """

    name: str
    router: Any
    timeout: float


@implementer(IRouter)
class RouterChain:
    """The site's routers in order, then the routing table (see the module docstring)."""

    def __init__(self, routers: Sequence[ConfiguredRouter], table: Any, clock: IReactorTime):
        """
        @param routers: the routers, in the order they are asked.
        @param table: the L{IRouter} asked when every router falls through (the routing
            table).
        @param clock: the reactor, for the routers' timeouts.
        @raise TypeError: a router or the table does not provide L{IRouter}.
        @raise ValueError: a timeout that is not a number greater than zero.
        """
        for configured in routers:
            if not IRouter.providedBy(configured.router):
                raise TypeError(f"router {configured.name!r} does not provide IRouter")
            timeout = configured.timeout
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
                raise ValueError(
                    f"the timeout of router {configured.name!r} must be > 0, not {timeout!r}"
                )
        if not IRouter.providedBy(table):
            raise TypeError(f"the routing table {table!r} does not provide IRouter")
        self.routers = tuple(routers)
        self.table = table
        self.clock = clock

    def __repr__(self) -> str:
        names = ", ".join(r.name for r in self.routers)
        return f"<RouterChain [{names}] then {self.table!r}>"

    def route(self, envelope: Envelope, recipient: Recipient) -> Deferred[Route]:
        """The L{Route} of the first router that gives one, else the table's.

        @return: a Deferred firing with the L{Route}, or failing with a L{TransientFailure}
            (deferred) or a L{PermanentFailure} (bounced); cancelling it cancels the call in
            progress.
        """
        return Deferred.fromCoroutine(self._route(envelope, recipient))

    async def _route(self, envelope: Envelope, recipient: Recipient) -> Route:
        for configured in self.routers:
            answer = await self._ask(configured, envelope, recipient)
            if answer is not None:
                return answer
        route: Route = await maybeDeferred(self.table.route, envelope, recipient)
        return route

    async def _ask(
        self, configured: ConfiguredRouter, envelope: Envelope, recipient: Recipient
    ) -> Route | None:
        """C{configured}'s answer: a L{Route}, or C{None} when it falls through.

        @raise DeliveryFailure: the router's own L{TransientFailure} or L{PermanentFailure},
            or a L{TransientFailure} when it failed, timed out or answered something else.
        """
        name = configured.name
        about: dict[str, Any] = {
            "queueID": envelope.queueID,
            "router": name,
            "rcpt": recipient.address,
        }
        started = time.perf_counter()
        d = maybeDeferred(configured.router.route, envelope, recipient)
        d, held = boundedAnswer(d, configured.timeout, self.clock, started)
        try:
            answer = await d
        except CancelledError:
            raise  # the whole routing was cancelled (the queue stops)
        except DeliveryFailure as e:
            log.info(
                "{queueID}: router {router} answered for <{rcpt}>: {error}", error=str(e), **about
            )
            raise
        except TimeoutError:
            timeout = configured.timeout
            log.warn(
                "{queueID}: router {router} did not answer within {timeout}s for <{rcpt}>;"
                " deferring{held}",
                timeout=timeout,
                held=heldText(held),
                **about,
            )
            raise TransientFailure(
                code=ROUTER_FAILED,
                diagnostic=f"X-mailrelay; router {name} did not answer within {timeout:g}s",
            ) from None
        except Exception as e:
            log.failure("{queueID}: router {router} failed for <{rcpt}>; deferring", **about)
            raise TransientFailure(
                code=ROUTER_FAILED,
                diagnostic=f"X-mailrelay; router {name} failed: {type(e).__name__}",
            ) from e
        if isinstance(answer, Route):
            return answer
        if answer is None or answer == CONTINUE:
            return None
        log.error(
            "{queueID}: router {router} answered {answer!r} for <{rcpt}>, not a Route, None"
            " or CONTINUE; deferring",
            answer=answer,
            **about,
        )
        raise TransientFailure(
            code=ROUTER_MISBEHAVED,
            diagnostic=f"X-mailrelay; router {name} gave no usable answer",
        )


def chainRouters(routers: Sequence[ConfiguredRouter], table: Any, clock: IReactorTime) -> Any:
    """The router of the queue: C{table} itself when there are no C{routers} (no Deferred,
    no change), else a L{RouterChain} of them before C{table}."""
    if not routers:
        return table
    return RouterChain(routers, table, clock)
