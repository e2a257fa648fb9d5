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
import pwd
import stat
from collections.abc import Callable

__all__ = [
    "MAX_NAMED_FILE",
    "explainPermissions",
    "fileStamp",
    "readError",
    "readNamedFile",
    "runUserReadError",
    "userError",
]

#: The most octets such a file may hold: a large CA bundle is well under 1 MiB, a table of
#: a hundred thousand users and hashes about 10 MiB.
MAX_NAMED_FILE = 64 << 20


def fileStamp(path: str) -> tuple[int, int, int, int]:
    """What says that the file C{path} changed since it was read (its inode, device,
    modification time and size), for a file read again when it changes.

    @raise OSError: it cannot be looked at."""
    st = os.stat(path)
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


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


#: Whether this process is the relay (or one of its children): see L{explainPermissions}.
_relay = False


#: The user the relay's processes run as once started, when it is not this process's user
#: yet (L{runAsUser}); C{None}: this process's own.  C{_runGID}: its group (C{None}: the
#: user's own).
_runUID: int | None = None
_runGID: int | None = None


def runAsUser(uid: int | None, gid: int | None = None) -> None:
    """The relay, started as root, will run as C{uid} (twistd's C{--uid}, and group C{gid},
    its C{--gid}) once started: its checks made before (the configuration, as root) are to
    be made as for that user (L{runUID}, L{runUserReadError}).  C{None} (or -1: staying
    root): as for this process's own user."""
    global _runUID, _runGID
    _runUID = None if uid is None or uid < 0 else uid
    _runGID = None if gid is None or gid < 0 else gid


def runUserReadError(path: str) -> tuple[str, OSError] | None:
    """When this process (root) will run as another user (L{runAsUser}), whom the files the
    relay's children read are read by: why that user cannot open C{path} (its name, and the
    error), else C{None}.  Asked of the system itself, in a child process running as that
    user, so that groups, ACLs and the directories on the way all count."""
    uid = _runUID
    if uid is None or uid == 0 or os.geteuid() != 0:
        return None
    return userError(uid, _runGID, lambda: os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK)),
                     path)


def userError(
    uid: int, gid: int | None, act: Callable[[], object], path: str
) -> tuple[str, OSError] | None:
    """Why the user C{uid} (with the group C{gid}, C{None}: the user's own, and the user's
    supplementary groups) cannot C{act} on C{path}: its name and the C{OSError} C{act}
    raised, else C{None}.  C{act} runs in a child process (this one must be root) that has
    become that user, so that the system itself answers: groups, ACLs and the directories
    on the way all count."""
    try:
        entry = pwd.getpwuid(uid)
        name, gid = entry.pw_name, entry.pw_gid if gid is None else gid
        groups = os.getgrouplist(name, gid)
    except KeyError:
        name, gid, groups = str(uid), uid if gid is None else gid, []
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, which exits here
        code = 0
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            act()
        except OSError as e:
            code = e.errno or errno.EACCES
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return None
    return name, OSError(code, os.strerror(code) if code > 0 else "the check failed", path)


def runUID() -> int:
    """The user the relay's processes run as: the one set by L{runAsUser}, else this
    process's effective user."""
    return os.geteuid() if _runUID is None else _runUID


def explainPermissions(relay: bool = True) -> None:
    """Say (L{readError}) which user a refused read ran as, and what to do: for the relay's
    processes, which run as the relay's user; not for the commands (C{sendmail},
    C{mailrelay}), which any user may run."""
    global _relay
    _relay = relay


def readError(e: OSError) -> str:
    """Why a file could not be read, for a message: C{e}'s C{strerror}, and in the relay's
    processes (L{explainPermissions}) for a refused permission when not root, which user
    it runs as and what to do.

    twistd's C{--uid} drops root once the relay has started: a reload, a file re-read when it
    changes and the acceptor processes read as the relay's user, so a file only root may
    read (certbot's C{privkey.pem}, a 0600 password file) works at start and then fails.
    """
    text = e.strerror or str(e)
    uid = os.geteuid()
    if not _relay or not isinstance(e, PermissionError) or uid == 0:
        return text
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return (
        f"{text} (this process runs as user {user}: after start-up -- at a reload, when a "
        "file changes, in acceptor processes -- the relay reads its files as that user, so "
        "let it read this one, e.g. by its group and mode 0640)"
    )
