"""How the queue manager retries, expires and notifies: L{QueuePolicy} and the back-off."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QueuePolicy", "backoff"]


@dataclass(frozen=True)
class QueuePolicy:
    """How the queue manager retries, expires and notifies (Postfix parameter names in
    brackets).

    @ivar minBackoff: the fewest seconds between a failed attempt and the next one
        (C{minimal_backoff_time}); see L{backoff}.
    @ivar maxBackoff: the most seconds between retries (C{maximal_backoff_time}).
    @ivar maxLifetime: seconds after arrival when a message still not delivered is bounced,
        after one last attempt (C{maximal_queue_lifetime}).
    @ivar bounceLifetime: the same for mail from the null sender, the notifications we
        generated and those relayed for others alike (C{bounce_queue_lifetime}); at most
        C{maxLifetime} counts (see L{lifetime}).
    @ivar delayWarning: seconds after arrival when one "delayed" notification is sent for the
        recipients still pending; 0 turns delay warnings off (C{delay_warning_time}).
    @ivar activeLimit: messages loaded and being delivered at once
        (C{qmgr_message_active_limit}).
    @ivar postmaster: where a notification about an undeliverable bounce goes; C{None}: such
        bounces are logged and dropped.
    @ivar deliveryTimeout: seconds a routing decision, or a delivery by a backend without a
        timeout of its own (see L{QueueManager}'s C{timeouts}: the built-in backends), may
        take before it is abandoned and counted as a transient failure (a late answer is
        ignored); 0: no limit.  It runs from when the delivery has its place (see
        C{deliveryLimit}): the wait for one does not count.
    @ivar stopTimeout: seconds L{QueueManager.stopService} waits for deliveries in flight.
    @ivar bounceSizeLimit: the most octets of an original message returned in a notification
        (C{bounce_size_limit}).
    @ivar rescanInterval: seconds between two looks into the spool for entries nobody told
        the queue manager of (as qmgr's wakeup time in Postfix's C{master.cf}).
    @ivar deliveryLimit: deliveries (connections, commands) in flight at once over every
        destination and backend; those over it wait for one to end
        (C{default_process_limit}).
    """

    minBackoff: float = 300.0
    maxBackoff: float = 4000.0
    maxLifetime: float = 5 * 86400
    bounceLifetime: float = 5 * 86400
    delayWarning: float = 0.0
    activeLimit: int = 1000
    postmaster: str | None = None
    deliveryTimeout: float = 3600.0
    stopTimeout: float = 30.0
    bounceSizeLimit: int = 102400
    rescanInterval: float = 300.0
    deliveryLimit: int = 100

    def __post_init__(self) -> None:
        if not 0 < self.minBackoff <= self.maxBackoff:
            raise ValueError("need 0 < minBackoff <= maxBackoff")
        if self.maxLifetime < 0 or self.bounceLifetime < 0 or self.delayWarning < 0:
            raise ValueError("lifetimes and delayWarning must not be negative")
        if self.activeLimit < 1:
            raise ValueError("activeLimit must be at least 1")
        if self.deliveryLimit < 1:
            raise ValueError("deliveryLimit must be at least 1")
        if not self.rescanInterval > 0:
            raise ValueError("rescanInterval must be greater than 0")
        if self.deliveryTimeout < 0 or self.stopTimeout < 0 or self.bounceSizeLimit < 0:
            raise ValueError(
                "deliveryTimeout, stopTimeout and bounceSizeLimit must not be negative"
            )

    def lifetime(self, sender: str) -> float:
        """Seconds after its arrival when a message from C{sender} is given up: for the null
        sender C{bounceLifetime}, but no more than C{maxLifetime} (Postfix's qmgr applies
        C{bounce_queue_lifetime} to every message with an empty sender, and lowers it to
        C{maximal_queue_lifetime} when it is larger); else C{maxLifetime}."""
        return self.maxLifetime if sender else min(self.bounceLifetime, self.maxLifetime)


def backoff(policy: QueuePolicy, age: float) -> float:
    """Seconds to wait after an attempt that left recipients pending, for a message queued
    C{age} seconds ago: its age, at least C{minBackoff} and at most C{maxBackoff}.

    As Postfix's qmgr does, the delay follows the time in the queue, not the number of
    attempts: left alone the delays roughly double, and an attempt made early (a flush, a
    deferral by a suspended next hop) does not push the next one further away."""
    return min(policy.maxBackoff, max(policy.minBackoff, age))
