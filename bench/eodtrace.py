#!/usr/bin/env python3
"""Where one client's end-of-data -> 250 goes: time stamps on the relay's reactor thread and
its spool committer's thread, per message, kept in memory and written to a file when the relay
stops -- never in the relay's log.

For each run a fresh relay (``[queue] hold = true``: spooled with fsync, nothing delivered, so
the queue stays idle; ``--deliver`` relays to an ``smtp-sink`` instead) is started through
this script, which wraps a few of the relay's functions with stamps before running twistd;
one client sends ``--messages`` messages of ``--size`` on one connection, one after the other
(``bench.run.latency_client``: the end-of-data dot in a write of its own).  Per message, the
intervals between the stamps (median and p90 of each, in microseconds):

    rx-submit      the read of the dot -> the commit handed to the committer (reactor)
    submit-thread  -> the batch started in the committer's thread (the hand-off)
    write          the two files written in tmp/ (the message and its envelope)
    sync           the data made durable (syncfs, or an fsync per file)
    rename         the two renames into queue/
    dirsync        the fsync of queue/
    thread-back    the batch's end in the thread -> its result on the reactor thread
    back-reply     -> the 250 handed to the socket (callbacks, the log line, the send), of
                   it: back-intake (-> the intake's result callback), intake (its log line,
                   observers and queue manager's notice), intake-reply (-> the send)

with the relay's CPU time per message (all its processes' user+system, ``/proc``) and the
committer thread's user and system time per batch (``getrusage(RUSAGE_THREAD)`` around each
batch), and the client's p50/p99.
Runs the twistd of the Python running it (``/old/.venv/bin/python bench/eodtrace.py``
measures that build); ``--runs`` relays in turn, each with a fresh spool directory.

    .venv/bin/python bench/eodtrace.py --size 4k --messages 400 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

INTERVALS = (
    ("rx-submit", "rx", "submit"),
    ("submit-thread", "submit", "batch0"),
    ("write", "batch0", "written"),
    ("sync", "written", "synced"),
    ("rename", "synced", "published"),
    ("dirsync", "published", "batch1"),
    ("thread-back", "batch1", "finished"),
    ("back-intake", "finished", "intake0"),
    ("intake", "intake0", "intake1"),
    ("intake-reply", "intake1", "sent"),
    ("back-reply", "finished", "sent"),
    ("total", "rx", "sent"),
)


# -- in the relay's process (--serve): the stamps


def serve(stampFile: str, twistdArgs: list[str]) -> None:
    """Wrap the relay's functions with stamps, then run twistd with C{twistdArgs}."""
    import resource

    from mailrelay.cleanup import intake
    from mailrelay.receive import protocol
    from mailrelay.spool import commit

    stamps: list[tuple[str, int]] = []
    batches: list[tuple[float, float]] = []
    now = time.perf_counter_ns

    def threadTime() -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_THREAD)
        return usage.ru_utime, usage.ru_stime

    def around(cls: Any, name: str, before: str | None, after: str | None) -> None:
        original = getattr(cls, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                stamps.append((before, now()))
            try:
                return original(*args, **kwargs)
            finally:
                if after is not None:
                    stamps.append((after, now()))

        setattr(cls, name, wrapper)

    originalReceived = protocol.SMTPServerProtocol.dataReceived

    def dataReceived(self: Any, data: bytes) -> None:
        if data.endswith(b"\r\n.\r\n") or data == b".\r\n":
            stamps.append(("rx", now()))
        originalReceived(self, data)

    protocol.SMTPServerProtocol.dataReceived = dataReceived  # type: ignore[method-assign]

    originalRun = commit.GroupCommitter._runBatch

    def runBatch(self: Any, batch: list[Any]) -> Any:
        stamps.append(("batch0", now()))
        user, system = threadTime()
        try:
            return originalRun(self, batch)
        finally:
            stamps.append(("batch1", now()))
            user2, system2 = threadTime()
            batches.append((user2 - user, system2 - system))

    commit.GroupCommitter._runBatch = runBatch  # type: ignore[method-assign]
    around(commit.GroupCommitter, "submit", "submit", None)
    around(commit._Commit, "prepare", None, "written")
    around(commit.GroupCommitter, "_syncFilesystem", None, "synced")
    around(commit._Commit, "syncData", None, "synced")
    around(commit._Commit, "publish", None, "published")
    around(commit.GroupCommitter, "_batchFinished", "finished", None)
    around(intake.IncomingMessage, "_committed", "intake0", "intake1")

    originalWriteNow = protocol.writeNow

    def writeNow(transport: Any, data: bytes) -> None:
        originalWriteNow(transport, data)
        if data.startswith(b"250 2.0.0 Ok: queued"):
            stamps.append(("sent", now()))

    protocol.writeNow = writeNow

    from twisted.internet import reactor

    def dump() -> None:
        with open(stampFile, "w") as f:
            json.dump({"stamps": stamps, "batchCPU": batches}, f)

    reactor.addSystemEventTrigger("after", "shutdown", dump)  # type: ignore[attr-defined]
    profileFile = os.environ.get("EODTRACE_PROFILE")
    if profileFile:
        # The reactor thread's calls from the first message on (after the start-up), to
        # count calls per message: cProfile's total over the run, divided by its messages.
        import cProfile

        profiler = cProfile.Profile()
        started: list[bool] = []

        def startProfile(self: Any, data: bytes) -> None:
            if not started:
                started.append(True)
                profiler.enable()
            dataReceived(self, data)

        protocol.SMTPServerProtocol.dataReceived = startProfile  # type: ignore[method-assign]
        reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
            "before", "shutdown", lambda: (profiler.disable(), profiler.dump_stats(profileFile)))
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *twistdArgs]
    run()


# -- the driver


def perMessage(stamps: list[list[Any]]) -> list[dict[str, int]]:
    """The stamps cut into messages (each from its C{rx} to its C{sent}), first stamp of a
    name kept (a message is alone in its batch with one client)."""
    messages: list[dict[str, int]] = []
    current: dict[str, int] | None = None
    for name, ns in stamps:
        if name == "rx":
            current = {"rx": ns}
        elif current is not None:
            current.setdefault(name, ns)
            if name == "sent":
                messages.append(current)
                current = None
    return messages


def oneRun(args: argparse.Namespace, workdir: Path, run: int) -> dict[str, Any]:
    from bench.run import (
        RELAY_NAME,
        BenchError,
        Sink,
        descendants,
        latency_client,
        percentile,
        proc_tree_cpu_seconds,
        stop_process,
        wait_smtp_ready,
    )

    directory = workdir / f"relay-{run}"
    directory.mkdir()
    stampFile = directory / "stamps.json"
    sink = Sink(workdir) if args.deliver else None
    port = _freePort()
    config = directory / "mailrelay.toml"
    lines = "[dns]\nreverse_lookups = false\n" if args.no_rdns else ""
    if sink is None:
        lines += "[queue]\nhold = true\n"
    config.write_text(lines)
    try:
        if sink is not None:
            sink.__enter__()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(stampFile), "--",
               "-n", "--pidfile=", "mailrelay", "--config", str(config),
               "--listen", f"tcp:{port}:interface=127.0.0.1", "--spool",
               str(directory / "spool"), "--hostname", RELAY_NAME]
        if sink is not None:
            cmd += ["--smarthost", f"[127.0.0.1]:{sink.port}"]
        with open(directory / "mailrelay.log", "wb") as logFile:
            proc = subprocess.Popen(cmd, cwd=directory, stdin=subprocess.DEVNULL,
                                    stdout=logFile, stderr=subprocess.STDOUT,
                                    start_new_session=True,
                                    env=_serveEnvironment(args.profile and f"{args.profile}.{run}"))
            try:
                wait_smtp_ready(port, time.monotonic() + 60, lambda: proc.poll() is None)
                time.sleep(0.5)  # the delivery process's start-up is not per-message work
                latency_client(port, 5, args.size, time.monotonic() + 60)  # warm-up
                pids = [proc.pid, *(pid for pid, _, _ in descendants(proc.pid))]
                before = proc_tree_cpu_seconds(pids)
                samples = latency_client(port, args.messages, args.size,
                                         time.monotonic() + args.timeout)
                after = proc_tree_cpu_seconds(pids)
            finally:
                stop_process(proc, "mailrelay")
    finally:
        if sink is not None:
            sink.__exit__(None, None, None)
    if not stampFile.exists():
        raise BenchError(f"no stamps from the relay: see {directory / 'mailrelay.log'}")
    data = json.loads(stampFile.read_text())
    messages = perMessage(data["stamps"])[5:]  # without the warm-up's
    intervals: dict[str, list[float]] = {}
    for label, start, end in INTERVALS:
        values = [(m[end] - m[start]) / 1000 for m in messages if start in m and end in m]
        intervals[label] = values
    batchCPU = data["batchCPU"][5:]
    if not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    calls = None
    if args.profile:
        import pstats

        # (The warm-up's 5 messages are in the profile too.)
        calls = round(pstats.Stats(f"{args.profile}.{run}").total_calls / (args.messages + 5))
    return {
        "reactor_calls_per_msg": calls,
        "client_p50_ms": round(percentile(samples, 50) * 1000, 3),
        "client_p99_ms": round(percentile(samples, 99) * 1000, 3),
        "cpu_ms_per_msg": round((after - before) * 1000 / args.messages, 3),
        # (getrusage's figures, per batch: one message each with one client)
        "committer_user_us_per_batch": round(sum(u for u, _ in batchCPU) * 1e6 / len(batchCPU), 1),
        "committer_sys_us_per_batch": round(sum(s for _, s in batchCPU) * 1e6 / len(batchCPU), 1),
        "intervals_us": {
            label: {"p50": round(statistics.median(v), 1),
                    "p90": round(percentile(v, 90), 1)}
            for label, v in intervals.items() if v
        },
    }


def _freePort() -> int:
    from bench.run import free_port

    return free_port()


def _serveEnvironment(profile: str | None) -> dict[str, str]:
    """The relay's environment: without this checkout on C{PYTHONPATH}, so an older build's
    Python imports its own mailrelay; C{profile}: where its reactor thread's profile goes."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("EODTRACE_PROFILE", None)
    if profile:
        env["EODTRACE_PROFILE"] = profile
    return env


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        serve(argv[1], argv[3:])
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.run import parse_size

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("4k"))
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--deliver", action="store_true",
                   help="deliver to an smtp-sink instead of holding the queue")
    p.add_argument("--no-rdns", action="store_true", help="[dns] reverse_lookups = false")
    p.add_argument("--profile", metavar="FILE",
                   help="cProfile the relay's reactor thread from the first message on: "
                        "FILE.<run> (pstats), and print its calls per message")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-eodtrace-", dir=args.workdir))
    results = []
    try:
        for run in range(args.runs):
            results.append(oneRun(args, workdir, run))
            print(json.dumps(results[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if len(results) > 1:
        summary = {
            "client_p50_ms": [r["client_p50_ms"] for r in results],
            "cpu_ms_per_msg": [r["cpu_ms_per_msg"] for r in results],
            "intervals_p50_us": {
                label: statistics.median(r["intervals_us"][label]["p50"] for r in results)
                for label, _, _ in INTERVALS if label in results[0]["intervals_us"]
            },
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
