"""L{mailrelay.app.memory.releaseFreeMemory}: the free pages of the C library's heap go back
to the kernel; nothing allocated is touched."""

from __future__ import annotations

import re
import sys

import pytest

from mailrelay.app import memory
from mailrelay.app.memory import releaseFreeMemory


def residentHeap() -> int:
    """KiB of this process's anonymous memory that is resident (all its heaps)."""
    with open("/proc/self/smaps_rollup") as f:
        match = re.search(r"^Anonymous:\s+(\d+) kB", f.read(), re.MULTILINE)
    assert match is not None
    return int(match.group(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freePagesGoBack() -> None:
    """12 MiB freed in the middle of the heap (a block still in use above it, so that
    C{free} alone cannot shrink the heap) stay resident until released."""
    if not getattr(__import__("ctypes").CDLL(None), "malloc_trim", None):
        pytest.skip("not glibc")
    # 64 KiB objects: from malloc's heap (below its mmap threshold), not Python's arenas.
    blocks = [bytes([i % 256]) * (64 * 1024) for i in range(192)]
    above = bytearray(b"k" * (64 * 1024))
    del blocks
    before = residentHeap()
    assert releaseFreeMemory() is True
    after = residentHeap()
    assert before - after >= 8 * 1024, (before, after)
    assert above == b"k" * (64 * 1024)  # (what is in use is untouched)


def test_withoutMallocTrim(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the C library has no C{malloc_trim}, nothing is released, and nothing fails."""
    monkeypatch.setattr(memory, "_trim", False)
    assert releaseFreeMemory() is False
