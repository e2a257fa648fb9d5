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

from typing import Any

__all__ = ["releaseFreeMemory"]

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
