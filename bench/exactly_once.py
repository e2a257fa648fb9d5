#!/usr/bin/env python3
"""Count duplicate and lost deliveries when the relay is stopped or killed under load.

A stream of N messages (each with a unique Subject) is sent to the real ``twistd -n
mailrelay``, which relays them to a recording next hop (aiosmtpd in this process, answering
each DATA after ``--hop-delay`` seconds so that deliveries are in flight).  While the stream
runs, the relay is stopped ``--stops`` times, evenly spread (``--signal TERM``: a graceful
stop; ``--signal KILL``: ``kill -9`` of twistd, its delivery process left to fend for
itself), and started again at once on the same spool.  At the end the relay runs until its
queue is empty.  Reported:

  accepted    messages the relay answered 250 to;
  delivered   distinct messages the next hop received;
  lost        accepted but never delivered (must be 0);
  duplicates  deliveries beyond the first of a message.

Run from the repository root with the test venv:

    .venv/bin/python bench/exactly_once.py --messages 1000 --stops 10 --signal KILL
    .venv/bin/python bench/exactly_once.py --messages 1000 --stops 10 --signal TERM
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import signal
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import RelayProcess  # noqa: E402
from tests.test_e2e_outbound import _TCPController  # noqa: E402


class Hop:
    """Records the Subject and the relay's queue id (from its Received: field) of every
    message it accepts."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.queueIDs: collections.Counter[str] = collections.Counter()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        head = envelope.original_content.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
        subject = re.search(r"^Subject: (\S+)", head, re.MULTILINE | re.IGNORECASE)
        queueID = re.search(r"^Received:.*?\bid (\w+)", head, re.MULTILINE | re.DOTALL)
        with self.lock:
            self.counts[subject.group(1) if subject else ""] += 1
            self.queueIDs[queueID.group(1) if queueID else ""] += 1
        return "250 2.0.0 OK"

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())


def send(port: int, subject: str) -> bool:
    """Whether the relay accepted the message (its 250 to the end of data: what happens to
    the QUIT after it, a 421 from a stopping relay say, does not matter)."""
    try:
        s = smtplib.SMTP("127.0.0.1", port, timeout=60)
    except OSError:
        return False
    try:
        s.sendmail(
            "alice@example.com", ["bob@example.org"],
            f"Subject: {subject}\r\n\r\nbody {subject}\r\n".encode(),
        )
    except (smtplib.SMTPException, OSError):
        return False
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            s.close()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--stops", type=int, default=10)
    parser.add_argument("--signal", choices=("TERM", "KILL"), default="KILL")
    parser.add_argument("--senders", type=int, default=8, help="parallel SMTP clients")
    parser.add_argument("--hop-delay", type=float, default=0.05,
                        help="seconds the next hop takes to answer each message")
    parser.add_argument("--rate", type=float, default=40.0,
                        help="messages per second sent, at most (the delivery process needs "
                             "a second to start: stops closer than that find nothing in flight)")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    hop = Hop(args.hop_delay)
    controller = _TCPController(hop, hostname="127.0.0.1", port=0, ready_timeout=10)
    controller.start()
    hopPort = controller.port
    work = Path(tempfile.mkdtemp(prefix="exactly-once-"))
    relay = RelayProcess(
        work / "relay",
        f'[relay]\nsmarthost = "[127.0.0.1]:{hopPort}"\n[dns]\nreverse_lookups = false\n'
        "[delivery]\nconnection_cache_time = 0\n",
        args=("--listen", "tcp:0:interface=127.0.0.1"),
    )
    relay.start()
    ports = {"port": relay.port}
    accepted: set[str] = set()
    acceptedLock = threading.Lock()
    subjects = [f"m{i:06d}" for i in range(args.messages)]
    todo = collections.deque(subjects)
    todoLock = threading.Lock()

    interval = args.senders / args.rate if args.rate > 0 else 0.0

    def sender() -> None:
        while True:
            with todoLock:
                if not todo:
                    return
                subject = todo.popleft()
            time.sleep(interval)
            if send(ports["port"], subject):
                with acceptedLock:
                    accepted.add(subject)
            else:
                with todoLock:
                    todo.append(subject)  # not accepted: the client tries again
                time.sleep(0.05)

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(args.senders)]
    started = time.monotonic()
    for t in threads:
        t.start()
    sig = signal.SIGKILL if args.signal == "KILL" else signal.SIGTERM
    step = args.messages // (args.stops + 1)
    for n in range(1, args.stops + 1):
        while True:
            with acceptedLock:
                if len(accepted) >= n * step:
                    break
            time.sleep(0.01)
        delivered = hop.total()
        relay.stop(sig, timeout=60)
        print(f"stop {n}: SIG{args.signal} after {len(accepted)} accepted, "
              f"{delivered} delivered", flush=True)
        if sig == signal.SIGKILL:
            time.sleep(0.2)
        relay.start()
        ports["port"] = relay.port
    for t in threads:
        t.join()
    deadline = time.monotonic() + args.drain_timeout
    while time.monotonic() < deadline:
        with hop.lock:
            done = all(hop.counts[s] for s in accepted)
        if done and not relay.queued():
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # late duplicates, if any
    relay.stop()
    controller.stop()
    with hop.lock:
        counts = dict(hop.counts)
        queueIDs = dict(hop.queueIDs)
    lost = sorted(s for s in accepted if not counts.get(s))
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    # A queue entry delivered twice: the relay's doing.  A message queued twice (the relay
    # was killed between its commit and its 250, and the client sent it again): the
    # client's, as with any MTA.
    deliveredTwice = sum(c - 1 for c in queueIDs.values() if c > 1)
    unexpected = sorted(s for s in counts if s not in accepted)
    print(f"signal=SIG{args.signal} stops={args.stops} messages={args.messages} "
          f"accepted={len(accepted)} delivered={len(counts)} lost={len(lost)} "
          f"duplicates={duplicates} (queue entries delivered twice: {deliveredTwice}; "
          f"messages queued twice by a client retrying: {duplicates - deliveredTwice}) "
          f"delivered-but-not-acknowledged={len(unexpected)} time={elapsed:.1f}s")
    if lost:
        print("lost:", " ".join(lost[:20]))
    if args.keep:
        print("work directory:", work)
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
