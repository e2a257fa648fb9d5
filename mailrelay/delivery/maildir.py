"""The C{maildir} backend: each recipient's copy written into a Maildir, in a thread.

The route's next hop is a path template with the placeholders C{{local}}, C{{domain}} and
C{{address}} (C{{local}@{domain}}), for example C{"/var/mail/{domain}/{local}/Maildir"}.
Only those three are replaced, in one pass (what one is replaced with is never read for
another: C{{domain}@example.org} is user C{{domain}}), and this is not C{str.format}: other
braces stay as they are.
A relative template is relative to the process's working directory; the configuration should
make it absolute.

For the path the local part is unquoted (C{"john doe"} becomes C{john doe}), lower-cased,
and, with C{[delivery] recipient_delimiter} (C{"+"}), cut before its address extension
(C{bob+lists} is C{bob}'s unless a user C{bob+lists} exists: L{userParts}; its
C{Delivered-To:} keeps the whole address);
a local part or domain that is empty, starts with C{"."}, or contains C{"/"}, a NUL or another
control character is refused (permanent 5.1.3), so that no recipient can write outside its
directory.

Each copy starts with C{Return-Path: <sender>} and C{Delivered-To: <address>} and is stored
with LF line ends (the Unix Maildir convention: the spool's CRLF become LF; a lone CR stays).
A C{BODY=BINARYMIME} message, whose CRLF need not be line ends, is first made 7-bit as for a
next hop without BINARYMIME (its binary parts base64: L{withTextLineEnds}), or returned with 5.6.3
when it cannot be (DKIM-signed, 8-bit header fields).
The copy is written to C{tmp/}, fsynced, linked (or, where the file system cannot link,
renamed) into C{new/}, and C{new/} is fsynced, as the Maildir specification asks.  Missing
Maildirs (C{tmp}, C{new}, C{cur}) are created with mode 0700.

Exactly once across a crash: the copy's unique name is the queue id (unique on this host,
L{mailrelay.spool.ids}), a hash of the mailbox and the host name, the same at every attempt,
so that an attempt killed after its copy reached C{new/} but before the spool recorded the
recipient delivered is found by the retry: the name in C{new/} (or C{EEXIST} at the link)
means delivered.  A copy the user's mail reader has since moved to C{cur/} is found there:
under the 64 names the specification's flags can give it (C{name:2,} to C{name:2,DFPRST},
looked up one by one), and under any other C{name:info} (C{cur/} listed) only when C{tmp/}
still holds the name, left by an attempt that may have reached the link and did not end:
C{cur/}, which can be big, is not listed otherwise.

Only for users that exist, unless C{[delivery] create_mailboxes} is set: a user's directory
is the template up to and including its first part holding C{{local}} or C{{address}}
(C{/var/mail/example.org/bob} for C{/var/mail/{domain}/{local}/Maildir}); when it does not
exist the recipient bounces with 5.1.1 (unknown user) and nothing is created, as Postfix's
delivery agents deliver only to the users they know; when it cannot be looked up (a
directory the relay may not search, an I/O error) the recipient is deferred.  (Otherwise
any local part of a routed domain would create a directory.)  The relay refuses those
recipients at RCPT already (L{MaildirUsers}), unless C{[[routers]]} are configured (a
router may send any recipient elsewhere); delivery bounces a user whose directory went
away since.  A template without either
placeholder is one mailbox, created when missing.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import os
import re
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.address import userParts
from mailrelay.delivery.common import builtinOptions, removeWhenFired, withTextLineEnds
from mailrelay.errors import DeliveryFailure
from mailrelay.interfaces import (
    CONTINUE,
    DeliveryStatus,
    IDeliveryBackend,
    PluginContext,
    RecipientResult,
    Route,
    Verdict,
    VerdictKind,
    threadHandOff,
)
from mailrelay.smtp.replies import VALIDATOR_FAILED

log = Logger()

CHUNK = 65536
DELIVERED_DIAGNOSTIC = "X-mailrelay; delivered to maildir"

#: The placeholders of a template (any other brace is text).
_PLACEHOLDERS = re.compile(r"\{(local|domain|address)\}")


class UnsafeAddress(ValueError):
    """A local part or domain that cannot be part of a path."""


def unquoteLocalPart(local: str) -> str:
    """C{local} without its quotes and backslash escapes, when it is a quoted-string."""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        out = []
        chars = iter(local[1:-1])
        for c in chars:
            if c == "\\":
                c = next(chars, "")
            out.append(c)
        return "".join(out)
    return local


def _checkComponent(text: str, what: str) -> str:
    if not text:
        raise UnsafeAddress(f"empty {what}")
    if text.startswith("."):
        raise UnsafeAddress(f"{what} {text!r} starts with '.'")
    if "/" in text or "\\" in text:
        raise UnsafeAddress(f"{what} {text!r} contains a slash")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise UnsafeAddress(f"{what} {text!r} contains a control character")
    return text


def _split(address: str) -> tuple[str, str]:
    """The local part (unquoted) and the domain of C{address}."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    return unquoteLocalPart(local), domain


def _path(template: str, local: str, domain: str) -> str:
    local = _checkComponent(local.lower(), "local part")
    if "{domain}" in template or "{address}" in template:
        domain = _checkComponent(domain, "domain")
    values = {"address": f"{local}@{domain}", "local": local, "domain": domain}
    # In one pass: what a placeholder is replaced with is never read for another.
    return _PLACEHOLDERS.sub(lambda m: values[m.group(1)], template)


def _userPath(template: str, local: str, domain: str) -> str | None:
    parts = template.split("/")
    for index, part in enumerate(parts):
        if "{local}" in part or "{address}" in part:
            return _path("/".join(parts[: index + 1]), local, domain)
    return None


def mailboxPath(template: str, address: str) -> str:
    """The Maildir of C{address} (canonical, C{local@domain}) according to C{template}.

    @raise UnsafeAddress: the local part or domain cannot safely be part of a path.
    """
    return _path(template, *_split(address))


def mailboxes(template: str, address: str, delimiters: str = "") -> list[tuple[str, str | None]]:
    """C{(mailbox, user directory)} of each user C{address} may be (L{userParts}), in the
    order they are looked for: the first whose user directory exists is it.  A user's
    directory is the template up to and including its first part holding C{{local}} or
    C{{address}} (see the module docstring), C{None} for a template without them.

    @raise UnsafeAddress: as L{mailboxPath}.
    """
    local, domain = _split(address)
    found: list[tuple[str, str | None]] = []
    for part in userParts(local, delimiters):
        entry = (_path(template, part, domain), _userPath(template, part, domain))
        if entry not in found:
            found.append(entry)
    return found


def isUser(directory: str) -> bool:
    """Whether C{directory} (a user's, L{mailboxes}) exists as a directory: the user is known.

    @raise OSError: it could not be looked up (a directory on the way that the relay may not
        search, a symbolic link loop, an I/O error): not an unknown user, a lookup failure.
    """
    try:
        return stat.S_ISDIR(os.stat(directory).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return False  # no user can have a name the file system cannot hold
        raise


def _writeFailed(address: str, e: OSError) -> RecipientResult:
    """The result of C{address} whose mailbox could not be looked up or written: returned
    with 5.2.2 when the mailbox is over its quota or the file over its size limit (EDQUOT,
    EFBIG: as Postfix's C{mbox_dsn}, global/mbox_open.c), else deferred (4.3.1 for a full
    file system, 4.3.0 otherwise)."""
    status = DeliveryStatus.TRANSIENT
    if e.errno in (errno.EDQUOT, errno.EFBIG):
        status, code = DeliveryStatus.PERMANENT, "5.2.2"
    elif e.errno == errno.ENOSPC:
        code = "4.3.1"
    else:
        code = "4.3.0"
    return RecipientResult(address, status, code, f"X-mailrelay; cannot deliver to maildir: {e}")


#: The names a mail reader gives a copy it moves from C{new/} to C{cur/}: C{name:2,flags},
#: the flags a subset of the specification's C{DFPRST} in ASCII order (64 names).
_READ_INFOS = tuple(
    ":2," + "".join(flags)
    for size in range(len("DFPRST") + 1)
    for flags in itertools.combinations("DFPRST", size)
)


def _fsyncDirectory(path: str) -> None:
    """Make the entries of the directory C{path} durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _anyUser(directories: list[str]) -> bool:
    """Whether any of C{directories} is a user's (L{isUser})."""
    return any(isUser(d) for d in directories)


def _hostnameForName() -> str:
    """This host's name as a Maildir file name part ('/' and ':' escaped as the spec says)."""
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


#: Seconds the RCPT-time lookup of a user's directory may take before the recipient is
#: deferred (a hung network file system).
USER_LOOKUP_TIMEOUT = 30.0

#: The RCPT-time lookups that may hang at once (running for L{HUNG_AFTER} seconds or more):
#: a hung file system holds a thread per lookup, and the pool also checks passwords and
#: runs plugins.  Beyond, a recipient is deferred at once.  (Lookups queued in a burst are
#: load, not a hang: they are never counted before L{HUNG_AFTER}.)
USER_LOOKUPS_IN_FLIGHT = 4
#: Seconds after which a lookup that has not come back counts as hanging.
HUNG_AFTER = 5.0

UNKNOWN_USER = Verdict.reject("Error: user unknown (no mailbox here)", 550, "5.1.1")
LOOKUP_FAILED = Verdict(VerdictKind.DEFER, VALIDATOR_FAILED)


def needsUsers(rules: Iterable[Any], createMailboxes: bool) -> bool:
    """Whether any of the routing C{rules} is a maildir route delivering only to its users
    (a template with C{{local}} or C{{address}}, C{createMailboxes} off)."""
    return not createMailboxes and any(
        rule.backend == "maildir"
        and rule.nexthop
        and ("{local}" in rule.nexthop or "{address}" in rule.nexthop)
        for rule in rules
    )


class MaildirUsers:
    """Refuses at RCPT the recipients a maildir route would bounce as unknown users, as
    Postfix's C{smtpd_reject_unlisted_recipient} does: accepting them would make the relay
    send a bounce to a sender that is often forged (backscatter).

    A recipient routed (by the routing table) to a maildir route whose template names users
    is refused 550 5.1.1 when its user's directory (L{mailboxes}) does not exist, and
    550 5.1.3 when its address cannot name a directory; a lookup that fails (L{isUser}
    raises), takes longer than C{timeout}, or finds L{USER_LOOKUPS_IN_FLIGHT} lookups
    hanging defers it (451 4.3.0, logged).  Recipients routed elsewhere are not looked at,
    nor C{postmaster} (RFC 5321 4.5.1: always accepted; delivery bounces it to the sender
    when it has no mailbox).  The lookups run in a thread: a directory on a network file
    system must not stall the reactor.
    """

    def __init__(
        self,
        table: Any,
        clock: Any,
        deferToThread: Callable[..., Deferred] | None = None,
        timeout: float = USER_LOOKUP_TIMEOUT,
        inFlight: int = USER_LOOKUPS_IN_FLIGHT,
        delimiters: str = "",
    ) -> None:
        """
        @param delimiters: the recipient delimiters (L{userParts}): C{bob+lists} is C{bob}'s
            unless a user C{bob+lists} exists.
        @param table: the routing table (L{mailrelay.route.RoutingTable}).
        @param clock: the reactor: its thread pool runs the lookups unless C{deferToThread}
            is given, and it times them out.
        @param deferToThread: C{callable(f, *args)} returning a Deferred of C{f(*args)}.
        @param inFlight: how many lookups may be hanging at once (L{HUNG_AFTER}).
        """
        self.table = table
        self.clock = clock
        self.timeout = timeout
        self.maxInFlight = inFlight
        self.delimiters = delimiters
        #: When each lookup running began (timed out or not: until its thread is done).
        self._running: dict[int, float] = {}
        self._serials = itertools.count()
        self._deferToThread = deferToThread or threadHandOff(clock)

    def check(self, recipient: Any) -> Deferred[Verdict] | None:
        """C{None} when C{recipient} (an L{mailrelay.envelope.Recipient}) does not go to a
        maildir route with users, else a Deferred firing with L{CONTINUE} (a known user) or
        the refusal."""
        address = recipient.address
        local = address.rpartition("@")[0] if "@" in address else address
        if local.lower() == "postmaster":
            return None
        try:
            route = self.table.route(None, recipient)
        except DeliveryFailure:
            return None  # no route: delivery says so
        if route.backend != "maildir":
            return None
        try:
            users = [u for _, u in mailboxes(route.nexthop, address, self.delimiters)]
        except UnsafeAddress as e:
            return succeed(Verdict.reject(f"Error: {e}", 550, "5.1.3"))
        if None in users:
            return None  # (a template naming no user)
        directory = str(users[0])
        now = self.clock.seconds()
        hanging = sum(1 for began in self._running.values() if now - began >= HUNG_AFTER)
        if hanging >= self.maxInFlight:
            problem = (f"{hanging} lookups have been running for {HUNG_AFTER:g}s or more (a "
                       "hung file system?)")
            return succeed(self._failed(problem, address, directory))
        serial = next(self._serials)
        self._running[serial] = now
        answer: Deferred[Any] = Deferred()
        timer = self.clock.callLater(self.timeout, self._timedOut, answer)

        def done(result: Any) -> None:
            del self._running[serial]
            if timer.active():
                timer.cancel()
                answer.callback(result)

        self._deferToThread(_anyUser, users).addBoth(done)
        return answer.addCallbacks(
            lambda known: CONTINUE if known else UNKNOWN_USER,
            lambda failure: self._failed(failure.getErrorMessage(), address, directory),
        )

    @property
    def inFlight(self) -> int:
        """The lookups running (timed out or not: until their thread is done)."""
        return len(self._running)

    def _timedOut(self, answer: Deferred[Any]) -> None:
        answer.errback(defer.TimeoutError(f"no answer within {self.timeout:g}s"))

    def _failed(self, problem: str, address: str, directory: str) -> Verdict:
        log.warn(
            "cannot look up the mailbox of {address} ({directory}): {problem}; deferring",
            address=address,
            directory=directory,
            problem=problem,
        )
        return LOOKUP_FAILED


@dataclass
class _Job:
    address: str
    #: C{(mailbox, user directory)} of each user the address may be (L{mailboxes}); the
    #: user directory C{None}: none need exist.
    candidates: list[tuple[str, str | None]]
    #: The mailbox written to (chosen in the thread), and whether its user is known.
    directory: str = ""
    known: bool = False


@implementer(IDeliveryBackend)
class MaildirBackend:
    """Writes each recipient's copy into its Maildir (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        *,
        deferToThread: Callable[..., Deferred] | None = None,
        hostname: str | None = None,
        createMailboxes: bool = False,
        recipientDelimiter: str = "",
    ) -> None:
        """
        @param reactor: the reactor; its thread pool runs the file operations unless
            C{deferToThread} is given.
        @param deferToThread: C{callable(f, *args)} returning a Deferred of C{f(*args)}
            (tests pass one running C{f} at once).
        @param hostname: the host name in unique file names (default: C{socket.gethostname()}).
        @param createMailboxes: deliver to any user, creating its directory; else only to
            those whose directory exists (see the module docstring).
        @param recipientDelimiter: the characters separating a user from an address
            extension (L{userParts}): C{bob+lists@} goes to C{bob}'s mailbox unless a user
            C{bob+lists} exists.
        """
        self.reactor = reactor
        self.createMailboxes = createMailboxes
        self.recipientDelimiter = recipientDelimiter
        self._deferToThread = deferToThread or threadHandOff(reactor)
        self.hostname = (
            hostname.replace("/", "\\057").replace(":", "\\072") if hostname else _hostnameForName()
        )

    def deliver(self, envelope: Any, recipients: Any, route: Route, messagePath: Path) -> Deferred:
        """Write each recipient's copy into the Maildir C{route.nexthop} names (a template,
        see the module docstring); C{route.options} do not apply to files."""
        recipients = list(recipients)
        results: list[RecipientResult | None] = [None] * len(recipients)
        jobs: list[tuple[int, _Job]] = []
        for index, recipient in enumerate(recipients):
            try:
                candidates = mailboxes(route.nexthop, recipient.address, self.recipientDelimiter)
            except UnsafeAddress as e:
                log.warn(
                    "{queueID}: refusing maildir delivery to {address}: {problem}",
                    queueID=envelope.queueID,
                    address=recipient.address,
                    problem=str(e),
                )
                results[index] = RecipientResult(
                    recipient.address,
                    DeliveryStatus.PERMANENT,
                    "5.1.3",
                    f"X-mailrelay; cannot deliver to maildir: {e}",
                )
            else:
                jobs.append((index, _Job(recipient.address, candidates)))
        if not jobs:
            return succeed(results)

        header = f"Return-Path: <{envelope.sender}>\n"

        def write(prepared: Any) -> Any:
            if isinstance(prepared, list):  # a binary message that cannot be converted
                for (index, _), outcome in zip(jobs, prepared, strict=True):
                    results[index] = outcome
                return results
            _, path, converted = prepared
            d = self._deferToThread(self._deliverAll, header, [j for _, j in jobs], str(path),
                                    envelope.queueID)
            d.addCallbacks(done, failed)
            return removeWhenFired(d, converted)

        def done(outcomes: list[RecipientResult]) -> list[RecipientResult]:
            for (index, job), result in zip(jobs, outcomes, strict=True):
                results[index] = result
                if result.status is DeliveryStatus.DELIVERED:
                    log.info(
                        "{queueID}: delivered to {address} in maildir {directory}",
                        queueID=envelope.queueID,
                        address=job.address,
                        directory=job.directory,
                    )
                else:
                    log.warn(
                        "{queueID}: maildir delivery to {address} in {directory} failed: "
                        "{diagnostic}",
                        queueID=envelope.queueID,
                        address=job.address,
                        directory=job.candidates[0][1]
                        if result.code == "5.1.1" else job.directory,
                        diagnostic=result.diagnostic,
                    )
            return results  # type: ignore[return-value]

        def failed(failure: Any) -> list[RecipientResult]:
            log.failure("{queueID}: maildir delivery failed", failure, queueID=envelope.queueID)
            for index, job in jobs:
                results[index] = RecipientResult(
                    job.address,
                    DeliveryStatus.TRANSIENT,
                    "4.3.0",
                    f"X-mailrelay; maildir delivery failed: {failure.getErrorMessage()}",
                )
            return results  # type: ignore[return-value]

        prepared = withTextLineEnds(self._deferToThread, envelope,
                                    [recipients[index] for index, _ in jobs], messagePath,
                                    route.backend)
        return prepared.addCallbacks(write, failed)

    # -- in the thread ------------------------------------------------------------------------

    def _deliverAll(
        self, header: str, jobs: list[_Job], messagePath: str, queueID: str
    ) -> list[RecipientResult]:
        """Each job's result; recipients of one mailbox (C{Bob@} and C{bob@}, C{bob+a@} and
        C{bob+b@}) get one copy, as Postfix's local(8) delivers once per mailbox, also
        across attempts (L{_uniqueName})."""
        delivered: dict[str, RecipientResult] = {}
        results = []
        for job in jobs:
            try:
                self._choose(job)
            except OSError as e:
                job.directory = str(job.candidates[0][1])  # (for the log)
                results.append(_writeFailed(job.address, e))
                continue
            first = delivered.get(job.directory)
            if first is not None:
                results.append(dataclasses.replace(first, address=job.address))
                continue
            result = self._deliverOne(header, job, messagePath, queueID)
            if result.status is DeliveryStatus.DELIVERED:
                delivered[job.directory] = result
            results.append(result)
        return results

    def _choose(self, job: _Job) -> None:
        """Set C{job}'s mailbox: the first candidate whose user exists; with
        C{createMailboxes} and none, the last (the user without extension); without, the
        first, whose missing user makes it unknown.

        @raise OSError: a user directory could not be looked up (L{isUser}).
        """
        for directory, user in job.candidates:
            if user is None or isUser(user):
                job.directory, job.known = directory, True
                return
        job.directory = job.candidates[-1 if self.createMailboxes else 0][0]
        job.known = self.createMailboxes

    def _deliverOne(
        self, header: str, job: _Job, messagePath: str, queueID: str
    ) -> RecipientResult:
        try:
            if not job.known:
                return RecipientResult(
                    job.address,
                    DeliveryStatus.PERMANENT,
                    "5.1.1",
                    f"X-mailrelay; unknown user: no mailbox for {job.address}",
                )
            self._write(header + f"Delivered-To: {job.address}\n", job.directory, messagePath,
                        self._uniqueName(queueID, job.directory))
        except OSError as e:
            return _writeFailed(job.address, e)
        return RecipientResult(
            job.address, DeliveryStatus.DELIVERED, "2.0.0", DELIVERED_DIAGNOSTIC, final=True
        )

    def _uniqueName(self, queueID: str, directory: str) -> str:
        """The name of C{queueID}'s copy in the Maildir C{directory}: the same at every
        attempt, unique on this host (the queue id is), so that a retry finds what a killed
        attempt delivered.  (The Maildir specification's unique names are the time, what
        makes the delivery unique on the host, and the host name: the queue id begins with
        its arrival time.)

        @raise ValueError: C{queueID} is not one (two messages must not share a name).
        """
        if not isinstance(queueID, str) or not (queueID.isascii() and queueID.isalnum()):
            raise ValueError(f"cannot name a maildir copy after queue id {queueID!r}")
        mailbox = hashlib.sha256(directory.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return f"{queueID}.M{mailbox}.{self.hostname}"

    @staticmethod
    def _delivered(directory: str, name: str, interrupted: bool) -> bool:
        """Whether the copy C{name} is in the Maildir C{directory} already: in C{new/}, or in
        C{cur/} where a mail reader moved it: under one of the L{_READ_INFOS} names (looked
        up one by one), or, after an C{interrupted} attempt only, under any C{name:info}
        (C{cur/} listed)."""
        if os.path.lexists(os.path.join(directory, "new", name)):
            return True
        cur = os.path.join(directory, "cur")
        if any(os.path.lexists(os.path.join(cur, name + info)) for info in _READ_INFOS):
            return True
        if not interrupted:
            return False
        prefix = name + ":"
        with os.scandir(os.path.join(directory, "cur")) as entries:
            return any(e.name == name or e.name.startswith(prefix) for e in entries)

    def _write(self, header: str, directory: str, messagePath: str, name: str) -> None:
        """Write the copy C{name} into the Maildir C{directory}, unless it is there already
        (L{_delivered}): an earlier attempt, killed before the spool recorded it, wrote it."""
        for sub in ("", "tmp", "new", "cur"):
            path = os.path.join(directory, sub) if sub else directory
            if not os.path.isdir(path):
                os.makedirs(path, mode=0o700, exist_ok=True)
        tmpPath = os.path.join(directory, "tmp", name)
        newPath = os.path.join(directory, "new", name)
        interrupted = os.path.lexists(tmpPath)
        if self._delivered(directory, name, interrupted):
            if interrupted:
                os.unlink(tmpPath)
            _fsyncDirectory(os.path.join(directory, "new"))  # (the killed attempt may not have)
            return
        # O_TRUNC, not O_EXCL: a name in tmp/ is that of an interrupted attempt of this copy.
        fd = os.open(tmpPath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out, open(messagePath, "rb") as source:
                out.write(header.encode("utf-8"))
                pendingCR = b""
                while True:
                    chunk = source.read(CHUNK)
                    if not chunk:
                        break
                    chunk = pendingCR + chunk
                    if chunk.endswith(b"\r"):
                        chunk, pendingCR = chunk[:-1], b"\r"
                    else:
                        pendingCR = b""
                    out.write(chunk.replace(b"\r\n", b"\n"))
                out.write(pendingCR)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmpPath, newPath)
            except FileExistsError:
                pass  # delivered meanwhile: the copy there is this one
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EOPNOTSUPP):
                    raise
                os.rename(tmpPath, newPath)  # (new/ was checked for the name above)
            if os.path.lexists(tmpPath):
                os.unlink(tmpPath)
        except BaseException:
            try:
                os.unlink(tmpPath)
            except OSError:
                pass
            raise
        _fsyncDirectory(os.path.join(directory, "new"))

    def close(self) -> Deferred:
        """Nothing to close."""
        return succeed(None)


def build(options: dict[str, Any], context: PluginContext) -> MaildirBackend:
    """The C{maildir} plugin's factory: C{create_mailboxes} (C{[delivery]}'s, default
    C{False}); the relay's host name (C{context}) goes into the unique file names, the
    reactor's thread pool writes."""
    options = builtinOptions("maildir", options, ("create_mailboxes", "recipient_delimiter"))
    return MaildirBackend(
        context.reactor,
        hostname=context.hostname,
        createMailboxes=options.get("create_mailboxes", False),
        recipientDelimiter=options.get("recipient_delimiter", ""),
    )
