"""The relay's processes give back the memory their start-up left free (issue 11's base
memory).

Python takes objects above 512 octets (code objects, big dicts, the contents of each
C{.pyc} it reads) from the C library's C{malloc}, whose heap keeps what was freed: the
pages of the start-up's garbage (imports, parsing the configuration, building the relay)
stay resident though nothing lives on them.  glibc's C{malloc_trim(0)} hands every whole
free page of the heap back to the kernel (C{MADV_DONTNEED}); nothing allocated moves.
Called where start-up ends: before the relay forks its fork server (the pages would else be
part of the image the three processes share), and in each process once its services have
started.  Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["libraryCode", "releaseFreeMemory", "unmapLibraryCode"]

_trim: Any = None


def releaseFreeMemory() -> bool:
    """Give the C library's free heap pages back to the system (glibc's C{malloc_trim(0)});
    whether any was given back (C{False} also where the C library has no C{malloc_trim})."""
    global _trim
    if _trim is None:
        import ctypes

        _trim = getattr(ctypes.CDLL(None), "malloc_trim", False)
        if _trim:
            _trim.argtypes = [ctypes.c_size_t]
            _trim.restype = ctypes.c_int
    return bool(_trim and _trim(0))


#: The first line of a mapping in C{/proc/PID/smaps}: its range, permissions, path.
_HEADER = re.compile(r"([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+ *(.*?)\n?$")
#: A shared library's file name.
_LIBRARY = re.compile(r"\.so(\.[\d.]+)?$")
_MADV_DONTNEED = 4
#: Where the kernel lists this process's mappings (Linux).
_SMAPS = "/proc/self/smaps"


def unmapLibraryCode() -> int:
    """Drop this process's page table entries of the shared libraries' code and read-only
    data (L{libraryCode}): the pages stay in the page cache, and what runs later faults
    back in from there.  The octets of the mappings dropped.

    Linux maps a library's file in whole page-cache folios, up to some MiB at one fault:
    importing C{cryptography} (Twisted's TCP transport imports its TLS) left twistd with 7
    MiB of the Rust binding's code mapped, none of which the relay runs at rest, counted in
    its memory (issue 11's base memory).  Nothing is dropped where there is no
    C{/proc/self/smaps} (not Linux).
    """
    import ctypes

    try:
        with open(_SMAPS) as f:
            mappings = libraryCode(f)
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not Linux
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for start, end in mappings:
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


def libraryCode(smaps: Iterable[str]) -> list[tuple[int, int]]:
    """The ranges of the mappings of shared libraries (C{.so} files) in C{smaps} (the lines
    of C{/proc/PID/smaps}) that hold nothing but the file's clean pages: not writable, and
    no page of their own (C{Anonymous: 0}: no relocated or written page, which dropping
    would lose)."""
    found = []
    mapping: tuple[int, int] | None = None
    for line in smaps:
        header = _HEADER.match(line)
        if header is not None:
            mapping = None
            path = header.group(4)
            if "w" not in header.group(3) and _LIBRARY.search(path) and path.startswith("/"):
                mapping = (int(header.group(1), 16), int(header.group(2), 16))
        elif mapping is not None and line.startswith("Anonymous:"):
            if line.split()[1] == "0":
                found.append(mapping)
            mapping = None
    return found
