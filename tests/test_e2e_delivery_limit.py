"""End-to-end: C{[queue] delivery_limit}, the most deliveries in flight at once over every
destination and backend (Postfix's C{default_process_limit}), with the real C{twistd -n
mailrelay} delivering to many next hops on 127.0.0.1 that count the sessions open at once."""

from __future__ import annotations

import asyncio
import re
import smtplib
import threading
import time
from pathlib import Path

import pytest

from tests.harness import RelayProcess, requireTool


class CountingHops:
    """SMTP next hops on C{count} ports of 127.0.0.1, in one asyncio loop in a thread: each
    accepts every recipient, answers the end of data after C{hold} seconds (so that
    deliveries overlap), and counts the sessions open at once, and the transactions.

    @ivar most: the most sessions open at once so far (those in a transaction, and those
        kept open by the relay for its next delivery).
    @ivar mostBusy: the most sessions in a transaction (from MAIL to the reply to the end
        of data) at once so far.
    @ivar delivered: the recipients accepted in a finished transaction.
    """

    def __init__(self, count: int, hold: float = 0.3) -> None:
        self.hold = hold
        self.open = 0
        self.most = 0
        self.busy = 0
        self.mostBusy = 0
        self.delivered: list[str] = []
        self.ports: list[int] = []
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._writers: set[asyncio.StreamWriter] = set()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            for _ in range(count):
                server = self._loop.run_until_complete(
                    asyncio.start_server(self._session, "127.0.0.1", 0)
                )
                self._servers.append(server)
                self.ports.append(server.sockets[0].getsockname()[1])
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(30), "the next hops did not start"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.open += 1
        self.most = max(self.most, self.open)
        rcpts: list[str] = []
        try:
            writer.write(b"220 hop.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250 hop.test\r\n")
                elif verb == b"MAIL":
                    rcpts = []
                    self.busy += 1
                    self.mostBusy = max(self.mostBusy, self.busy)
                    writer.write(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    rcpts.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
                    writer.write(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    while (await reader.readline()) not in (b".\r\n", b""):
                        pass
                    await asyncio.sleep(self.hold)
                    self.delivered += rcpts
                    self.busy -= 1
                    writer.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (ConnectionError, IndexError):
            pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            await asyncio.wait(sessions, timeout=10)
            self._loop.stop()

        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(close()))
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def hops():
    made: list[CountingHops] = []

    def make(count: int) -> CountingHops:
        made.append(CountingHops(count))
        return made[-1]

    yield make
    for h in made:
        h.stop()


class WrappedRelay(RelayProcess):
    """A relay run under a command such as C{prlimit --nofile=64} (C{wrapper})."""

    def __init__(self, *args, wrapper: tuple[str, ...] = (), **kw) -> None:
        super().__init__(*args, **kw)
        self.wrapper = wrapper

    def command(self) -> list[str]:
        return [*self.wrapper, *super().command()]


@pytest.fixture
def relay(tmp_path: Path):
    started: list[RelayProcess] = []

    def start(config: str, wrapper: tuple[str, ...] = ()) -> RelayProcess:
        r = WrappedRelay(tmp_path / f"relay{len(started)}", config, wrapper=wrapper)
        started.append(r)
        return r.start()

    yield start
    for r in started:
        r.stop()


def relayConfig(hops: CountingHops, queue: str) -> str:
    routes = "".join(
        f'[[routes]]\ndomain = "d{i}.test"\nbackend = "smtp"\nnexthop = "[127.0.0.1]:{port}"\n'
        for i, port in enumerate(hops.ports)
    )
    return f"[queue]\n{queue}\n[dns]\nreverse_lookups = false\n" + routes


def submit(r: RelayProcess, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as s:
        refused = s.sendmail("a@sender.test", recipients, b"Subject: t\r\n\r\nbody\r\n")
        assert not refused


def waitDelivered(r: RelayProcess, count: int, timeout: float = 120.0) -> None:
    """Wait until C{count} recipients are logged as sent (or the first one deferred)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = r.log()
        if log.count("status=sent") >= count or "status=deferred" in log:
            return
        time.sleep(0.1)
    raise AssertionError(f"{count} recipients not sent in {timeout}s:\n{r.log()}")


def test_deliveries_at_once_are_capped_over_every_destination(relay, hops) -> None:
    """One message to ten destinations, each its own next hop: with C{delivery_limit = 2}
    never more than two deliveries are in flight at once (without the cap, ten were), nor
    more than two connections kept open for reuse besides; every recipient is delivered in
    the first attempt (those over the cap waited, not deferred)."""
    h = hops(10)
    r = relay(relayConfig(h, "delivery_limit = 2"))
    recipients = [f"u@d{i}.test" for i in range(10)]
    submit(r, recipients)
    waitDelivered(r, 10)
    assert sorted(h.delivered) == sorted(recipients)
    assert h.mostBusy == 2, h.mostBusy
    assert h.most <= 4, h.most
    log = r.log()
    assert "status=deferred" not in log
    assert len(re.findall(r"attempts=1, status=sent", log)) == 10


def test_many_destinations_under_a_low_open_file_limit(relay, hops) -> None:
    """The bug hunt's case: the relay under C{prlimit --nofile=64}, a message to 100
    destinations.  Without a cap every attempt opened 100 connections at once and deferred
    every recipient with "Too many open files", attempt after attempt; with C{delivery_limit
    = 10} all are delivered at the first attempt, and the start-up warns that the limit is
    below what the listeners and the deliveries may need."""
    prlimit = requireTool("prlimit", "util-linux")
    h = hops(100)
    text = relayConfig(h, "delivery_limit = 10\nmin_backoff = 3600\nmax_backoff = 3600")
    started = relay(text, (prlimit, "--nofile=64"))
    recipients = [f"u@d{i}.test" for i in range(100)]
    submit(started, recipients)
    waitDelivered(started, 100)
    log = started.log()
    assert "Too many open files" not in log
    assert "status=deferred" not in log
    assert sorted(h.delivered) == sorted(recipients)
    assert h.mostBusy <= 10, h.mostBusy
    assert h.most <= 20, h.most
    assert re.search(r"open file limit \(64\) is below the \d+ descriptors", log), log
