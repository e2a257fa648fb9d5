#!/usr/bin/env python3
"""CPU time per delivered message of mailrelay's delivery process (and of the relay's main
process meanwhile): what streaming a message out and removing it from the spool cost.

For each run: ``--messages`` messages of ``--size`` are spooled into a fresh relay with its
queue held (``[queue] hold = true``), the relay is restarted with delivery on, its smarthost
an ``smtp-sink`` (which takes DATA; it does not offer CHUNKING), and the user+system CPU time
of the delivery process (``python -m mailrelay.app.deliveryprocess``, the twistd process's
child) and of twistd is read from ``/proc/<pid>/stat`` when its queue manager has started
and again when the spool is empty.  CPU time, not wall time, so a busy machine disturbs it
less.  The median of ``--repeat`` runs is printed as JSON.

Runs the twistd next to the Python running it, so ``/path/to/old/.venv/bin/python
bench/delivercost.py`` measures an older build.  ``--py-spy FILE`` records the delivery
process of the first run with py-spy (collapsed stacks, ``--format raw``) for a profile.

    .venv/bin/python bench/delivercost.py --size 1m --messages 100
    .venv/bin/python bench/delivercost.py --size 4k --messages 1000
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chunking import Relay, arguments, spoolThenDeliver  # noqa: E402 - after the path is set
from bench.run import BenchError, Sink, descendants, log, proc_cpu_seconds  # noqa: E402


def childOf(pid: int) -> int | None:
    """The delivery process of the twistd C{pid}: the descendant its fork server named
    C{mr-delivery}, or its (first) child when it started it as a new process."""
    found = descendants(pid)
    named = [child for child, comm, _ in found if comm == "mr-delivery"]
    return named[0] if named else (found[0][0] if found else None)


def one(args: argparse.Namespace, workdir: Path, run: int) -> dict[str, float]:
    with Sink(workdir) as sink:
        relay = Relay(args.twistd, workdir / f"relay-{run}", sink.port)
        profiler = None
        try:
            deadline = time.monotonic() + args.timeout
            spoolThenDeliver(relay, args.size, args.messages, deadline)
            assert relay.proc is not None
            child = childOf(relay.proc.pid)
            if child is None:
                raise BenchError("no delivery process")
            relayBefore = proc_cpu_seconds(relay.proc.pid)
            childBefore = proc_cpu_seconds(child)
            if args.py_spy and run == 0:
                spy = Path(sys.executable).with_name("py-spy")
                profiler = subprocess.Popen(
                    [str(spy) if spy.exists() else "py-spy", "record", "--pid", str(child),
                     "--format", "raw", "--rate", "250", "--output", args.py_spy,
                     "--nonblocking", "--gil"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = relay.drain(deadline)
            time.sleep(0.1)  # the last removals' batch
            childAfter = proc_cpu_seconds(child)
            relayAfter = proc_cpu_seconds(relay.proc.pid)
        finally:
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes its file then
                profiler.wait(30)
            relay.stop()
            if not args.keep:
                shutil.rmtree(relay.dir, ignore_errors=True)
        if sink.count < args.messages:
            raise BenchError(f"the sink counted {sink.count} of {args.messages} messages")
    n = args.messages
    result = {
        "delivery_cpu_ms_per_message": (childAfter - childBefore) * 1000 / n,
        "relay_cpu_ms_per_message": (relayAfter - relayBefore) * 1000 / n,
        "seconds": seconds,
    }
    log(f"run {run}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return result


def main(argv: list[str] | None = None) -> int:
    p = arguments(__doc__)
    p.add_argument("--py-spy", metavar="FILE", help="profile the first run's delivery process")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-delivercost-", dir=args.workdir))
    workdir.chmod(0o755)
    try:
        runs = [one(args, workdir, run) for run in range(args.repeat)]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "twistd": args.twistd, "size": args.size, "messages": args.messages,
        **{f"median_{key}": round(statistics.median(r[key] for r in runs), 3)
           for key in runs[0]},
        "runs": runs,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
