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

``--kill`` chooses what gets ``kill -9`` instead of twistd (``delivery``: the delivery
process; ``acceptor``: an acceptor process, with ``--processes 2``; ``forkserver``: the fork
server, with ``--fork-children``; ``any``: one of those that run, at random each time), and
``--random`` kills at random moments rather than evenly spread.  ``--targets`` sends each
message to one recipient at each of several next hops at once: ``fast`` (the smarthost),
``slow`` (an SMTP route whose next hop answers after ``--slow-delay`` seconds), ``lmtp`` (an
LMTP route), ``maildir`` (a maildir route), ``refused`` (a next hop refusing the recipient:
a bounce); every notice (the sender's domain routes to a recording next hop) is counted too:
with ``--notify-success`` (``NOTIFY=SUCCESS,FAILURE``) each recipient must get exactly one,
without it each refused one.  ``--queue-commands`` runs ``mailrelay queue hold/release/
flush`` at random meanwhile.  Each is counted on its own: a loss anywhere is a bug; a
duplicate is one unless its kill came between the next hop's 250 and the relay's record.

Run from the repository root with the test venv:

    .venv/bin/python bench/exactly_once.py --messages 1000 --stops 10 --signal KILL
    .venv/bin/python bench/exactly_once.py --messages 1000 --stops 10 --signal TERM
    .venv/bin/python bench/exactly_once.py --messages 400 --stops 20 --random --kill any \\
        --processes 2 --fork-children --targets fast,slow,lmtp,maildir,refused \\
        --notify-success --queue-commands
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import re
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import RelayProcess  # noqa: E402
from tests.test_e2e_outbound import _LMTPController, _TCPController  # noqa: E402

TARGETS = ("fast", "slow", "lmtp", "maildir", "refused")
SUBJECT = re.compile(r"^Subject: (m\d+)", re.MULTILINE | re.IGNORECASE)


class Hop:
    """Records the Subject and the relay's queue id (from its Received: field) of every
    message it accepts."""

    def __init__(self, delay: float, lmtp: bool = False, refuse: bool = False) -> None:
        self.delay = delay
        self.lmtp = lmtp
        self.refuse = refuse
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.queueIDs: collections.Counter[str] = collections.Counter()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        head = envelope.original_content.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
        subject = re.search(r"^Subject: (\S+)", head, re.MULTILINE | re.IGNORECASE)
        queueID = re.search(r"^Received:.*?\bid (\w+)", head, re.MULTILINE | re.DOTALL)
        with self.lock:
            self.counts[subject.group(1) if subject else ""] += 1
            self.queueIDs[queueID.group(1) if queueID else ""] += 1
        if self.lmtp:
            return "\r\n".join(["250 2.0.0 OK"] * len(envelope.rcpt_tos))
        return "250 2.0.0 OK"

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())


class Notices:
    """Records the notices (DSNs) sent back to the senders: how many times each original
    message's recipient was reported on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        #: The same by the queue id of the message reported on (its Received: field).
        self.queueIDs: collections.Counter[tuple[str, str]] = collections.Counter()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        text = envelope.original_content.decode("utf-8", "replace")
        subject = SUBJECT.search(text)
        # (The first Received: with an id after the report's own header is the original's.)
        original = text.split("\r\n\r\n", 1)[-1]
        queueID = re.search(r"^Received:.*?\bid (\w+)", original, re.MULTILINE | re.DOTALL)
        with self.lock:
            for rcpt in re.findall(r"^Final-Recipient: *rfc822; *(\S+)", text,
                                   re.MULTILINE | re.IGNORECASE):
                self.counts[(subject.group(1) if subject else "", rcpt.lower())] += 1
                self.queueIDs[(queueID.group(1) if queueID else "", rcpt.lower())] += 1
        return "250 2.0.0 OK"


def maildirCounts(directory: Path) -> collections.Counter[str]:
    """How many times each message was written to the maildir C{directory}."""
    counts: collections.Counter[str] = collections.Counter()
    for sub in ("new", "cur"):
        for path in (directory / sub).glob("*") if (directory / sub).is_dir() else ():
            m = SUBJECT.search(path.read_bytes()[:4096].decode("utf-8", "replace"))
            counts[m.group(1) if m else ""] += 1
    return counts


def descendants(pid: int) -> dict[int, str]:
    """The processes below C{pid}, each with its name: C{mr-delivery}, C{mr-acceptor} or
    C{mr-forkserver} when forked by the fork server, or its module for a new process."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if "deliveryprocess" in cmdline.decode("utf-8", "replace"):
            comm = "mr-delivery"
        elif "acceptorprocess" in cmdline.decode("utf-8", "replace"):
            comm = "mr-acceptor"
        names[int(entry)] = comm
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, p in parents.items():
            if p == parent and child not in found:
                found[child] = names[child]
                todo.append(child)
    return found


KINDS = {"delivery": "mr-delivery", "acceptor": "mr-acceptor", "forkserver": "mr-forkserver"}


def send(port: int, subject: str, recipients: list[str] | None = None,
         notify: bool = False) -> bool:
    """Whether the relay accepted the message (its 250 to the end of data: what happens to
    the QUIT after it, a 421 from a stopping relay say, does not matter)."""
    try:
        s = smtplib.SMTP("127.0.0.1", port, timeout=60)
    except OSError:
        return False
    try:
        s.sendmail(
            "alice@example.com", recipients or ["bob@example.org"],
            f"Subject: {subject}\r\n\r\nbody {subject}\r\n".encode(),
            rcpt_options=["NOTIFY=SUCCESS,FAILURE"] if notify else [],
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
    parser.add_argument("--kill", choices=("twistd", *KINDS, "any"), default="twistd",
                        help="the process stopped (with --signal KILL): twistd, or one of "
                             "its children, which twistd restarts")
    parser.add_argument("--random", action="store_true",
                        help="stop at random moments rather than evenly spread")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--processes", type=int, default=1, help="[relay] processes")
    parser.add_argument("--fork-children", action="store_true", help="[relay] fork_children")
    parser.add_argument("--targets", default="fast",
                        help=f"the next hops of each message, comma separated: {TARGETS}")
    parser.add_argument("--slow-delay", type=float, default=2.0,
                        help="seconds the slow next hop takes to answer each message")
    parser.add_argument("--notify-success", action="store_true",
                        help="every recipient with NOTIFY=SUCCESS,FAILURE")
    parser.add_argument("--queue-commands", action="store_true",
                        help="run mailrelay queue hold/release/flush at random meanwhile")
    parser.add_argument("--senders", type=int, default=8, help="parallel SMTP clients")
    parser.add_argument("--hop-delay", type=float, default=0.05,
                        help="seconds the next hop takes to answer each message")
    parser.add_argument("--rate", type=float, default=40.0,
                        help="messages per second sent, at most (the delivery process needs "
                             "a second to start: stops closer than that find nothing in flight)")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    if not targets or any(t not in TARGETS for t in targets):
        parser.error(f"--targets: each of {TARGETS}, not {args.targets!r}")
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="exactly-once-"))

    # Everything started is stopped on any failure, Ctrl-C included: the relay (twistd, and
    # its children with it), the next hops, and the threads sending to it.
    live: dict[str, Any] = {}
    controllers: list[Any] = []
    stopping = threading.Event()
    commandsDone = threading.Event()

    def stopAll() -> None:
        stopping.set()
        commandsDone.set()
        relay = live.pop("relay", None)
        if relay is not None:
            relay.stop()
        while controllers:
            controllers.pop().stop()

    try:
        hops: dict[str, Hop] = {}
        fastPort: int | None = None  # (the smarthost)
        routes: list[str] = []
        recipients: list[str] = []
        maildir = work / "maildir"
        for target in targets:
            if target == "maildir":
                routes.append(f'[[routes]]\ndomain = "maildir.test"\nbackend = "maildir"\n'
                              f'nexthop = "{maildir}"\n')
                recipients.append("bob@maildir.test")
                continue
            hop = hops[target] = Hop(
                args.slow_delay if target == "slow" else args.hop_delay,
                lmtp=target == "lmtp", refuse=target == "refused",
            )
            if target == "lmtp":
                socketPath = work / "lmtp.sock"
                controller: Any = _LMTPController(hop, unix_socket=str(socketPath),
                                                  ready_timeout=10)
                controller.start()
                routes.append(f'[[routes]]\ndomain = "lmtp.test"\nbackend = "lmtp"\n'
                              f'nexthop = "unix:{socketPath}"\n')
            else:
                controller = _TCPController(hop, hostname="127.0.0.1", port=0, ready_timeout=10)
                controller.start()
                if target == "fast":
                    fastPort = controller.port
                else:
                    routes.append(f'[[routes]]\ndomain = "{target}.test"\nbackend = "smtp"\n'
                                  f'nexthop = "[127.0.0.1]:{controller.port}"\n')
            controllers.append(controller)
            recipients.append("bob@example.org" if target == "fast" else f"bob@{target}.test")
        notices = Notices()
        noticeHop = _TCPController(notices, hostname="127.0.0.1", port=0, ready_timeout=10)
        noticeHop.start()
        controllers.append(noticeHop)
        routes.append(f'[[routes]]\ndomain = "example.com"\nbackend = "smtp"\n'
                      f'nexthop = "[127.0.0.1]:{noticeHop.port}"\n')
        smarthost = fastPort if fastPort is not None else noticeHop.port
        relay = live["relay"] = RelayProcess(
            work / "relay",
            f'[relay]\nsmarthost = "[127.0.0.1]:{smarthost}"\nprocesses = {args.processes}\n'
            f"fork_children = {'true' if args.fork_children else 'false'}\n"
            "[dns]\nreverse_lookups = false\n"
            "[delivery]\nconnection_cache_time = 0\ncreate_mailboxes = true\n"
            "[queue]\nmin_backoff = 1\nmax_backoff = 2\n" + "".join(routes),
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
            while not stopping.is_set():
                with todoLock:
                    if not todo:
                        return
                    subject = todo.popleft()
                time.sleep(interval)
                if send(ports["port"], subject, recipients, args.notify_success):
                    with acceptedLock:
                        accepted.add(subject)
                else:
                    with todoLock:
                        todo.append(subject)  # not accepted: the client tries again
                    time.sleep(0.05)

        def queueCommands() -> None:
            control = [sys.executable, "-m", "mailrelay", "--spool", str(relay.spool),
                       "--timeout", "10", "queue"]
            choices = (["hold", "--all"], ["release", "--all"], ["flush"])
            while not commandsDone.wait(rng.uniform(0.1, 0.5)):
                subprocess.run(control + list(rng.choice(choices)), capture_output=True,
                               timeout=30, check=False)
            for _ in range(60):  # (the relay may be restarting: until it answers)
                if subprocess.run(control + ["release", "--all"], capture_output=True, timeout=30,
                                  check=False).returncode == 0:
                    break
                time.sleep(0.5)

        threads = [threading.Thread(target=sender, daemon=True) for _ in range(args.senders)]
        started = time.monotonic()
        for t in threads:
            t.start()
        commander = threading.Thread(target=queueCommands, daemon=True)
        if args.queue_commands:
            commander.start()
        sig = signal.SIGKILL if args.signal == "KILL" else signal.SIGTERM
        step = args.messages // (args.stops + 1)
        marks = sorted(rng.randrange(1, args.messages) for _ in range(args.stops)) if args.random \
            else [n * step for n in range(1, args.stops + 1)]
        killed: collections.Counter[str] = collections.Counter()
        for n, mark in enumerate(marks, 1):
            while True:
                with acceptedLock:
                    if len(accepted) >= mark:
                        break
                time.sleep(0.01)
            if args.random:
                time.sleep(rng.uniform(0, 0.5))
            delivered = sum(h.total() for h in hops.values())
            kind = args.kill if sig == signal.SIGKILL else "twistd"
            assert relay.process is not None
            children = descendants(relay.process.pid)
            if kind == "any":
                running = sorted({k for k, name in KINDS.items() if name in children.values()})
                kind = rng.choice(["twistd", *running])
            if kind == "twistd":
                relay.stop(sig, timeout=60)
            else:
                pids = [pid for pid, name in children.items() if name == KINDS[kind]]
                if not pids:
                    print(f"stop {n}: no {kind} process running", flush=True)
                    continue
                os.kill(rng.choice(pids), signal.SIGKILL)
            killed[kind] += 1
            print(f"stop {n}: SIG{args.signal} of {kind} after {len(accepted)} accepted, "
                  f"{delivered} delivered", flush=True)
            if kind == "twistd":
                if sig == signal.SIGKILL:
                    time.sleep(0.2)
                relay.start()
                ports["port"] = relay.port
        for t in threads:
            t.join()
        commandsDone.set()
        if args.queue_commands:
            commander.join()

        def delivered() -> dict[str, collections.Counter[str]]:
            counts = {}
            for target, hop in hops.items():
                if target != "refused":
                    with hop.lock:
                        counts[target] = collections.Counter(hop.counts)
            if "maildir" in targets:
                counts["maildir"] = maildirCounts(maildir)
            return counts

        def expectedNotices() -> set[tuple[str, str]]:
            noticed = [r for r in recipients if args.notify_success or r.endswith("@refused.test")]
            return {(s, r) for s in accepted for r in noticed}

        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline:
            counts = delivered()
            with notices.lock:
                noticed = set(notices.counts)
            done = all(c[s] for c in counts.values() for s in accepted) \
                and expectedNotices() <= noticed
            if done and not relay.queued():
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        time.sleep(1.0)  # late duplicates, if any
        stopAll()
        corrupt = sorted(p.name for p in (relay.spool / "corrupt").glob("*")) \
            if (relay.spool / "corrupt").is_dir() else []
        print(f"signal=SIG{args.signal} stops={args.stops} ({dict(killed)}) "
              f"messages={args.messages} accepted={len(accepted)} corrupt={len(corrupt)} "
              f"time={elapsed:.1f}s")
        failed = bool(corrupt)
        for target, counts in delivered().items():
            lost = sorted(s for s in accepted if not counts.get(s))
            duplicates = sum(c - 1 for c in counts.values() if c > 1)
            unexpected = sorted(s for s in counts if s not in accepted)
            line = (f"  {target}: delivered={len(counts)} lost={len(lost)} "
                    f"duplicates={duplicates} delivered-but-not-acknowledged={len(unexpected)}")
            if target in hops:
                with hops[target].lock:
                    queueIDs = dict(hops[target].queueIDs)
                # A queue entry delivered twice: the relay's doing.  A message queued twice
                # (the relay was killed between its commit and its 250, and the client sent it
                # again): the client's, as with any MTA.
                line += (f" (queue entries delivered twice: "
                         f"{sum(c - 1 for c in queueIDs.values() if c > 1)})")
            print(line)
            if lost:
                print("  lost:", " ".join(lost[:20]))
                failed = True
        if args.notify_success or "refused" in targets:
            with notices.lock:
                noticeCounts = dict(notices.counts)
                byQueueID = dict(notices.queueIDs)
            expected = expectedNotices()
            missing = sorted(expected - set(noticeCounts))
            twice = sum(c - 1 for c in noticeCounts.values() if c > 1)
            print(f"  notices: expected={len(expected)} got={len(noticeCounts)} "
                  f"missing={len(missing)} duplicates={twice} (about a queue entry twice: "
                  f"{sum(c - 1 for c in byQueueID.values() if c > 1)})")
            if missing:
                print("  missing:", " ".join(f"{s}/{r}" for s, r in missing[:10]))
                failed = True
        if corrupt:
            print("  corrupt:", " ".join(corrupt[:20]))
        return 1 if failed else 0

    finally:
        stopAll()
        if args.keep:
            print("work directory:", work)
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
