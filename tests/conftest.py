"""Fixtures shared by the end-to-end test modules."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.harness import RelayProcess


class SlowHop:
    """An aiosmtpd next hop that takes C{delay} seconds to answer each message, and counts
    the messages it accepted by Subject."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.cond = threading.Condition()
        self.started = 0
        self.subjects: Counter[str] = Counter()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.cond:
            self.started += 1
            self.cond.notify_all()
        await asyncio.sleep(self.delay)
        match = re.search(rb"^Subject: (\S+)", envelope.original_content, re.MULTILINE)
        with self.cond:
            self.subjects[match.group(1).decode() if match else ""] += 1
            self.cond.notify_all()
        return "250 2.0.0 OK"

    def waitFor(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"next hop: {what} not seen in {timeout}s: "
                                         f"started={self.started} got={dict(self.subjects)}")
                self.cond.wait(min(left, 0.2))


@pytest.fixture
def hop():
    controllers: list[Any] = []

    def start(delay: float) -> tuple[SlowHop, int]:
        handler = SlowHop(delay)
        from tests.test_e2e_outbound import _TCPController

        controller = _TCPController(handler, hostname="127.0.0.1", port=0, ready_timeout=10)
        controller.start()
        controllers.append(controller)
        return handler, controller.port

    yield start
    for c in controllers:
        c.stop()


@pytest.fixture
def relays(tmp_path: Path):
    made: list[RelayProcess] = []

    def make(config: str, name: str = "relay", **options: Any) -> RelayProcess:
        r = RelayProcess(tmp_path / name, config, **options)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop(signal.SIGKILL)
        for pid in deliveryPIDs(r):
            try:
                import os

                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def deliveryPIDs(r: RelayProcess) -> list[int]:
    """The process ids of every delivery process C{r} has started."""
    text = r.logPath.read_text(errors="replace") if r.logPath.exists() else ""
    return [int(p) for p in re.findall(r"delivery process started \(pid (\d+)\)", text)]


