#!/usr/bin/env python3
"""Python function calls and CPU time per accepted message in the accepting process's
reactor thread, measured in-process through the real classes.

Builds the relay's listener factory, spool and log observer from its default configuration
(as ``bench/run.py`` starts it: ``--listen``, ``--spool``, ``--hostname bench.test``,
``--smarthost``, and ``[queue] hold = true``), in this process: the factory is the one
``RelayService.plan`` makes, the spool's committer thread syncs for real into a temporary
directory, and the log goes to a file through the observer twistd would use
(``classicLogText`` behind the ``LevelFilter`` at ``info``).  Postfix's ``smtp-source``
(a separate process, so its work is not counted) sends ``--messages`` messages of ``--size``
octets over ``--sessions`` connections, one message per connection or, with ``--per-conn``
above 1, several (``smtp-source -d``), with PIPELINING as smtp-source uses it.

Each run reports, per message:

* ``calls``: the Python function calls of the reactor thread (cProfile's total), with
  ``--profile``; cProfile slows what it measures, so those runs do not give the CPU figures;
* ``reactor_cpu_ms``: the user+system CPU time of the reactor thread
  (``/proc/self/task/TID/stat``), and ``process_cpu_ms`` of the whole process (the spool's
  committer thread too).

It imports ``mailrelay`` from the virtualenv of the Python that runs it (not from this
checkout), so ``/path/to/old/.venv/bin/python bench/sessioncost.py`` measures an older
build with the same driver; ``--ab OLD_PYTHON`` alternates the two (``--repeat`` runs each)
and prints both lists and their medians.

    .venv/bin/python bench/sessioncost.py --profile tottime           # calls, top entries
    .venv/bin/python bench/sessioncost.py --per-conn 100 --repeat 5   # CPU per message
    .venv/bin/python bench/sessioncost.py --ab /tmp/old/.venv/bin/python --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

SMTP_SOURCE = "/usr/sbin/smtp-source"
SENDER = "sender@bench.test"
RECIPIENT = "rcpt@example.net"
CLIENT_NAME = "client.bench.test"


def _threadCPU(tid: int) -> tuple[float, float]:
    """The user and the system CPU seconds of this process's thread C{tid}."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _processCPUSeconds() -> float:
    times = os.times()
    return times.user + times.system


def _relay(directory: Path, reactor: Any) -> tuple[Any, Any]:
    """The relay's first listener factory and its services (the spool's), from the default
    configuration with the queue held."""
    from mailrelay.app.relay import RelayService
    from mailrelay.config import loadConfig

    try:
        from mailrelay.app.delivery import makeSpool
    except ImportError:  # (older builds)
        from mailrelay.app.relay import makeSpool  # type: ignore[attr-defined,no-redef]

    path = directory / "relay.toml"
    path.write_text("[queue]\nhold = true\n")
    overrides = {
        "listen": ["tcp:0:interface=127.0.0.1"],
        "spool": str(directory / "spool"),
        "hostname": "bench.test",
        "smarthost": "[127.0.0.1]:9",
    }
    config = loadConfig(str(path), overrides)
    top = RelayService(reactor, config.source, overrides)
    top.spool = makeSpool(config, reactor, top)
    plan = top.plan(config, None)
    return plan.listeners[0][1], top


def _logTo(path: Path) -> Any:
    """The observer twistd's C{--logfile} gets from the relay (L{installTwistdObserver})."""
    from twisted.logger import FileLogObserver, globalLogBeginner

    from mailrelay.app.logs import LevelFilter, classicLogText, filtered

    out = open(path, "a")
    observer = filtered(FileLogObserver(out, classicLogText()), LevelFilter())
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)
    return out


def runOnce(args: argparse.Namespace) -> dict[str, Any]:
    """One fresh relay (in this process) and one smtp-source run."""
    from twisted.internet import reactor
    from twisted.internet.protocol import ProcessProtocol

    directory = Path(tempfile.mkdtemp(prefix="mailrelay-sessioncost-", dir=args.workdir))
    result: dict[str, Any] = {}
    try:
        out = _logTo(directory / "relay.log")
        factory, top = _relay(directory, reactor)
        for service in list(top):  # (the spool's)
            service.privilegedStartService()
            service.startService()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        messages = args.messages
        cmd = [SMTP_SOURCE, "-s", str(args.sessions), "-m", str(messages), "-l", str(args.size),
               "-f", SENDER, "-t", RECIPIENT, "-M", CLIENT_NAME]
        if args.per_conn > 1:
            cmd.append("-d")
        cmd.append(f"127.0.0.1:{port.getHost().port}")
        tid = threading.get_native_id()
        profile = None
        if args.profile:
            import cProfile

            profile = cProfile.Profile()

        class Source(ProcessProtocol):
            def processEnded(self, reason: Any) -> None:
                if profile is not None:
                    profile.disable()
                user, system = _threadCPU(tid)
                result["reactor_user"], result["reactor_sys"] = user - start[0], system - start[1]
                result["process_cpu"] = _processCPUSeconds() - start[2]
                result["exit"] = reason.value.exitCode
                port.stopListening()
                for service in list(top):
                    service.stopService()
                reactor.stop()

        def begin() -> None:
            start[:] = [*_threadCPU(tid), _processCPUSeconds()]
            if profile is not None:
                profile.enable()
            reactor.spawnProcess(Source(), cmd[0], cmd, env={}, childFDs={0: "w", 1: 1, 2: 2})

        start: list[float] = [0.0, 0.0, 0.0]
        reactor.callWhenRunning(begin)
        reactor.run(installSignalHandlers=True)
        queuedFiles = sum(1 for _ in (directory / "spool").rglob("*") if _.is_file()
                     and _.parent.name == "queue")
        if result.get("exit") != 0:
            raise SystemExit(f"smtp-source: {' '.join(cmd)} exited {result.get('exit')}")
        result.update(
            messages=messages,
            queued_files=queuedFiles,
            reactor_cpu_ms=round(
                (result["reactor_user"] + result["reactor_sys"]) * 1000 / messages, 4),
            reactor_user_ms=round(result.pop("reactor_user") * 1000 / messages, 4),
            reactor_sys_ms=round(result.pop("reactor_sys") * 1000 / messages, 4),
            process_cpu_ms=round(result.pop("process_cpu") * 1000 / messages, 4),
        )
        if profile is not None:
            import pstats

            stats = pstats.Stats(profile)
            result["calls"] = round(stats.total_calls / messages, 1)  # type: ignore[attr-defined]
            if args.profile_out:
                stats.dump_stats(args.profile_out)
            stats.sort_stats(args.profile).print_stats(args.top)
        out.close()
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--per-conn", type=int, default=1,
                        help="1, or several messages per connection (smtp-source -d: "
                        "--messages / --sessions each)")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--profile", choices=["tottime", "cumtime", "ncalls"],
                        help="profile the reactor thread (cProfile) and print its top entries "
                        "sorted so; gives the calls per message")
    parser.add_argument("--profile-out", help="where to dump the cProfile stats")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs (each in a fresh process); the median is printed")
    parser.add_argument("--ab", metavar="OLD_PYTHON",
                        help="alternate runs of OLD_PYTHON's build (first) with this one's")
    parser.add_argument("--workdir", default="/var/tmp",
                        help="where the spools go: a disk, not tmpfs (default /var/tmp)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.per_conn > 1:
        args.messages = args.sessions * args.per_conn
    if args.once or (args.repeat == 1 and not args.ab):
        print(json.dumps(runOnce(args)), flush=True)
        return 0
    passed = list(argv if argv is not None else sys.argv[1:])
    for flag in ("--ab", "--repeat", "--workdir"):
        while flag in passed:
            at = passed.index(flag)
            del passed[at:at + 2]
    # Every run's spool stays until all runs are done: on an ext4 without a journal (this
    # VM's), creating a file scans past each inode of its group freed in the last ~30 s
    # (bench/README), so a spool removed just before a run would cost that run's file
    # creations more than the relay's code does.
    parent = tempfile.mkdtemp(prefix="mailrelay-sessioncost-runs-", dir=args.workdir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # (clean up)
    passed += ["--workdir", parent, "--keep"]
    try:
        runs = _alternate(args, passed)
    finally:
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        for key in ("reactor_cpu_ms", "process_cpu_ms", "calls"):
            values = [r[key] for r in results if key in r]
            if values:
                summary[f"{name} {key}"] = values
                summary[f"{name} {key} median"] = round(statistics.median(values), 4)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def _alternate(args: argparse.Namespace, passed: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Runs of the old build (C{--ab}) and of this one alternated, C{--repeat} each."""
    pythons = [("new", sys.executable)]
    if args.ab:
        pythons.insert(0, ("old", args.ab))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in pythons}
    for _ in range(args.repeat):
        for name, python in pythons:
            line = subprocess.run([python, __file__, "--once", *passed], check=True,
                                  stdout=subprocess.PIPE, text=True).stdout.splitlines()[-1]
            runs[name].append(json.loads(line))
            print(name, line, file=sys.stderr, flush=True)
    return runs


if __name__ == "__main__":
    raise SystemExit(main())
