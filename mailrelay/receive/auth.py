"""SMTP AUTH behind C{twisted.cred}: the password file, its checker, the realm, the portal,
the per-client throttle of AUTH attempts, and one attempt's way through them
(L{AuthPolicy.authenticate}).

The server session (L{mailrelay.smtp.server}) speaks SASL PLAIN and LOGIN and asks its driver
to check the credentials; the driver (L{mailrelay.receive.protocol}) hands them to
L{AuthPolicy.authenticate}, which logs in through the policy's C{Portal}.  (The users'
sender binding, C{AuthSettings.senders}, is checked at MAIL: L{mailrelay.policy.sender}.)  Any
C{ICredentialsChecker} for C{IUsernamePassword} can stand behind that portal (a site's LDAP
or SQL checker); the built-in one is L{PasswordFileChecker}, reading a file of argon2
hashes::

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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import (
    Deferred,
    DeferredSemaphore,
    TimeoutError,
    maybeDeferred,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from mailrelay.interfaces import Reply
from mailrelay.metrics import boundedAnswer, heldText
from mailrelay.namedfile import fileStamp, readError, readNamedFile
from mailrelay.receive.limits import DEFAULT_IPV6_PREFIX_LENGTH, clientNetwork
from mailrelay.smtp.server import AUTH_INVALID, Authenticate

log = Logger()

#: The hash formats the password file may hold (argon2-cffi verifies all three; new hashes
#: are argon2id).
HASH_PREFIXES = ("$argon2id$", "$argon2i$", "$argon2d$")
#: The SASL mechanisms the server implements.
MECHANISMS = ("PLAIN", "LOGIN")

DEFAULT_FAILURE_WINDOW = 900.0
DEFAULT_CHECKER_TIMEOUT = 30.0

AUTH_TOO_MANY_FAILURES = Reply(
    421, "4.7.0", "Error: too many failed authentications, try again later"
)
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
#: Seconds between two looks at the AUTH throttle of an attempt waiting for the checks in
#: flight of the same client.
AUTH_WAIT_INTERVAL = 0.1


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
    if name.startswith("#"):
        return ("a user name cannot start with '#' (the password file would read its line as "
                "a comment)")
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
    # (argon2 is loaded only by a relay that has passwords to check)
    from argon2 import extract_parameters
    from argon2.exceptions import InvalidHashError

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
        data = readNamedFile(path)
    except OSError as e:
        raise PasswordFileError(
            path, None, f"cannot read the password file: {readError(e)}"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise PasswordFileError(path, lineno, "not UTF-8 text") from None
    return parsePasswordLines(path, text)


#: The most password checks run at once by default: each argon2id check of mailrelay-passwd's
#: hashes takes 64 MiB (m=65536) and about half a second of CPU, so more at once than there
#: are CPUs only costs memory (ten at once, as many as the reactor's thread pool runs, took
#: the relay to 700 MiB), and it leaves the pool threads for the other blocking work.
MAX_CONCURRENT_CHECKS = max(1, min(4, os.cpu_count() or 1))


def _defaultDeferToThread(f: Callable[..., Any], *args: Any) -> Deferred:
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool

    theReactor: Any = reactor
    return deferToThreadPool(theReactor, theReactor.getThreadPool(), f, *args)


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """Checks user names and passwords against a password file of argon2 hashes.

    @param path: the password file.
    @param users: its users and hashes, already read (by the configuration); read now when
        C{None}.
    @param deferToThread: runs a blocking call off the reactor thread and returns a Deferred
        (default: the reactor's thread pool).  Tests pass a synchronous one.
    @param concurrency: the most checks handed to C{deferToThread} at once; the others wait
        their turn, in order (default: L{MAX_CONCURRENT_CHECKS}).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        path: str,
        users: Mapping[str, str] | None = None,
        deferToThread: Callable[..., Deferred] | None = None,
        concurrency: int = MAX_CONCURRENT_CHECKS,
    ) -> None:
        self.path = path
        self._checks = DeferredSemaphore(concurrency)
        self._lock = threading.Lock()
        self._users = dict(readPasswordFile(path) if users is None else users)
        try:
            self._stamp: tuple[int, int, int, int] | None = fileStamp(path)
        except OSError:
            self._stamp = None
        self._deferToThread = deferToThread or _defaultDeferToThread
        from argon2 import PasswordHasher

        self._hasher = PasswordHasher()
        self._dummy: str | None = None

    @property
    def users(self) -> list[str]:
        """The user names known now."""
        with self._lock:
            return list(self._users)

    def table(self) -> dict[str, str]:
        """The users known now and their hashes (a copy)."""
        with self._lock:
            return dict(self._users)

    def requestAvatarId(self, credentials: Any) -> Deferred:
        """Verify in a thread; the avatar id is the user name (C{str})."""
        username = credentials.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        password = credentials.password
        placed = self._checks.acquire()  # (cancelled while waiting: it never runs)
        verified: Deferred[Any] = placed.addCallback(
            lambda _: self._inThread(username, password))
        return verified.addCallback(self._verified, username)

    def _inThread(self, username: str, password: Any) -> Deferred:
        """Verify in a thread, the place taken (L{requestAvatarId}) freed when the thread is
        done.  Cancelled (the AUTH time-out gave up), the answer fails at once, but the
        place stays taken until then: the thread goes on hashing (it cannot be stopped)."""
        work = self._deferToThread(self._verify, username, password)
        answer: Deferred = Deferred()

        def done(result: Any) -> None:
            self._checks.release()
            if answer.called:
                return None  # (given up: no one waits for it)
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)
            return None

        work.addBoth(done)
        return answer

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
        from argon2.exceptions import InvalidHashError, VerificationError

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
            stamp = fileStamp(self.path)
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
        """The avatar of the user C{avatarId}, the checker's answer.

        @raise ValueError: the answer is not a user name (a checker's bug: None from a
            callback without its C{return}, Twisted's C{ANONYMOUS}, an empty or multi-line
            name): the client is not logged in (454, logged), never as C{"None"}.
        """
        if IAuthenticatedUser not in interfaces:
            raise NotImplementedError("only IAuthenticatedUser avatars")
        name = avatarId
        if isinstance(name, bytes):
            try:
                name = name.decode("utf-8")
            except UnicodeDecodeError:
                name = None
        if not isinstance(name, str) or not name or not name.isprintable():
            raise ValueError(
                f"the credentials checker answered {avatarId!r}, not a user name (a "
                "non-empty str of printable characters, or such bytes in UTF-8)"
            )
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
        now = self.clock.seconds()
        if now - last >= self.window:
            del self._entries[client]
            return 0
        if last > now:
            # Counted before the clock was stepped back: the window goes on from now (it
            # went on until the clock reached the last failure again).
            self._entries[client] = (count, now)
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


@dataclass(frozen=True)
class AuthSettings:
    """What the relay's AUTH is (C{[auth]}): who checks the users, what they may do, and how
    failures are limited.

    @ivar passwordFile: the password file (see L{PasswordFileChecker}) the users are checked
        against, or C{None} when a site checker checks them.
    @ivar users: its users and hashes as read at start-up (not shown by C{repr}).
    @ivar checker: the site checker's plugin entry (a plugin providing
        C{ICredentialsChecker}, with its options and its C{timeout}: how long one check may
        take), which the application builds; or C{None}.
    @ivar mechanisms: the SASL mechanisms offered.
    @ivar throttleAfter: failures from one client (see L{IAuthThrottle}) after which each
        further C{535} is delayed by C{failureDelay} seconds.
    @ivar failureDelay: that delay.
    @ivar maxFailures: failures from one client after which AUTH is refused with C{421} and
        the connection closed (until the failures expire); attempts in flight count too (one
        beyond waits for them), so at most this many passwords are checked per window per
        client.
    @ivar failureWindow: seconds after a client's last failure when its failures are
        forgotten (the window of the L{MemoryAuthThrottle}).
    @ivar senders: user name to the MAIL FROM patterns the user may use (see
        L{mailrelay.policy.sender.senderAllowed}); users not listed may use any sender.
    """

    passwordFile: str | None = None
    users: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False, compare=False)
    checker: Any = None
    mechanisms: tuple[str, ...] = MECHANISMS
    throttleAfter: int = 3
    failureDelay: float = 5.0
    maxFailures: int = 10
    failureWindow: float = DEFAULT_FAILURE_WINDOW
    senders: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)


@dataclass
class AuthPolicy:
    """What a listener needs for SMTP AUTH.

    @ivar portal: the C{Portal} credentials are checked through (avatar interface
        L{IAuthenticatedUser}).
    @ivar throttle: the L{IAuthThrottle}.
    @ivar settings: the L{AuthSettings}: mechanisms, senders, the limits on failures.
    @ivar timeout: seconds the portal's checker may take to answer (a slow site checker):
        then C{454 4.7.0} (temporary failure), not counted as a failure; also the longest an
        attempt waits for the checks in flight of the same client (then C{454} too); C{0}:
        no limit.
    @ivar checkerName: the site checker's plugin name (C{[auth.checker] plugin}), named
        in the log lines of its failures as the other hooks' plugins are; C{None}: the
        built-in checker.
    """

    portal: Portal
    throttle: Any
    settings: AuthSettings = AuthSettings()
    timeout: float = DEFAULT_CHECKER_TIMEOUT
    checkerName: str | None = None

    def authenticate(
        self,
        attempt: Authenticate,
        address: str,
        clock: Any,
        ipv6PrefixLength: int = DEFAULT_IPV6_PREFIX_LENGTH,
        abandoned: Callable[[], bool] = lambda: False,
    ) -> Deferred[Reply | str]:
        """Check the credentials of C{attempt}, made by the client at C{address}, through the
        portal.

        Attempts are counted per client (an IPv6 client by its network of C{ipv6PrefixLength}
        bits) while in flight and as failures after (see L{IAuthThrottle}): after
        C{throttleAfter} failures the 535 is delayed, and from C{maxFailures} on AUTH is
        refused with 421 without a check.  An attempt that would go beyond C{maxFailures}
        with the checks in flight of the same client waits for them (at most C{timeout},
        then 454), so that at most C{maxFailures} passwords are checked per window, however
        many connections try at once, and a client with many connections and the right
        password is not refused.

        @param clock: an C{IReactorTime} for the timeout and the delays.
        @param abandoned: whether no one waits for the answer any more (the session closed):
            an attempt waiting for others is then not checked.
        @return: a Deferred firing with the user name (accepted) or the L{Reply} refusing.
        """
        return _Attempt(self, attempt, address, clock, ipv6PrefixLength, abandoned).start()


class _Attempt:
    """One AUTH attempt going through the throttle and the portal (see
    L{AuthPolicy.authenticate})."""

    def __init__(
        self,
        policy: AuthPolicy,
        attempt: Authenticate,
        address: str,
        clock: Any,
        ipv6PrefixLength: int,
        abandoned: Callable[[], bool],
    ) -> None:
        self.policy = policy
        self.attempt = attempt
        self.address = address
        self.client = clientNetwork(address, ipv6PrefixLength)
        self.clock = clock
        self.abandoned = abandoned
        self.started = clock.seconds()
        #: why it was refused before any check, when not malformed
        self.refused = ""
        #: how long the checker's call held the reactor, when past the timeout
        self.held: float | None = None

    def start(self) -> Deferred[Reply | str]:
        """Reserve a place in the client's budget, then check."""
        d = maybeDeferred(self.policy.throttle.reserve, self.client)
        return d.addCallbacks(self._reserved, self._throttleFailed)

    def _settle(self, failed: bool) -> Deferred[int]:
        return maybeDeferred(self.policy.throttle.settle, self.client, failed)

    def _release(self) -> None:
        self._settle(False).addErrback(
            lambda f: log.failure("AUTH throttle: settling for {client}", f, client=self.client)
        )

    def _reserved(self, count: int) -> Any:
        policy, attempt = self.policy, self.attempt
        if count > policy.settings.maxFailures:
            return self._settle(False).addCallbacks(self._overBudget, self._throttleFailed)
        if attempt.malformed:
            return self._failed(Failure(UnauthorizedLogin(self._why())))
        if attempt.authzid and attempt.authzid != attempt.username:
            self.refused = "authorization identity differs"
            return self._failed(Failure(UnauthorizedLogin(self.refused)))
        # The user name is text: checkers get it as the documented str.
        credentials = UsernamePassword(attempt.username, attempt.password)  # type: ignore[arg-type]
        started = time.perf_counter()
        d = policy.portal.login(credentials, None, IAuthenticatedUser)
        d, self.held = boundedAnswer(d, policy.timeout or None, self.clock, started)
        return d.addCallbacks(self._succeeded, self._failed)

    def _throttleFailed(self, failure: Failure) -> Reply:
        log.failure(
            "AUTH throttle: reserving or settling for {client}", failure, client=self.client
        )
        return AUTH_TEMPORARY_FAILURE

    def _overBudget(self, failures: int) -> Any:
        # The failures recorded fill the budget: refused.  Otherwise checks still in flight
        # (other connections of this client) hold it: wait for them, never refuse a client
        # for failures it has not made.
        policy = self.policy
        if failures >= policy.settings.maxFailures:
            self._logFailure(failures, "too many failures, refused with 421 without checking")
            return AUTH_TOO_MANY_FAILURES
        if self.abandoned():
            return AUTH_TEMPORARY_FAILURE  # no one waits for the answer: check nothing
        waited = self.clock.seconds() - self.started
        if policy.timeout and waited >= policy.timeout:
            log.warn(
                "authentication from {client} (sasl_username={user}) waited {waited:g}s "
                "for the checks in flight of the same client; answered 454",
                client=self.address,
                user=self.attempt.username,
                sasl_username=self.attempt.username,
                waited=waited,
            )
            return AUTH_TEMPORARY_FAILURE
        return deferLater(self.clock, AUTH_WAIT_INTERVAL, self.start)

    def _succeeded(self, result: tuple[Any, Any, Any]) -> str:
        self._release()
        _, avatar, _ = result
        name = getattr(avatar, "name", self.attempt.username)
        log.info(
            "authenticated {client}: sasl_method={mechanism} sasl_username={user}",
            client=self.address,
            mechanism=self.attempt.mechanism,
            user=name,
            sasl_username=name,
        )
        return str(name)

    def _failed(self, failure: Failure) -> Any:
        name = self.policy.checkerName
        about: dict[str, Any] = {
            "client": self.address,
            "user": self.attempt.username,
            "sasl_username": self.attempt.username,
            "plugin": name,
            "checker": "the credentials checker" if name is None else f"AUTH checker plugin {name}",
        }
        if failure.check(TimeoutError):
            self._release()
            log.error(
                "authentication check for {client} (sasl_username={user}) by {checker} gave "
                "no answer in {timeout:g}s; answered 454{held}",
                timeout=self.policy.timeout,
                held=heldText(self.held),
                **about,
            )
            return AUTH_TEMPORARY_FAILURE
        if not failure.check(UnauthorizedLogin, UnhandledCredentials):
            self._release()
            log.failure(
                "{checker} failed for {client} (sasl_username={user}); answered 454",
                failure,
                **about,
            )
            return AUTH_TEMPORARY_FAILURE
        return self._settle(True).addCallbacks(self._answer, self._notRecorded)

    def _notRecorded(self, failure: Failure) -> Reply:
        log.failure("AUTH throttle: recording a failure of {client}", failure, client=self.client)
        return AUTH_INVALID

    def _answer(self, count: int) -> Any:
        policy = self.policy
        if count >= policy.settings.maxFailures:
            self._logFailure(count, "too many failures, closing")
            return AUTH_TOO_MANY_FAILURES
        if count > policy.settings.throttleAfter and policy.settings.failureDelay > 0:
            self._logFailure(count, f"answer delayed {policy.settings.failureDelay:g}s")
            return deferLater(self.clock, policy.settings.failureDelay, lambda: AUTH_INVALID)
        self._logFailure(count, self._why())
        return AUTH_INVALID

    def _why(self) -> str:
        """Why the attempt failed, for the log line of a failure."""
        if self.attempt.malformed:
            return f"{self.attempt.malformed}, not checked"
        return self.refused or "wrong user name or password"

    def _logFailure(self, count: int, why: str) -> None:
        log.warn(
            "authentication failed from {client}: sasl_method={mechanism} "
            "sasl_username={user} failures={failures} ({why})",
            client=self.address,
            mechanism=self.attempt.mechanism,
            user=self.attempt.username,
            sasl_username=self.attempt.username,
            failures=count,
            why=why,
        )
