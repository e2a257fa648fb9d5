"""Reading a file the configuration names -- a certificate, a key, a CA bundle, a password
file, a DKIM key -- as a regular file of a sensible size (L{readNamedFile}).

A FIFO, a device or a socket named by mistake would be opened and read: the check, the
relay's start and a reload waited forever for a FIFO's writer, and C{/dev/zero} was read
until memory ran out.  They are refused at once instead, and the caller's message names the
key, the file and why.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["MAX_NAMED_FILE", "readNamedFile"]

#: The most octets such a file may hold: a large CA bundle is well under 1 MiB, a table of
#: a hundred thousand users and hashes about 10 MiB.
MAX_NAMED_FILE = 64 << 20


def readNamedFile(path: str) -> bytes:
    """The bytes of C{path}, a regular file of at most L{MAX_NAMED_FILE} octets.  It is
    opened without blocking (a FIFO without a writer does not hold the caller).

    @raise OSError: it cannot be read, is not a regular file or is too big; C{strerror}
        says which, for the caller's message.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a file")
            raise OSError(errno.EINVAL, f"not a regular file ({kind})", path)
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_NAMED_FILE:
                raise OSError(errno.EFBIG, f"larger than {MAX_NAMED_FILE >> 20} MiB", path)
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
