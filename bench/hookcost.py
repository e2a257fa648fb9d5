#!/usr/bin/env python3
"""CPU time per accepted message of the real relay: what the hooks of issue 9 cost when no
plugin is configured (every chain empty), against a build from before them.

Starts ``twistd -n mailrelay`` from the virtualenv of the Python running this script (so
``/path/to/old/.venv/bin/python bench/hookcost.py`` measures an older build), holding its
mail (``[queue] hold = true``: spooled, nothing delivered), without reverse lookups.  Sends
``--messages`` messages of ``--size`` octets over ``--sessions`` connections in turn, several
messages per connection, and reads the relay's user+system CPU time from ``/proc/<pid>/stat``
before and after: CPU time, not wall time, so a busy machine disturbs it less.  Repeats
``--repeat`` times with a fresh relay and spool and prints the median, as JSON.
``--processes N`` sets ``[relay] processes`` (acceptor processes): the CPU time is then the
sum over the relay and its child processes.

    .venv/bin/python bench/hookcost.py --messages 2000
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import (  # noqa: E402 (the path)
    descendants,
    free_port,
    proc_tree_cpu_seconds,
    wait_smtp_ready,
)


def treeCPUSeconds(pid: int) -> float:
    """The CPU time of C{pid} and of its descendants (the fork server, the acceptor
    processes it forks)."""
    return proc_tree_cpu_seconds([pid, *(child for child, _, _ in descendants(pid))])


def run(messages: int, sessions: int, size: int, processes: int = 1) -> float:
    """CPU milliseconds per message, for one fresh relay."""
    directory = Path(tempfile.mkdtemp(prefix="mailrelay-hookcost-"))
    port = free_port()
    config = directory / "relay.toml"
    config.write_text(
        'hostname = "relay.test"\n[queue]\nhold = true\n[dns]\nreverse_lookups = false\n'
        f'[spool]\ndirectory = "{directory / "spool"}"\n'
        f'[[listeners]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n'
        + (f"[relay]\nprocesses = {processes}\n" if processes != 1 else "")
    )
    twistd = str(Path(sys.executable).with_name("twistd"))
    process = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "mailrelay", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=directory,
    )
    try:
        wait_smtp_ready(port, time.monotonic() + 30, lambda: process.poll() is None)
        if processes != 1:
            time.sleep(5)  # the acceptor processes start
        body = b"Subject: hook cost\r\n\r\n" + b"x" * 70 + b"\r\n"
        body = body + (b"y" * 76 + b"\r\n") * max(0, (size - len(body)) // 78)
        perSession = messages // sessions
        before = treeCPUSeconds(process.pid)
        for _ in range(sessions):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo("client.test")
                for _ in range(perSession):
                    client.sendmail("alice@example.com", ["bob@example.org"], body)
        time.sleep(0.2)  # the last commits' group fsync
        after = treeCPUSeconds(process.pid)
        return (after - before) * 1000 / (perSession * sessions)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1, help="[relay] processes")
    options = parser.parse_args()
    runs = [run(options.messages, options.sessions, options.size, options.processes)
            for _ in range(options.repeat)]
    print(json.dumps({
        "python": sys.executable,
        "messages": options.messages,
        "processes": options.processes,
        "cpu_ms_per_message": [round(r, 3) for r in runs],
        "median": round(statistics.median(runs), 3),
    }))


if __name__ == "__main__":
    main()
