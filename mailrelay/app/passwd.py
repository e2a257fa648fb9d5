"""C{mailrelay-passwd}: add, change, delete and list the users of an AUTH password file.

    mailrelay-passwd FILE add USER       # a new user; the password is asked twice
    mailrelay-passwd FILE change USER    # a new password for an existing user
    mailrelay-passwd FILE set USER       # add or change
    mailrelay-passwd FILE delete USER
    mailrelay-passwd FILE list
    echo 'pw' | mailrelay-passwd --stdin FILE set USER   # the password from standard input

(or C{python -m mailrelay.passwd ...}).  The password is hashed with argon2id.  The file is
rewritten atomically (a temporary file in the same directory, fsynced, renamed over it, the
directory fsynced) under a lock, keeping its comments, order, permissions and owner; a new file
is created readable by its owner only.  A running relay reads the file again when it changes.
"""

from __future__ import annotations

import argparse
import fcntl
import getpass
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import TextIO

from argon2 import PasswordHasher

from mailrelay.receive.auth import PasswordFileError, parsePasswordLines, userNameProblem


class PasswdError(Exception):
    """A problem to report (on stderr, exit status 1)."""


def readPassword(useStdin: bool, stdin: TextIO, user: str) -> str:
    """The new password: the first line of C{stdin}, or typed twice at the terminal."""
    if useStdin:
        password = stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        password = getpass.getpass(f"New password for {user}: ")
        if getpass.getpass("Again: ") != password:
            raise PasswdError("the passwords differ; nothing changed")
    if not password:
        raise PasswdError("empty password refused; nothing changed")
    if "\0" in password:
        raise PasswdError("a password cannot contain a NUL character; nothing changed")
    return password


def _lines(path: str) -> tuple[list[str], os.stat_result | None]:
    """The file's lines (without line ends), checked, and its status; C{[]} for a missing
    file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
            st = os.fstat(f.fileno())
    except FileNotFoundError:
        return [], None
    except OSError as e:
        raise PasswdError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PasswdError(f"{path}: not UTF-8 text; fix it by hand first") from None
    try:
        parsePasswordLines(path, text)
    except PasswordFileError as e:
        raise PasswdError(f"{e}; fix it by hand first") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines], st


def _find(lines: list[str], user: str) -> int | None:
    for index, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#") and line.partition(":")[0] == user:
            return index
    return None


def _write(path: str, lines: list[str], st: os.stat_result | None) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".mailrelay-passwd-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), (st.st_mode & 0o7777) if st else 0o600)
            if st is not None:
                try:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                except PermissionError:
                    pass
            f.write("".join(line + "\n" for line in lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def run(argv: Sequence[str], stdin: TextIO, stdout: TextIO) -> None:
    """Carry out one command.  @raise PasswdError: what went wrong, for the user."""
    parser = argparse.ArgumentParser(
        prog="mailrelay-passwd",
        description="Manage the users of a mailrelay AUTH password file (argon2id hashes).",
    )
    parser.add_argument("--stdin", action="store_true",
                        help="read the password from the first line of standard input")
    parser.add_argument("file", help="the password file ([auth] password_file)")
    parser.add_argument("command", choices=("add", "change", "set", "delete", "list"))
    parser.add_argument("user", nargs="?", help="the user name (not for list)")
    args = parser.parse_args(list(argv))
    if args.command == "list":
        if args.user is not None:
            parser.error("list takes no user name")
        lines, _ = _lines(args.file)
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#"):
                print(line.partition(":")[0], file=stdout)
        return
    if args.user is None:
        parser.error(f"{args.command} needs a user name")
    problem = userNameProblem(args.user)
    if problem:
        raise PasswdError(f"{args.user!r}: {problem}")

    directory = os.path.dirname(os.path.abspath(args.file))
    try:
        lockfd = os.open(directory, os.O_RDONLY)
    except OSError as e:
        raise PasswdError(f"cannot open the directory {directory}: {e.strerror or e}") from None
    try:
        fcntl.flock(lockfd, fcntl.LOCK_EX)  # against a concurrent mailrelay-passwd
        lines, st = _lines(args.file)
        index = _find(lines, args.user)
        if args.command == "add" and index is not None:
            raise PasswdError(f"user {args.user!r} already exists in {args.file} (use change)")
        if args.command in ("change", "delete") and index is None:
            raise PasswdError(f"no user {args.user!r} in {args.file}")
        if args.command == "delete":
            assert index is not None
            del lines[index]
            what = "deleted"
        else:
            password = readPassword(args.stdin, stdin, args.user)
            line = f"{args.user}:{PasswordHasher().hash(password)}"
            if index is None:
                lines.append(line)
                what = "added"
            else:
                lines[index] = line
                what = "changed"
        try:
            _write(args.file, lines, st)
        except OSError as e:
            raise PasswdError(f"cannot write {args.file}: {e.strerror or e}") from None
    finally:
        os.close(lockfd)
    print(f"{args.user}: {what} in {args.file}", file=stdout)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script's entry point."""
    try:
        run(sys.argv[1:] if argv is None else argv, sys.stdin, sys.stdout)
    except PasswdError as e:
        print(f"mailrelay-passwd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
