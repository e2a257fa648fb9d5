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


SMAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:00 1 /usr/bin/python3.11
Rss:                   4 kB
Anonymous:             0 kB
7f0000000000-7f0000200000 r-xp 00002000 fd:00 2 /venv/site-packages/x/_rust.abi3.so
Size:               2048 kB
Rss:                1024 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
7f0000200000-7f0000210000 r--p 00202000 fd:00 2 /venv/site-packages/x/_rust.abi3.so
Rss:                  64 kB
Anonymous:            64 kB
7f0000210000-7f0000211000 rw-p 00212000 fd:00 2 /venv/site-packages/x/_rust.abi3.so
Anonymous:             0 kB
7f0000300000-7f0000400000 r--p 00000000 fd:00 3 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
Anonymous:             0 kB
7f0000400000-7f0000500000 r--p 00000000 fd:00 4 /usr/lib/locale/C.utf8/LC_CTYPE
Anonymous:             0 kB
7f0000500000-7f0000600000 rw-p 00000000 00:00 0
Anonymous:          1024 kB
7f0000600000-7f0000700000 r-xp 00000000 fd:00 5 /tmp/gone.so (deleted)
Anonymous:             0 kB
"""


def test_only_clean_library_mappings_are_dropped() -> None:
    """The code and read-only data of shared libraries, none of whose pages is the process's
    own: not the relocated pages (Anonymous), nor a writable mapping, nor a file that is no
    library (the program, locale data), nor anonymous memory."""
    from mailrelay.app.memory import libraryCode

    assert libraryCode(SMAPS.splitlines(keepends=True)) == [
        (0x7F0000000000, 0x7F0000200000),
        (0x7F0000300000, 0x7F0000400000),
    ]


def mappedOf(fragment: str) -> int:
    """KiB of this process's mappings of files whose path holds C{fragment}, resident."""
    total, mapped = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                mapped = fragment in line
            elif mapped and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps")
def test_dropped_library_code_runs_again() -> None:
    """What is dropped is no longer counted in the process, and runs as before when used:
    it faults back in from the page cache."""
    from cryptography.hazmat.primitives import hashes

    from mailrelay.app.memory import unmapLibraryCode

    def sha256(data: bytes) -> str:
        digest = hashes.Hash(hashes.SHA256())
        digest.update(data)
        return digest.finalize().hex()

    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256(b"abc") == expected
    before = mappedOf("_rust")
    assert unmapLibraryCode() > 0
    after = mappedOf("_rust")
    assert after < before, (before, after)
    assert sha256(b"abc") == expected


def test_nothing_dropped_without_proc(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no /proc/self/smaps (not Linux), nothing is dropped, and the relay's
    start (which calls it once running) is not disturbed by an error."""
    from mailrelay.app.memory import unmapLibraryCode

    monkeypatch.setattr(memory, "_SMAPS", str(tmp_path / "no-such-file"))
    assert unmapLibraryCode() == 0
