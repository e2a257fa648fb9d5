#!/usr/bin/env python3
"""Delivery throughput of mailrelay's client, BDAT (CHUNKING, RFC 3030) against DATA.

For each run: a private Postfix instance (bench/run.py's) as the next hop, discarding what
it takes (``default_transport = discard``), offering CHUNKING or not
(``smtpd_discard_ehlo_keywords = chunking``); mailrelay (twistd) with that Postfix as its
smarthost.  N messages of SIZE are first spooled with the queue held, then the relay is
restarted with delivery on, and the time from its queue manager's start until its spool is
empty is measured: delivery only, the same messages both ways.  Runs alternate BDAT, DATA,
BDAT, ... and the median of --repeat runs is reported, with the ratio BDAT/DATA; Postfix's
smtpd log says which command carried the messages (``bdat=`` or ``data=`` counts).

Run as root (Postfix needs it):

    .venv/bin/python bench/chunking.py [--size 1m] [--messages 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import (  # noqa: E402 - after the path is set
    RELAY_NAME,
    BenchError,
    Postfix,
    free_port,
    log,
    parse_size,
    size_label,
    stop_process,
    tail,
    wait_smtp_ready,
)


def message(size: int, index: int) -> bytes:
    """About C{size} octets: text lines, one in 50 starting with a dot (DATA stuffs them)."""
    head = (f"From: <bench@source.test>\r\nTo: <sink@sink.test>\r\n"
            f"Subject: chunking {index}\r\n\r\n").encode()
    lines, n = [], 0
    while len(head) + n < size:
        line = (b"." if len(lines) % 50 == 0 else b"") + b"x" * 76 + b"\r\n"
        lines.append(line)
        n += len(line)
    return head + b"".join(lines)


class Relay:
    """mailrelay in its own directory, its configuration rewritten between starts."""

    def __init__(self, twistd: str, directory: Path, nexthop: int) -> None:
        self.twistd = twistd
        self.dir = directory
        self.nexthop = nexthop
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.logpath = directory / "mailrelay.log"
        directory.mkdir(parents=True)

    def start(self, hold: bool) -> None:
        config = self.dir / "mailrelay.toml"
        config.write_text(
            f'[relay]\nsmarthost = "[127.0.0.1]:{self.nexthop}"\n'
            f"[queue]\nhold = {'true' if hold else 'false'}\n"
            "[dns]\nreverse_lookups = false\n"
        )
        self._log = open(self.logpath, "ab")
        self.offset = self.logpath.stat().st_size
        self.proc = subprocess.Popen(
            [self.twistd, "-n", "--pidfile=", "mailrelay", "--config", str(config),
             "--listen", f"tcp:{self.port}:interface=127.0.0.1", "--spool",
             str(self.dir / "spool"), "--hostname", RELAY_NAME],
            cwd=self.dir, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        wait_smtp_ready(self.port, time.monotonic() + 60, lambda: self.proc.poll() is None)

    def log(self) -> str:
        with open(self.logpath, "rb") as f:
            f.seek(self.offset)
            return f.read().decode("utf-8", "replace")

    def queued(self) -> int:
        return len(list((self.dir / "spool" / "queue").glob("*.json")))

    def drain(self, deadline: float) -> float:
        """Wait until the spool is empty; return the seconds it took."""
        start = time.monotonic()
        while self.queued():
            if time.monotonic() > deadline:
                raise BenchError(f"{self.queued()} left\n{tail(self.logpath)}")
            time.sleep(0.01)
        return time.monotonic() - start

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, "mailrelay")
            self.proc = None
            self._log.close()


def one(args: argparse.Namespace, workdir: Path, mode: str, run: int) -> dict:
    params = ["default_transport=discard", "message_size_limit=0"]
    if mode == "data":
        params.append("smtpd_discard_ehlo_keywords=chunking")
    ns = argparse.Namespace(keep=args.keep, postfix_param=params)
    with Postfix(ns, workdir, 0, f"{mode}{run}") as postfix:
        relay = Relay(args.twistd, workdir / f"relay-{mode}{run}", postfix.port)
        try:
            deadline = time.monotonic() + args.timeout
            spoolThenDeliver(relay, args.size, args.messages, deadline)
            seconds = relay.drain(deadline)
        finally:
            relay.stop()
            if not args.keep:
                shutil.rmtree(relay.dir, ignore_errors=True)
        counts = re.findall(r"disconnect from \S+ .*?\b(bdat|data)=(\d+)",
                            postfix.logpath.read_text(errors="replace"))
    carried = {kind: sum(int(n) for k, n in counts if k == kind) for kind in ("bdat", "data")}
    rate = args.messages / seconds
    log(f"{mode}: {args.messages} x {size_label(args.size)} in {seconds:.2f}s = "
        f"{rate:.1f} msg/s, {rate * args.size / 2**20:.1f} MiB/s (smtpd: {carried})")
    return {"mode": mode, "seconds": seconds, "rate": rate, "smtpd": carried}


def spoolThenDeliver(relay: Relay, size: int, messages: int, deadline: float) -> None:
    """Spool C{messages} messages of C{size} with the queue held, then restart C{relay} with
    delivery on, and return when its queue manager has started."""
    relay.start(hold=True)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: submit(relay.port, message(size, i)), range(messages)))
    relay.stop()
    if relay.queued() != messages:
        raise BenchError(f"{relay.queued()} of {messages} messages spooled")
    relay.start(hold=False)
    while "queue manager started" not in relay.log():
        if time.monotonic() > deadline:
            raise BenchError(f"no queue manager\n{tail(relay.logpath)}")
        time.sleep(0.005)


def submit(port: int, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.sendmail("bench@source.test", ["sink@sink.test"], data)


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options of a benchmark spooling then delivering (this one's and
    bench/delivercost.py's)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("1m"))
    p.add_argument("--messages", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--twistd", default=str(Path(sys.executable).with_name("twistd")))
    return p


def main(argv: list[str] | None = None) -> int:
    args = arguments(__doc__).parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-chunking-", dir=args.workdir))
    workdir.chmod(0o755)  # Postfix's users must reach their directories
    results = []
    try:
        for run in range(args.repeat):
            for mode in ("bdat", "data"):
                results.append(one(args, workdir, mode, run))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    median = {m: statistics.median(r["rate"] for r in results if r["mode"] == m)
              for m in ("bdat", "data")}
    summary = {"size": args.size, "messages": args.messages, "repeat": args.repeat,
               "median_msg_per_s": median, "ratio_bdat_over_data": median["bdat"] / median["data"],
               "runs": results}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
