"""SMTP AUTH behind C{twisted.cred}: the password file, its checker, the realm, the portal,
the per-client throttle of AUTH attempts, and per-user sender binding.

The server session (L{mailrelay.smtp.server}) speaks SASL PLAIN and LOGIN and asks its driver
to check the credentials; the driver (L{mailrelay.receive.protocol}) logs in through the
L{AuthPolicy}'s C{Portal}.  Any C{ICredentialsChecker} for C{IUsernamePassword} can stand
behind that portal (a site's LDAP or SQL checker); the built-in one is
L{PasswordFileChecker}, reading a file of argon2 hashes::

    # comment
    alice:$argon2id$v=19$m=65536,t=3,p=4$...$...
    bob@example.com:$argon2id$v=19$m=65536,t=3,p=4$...$...

Hashing and verification run in the reactor's thread pool, never on the reactor thread.  The
file is read (and checked: L{PasswordFileError} names the path and line) at start-up, and read
again, in the thread pool, when it changes: users added with C{mailrelay-passwd} can log in
without a restart.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

log = Logger()

#: The hash formats the password file may hold (argon2-cffi verifies all three; new hashes
#: are argon2id).
HASH_PREFIXES = ("$argon2id$", "$argon2i$", "$argon2d$")
#: The SASL mechanisms the server implements.
MECHANISMS = ("PLAIN", "LOGIN")

DEFAULT_THROTTLE_AFTER = 3
DEFAULT_FAILURE_DELAY = 5.0
DEFAULT_MAX_FAILURES = 10
DEFAULT_FAILURE_WINDOW = 900.0
DEFAULT_CHECKER_TIMEOUT = 30.0


class PasswordFileError(ValueError):
    """A password file cannot be used.

    @ivar path: the file.
    @ivar lineno: the line at fault (1-based), or C{None} for the whole file.
    @ivar problem: what is wrong, in words (never the hash or a password).
    """

    def __init__(self, path: str, lineno: int | None, problem: str) -> None:
        self.path = path
        self.lineno = lineno
        self.problem = problem
        where = f"{path}:{lineno}" if lineno is not None else path
        super().__init__(f"{where}: {problem}")


def userNameProblem(name: str) -> str | None:
    """Why C{name} cannot be a user name of the password file, or C{None}."""
    if not name:
        return "the user name is empty"
    if ":" in name:
        return "a user name cannot contain ':'"
    if any(c.isspace() or not c.isprintable() for c in name):
        return "a user name cannot contain white space or control characters"
    return None


def hashProblem(text: str) -> str | None:
    """Why C{text} is not a password hash mailrelay can verify, or C{None}."""
    if text.startswith(("$2a$", "$2b$", "$2y$")):
        return (
            "bcrypt hashes are not supported (mailrelay uses argon2id); set the password "
            "again with mailrelay-passwd"
        )
    if not text.startswith(HASH_PREFIXES):
        return 'the hash must be an argon2 hash ("$argon2id$..."), made by mailrelay-passwd'
    try:
        extract_parameters(text)
    except (InvalidHashError, ValueError):
        return "the argon2 hash is malformed"
    return None


def parsePasswordLines(path: str, text: str) -> dict[str, str]:
    """The users and hashes of a password file's text (see the module docstring).

    @raise PasswordFileError: naming C{path} and the line.
    """
    users: dict[str, str] = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, hashed = line.partition(":")
        if not colon:
            raise PasswordFileError(path, lineno, 'expected "user:hash"')
        problem = userNameProblem(name) or hashProblem(hashed)
        if problem:
            raise PasswordFileError(path, lineno, problem)
        if name in users:
            raise PasswordFileError(path, lineno, f"user {name!r} is listed twice")
        users[name] = hashed
    return users


def readPasswordFile(path: str) -> dict[str, str]:
    """Read and check a password file.

    @raise PasswordFileError: unreadable, not UTF-8, or a bad line (naming it).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PasswordFileError(
            path, None, f"cannot read the password file: {e.strerror or e}"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise PasswordFileError(path, lineno, "not UTF-8 text") from None
    return parsePasswordLines(path, text)


def _fileStamp(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


def _defaultDeferToThread(f: Callable[..., Any], *args: Any) -> Deferred:
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool

    pool = reactor.getThreadPool()  # type: ignore[attr-defined]
    return deferToThreadPool(reactor, pool, f, *args)


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Checks user names and passwords against a password file of argon2 hashes.

    @param path: the password file.
    @param users: its users and hashes, already read (by the configuration); read now when
        C{None}.
    @param deferToThread: runs a blocking call off the reactor thread and returns a Deferred
        (default: the reactor's thread pool).  Tests pass a synchronous one.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        path: str,
        users: Mapping[str, str] | None = None,
        deferToThread: Callable[..., Deferred] | None = None,
    ) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._users = dict(readPasswordFile(path) if users is None else users)
        try:
            self._stamp: tuple[int, int, int, int] | None = _fileStamp(path)
        except OSError:
            self._stamp = None
        self._deferToThread = deferToThread or _defaultDeferToThread
        self._hasher = PasswordHasher()
        self._dummy: str | None = None

    @property
    def users(self) -> list[str]:
        """The user names known now."""
        with self._lock:
            return list(self._users)

    def requestAvatarId(self, credentials: Any) -> Deferred:
        """Verify in a thread; the avatar id is the user name (C{str})."""
        username = credentials.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        password = credentials.password
        d = self._deferToThread(self._verify, username, password)
        return d.addCallback(self._verified, username)

    def _verified(self, result: tuple[bool, str | None], username: str) -> str:
        ok, reloadProblem = result
        if reloadProblem:
            log.error(
                "password file changed but cannot be used, keeping the users read before: "
                "{problem}",
                problem=reloadProblem,
            )
        if not ok:
            raise UnauthorizedLogin()
        return username

    # In the thread pool -------------------------------------------------------------------------

    def _verify(self, username: str, password: str | bytes) -> tuple[bool, str | None]:
        problem = self._reloadIfChanged()
        with self._lock:
            hashed = self._users.get(username)
        if hashed is None:
            # Spend the same time as for a real user, so that timing does not tell who exists.
            if self._dummy is None:
                self._dummy = self._hasher.hash("mailrelay dummy password")
            hashed = self._dummy
            username = ""
        try:
            self._hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False, problem
        return bool(username), problem

    def _reloadIfChanged(self) -> str | None:
        try:
            stamp = _fileStamp(self.path)
        except OSError as e:
            return f"{self.path}: {e.strerror or e}"
        if stamp == self._stamp:
            return None
        try:
            users = readPasswordFile(self.path)
        except PasswordFileError as e:
            return str(e)
        with self._lock:
            self._users = users
            self._stamp = stamp
        return None


class IAuthenticatedUser(Interface):
    """The avatar of an SMTP client that authenticated."""

    name = Attribute("The user name (C{str}), as logged and written in C{Received:}.")


@implementer(IAuthenticatedUser)
@dataclass(frozen=True)
class AuthenticatedUser:
    name: str


@implementer(IRealm)
class SubmitterRealm:
    """Gives every authenticated avatar id an L{AuthenticatedUser}."""

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        if IAuthenticatedUser not in interfaces:
            raise NotImplementedError("only IAuthenticatedUser avatars")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
        return IAuthenticatedUser, AuthenticatedUser(name), lambda: None


def makePortal(checkers: Sequence[Any]) -> Portal:
    """A portal for SMTP AUTH with these C{ICredentialsChecker}s."""
    return Portal(SubmitterRealm(), list(checkers))


class IAuthThrottle(Interface):
    """Counts AUTH attempts per client, so that at most C{maxFailures} passwords are ever
    checked per window per client, however many connections guess at once.

    A client is what L{mailrelay.receive.limits.clientNetwork} makes of its address: an IPv4
    address, or an IPv6 network of the listener's C{ipv6_prefix_length} bits (one host has a
    whole /64 or more to guess from).

    The server L{reserve}s every attempt before its password is checked and L{settle}s it
    once the check is over: an attempt in flight counts as a failure until it is settled, so
    that fifty guesses sent at once on fifty connections cannot all be checked before the
    first failure is recorded.  Every C{reserve} that answered is matched by exactly one
    C{settle}, also when the attempt is then not checked.  An attempt over the limit is
    settled at once: when the failures recorded (what C{settle} returns) reach the limit it
    is refused; otherwise attempts in flight hold the budget, and the server reserves again
    a moment later (polling: a shared store needs no notification).

    The built-in L{MemoryAuthThrottle} keeps the counts in memory, per relay process.  One
    shared by several relays (Redis, say) can replace it: both methods may return a
    Deferred, and C{reserve} must count atomically (one C{INCR} of a counter of failures and
    attempts in flight, whose C{EXPIRE} is renewed by each failure; C{settle} with
    C{failed=False} is a C{DECR}).  A C{reserve} that fails makes the attempt a temporary
    failure (C{454 4.7.0}), never a check without a count.
    """

    def reserve(client: str) -> Any:
        """An AUTH attempt from C{client} is about to be checked: count it.

        @return: the failures of C{client} not yet expired plus its attempts in flight, this
            one included (an C{int}, or a Deferred firing with one).  When it is over the
            limit the server settles it (not failed) without a check, and refuses it or
            tries again later (see above).
        """

    def settle(client: str, failed: bool) -> Any:
        """The attempt L{reserve}d for C{client} is over.

        @param failed: C{True}: the password was wrong; the attempt stays counted as a
            failure, and the window of C{client}'s failures starts again.  C{False}: it is
            forgotten (the login succeeded, the attempt was refused without a check, or the
            checker gave no answer).
        @return: the failures of C{client} now recorded and not expired, attempts still in
            flight not included (an C{int}, or a Deferred firing with one).
        """


@implementer(IAuthThrottle)
class MemoryAuthThrottle:
    """L{IAuthThrottle} in memory: a failure is forgotten C{window} seconds after the last
    failure of its client.  At most C{maxEntries} clients with failures are kept (the oldest
    are dropped first), so a scan from many addresses cannot exhaust memory; attempts in
    flight are kept until settled (at most one per connection).
    """

    def __init__(
        self, clock: Any, window: float = DEFAULT_FAILURE_WINDOW, maxEntries: int = 100000
    ) -> None:
        self.clock = clock
        self.window = window
        self.maxEntries = maxEntries
        self._entries: dict[str, tuple[int, float]] = {}
        self._inFlight: dict[str, int] = {}

    def failures(self, client: str) -> int:
        """The failures of C{client} recorded and not expired (attempts in flight not
        included)."""
        entry = self._entries.get(client)
        if entry is None:
            return 0
        count, last = entry
        if self.clock.seconds() - last >= self.window:
            del self._entries[client]
            return 0
        return count

    def inFlight(self, client: str) -> int:
        """The attempts of C{client} reserved and not yet settled."""
        return self._inFlight.get(client, 0)

    def reserve(self, client: str) -> int:
        self._inFlight[client] = self.inFlight(client) + 1
        return self.failures(client) + self._inFlight[client]

    def settle(self, client: str, failed: bool) -> int:
        left = self.inFlight(client) - 1
        if left > 0:
            self._inFlight[client] = left
        else:
            self._inFlight.pop(client, None)
        if not failed:
            return self.failures(client)
        count = self.failures(client) + 1
        self._entries.pop(client, None)  # re-insert: dict order is then by last failure
        self._entries[client] = (count, self.clock.seconds())
        while len(self._entries) > self.maxEntries:
            del self._entries[next(iter(self._entries))]
        return count


def senderAllowed(patterns: Sequence[str], sender: str) -> bool:
    """May a user bound to C{patterns} use the MAIL FROM address C{sender}?

    A pattern is an address (C{"alice@example.com"}, compared with the domain
    case-insensitively and the local part exactly) or C{"@domain"} (any address in that
    domain).  The null sender (C{""}, for bounces) is always allowed.
    """
    if sender == "":
        return True
    local, at, domain = sender.rpartition("@")
    if not at:
        return False
    domain = domain.lower()
    for pattern in patterns:
        if pattern.startswith("@"):
            if pattern[1:].lower() == domain:
                return True
        else:
            pLocal, _, pDomain = pattern.rpartition("@")
            if pLocal == local and pDomain.lower() == domain:
                return True
    return False


@dataclass
class AuthPolicy:
    """What a listener needs for SMTP AUTH.

    @ivar portal: the C{Portal} credentials are checked through (avatar interface
        L{IAuthenticatedUser}).
    @ivar throttle: the L{IAuthThrottle}.
    @ivar throttleAfter: failures from one client (see L{IAuthThrottle}) after which each
        further C{535} is delayed by C{failureDelay} seconds.
    @ivar failureDelay: that delay.
    @ivar maxFailures: failures from one client after which AUTH is refused with C{421} and
        the connection closed (until the failures expire); attempts in flight count too (one
        beyond waits for them), so at most this many passwords are checked per window per
        client.
    @ivar senders: user name to the MAIL FROM patterns the user may use (see
        L{senderAllowed}); users not listed may use any sender.
    @ivar mechanisms: the SASL mechanisms offered.
    @ivar timeout: seconds the portal's checker may take to answer (a slow site checker):
        then C{454 4.7.0} (temporary failure), not counted as a failure; also the longest an
        attempt waits for the checks in flight of the same client (then C{454} too); C{0}:
        no limit.
    """

    portal: Portal
    throttle: Any
    throttleAfter: int = DEFAULT_THROTTLE_AFTER
    failureDelay: float = DEFAULT_FAILURE_DELAY
    maxFailures: int = DEFAULT_MAX_FAILURES
    senders: dict[str, tuple[str, ...]] = field(default_factory=dict)
    mechanisms: tuple[str, ...] = MECHANISMS
    timeout: float = DEFAULT_CHECKER_TIMEOUT

    def senderAllowed(self, user: str, sender: str) -> bool:
        patterns = self.senders.get(user)
        return patterns is None or senderAllowed(patterns, sender)
