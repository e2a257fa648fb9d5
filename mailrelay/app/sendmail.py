"""C{mailrelay-sendmail}: the Sendmail command line that mail(1), cron, PHP and git use.

    mailrelay-sendmail [-t] [-i] [-f sender] [-F name] [-v] [-C config | --spool dir] [--]
                       [recipient ...]
    mailrelay-sendmail -bs         # SMTP on standard input and output
    mailrelay-sendmail -bp         # the queue (also as mailq)
    mailrelay-sendmail -q          # deliver the queue now (-qRdomain: mail for a domain)

(or C{python -m mailrelay.app.sendmail ...}).  The message on standard input is submitted
through the same intake as mail received by SMTP: the command connects to the relay's
first listener of mode C{relay} that it can reach locally and speaks SMTP with it, so
policy, stamping, spooling and group commit are the relay's.  The relay is the one running
on the spool directory of the same configuration file as the relay's (C{-C FILE},
C{--config FILE}, C{$MAILRELAY_CONFIG}, else the embedded default), or on C{--spool DIR}:
it publishes the listeners it is bound to there (L{mailrelay.app.published}), as Postfix's
sendmail reaches the running system through the queue directory of its C{main.cf}; the
file's own listeners serve when no relay publishes on its spool directory.  Exit 0 means
the relay has the message on disk for every recipient; otherwise the status is a
C{sysexits.h} code and standard error says why: C{EX_TEMPFAIL} (75) when the relay is not
running or answers 4xx (nothing was accepted: the caller keeps the message
and tries again), C{EX_NOUSER}, C{EX_NOHOST}, C{EX_NOPERM}, C{EX_DATAERR} ... for a
refusal, C{EX_USAGE} for a bad command line, C{EX_CONFIG} for a bad configuration.

The connection is opened before the message is read: when the relay is down the command
exits without consuming its input, which the caller still has (mail(1) saves it in
C{~/dead.letter}).  A message read and then not accepted is appended to C{~/dead.letter},
as Sendmail does with mail it can neither deliver nor return.

The message is made as Postfix's sendmail and cleanup make local mail (see
L{mailrelay.app.localmail}).  Options as Postfix's sendmail takes them; those that do not
apply (C{-oXXX} but C{-oi}, C{-h}, C{-n}, C{-U}, C{-G}, C{-L}, C{-X}, C{-qINTERVAL}, ...)
are accepted and ignored.  C{-v} writes the SMTP dialogue to standard error.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pwd
import select
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, BinaryIO, TextIO

from mailrelay.address import hostPort, normaliseHostname, xtextEncode
from mailrelay.app.localmail import (
    MessageTooLarge,
    Submission,
    SubmitError,
    commandLineRecipients,
    prepareMessage,
    readInput,
    senderAddress,
)
from mailrelay.app.published import PublishedError, publishedPath, readPublished
from mailrelay.config import ConfigError, ListenerView, LocalView, loadLocalView
from mailrelay.endpoints import listeningSocket
from mailrelay.interfaces import Reply
from mailrelay.smtp.errors import ProtocolError
from mailrelay.smtp.wire import DotStuffer, ReplyParser, asciiName, parseExtensions

PROG = "mailrelay-sendmail"

USAGE = f"""\
usage: {PROG} [-t] [-i|-oi] [-f sender] [-F full_name] [-v] [-C config | --spool dir]
                          [-N dsn] [-R ret] [-V envid] [-B 7BIT|8BITMIME] [--] [recipient ...]
       {PROG} -bs [-C config]      SMTP on standard input and output
       {PROG} -bp [-C config]      list the queue (as mailq)
       {PROG} -q[Rdomain] [-C config]  deliver the queue (a domain's mail) now
The configuration: -C FILE, --config FILE, $MAILRELAY_CONFIG, else the relay's embedded default.
The relay is the one running on the configuration's spool directory, or on --spool DIR.
"""

#: The environment variable naming the relay's configuration file (as Postfix's MAIL_CONFIG).
CONFIG_VARIABLE = "MAILRELAY_CONFIG"

#: The module of the C{mailrelay} command, whose C{main(argv)} serves C{-bp} (C{mailrelay
#: queue list}) and C{-q} (C{mailrelay queue flush}).
MAILRELAY_COMMAND = "mailrelay.app.cli"

#: Seconds to wait for the connection, for each reply, and for the reply to the message.
CONNECT_TIMEOUT = 30.0
REPLY_TIMEOUT = 300.0
DATA_TIMEOUT = 600.0

#: Options without a value, with a value (attached, or the next argument), and with an
#: optional value (attached only).
_FLAGS = frozenset("GIUimntv")
_WITH_VALUE = frozenset("ABCDFLNORVXbefhopr")
_OPTIONAL_VALUE = frozenset("dq")
#: The long options, each with a value (C{--config FILE}, C{--config=FILE}): what it is.
_LONG_WITH_VALUE = {"--config": "a file name", "--spool": "a directory"}
#: The -b modes of Sendmail this command does not have.
_OTHER_MODES = "aDdHhlPtv"


class UsageError(Exception):
    """A bad command line (exit status C{EX_USAGE})."""


@dataclass
class Options:
    """The command line, read.

    @ivar action: C{"send"} (the default, C{-bm}), C{"smtp"} (C{-bs}), C{"list"} (C{-bp},
        C{mailq}), C{"flush"} (C{-q}, C{-qR}/C{-qS}/C{-qI}), C{"nothing"} (C{-qINTERVAL}),
        C{"newaliases"} (C{-bi}, C{-I}), C{"help"}.
    @ivar flush: with C{"flush"}: the arguments of C{mailrelay queue flush} (C{[]}, C{["--domain",
        D]}, C{[ID]}).
    @ivar dotEnds: a line holding a single dot ends the message (no C{-i}, C{-oi}).
    @ivar config: C{-C}, C{--config}: the relay's configuration file.
    @ivar spool: C{--spool}: the spool directory of the relay to submit to, which publishes
        its listeners there (L{mailrelay.app.published}).
    @ivar notify: C{-N}: the DSN NOTIFY value (C{"NEVER"}, C{"SUCCESS,FAILURE"}).
    @ivar ret: C{-R}: C{"FULL"} or C{"HDRS"}.
    @ivar envid: C{-V}: the DSN envelope id, as xtext.
    @ivar body: C{-B}: C{"7BIT"} or C{"8BITMIME"}.
    """

    action: str = "send"
    flush: list[str] = field(default_factory=list)
    extract: bool = False
    dotEnds: bool = True
    sender: str | None = None
    fullName: str | None = None
    verbose: bool = False
    config: str | None = None
    spool: str | None = None
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None
    body: str | None = None
    recipients: list[str] = field(default_factory=list)


def parseArguments(argv: Sequence[str], name: str = PROG) -> Options:
    """Read the command line as Postfix's sendmail does (POSIX getopt: options end at the
    first argument that is not one, or at C{--}).

    @param name: the name the command was run as: C{mailq} means C{-bp}, C{newaliases}
        C{-bi}.
    @raise UsageError: an unknown option, a missing or bad value.
    """
    options = Options()
    base = os.path.basename(name)
    if base == "mailq":
        options.action = "list"
    elif base == "newaliases":
        options.action = "newaliases"
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            index += 1
            break
        if arg == "--help":
            options.action = "help"
        elif arg.partition("=")[0] in _LONG_WITH_VALUE:
            option, attached, value = arg.partition("=")
            if not attached:
                index += 1
                if index >= len(argv):
                    raise UsageError(f"option {option} needs {_LONG_WITH_VALUE[option]}")
                value = argv[index]
            setattr(options, option[2:], value)
        elif arg.startswith("--"):
            raise UsageError(f"unknown option {arg}")
        elif not arg.startswith("-") or arg == "-":
            break
        else:
            position = 1
            while position < len(arg):
                letter = arg[position]
                if letter in _FLAGS:
                    _flag(options, letter)
                    position += 1
                    continue
                value = arg[position + 1 :]
                if letter in _OPTIONAL_VALUE:
                    _option(options, letter, value)
                elif letter in _WITH_VALUE:
                    if not value:
                        index += 1
                        if index >= len(argv):
                            raise UsageError(f"option -{letter} needs a value")
                        value = argv[index]
                    _option(options, letter, value)
                else:
                    raise UsageError(f"unknown option -{letter}")
                break
        index += 1
    options.recipients = list(argv[index:])
    return options


def _flag(options: Options, letter: str) -> None:
    if letter == "t":
        options.extract = True
    elif letter == "i":
        options.dotEnds = False
    elif letter == "v":
        options.verbose = True
    elif letter == "I":
        options.action = "newaliases"
    # -G (gateway), -U (initial submission), -m (me too), -n (no aliases): nothing to do.


def _option(options: Options, letter: str, value: str) -> None:
    if letter == "b":
        _mode(options, value)
    elif letter in "fr":
        options.sender = value
    elif letter == "F":
        options.fullName = value
    elif letter == "C":
        options.config = value
    elif letter == "o":
        if value[:1] == "i":  # -oi (Postfix reads only the letter)
            options.dotEnds = False
    elif letter == "O":
        key, _, setting = value.partition("=")
        if key.strip().lower() == "ignoredots":
            options.dotEnds = setting.strip().lower() not in ("", "true", "t", "yes", "y", "1")
    elif letter == "q":
        _queueRun(options, value)
    elif letter == "N":
        options.notify = _notify(value)
    elif letter == "R":
        if value.lower() not in ("full", "hdrs"):
            raise UsageError(f"-R takes full or hdrs, not {value!r}")
        options.ret = value.upper()
    elif letter == "V":
        if not value.isascii() or not value.isprintable() or len(value) > 100:
            raise UsageError(f"-V: bad envelope id {value!r} (printable ASCII, 100 at most)")
        options.envid = xtextEncode(value)
    elif letter == "B":
        if value.upper() not in ("7BIT", "8BITMIME"):
            raise UsageError(f"-B takes 7BIT or 8BITMIME, not {value!r}")
        options.body = value.upper()
    # -A, -D, -L, -X, -d, -e, -h, -p: nothing to do.


def _mode(options: Options, value: str) -> None:
    if value == "m":
        options.action = "send"
    elif value == "s":
        options.action = "smtp"
    elif value == "p":
        options.action = "list"
    elif value == "i":
        options.action = "newaliases"
    elif value[:1] in _OTHER_MODES:
        raise UsageError(f"-b{value} is not supported (only -bm, -bs, -bp and -bi)")
    else:
        raise UsageError(f"unknown mode -b{value}")


def _queueRun(options: Options, value: str) -> None:
    """C{-q}: flush the queue; C{-qRsite}, C{-qSsite}: the mail for a domain; C{-qIid}: one
    message; C{-qINTERVAL}: ignored (Postfix ignores it: the relay retries on its own)."""
    if value == "":
        options.action, options.flush = "flush", []
    elif value[0] in "RS":
        site = value[1:].strip().lstrip("@")
        if not site:
            raise UsageError(f"-q{value[0]} needs a domain")
        options.action, options.flush = "flush", ["--domain", site]
    elif value[0] == "I":
        if not value[1:]:
            raise UsageError("-qI needs a queue id")
        options.action, options.flush = "flush", [value[1:]]
    elif value[0].isdigit():
        options.action = "nothing"
    else:
        raise UsageError(f"unknown queue option -q{value}")


def _notify(value: str) -> str:
    items = [item.strip().upper() for item in value.split(",")]
    if items == ["NEVER"]:
        return "NEVER"
    if not items or any(item not in ("SUCCESS", "FAILURE", "DELAY") for item in items):
        raise UsageError(f"-N takes never, or success, failure and delay separated by commas, "
                         f"not {value!r}")
    return ",".join(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------
# Reaching the relay


@dataclass(frozen=True)
class Address:
    """Where a listener is reached from this host: C{family} and C{address} for
    C{socket.connect}, and how to say it (C{"127.0.0.1:2525"})."""

    family: int
    address: Any
    text: str


def listenerAddress(endpoint: str) -> Address | None:
    """How a listener on server endpoint C{endpoint} is reached from this host: its UNIX
    socket, or its TCP port on the address it is bound to (loopback for a wildcard); C{None}
    for a port chosen at start-up (0) and for endpoints of other kinds."""
    bound = listeningSocket(endpoint)
    if bound is None or bound.tls:
        return None
    if bound.family == socket.AF_UNIX:
        return Address(socket.AF_UNIX, bound.address, bound.address)
    if not bound.port:
        return None
    six = bound.family == socket.AF_INET6
    interface = ("::1" if six else "127.0.0.1") if bound.everyAddress else bound.address
    return Address(bound.family, (interface, bound.port), hostPort(interface, bound.port))


def chooseListener(view: LocalView) -> tuple[ListenerView, Address]:
    """The first listener of C{view} the command can submit to: mode C{relay}, no PROXY
    header, no implicit TLS, reachable from this host.

    @raise SubmitError: C{EX_CONFIG} when there is none.
    """
    for listener in view.listeners:
        if listener.mode != "relay" or listener.proxyProtocol or listener.tlsMode == "implicit":
            continue
        address = listenerAddress(listener.endpoint)
        if address is not None:
            return listener, address
    where = view.source or "the embedded default configuration"
    raise SubmitError(
        f"{where}: no listener to submit to: {PROG} needs a [[listeners]] table with "
        'mode = "relay" (the default), no proxy_protocol, no implicit TLS, and a fixed TCP '
        "port or a UNIX socket",
        os.EX_CONFIG,
    )


def connect(view: LocalView, timeout: float = CONNECT_TIMEOUT) -> tuple[socket.socket, str]:
    """A connection to the relay's listener (see L{chooseListener}), and how to name it.

    @raise SubmitError: C{EX_TEMPFAIL} when the relay cannot be reached.
    """
    listener, address = chooseListener(view)
    where = f"{address.text} (listener {listener.endpoint})"
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address.address)
    except OSError as e:
        sock.close()
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise SubmitError(
            f"cannot connect to the relay at {where}: {reason}; is mailrelay running? "
            "Nothing was sent; try again later",
            os.EX_TEMPFAIL,
        ) from None
    return sock, where


def localView(options: Options, config: str | None) -> LocalView:
    """The relay to submit to: the one running on the spool directory C{--spool} names, or
    the configuration file C{config}'s (its published listeners, L{readPublished}: a relay
    started with C{--listen}, or on a port chosen at start, is reached); the file's own
    listeners when no relay publishes there (as before relays published them, and for a
    user who may not read the spool directory).

    @raise SubmitError: C{EX_TEMPFAIL} when no relay runs on C{--spool}'s directory,
        C{EX_CONFIG} for a bad configuration or a published file that cannot be read.
    """
    if options.spool is not None:
        try:
            published = readPublished(options.spool)
        except PublishedError as e:
            raise SubmitError(str(e), os.EX_CONFIG) from None
        if published is None:
            directory = os.path.abspath(options.spool)
            raise SubmitError(
                f"no relay runs on the spool directory {directory} (no relay publishes its "
                f"listeners in {publishedPath(directory)}); is mailrelay running? "
                "Nothing was sent; try again later",
                os.EX_TEMPFAIL,
            )
        return published
    try:
        view = loadLocalView(config)
    except ConfigError as e:
        raise SubmitError(f"configuration error: {e}", os.EX_CONFIG) from None
    try:
        published = readPublished(view.spoolDirectory) if view.spoolDirectory else None
    except PublishedError:
        published = None  # (this user may not read the spool directory: the file's)
    return published or view


def showReply(reply: Reply) -> str:
    """A reply on one line: C{"550 5.1.1 unknown user"}."""
    text = " / ".join(line.strip() for line in reply.text.split("\n") if line.strip())
    head = f"{reply.code} {reply.enhanced}" if reply.enhanced else str(reply.code)
    return f"{head} {text}".rstrip()


def exitStatus(reply: Reply, stage: str) -> int:
    """The C{sysexits.h} status for a refusal C{reply} to C{stage} (C{"greeting"},
    C{"EHLO"}, C{"MAIL"}, C{"RCPT"}, C{"DATA"}): C{EX_TEMPFAIL} for 4xx; by the enhanced
    code's subject for 5xx: address (X.1.x) C{EX_NOUSER} for a recipient (C{EX_NOHOST} for a
    bad domain, X.1.2) and C{EX_DATAERR} for the sender; policy (X.7.x) C{EX_NOPERM};
    content and size (X.6.x, X.3.4) C{EX_DATAERR}; protocol (X.5.x) C{EX_PROTOCOL}; else
    C{EX_UNAVAILABLE}."""
    if reply.code < 500:
        return os.EX_TEMPFAIL
    _, subject, detail = ((reply.enhanced or "5.0.0").split(".") + ["0", "0"])[:3]
    if subject == "1":
        if stage == "RCPT":
            return os.EX_NOHOST if detail == "2" else os.EX_NOUSER
        return os.EX_DATAERR
    if subject == "7":
        return os.EX_NOPERM
    if subject == "6" or (subject == "3" and detail == "4"):
        return os.EX_DATAERR
    if subject == "5":
        return os.EX_PROTOCOL
    return os.EX_UNAVAILABLE


class RelayClient:
    """A blocking SMTP client for one connection to the relay.

    @ivar transcript: where the dialogue is written (C{-v}), or C{None}.
    """

    def __init__(self, sock: socket.socket, where: str, transcript: TextIO | None) -> None:
        self.sock = sock
        self.where = where
        self.transcript = transcript
        self._parser = ReplyParser()

    def say(self, text: str) -> None:
        """Write C{text} to the transcript, if there is one."""
        if self.transcript is not None:
            print(text, file=self.transcript, flush=True)

    def read(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        """The next reply.  @raise SubmitError: the connection broke or timed out
        (C{EX_TEMPFAIL}), the relay broke the protocol (C{EX_PROTOCOL})."""
        self.sock.settimeout(timeout)
        while True:
            try:
                reply = self._parser.next()
            except ProtocolError as e:
                raise SubmitError(f"the relay at {self.where} broke the protocol: {e}",
                                  os.EX_PROTOCOL) from None
            if reply is not None:
                if self.transcript is not None:
                    lines = reply.text.split("\n")
                    enhanced = f"{reply.enhanced} " if reply.enhanced else ""
                    for n, line in enumerate(lines):
                        separator = "-" if n < len(lines) - 1 else " "
                        self.say(f"{reply.code}{separator}{enhanced}{line}")
                return reply
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise SubmitError(f"the relay at {self.where} did not answer in "
                                  f"{timeout:g} seconds", os.EX_TEMPFAIL) from None
            except OSError as e:
                raise self._lost(e.strerror or str(e)) from None
            if not data:
                raise self._lost("the relay closed the connection")
            self._parser.feed(data)

    def _lost(self, reason: str) -> SubmitError:
        return SubmitError(f"connection to the relay at {self.where} lost: {reason}",
                           os.EX_TEMPFAIL)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise self._lost(e.strerror or str(e)) from None

    def command(self, line: str, timeout: float = REPLY_TIMEOUT) -> Reply:
        """Send command C{line}, return the reply."""
        self.say(f">>> {line}")
        self.send(line.encode("utf-8") + b"\r\n")
        return self.read(timeout)

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class Envelope:
    """The envelope of one submission: the sender (C{""}: null) and the DSN and body
    parameters of the command line."""

    sender: str
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None
    body: str | None = None


class _Stale(Exception):
    """The connection opened before the message was read is gone (the relay timed it out
    while the input came, or stopped): open another."""


def greetingHostname(greeting: Reply) -> str | None:
    """The host name a 220 greeting begins with (RFC 5321 4.3.1, C{Greeting = "220 " Domain
    ...}): the running relay's C{hostname}, also when C{--hostname} set it; C{None} when it
    begins with no host name (an address literal, nothing)."""
    words = greeting.text.split(None, 1)
    try:
        return normaliseHostname(words[0]) if words else None
    except ValueError:
        return None


class RelaySession:
    """The connection to the relay, opened before the message is read, so that a relay that
    is down is known before the input is consumed: the caller (mail(1), cron) still has the
    message when the command exits with C{EX_TEMPFAIL}.

    @ivar client: the connection, greeted, or C{None} before L{open}.
    """

    def __init__(
        self,
        view: LocalView,
        transcript: TextIO | None = None,
        connector: Callable[[LocalView], tuple[socket.socket, str]] = connect,
    ) -> None:
        self.view = view
        self.transcript = transcript
        self.connector = connector
        self.client: RelayClient | None = None
        self.hostname: str | None = None

    def open(self) -> None:
        """Connect and read the greeting (keep the host name it gives: L{hostname}).
        @raise SubmitError: the relay cannot be reached (C{EX_TEMPFAIL}) or refuses the
        connection."""
        sock, where = self.connector(self.view)
        client = RelayClient(sock, where, self.transcript)
        try:
            greeting = client.read()
        except SubmitError as e:
            client.close()
            e.message += "\n" + NOTHING_SENT
            raise
        if greeting.code != 220:
            client.close()
            error = _refused(greeting, "greeting", f"the relay at {where} refused the connection")
            error.message += "\n" + NOTHING_SENT
            raise error
        self.client = client
        self.hostname = greetingHostname(greeting)

    def submit(self, envelope: Envelope, submission: Submission) -> str:
        """Hand C{submission} to the relay; return its last reply (C{"250 2.0.0 Ok: queued
        as ID"}).  A connection that died while the message was read is opened again, once.

        All or nothing for each transaction: a recipient refused makes the command give up
        (RSET) before the message is sent.  When the relay takes fewer recipients at once
        than there are (452 4.5.3), the message goes in several transactions, as an SMTP
        client sends it.

        @raise SubmitError: why it was not accepted, with the status L{exitStatus} gives.
        """
        for attempt in (1, 2):
            if self.client is None:
                self.open()
            assert self.client is not None
            try:
                return _transactions(self.client, self.view, envelope, submission)
            except _Stale as e:
                self.close()
                if attempt == 2:
                    raise e.args[0] from None
        raise AssertionError("not reached")  # pragma: no cover

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def submit(
    view: LocalView,
    envelope: Envelope,
    submission: Submission,
    transcript: TextIO | None = None,
    connector: Callable[[LocalView], tuple[socket.socket, str]] = connect,
) -> str:
    """Open a L{RelaySession} and submit C{submission} through it (see
    L{RelaySession.submit})."""
    session = RelaySession(view, transcript, connector)
    session.open()
    try:
        return session.submit(envelope, submission)
    finally:
        session.close()


def _refused(reply: Reply, stage: str, what: str) -> SubmitError:
    return SubmitError(f"{what}: {showReply(reply)}", exitStatus(reply, stage))


#: What an error says when the relay took the message for no recipient.
NOTHING_SENT = "nothing was sent"


@dataclass
class _Progress:
    """How far a submission got: the recipients the relay took the message for (its 250
    after the end of data), and those of a transaction whose end of data got no answer."""

    sent: list[str] = field(default_factory=list)
    inDoubt: list[str] = field(default_factory=list)

    def said(self) -> str:
        """What to tell the user, who would otherwise send the whole message again."""
        if not self.sent and not self.inDoubt:
            return NOTHING_SENT
        doubt = (f"accepted it for {', '.join(self.inDoubt)} (the connection ended before "
                 "its answer)")
        if not self.inDoubt:
            return f"the message was sent to {', '.join(self.sent)} only"
        if not self.sent:
            return f"the relay may have {doubt}"
        return f"the message was sent to {', '.join(self.sent)}; the relay may also have {doubt}"


def _transactions(
    client: RelayClient, view: LocalView, envelope: Envelope, submission: Submission
) -> str:
    """The submission's transactions on C{client}; every error raised says how far it got
    (L{_Progress}): a lost connection or an interruption after the relay took the message
    for some recipients must not read as if nothing had been sent."""
    progress = _Progress()
    try:
        return _transact(client, view, envelope, submission, progress)
    except _Stale as e:
        e.args[0].message += "\n" + progress.said()
        raise
    except SubmitError as e:
        e.message += "\n" + progress.said()
        raise
    except (Exception, KeyboardInterrupt) as e:
        if not progress.sent and not progress.inDoubt:
            raise
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"internal error: {e!r}"
        status = os.EX_TEMPFAIL if isinstance(e, KeyboardInterrupt) else os.EX_SOFTWARE
        raise SubmitError(f"{what}\n{progress.said()}", status) from e


def _transact(
    client: RelayClient,
    view: LocalView,
    envelope: Envelope,
    submission: Submission,
    progress: _Progress,
) -> str:
    try:
        reply = client.command("EHLO " + asciiName(view.hostname).decode("ascii"))
    except SubmitError as e:
        raise _Stale(e) from None
    if reply.code == 421:
        raise _Stale(_refused(reply, "EHLO", "the relay closed the connection"))
    if reply.code != 250:
        raise _refused(reply, "EHLO", "the relay refused EHLO")
    extensions = parseExtensions(reply)
    content = submission.content
    params = []
    if "SIZE" in extensions:
        params.append(f"SIZE={len(content)}")
    body = envelope.body or ("8BITMIME" if not content.isascii() else None)
    if body and "8BITMIME" in extensions:
        params.append(f"BODY={body}")
    utf8 = not envelope.sender.isascii() or not all(r.isascii() for r in submission.recipients)
    if utf8:
        params.append("SMTPUTF8")
    if envelope.ret:
        params.append(f"RET={envelope.ret}")
    if envelope.envid:
        params.append(f"ENVID={envelope.envid}")
    rcptParams = f" NOTIFY={envelope.notify}" if envelope.notify else ""
    mailFrom = " ".join([f"MAIL FROM:<{envelope.sender}>", *params])
    pending = list(submission.recipients)
    last = ""
    while pending:
        reply = client.command(mailFrom)
        if not reply.isPositive:
            raise _refused(reply, "MAIL", f"sender <{envelope.sender}> refused")
        accepted: list[str] = []
        rest: list[str] = []
        for index, recipient in enumerate(pending):
            reply = client.command(f"RCPT TO:<{recipient}>{rcptParams}")
            if reply.isPositive:
                accepted.append(recipient)
            elif reply.enhanced == "4.5.3" and accepted:  # too many recipients: another time
                rest = pending[index:]
                break
            else:
                client.command("RSET")
                raise _refused(reply, "RCPT", f"<{recipient}> refused")
        reply = client.command("DATA")
        if reply.code != 354:
            raise _refused(reply, "DATA", "the relay refused DATA")
        stuffer = DotStuffer()
        client.say(f">>> (the message: {len(content)} octets)")
        client.send(stuffer.feed(content) + stuffer.finish())
        client.say(">>> .")
        progress.inDoubt = accepted
        reply = client.read(DATA_TIMEOUT)
        progress.inDoubt = []
        if not reply.isPositive:
            raise _refused(reply, "DATA", "the message was refused")
        progress.sent += accepted
        last = showReply(reply)
        for recipient in accepted:
            client.say(f"<{recipient}>... Sent ({last})")
        pending = rest
    try:
        client.command("QUIT")
    except SubmitError:
        pass  # the message is accepted; a lost 221 changes nothing
    return last


# ---------------------------------------------------------------------------------------------
# -bs: SMTP on standard input and output


class _RelayClosed(Exception):
    """The relay closed the connection."""


def _crlf(line: bytes) -> bytes:
    """C{line} (with its LF, or the input's last line without one) ended by CRLF, the CRs
    before its LF dropped."""
    return line.removesuffix(b"\n").rstrip(b"\r") + b"\r\n"


def _bdatSize(line: bytes) -> int | None:
    """The chunk size of C{line} when it is a well-formed C{BDAT} command (RFC 3030: the
    relay then reads that many octets whatever it answers), else C{None}."""
    words = line.split()
    if len(words) in (2, 3) and words[0].upper() == b"BDAT" and words[1].isdigit() and (
            len(words) == 2 or words[2].upper() == b"LAST"):
        return int(words[1])
    return None


class SMTPPipe:
    """C{-bs}: the relay's SMTP session, passed on between standard input and output.

    The client's commands go to the relay one at a time, each after the reply to the one
    before, and nothing before the greeting: a client that writes its whole session at once
    (a script, C{sendmail -bs < file}) is neither an early talker nor an unauthorised
    pipeliner to the relay, and gets every reply in order.  Line ends are made CRLF (local
    clients often send LF alone, which Postfix's sendmail -bs accepts), and the input's last
    line gets one when it has none.  After C{DATA} and its 354 the message goes as it
    comes, up to the line holding a single dot; a C{BDAT} command's chunk goes unchanged
    right behind it; after C{STARTTLS} and its 220 the bytes pass unchanged both ways.
    """

    def __init__(self, sock: socket.socket, stdin: int, stdout: int) -> None:
        self.sock = sock
        self.stdin = stdin
        self.stdout = stdout
        self._input = bytearray()
        self._inputOpen = True
        self._replies = bytearray()

    def run(self) -> None:
        """Serve the session until the relay closes the connection."""
        try:
            self._reply()
            while True:
                line = self._line()
                if line is None:
                    self.sock.shutdown(socket.SHUT_WR)
                    while True:
                        self._fromRelay()
                self.sock.sendall(_crlf(line))
                verb = line.split(maxsplit=1)[0].upper() if line.strip() else b""
                size = _bdatSize(line) if verb == b"BDAT" else None
                if size is not None and not self._chunk(size):
                    self._endSession("a BDAT chunk")
                code = self._reply()
                if verb == b"DATA" and code == b"354":
                    if not self._data():
                        self._endSession()
                    self._reply()
                elif verb == b"STARTTLS" and code == b"220":
                    self._transparent()
                    return
        except _RelayClosed:
            return

    def _output(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.stdout, view) :]

    def _fromRelay(self) -> None:
        """Read what the relay sent into the reply buffer.  @raise _RelayClosed: at its end
        (what came before it has been written out)."""
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._output(self._replies)
            raise _RelayClosed()
        self._replies += data

    def _reply(self) -> bytes:
        """Wait for the relay's next complete reply, write it out, return its code."""
        while True:
            start = 0
            while (end := self._replies.find(b"\r\n", start)) >= 0:
                line = bytes(self._replies[start:end])
                start = end + 2
                if line[3:4] != b"-":
                    self._output(self._replies[:start])
                    del self._replies[:start]
                    return line[:3]
            self._fromRelay()

    def _wait(self) -> None:
        """Wait for input from the client (into the input buffer); what the relay says
        meanwhile (a 421 as it times out) is written out at once."""
        readers: list[Any] = [self.sock] + ([self.stdin] if self._inputOpen else [])
        readable, _, _ = select.select(readers, [], [])
        if self.sock in readable:
            self._fromRelay()
            self._output(self._replies)
            self._replies.clear()
        if self.stdin in readable:
            data = os.read(self.stdin, 65536)
            if data:
                self._input += data
            else:
                self._inputOpen = False

    def _line(self) -> bytes | None:
        """The client's next line (with its line end), or C{None} at the end of the
        input."""
        while True:
            end = self._input.find(b"\n")
            if end >= 0:
                line = bytes(self._input[: end + 1])
                del self._input[: end + 1]
                return line
            if not self._inputOpen:
                if self._input:
                    line = bytes(self._input)
                    self._input.clear()
                    return line
                return None
            self._wait()

    def _endSession(self, where: str = "the message (after DATA)") -> None:
        """The input ended in the middle of the message (C{where}): end the session at once
        (the relay, seeing the connection's end, drops the message); what it says meanwhile
        is written out.  @raise SubmitError: C{EX_DATAERR}."""
        self.sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(_RelayClosed):
            while True:
                self._fromRelay()
        raise SubmitError(f"the input ended in the middle of {where}; nothing was sent",
                          os.EX_DATAERR)

    def _data(self) -> bool:
        """Pass the message on, up to and with its end (a line holding a single dot); return
        whether it came (C{False}: the input ended before)."""
        while True:
            out = bytearray()
            while (end := self._input.find(b"\n")) >= 0:
                line = bytes(self._input[: end + 1])
                del self._input[: end + 1]
                out += _crlf(line)
                if line.rstrip(b"\r\n") == b".":
                    self.sock.sendall(out)
                    return True
            if out:
                self.sock.sendall(out)
            if not self._inputOpen:
                if self._input == b".":  # the dot line, without its line end
                    self.sock.sendall(b".\r\n")
                    self._input.clear()
                    return True
                return False
            self._wait()

    def _chunk(self, size: int) -> bool:
        """Pass C{size} octets of the input on as they are (a BDAT chunk); return whether
        they came (C{False}: the input ended before)."""
        while size:
            if self._input:
                piece = bytes(self._input[:size])
                del self._input[: len(piece)]
                self.sock.sendall(piece)
                size -= len(piece)
            elif not self._inputOpen:
                return False
            else:
                self._wait()
        return True

    def _transparent(self) -> None:
        """Pass bytes unchanged both ways until the relay closes."""
        shut = False
        while True:
            if self._input:
                self.sock.sendall(bytes(self._input))
                self._input.clear()
            if not self._inputOpen and not shut:
                self.sock.shutdown(socket.SHUT_WR)
                shut = True
            self._wait()


def serveSMTP(view: LocalView, stdin: int, stdout: int) -> None:
    """C{-bs}: the relay's SMTP session on standard input and output.

    @raise SubmitError: C{EX_TEMPFAIL} when the relay cannot be reached; the client has been
        told with a C{421} greeting.
    """
    try:
        sock, _ = connect(view)
    except SubmitError as e:
        if e.status == os.EX_TEMPFAIL:
            greeting = f"421 4.3.2 {view.hostname} {PROG}: the relay is not running\r\n"
            os.write(stdout, greeting.encode("ascii", "replace"))
        raise
    try:
        SMTPPipe(sock, stdin, stdout).run()
    finally:
        sock.close()


# ---------------------------------------------------------------------------------------------
# -bp and -q


def runQueueCommand(
    arguments: Sequence[str], config: str | None, spool: str | None = None
) -> int:
    """Run C{mailrelay queue ARGUMENTS} (C{["list"]}, C{["flush", "--domain", "example.org"]})
    in this process, with the configuration file C{config}, or on the spool directory
    C{spool}; return its exit status.

    @raise SubmitError: C{EX_UNAVAILABLE} when this installation has no C{mailrelay} command
        (L{MAILRELAY_COMMAND}).
    """
    try:
        module = importlib.import_module(MAILRELAY_COMMAND)
    except ModuleNotFoundError as e:
        if e.name != MAILRELAY_COMMAND:
            raise
        raise SubmitError(
            f"the queue commands (-bp, mailq, -q) run `mailrelay queue {' '.join(arguments)}`, "
            f"but this installation has no mailrelay command (module {MAILRELAY_COMMAND}); "
            "nothing was done",
            os.EX_UNAVAILABLE,
        ) from None
    where = ["--spool", spool] if spool else ["--config", config] if config else []
    argv = [*where, "queue", *arguments]
    status = module.main(argv)
    return int(status or 0)


# ---------------------------------------------------------------------------------------------
# The command


def loginName(uid: int) -> str:
    """The login name of user C{uid}.  @raise SubmitError: none (C{EX_USAGE}: use C{-f})."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise SubmitError(
            f"no login name found for user ID {uid}; give the sender with -f", os.EX_USAGE
        ) from None


def run(
    options: Options,
    stdin: BinaryIO,
    stderr: TextIO,
    environ: dict[str, str] | os._Environ[str],
    stdinFD: int = 0,
    stdoutFD: int = 1,
) -> int:
    """Carry out C{options}; return the exit status.  @raise SubmitError: what failed."""
    config = options.config or environ.get(CONFIG_VARIABLE) or None
    if options.action == "help":
        sys.stdout.write(USAGE)
        return os.EX_OK
    if options.action == "newaliases":
        print(f"{PROG}: mailrelay has no aliases database; nothing to do", file=stderr)
        return os.EX_OK
    if options.action == "nothing":
        return os.EX_OK
    if options.action == "list":
        return runQueueCommand(["list"], config, options.spool)
    if options.action == "flush":
        return runQueueCommand(["flush", *options.flush], config, options.spool)
    view = localView(options, config)
    if options.action == "smtp":
        serveSMTP(view, stdinFD, stdoutFD)
        return os.EX_OK
    uid = os.getuid()
    given = options.sender
    bareSender = given if given is not None else loginName(uid)
    sender = senderAddress(bareSender, view.hostname)
    recipients = commandLineRecipients(options.recipients, view.hostname)
    if not recipients and not options.extract:
        raise SubmitError(
            "recipient addresses must be given on the command line or with -t", os.EX_USAGE
        )
    session = RelaySession(view, stderr if options.verbose else None)
    session.open()  # a relay that is down is known before the input is read
    # Names without a domain get the running relay's (Postfix's cleanup appends the running
    # system's myorigin): a relay started with --hostname is not named by the file.
    hostname = session.hostname or view.hostname
    if hostname != view.hostname:
        sender = senderAddress(bareSender, hostname)
        recipients = commandLineRecipients(options.recipients, hostname)
    lines: list[bytes] | None = None
    try:
        lines = readInput(stdin, dotEnds=options.dotEnds, limit=view.maxMessageSize)
        submission = prepareMessage(
            lines,
            recipients=recipients,
            extract=options.extract,
            sender=sender,
            fullName=options.fullName or environ.get("NAME") or None,
            hostname=hostname,
            uid=uid,
            now=time.time(),
        )
        envelope = Envelope(sender, options.notify, options.ret, options.envid, options.body)
        session.submit(envelope, submission)
    except MessageTooLarge as e:
        # Read on to the end of the message, straight into dead.letter.
        e.message += "\n" + saveDeadLetter(chain(e.lines, e.rest), sender, environ, uid)
        raise
    except SubmitError as e:
        if lines is not None:
            e.message += "\n" + saveDeadLetter(lines, sender, environ, uid)
        raise
    except Exception as e:  # a bug: the message read is still not lost
        if lines is None:
            raise
        saved = saveDeadLetter(lines, sender, environ, uid)
        raise SubmitError(f"internal error: {e!r}\n{saved}", os.EX_SOFTWARE) from e
    finally:
        session.close()
    return os.EX_OK


def saveDeadLetter(
    lines: Iterable[bytes], sender: str, environ: dict[str, str] | os._Environ[str], uid: int
) -> str:
    """Append the message read (C{lines}, written as they come) to C{~/dead.letter} in mbox
    form, as Sendmail saves a message it cannot deliver nor return; say where it went (or
    why it could not)."""
    home = environ.get("HOME") or ""
    if not home:
        try:
            home = pwd.getpwuid(uid).pw_dir
        except KeyError:
            return "the message could not be saved: no home directory"
    path = os.path.join(home, "dead.letter")
    envelope = f"From {sender or 'MAILER-DAEMON'} {time.asctime()}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.write(envelope)
            for line in lines:
                f.write((b">" + line if line.lstrip(b">").startswith(b"From ") else line) + b"\n")
            f.write(b"\n")
    except OSError as e:
        return f"the message could not be saved in {path}: {e.strerror or e}"
    return f"the message was saved in {path}"


def _openClosedStandardDescriptors() -> None:
    """Open C{/dev/null} on each of descriptors 0, 1 and 2 that is closed, as Postfix's
    sendmail does: a closed standard input is an empty message, and no socket or file this
    command opens can take the place of one of them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # (the lowest free descriptor: this one)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script's entry point."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        options = parseArguments(arguments, sys.argv[0] if argv is None else PROG)
    except UsageError as e:
        sys.stderr.write(f"{PROG}: {e}\n{USAGE}")
        return os.EX_USAGE
    _openClosedStandardDescriptors()
    stdin = sys.stdin.buffer if sys.stdin is not None else open(0, "rb", closefd=False)  # noqa: SIM115
    try:
        return run(options, stdin, sys.stderr, os.environ)
    except SubmitError as e:
        for line in e.message.split("\n"):
            print(f"{PROG}: {line}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was sent", file=sys.stderr)
        return os.EX_TEMPFAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
