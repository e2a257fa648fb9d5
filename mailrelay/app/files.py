"""The relay's open file limit: enough descriptors for the connections its listeners allow,
and for its deliveries.

Each SMTP session is one descriptor, and the listeners allow 1000 sessions each by default
(C{max_connections}), while a login shell's soft limit is commonly 1024: a relay started from
one would fail to accept (EMFILE) long before its own limits.  Each delivery in flight
(C{[queue] delivery_limit}, 100 by default) holds a connection, a command's pipes or a file,
and as many SMTP connections may stay open, idle, for the next delivery.  At start-up the
soft limit is raised towards what the listeners and the deliveries need, up to the hard limit
(which needs no privilege), as servers such as nginx and Dovecot do; when even the hard limit
is too low, the relay says so once and runs on (systemd's unit sets C{LimitNOFILE=}).
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterable

from twisted.logger import Logger

log = Logger()

#: Descriptors beyond the sessions: the spool's files, the log, DNS, the control socket,
#: the metrics server, the pipes to the other processes, plugins' connections.
SPARE = 256

#: Descriptors per delivery in flight: its connection, and one connection kept idle for the
#: next delivery (the SMTP backend keeps as many as C{[queue] delivery_limit}).
PER_DELIVERY = 2


def needed(maxConnections: Iterable[int], deliveryLimit: int = 0) -> int | None:
    """Descriptors the listeners of C{maxConnections} (their C{max_connections}; 0: no limit)
    and C{deliveryLimit} deliveries in flight (L{PER_DELIVERY} each) may use, with L{SPARE};
    C{None} when a listener has no limit."""
    total = 0
    for limit in maxConnections:
        if limit == 0:
            return None
        total += limit
    return total + PER_DELIVERY * deliveryLimit + SPARE


def raiseFileLimit(
    maxConnections: Iterable[int],
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
    *,
    deliveryLimit: int = 0,
) -> int:
    """Raise the soft limit of open files to what the listeners and C{deliveryLimit}
    deliveries in flight need (all of the hard limit when a listener has no limit), never
    above the hard limit nor below what it is; warn when the hard limit is below the need.
    Returns the soft limit in force."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    want = needed(maxConnections, deliveryLimit)
    ceiling = hard if hard != resource.RLIM_INFINITY else None
    target = want if want is not None else ceiling
    if target is None:
        return soft  # no limit on the listeners nor on the process: leave it
    if ceiling is not None:
        if target > ceiling:
            log.warn(
                "the open file limit ({hard}) is below the {want} descriptors the listeners' "
                "max_connections and [queue] delivery_limit allow; connections beyond it will "
                "fail: raise the limit (LimitNOFILE= in the systemd unit, ulimit -Hn) or lower "
                "max_connections or delivery_limit",
                hard=hard,
                want=want if want is not None else "unlimited",
            )
        target = min(target, ceiling)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open file limit to {target}: {error}", target=target,
                     error=e)
            return soft
        return target
    return soft
