"""systemd's service notifications (C{sd_notify}), for C{Type=notify} (etc/mailrelay.service):
the relay says C{READY=1} once it runs (listeners bound, spool recovered, delivery process
started), C{RELOADING=1} then C{READY=1} around a reload, C{STOPPING=1} when it begins to
stop, and pings the watchdog (C{WATCHDOG=1}) when the unit sets C{WatchdogSec=}.

The protocol is one datagram of C{KEY=VALUE} lines to the C{AF_UNIX} socket named by
C{$NOTIFY_SOCKET} (a leading C{@}: the abstract namespace); without that variable (not run by
systemd) nothing is sent.  A few lines of the standard library, so no package is needed.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from twisted.logger import Logger

__all__ = ["notify", "Notifier"]

log = Logger()


def notify(state: str, environ: Any = None) -> bool:
    """Send C{state} (C{"READY=1"}, C{"STOPPING=1"}, ...) to systemd; whether it was sent
    (C{False} when C{$NOTIFY_SOCKET} is not set, or the socket refused it: logged)."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode("utf-8"), address)
    except OSError as e:
        log.warn("cannot notify systemd ({state}): {error}", state=state, error=str(e))
        return False
    return True


class Notifier:
    """The relay's notifications to systemd, and the watchdog's pings.

    @ivar environ: where C{NOTIFY_SOCKET}, C{WATCHDOG_USEC} and C{WATCHDOG_PID} are read.
    """

    def __init__(self, reactor: Any, environ: Any = None) -> None:
        self.reactor = reactor
        self.environ = os.environ if environ is None else environ
        self._watchdog: Any = None

    def _send(self, state: str) -> bool:
        return notify(state, self.environ)

    def ready(self, status: str) -> None:
        """The relay runs: C{READY=1}, with C{status} for C{systemctl status}; start the
        watchdog's pings if the unit asks for them."""
        self._send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")
        self._startWatchdog()

    def reloading(self) -> None:
        """A reload begins (L{ready} follows when it is over, whether it succeeded)."""
        monotonic = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic}")

    def stopping(self) -> None:
        """The relay begins to stop."""
        self._send("STOPPING=1")
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()

    def _startWatchdog(self) -> None:
        """Ping at half the unit's C{WatchdogSec=} (C{$WATCHDOG_USEC}), from the reactor: a
        reactor stuck for longer gets the relay restarted."""
        if self._watchdog is not None:
            return
        usec = self.environ.get("WATCHDOG_USEC")
        pid = self.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return
        try:
            interval = int(usec) / 2e6
        except ValueError:
            return
        if interval <= 0:
            return
        from twisted.internet.task import LoopingCall

        self._watchdog = LoopingCall(self._send, "WATCHDOG=1")
        self._watchdog.clock = self.reactor
        self._watchdog.start(interval, now=True)
