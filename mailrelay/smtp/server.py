"""The ESMTP server session: a sans-IO state machine.

L{ServerSession} takes bytes and returns a list of events: L{Reply} objects to send, L{Close},
L{Pause} (past the soft error limit), message body data to store (L{BodyData}), L{StartTLS},
refusals to log (L{Refused}), and questions the driver must answer before the session reads
on (L{CheckMail}, L{CheckRecipient}, L{StartData}, L{EndOfData},
L{Authenticate}).  After a question
the session parses nothing more until L{ServerSession.answer} is called, so pipelined commands are
answered strictly in order, across the DATA boundary too.  It never touches a socket, a clock or
the disk: L{mailrelay.receive.protocol} drives it with Twisted.

Message data is read by L{mailrelay.smtp.data.DataReader}, in bulk (C{re} searches and
C{bytes} methods over whole chunks, never one Python call per line).  The end of data is only
C{<CRLF>.<CRLF>}: a bare CR or LF never ends or splits a message.

CHUNKING (RFC 3030): C{BDAT n [LAST]} is followed at once by C{n} octets of the message, read
by L{mailrelay.smtp.data.ChunkReader} (no dot-stuffing, no end marker; a text message gets
the checks of DATA).  Once a BDAT line's syntax is good its octets are read whatever the
reply, so nothing in a chunk is ever taken as a command; a malformed BDAT closes the
session (521), since where the next command starts is then unknown.  The first chunk of a
message asks L{StartData} (C{command="BDAT"}), the last L{EndOfData}; the chunks between get
C{250 2.0.0 Ok: n octets received} at once.  A refused chunk is read, then refused, and the
chunks pipelined after it are read and refused until BDAT LAST or RSET (RFC 3030 2), each
refusal an error (the session ends at C{maxErrors}), as Postfix's smtpd does.

STARTTLS (RFC 3207): after C{220 2.0.0 Ready to start TLS} the session emits L{StartTLS} and
B{discards} every byte already received after the STARTTLS line (a client, or a man in the
middle, pipelining plaintext commands behind it: the "STARTTLS command injection" of
CVE-2011-0411); L{StartTLS.discarded} says how many, for the log.  It then reads nothing until
the driver calls L{ServerSession.tlsStarted} once the handshake is done, which resets the
session (no HELO, no transaction, no authentication): the client must EHLO again.

AUTH (RFC 4954): SASL PLAIN (RFC 4616) and LOGIN, with or without an initial response, are
decoded here; the credentials go to the driver in an L{Authenticate} question.

Protocol synchronization (Postfix's C{smtpd_forbid_unauth_pipelining}): with
C{SessionSettings.rejectUnauthPipelining}, a command followed by more input already received is
refused with C{554 5.5.0 Error: SMTP protocol synchronization} and the session closed, when the
client cannot know that pipelining is allowed (no EHLO answered yet, or HELO) or when the command
must end a group (RFC 2920 3.1: EHLO, HELO, DATA, NOOP, VRFY, EXPN, TURN).  A session made with
C{awaitingGreeting=True} treats input received before L{ServerSession.greeting} (an early talker)
the same way when C{rejectPregreet} is set, and otherwise keeps it until the greeting.  Either
way a L{SyncError} event comes first, for the log.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from mailrelay import address
from mailrelay.address import AddressError
from mailrelay.envelope import ClientInfo, Envelope, Recipient
from mailrelay.interfaces import Verdict, VerdictKind
from mailrelay.smtp import replies as R
from mailrelay.smtp.data import BARE_NEWLINE_REJECT, ChunkReader, DataReader
from mailrelay.smtp.replies import Reply

#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
MAX_COMMAND_LINE = 512
#: A client that sends this much without a line end is disconnected (421).
COMMAND_BUFFER_LIMIT = 16384
#: RFC 4954 section 4: an AUTH command (with its initial response) may be 12288 octets longer
#: than other commands, and a SASL response line (without CRLF) at most 12288 octets.
MAX_SASL_LINE = 12288

_XTEXT_MAX = 100  # RFC 3461 ENVID limit
_NON_ASCII_PARAMETER = Reply(553, "5.6.7", "Error: non-ASCII parameter without SMTPUTF8")


@dataclass(frozen=True)
class SessionSettings:
    """The limits and identity one listener gives its sessions."""

    hostname: str
    maxMessageSize: int = 10240000
    maxRecipients: int = 100
    maxErrors: int = 20
    #: Postfix's smtpd_soft_error_limit and smtpd_error_sleep_time: once a session has made
    #: C{softErrorLimit} errors, each reply is preceded by a L{Pause} of C{errorSleepTime}
    #: seconds (0: none).
    softErrorLimit: int = 10
    errorSleepTime: float = 1.0
    #: Postfix's smtpd_junk_command_limit: past this many HELO, EHLO, RSET, NOOP, VRFY and
    #: HELP commands (they never fail, so no error limit stops a client repeating them), each
    #: one counts as an error; a message received forgives them.
    junkCommandLimit: int = 100
    #: Postfix's smtpd_recipient_overshoot_limit: RCPTs refused past C{maxRecipients} (452)
    #: in one transaction without counting as errors; each one after those is an error.
    recipientOvershootLimit: int = 1000
    bareNewline: str = BARE_NEWLINE_REJECT
    #: NUL bytes in message data: C{"reject"} the message (550 5.6.0), or C{"normalize"}:
    #: remove them (a receiver that strips NULs would otherwise see what we did not).
    nulBytes: str = BARE_NEWLINE_REJECT
    #: STARTTLS is offered (the listener has a certificate and C{tls_mode = "starttls"}).
    starttls: bool = False
    #: The SASL mechanisms offered (C{("PLAIN", "LOGIN")}); C{()}: no AUTH on this listener.
    authMechanisms: tuple[str, ...] = ()
    #: AUTH is offered and accepted without TLS too (else 538 5.7.11 before TLS).
    authWithoutTLS: bool = False
    #: MAIL needs AUTH first (a submission listener): 530 5.7.0 otherwise.
    requireAuth: bool = False
    #: Refuse improper pipelining (554 5.5.0 and close; see the module docstring).
    rejectUnauthPipelining: bool = False
    #: Refuse input received before the greeting (554 5.5.0 and close).
    rejectPregreet: bool = False
    #: Ask the driver about each HELO/EHLO name (L{CheckHelo}) before greeting the client.
    checkHelo: bool = False
    #: The ESMTP extensions offered (see L{ExtensionCommand}): objects with C{keyword},
    #: C{mailParameters}, C{rcptParameters}, C{verbs} and, never raising,
    #: C{ehloLine(client)} (a line, or C{None} not to offer it to this client),
    #: C{mailParameter(client, envelope, name, value)} and
    #: C{rcptParameter(client, envelope, recipient, name, value)} (the value to keep, or a
    #: L{Reply} refusing the command).
    extensions: tuple[Any, ...] = ()
    #: CHUNKING (RFC 3030): BDAT is offered and taken.
    chunking: bool = True
    #: BINARYMIME (RFC 3030): C{BODY=BINARYMIME} is offered and taken (with CHUNKING only).
    binaryMIME: bool = False


# Events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after writing the replies before this event."""


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait C{seconds} before carrying out the events after this one (reading nothing
    meanwhile): a session past its soft error limit (C{SessionSettings.softErrorLimit})
    slows down, as Postfix's smtpd sleeps before each reply then (smtpd_chat.c)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class BodyData:
    """Message content to store: unstuffed, with CRLF line ends only."""

    data: bytes


@dataclass(frozen=True, slots=True)
class AbortData:
    """The message being received is abandoned (connection lost, timeout): drop what was stored."""


@dataclass(frozen=True, slots=True)
class CheckMail:
    """Question: may this MAIL be accepted?  Answer with a L{Verdict}."""

    envelope: Envelope


@dataclass(frozen=True, slots=True)
class CheckRecipient:
    """Question: may this recipient be accepted?  Answer with a L{Verdict}."""

    envelope: Envelope
    recipient: Recipient
    mailbox: address.Mailbox


@dataclass(frozen=True, slots=True)
class CheckHelo:
    """Question (with C{SessionSettings.checkHelo}): may the client greet as C{name}?  Answer
    with a L{Verdict}; C{client.helo} is still the previous name meanwhile."""

    name: str
    esmtp: bool


@dataclass(frozen=True, slots=True)
class ExtensionCommand:
    """Question: carry out the command C{verb} of the ESMTP extension C{extension} (one of
    C{SessionSettings.extensions}, offered to this client).  Answer with the L{Reply} to send
    (a 421 closes the session).

    @ivar envelope: the transaction in progress, or C{None}.
    """

    extension: Any
    verb: str
    argument: str
    envelope: Envelope | None


@dataclass(frozen=True, slots=True)
class StartData:
    """Question: a message is about to be received.  Prepare to store it (assign
    C{envelope.queueID}) and answer C{None}, or answer a L{Reply} (4xx/5xx) to refuse DATA.

    @ivar command: C{"DATA"}, or C{"BDAT"} for the first chunk of a message sent by BDAT.
    """

    envelope: Envelope
    command: str = "DATA"


@dataclass(frozen=True, slots=True)
class EndOfData:
    """Question: the message ended.  C{error} is the reply the session wants to send when the
    message is unacceptable (too big, long line, bare newline, NUL): the driver drops it and answers
    that reply.  Otherwise the driver stores it durably and answers the final L{Reply}."""

    envelope: Envelope
    error: Reply | None
    size: int


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Start the TLS handshake now, after writing the replies before this event, then call
    L{ServerSession.tlsStarted} when it completes.

    @ivar discarded: how many bytes received after the STARTTLS line were thrown away.
    """

    discarded: int = 0


@dataclass(frozen=True, slots=True)
class SyncError:
    """The client broke protocol synchronization; the 554 reply and L{Close} follow.

    @ivar after: the command after which input was pending (C{"EHLO"}), or C{""} for input
        before the greeting.
    @ivar pending: the start of the input that was pending (at most 100 bytes), for the log,
        cut at an AUTH command's mechanism (credentials are not logged).
    """

    after: str
    pending: bytes


@dataclass(frozen=True, slots=True)
class Closing:
    """The session is closed for a limit or a protocol error, for the log (Postfix's "too
    many errors after RCPT from host[addr]"); the reply and L{Close} follow.

    @ivar reason: what happened (C{"too many errors after RCPT"}).
    @ivar detail: more about it, to follow the client's address (C{": 'BDAT ten'"}), or
        C{""}.
    """

    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class HeloWithSpaces:
    """The client's HELO or EHLO argument has spaces in it: accepted (as Postfix does), for
    the log.

    @ivar verb: C{"HELO"} or C{"EHLO"}.
    @ivar name: the argument, runs of spaces and tabs made one space.
    """

    verb: str
    name: str


@dataclass(frozen=True, slots=True)
class Refused:
    """A connection (at the greeting) or an EHLO, HELO, MAIL, RCPT, DATA or BDAT command is
    refused (4xx or 5xx), for the log (Postfix's C{NOQUEUE: reject:} line); the reply itself
    follows as its own event.

    @ivar command: C{"CONNECT"}, C{"EHLO"}, C{"HELO"}, C{"MAIL"}, C{"RCPT"}, C{"DATA"} or
        C{"BDAT"}.
    @ivar reply: the refusal.
    @ivar sender: the transaction's sender (C{""}: the null sender), or the one the refused
        MAIL gave, or C{None} when there is none.
    @ivar recipient: the recipient a refused RCPT gave (without its angle brackets), else
        C{None}.
    """

    command: str
    reply: Reply
    sender: str | None = None
    recipient: str | None = None


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Question: are these credentials good?  Answer with the user name (C{str}) to accept
    (the session replies 235), or with a L{Reply} to refuse: 535 (or any 4xx/5xx) goes to the
    client and the session goes on; 421 goes to the client and the session closes.

    @ivar mechanism: C{"PLAIN"} or C{"LOGIN"}.
    @ivar username: the authentication identity (UTF-8 decoded).
    @ivar password: the password, as sent (bytes).
    @ivar authzid: the PLAIN authorization identity (C{""} when none was given).
    @ivar malformed: C{""}, or why the credentials cannot be checked: the user name
        (C{"user name not valid UTF-8"}, C{"user name empty"}, C{"user name unprintable"}:
        then C{username} shows the octets sent, escaped, L{_shownName}) or C{"password
        empty"}; the attempt is to be refused as failed without a check.
    """

    mechanism: str
    username: str
    password: bytes = field(repr=False)
    authzid: str = ""
    malformed: str = ""


@dataclass
class _Sasl:
    mechanism: str
    #: LOGIN's user name, as sent (decoded by L{ServerSession._authenticate}).
    username: bytes | None = None


def _shownName(raw: bytes) -> str:
    """A user name that cannot be checked, for the log: its octets with everything but
    printable ASCII escaped as Python writes bytes (C{al\\nice}, C{\\xffbob})."""
    return repr(raw)[2:-1]


@dataclass
class _Chunk:
    """The BDAT chunk being read: C{left} octets to go; C{refusal}: the reply it gets once
    read, or C{None} when its octets are the message's."""

    size: int
    last: bool
    left: int
    refusal: Reply | None = None
    #: The refusal is logged (L{Refused}); not for a chunk discarded after an earlier error,
    #: whose refusal was.  Every refusal counts in the error limit (Postfix's bdat_cmd).
    logged: bool = True


@dataclass
class _Chunking:
    """The state of a message sent by BDAT (RFC 3030), from its first BDAT to its BDAT LAST or
    RSET: meanwhile MAIL, RCPT and DATA are out of sequence (503).

    @ivar reader: the content reader, once the message is open (the driver took
        L{StartData}).
    @ivar open: the driver holds the message (to abort it if the session ends).
    @ivar received: octets received in its chunks, as the client counted them.
    @ivar error: the transaction failed with this reply: chunks are read and discarded
        until BDAT LAST.
    @ivar ending: the L{EndOfData} question asked was for BDAT LAST.
    """

    reader: ChunkReader | None = None
    open: bool = False
    received: int = 0
    error: Reply | None = None
    ending: bool = False


@dataclass
class _Transaction:
    envelope: Envelope
    rcptAttempted: int = 0
    #: RCPTs refused for being past C{SessionSettings.maxRecipients}.
    overshoot: int = 0
    seen: set[str] = field(default_factory=set)


_COMMAND, _DATA, _CLOSED = "command", "data", "closed"
#: Reading the octets of a BDAT chunk.
_BDAT = "bdat"
#: Waiting for the TLS handshake after STARTTLS; waiting for a SASL response line.
_TLS, _SASL = "tls", "sasl"

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_NEED_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
STARTTLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_ABORTED = Reply(501, "5.0.0", "Authentication aborted")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
EMPTY_CHUNK = Reply(501, "5.5.4", "Error: empty BDAT chunk without LAST")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
SYNC_ERROR = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")
#: RFC 2920 3.1: commands that can only be the last of a pipelined group.
#: The argument of BDAT (RFC 3030): the chunk size, then LAST for the last one.
_BDAT_ARGUMENT = re.compile(r"[ \t]*([0-9]{1,20})(?:[ \t]+(LAST))?[ \t]*", re.IGNORECASE)
#: What separates the words of a HELO/EHLO argument (as Postfix's command tokenizer).
_HELO_SPACE = re.compile(r"[ \t]+")
#: An AUTH command at the start of a line, up to its mechanism's name.
_AUTH_COMMAND = re.compile(rb"(?:^|\n)[ \t]*AUTH(?:[ \t]+[^ \t\r\n]*)?", re.IGNORECASE)
_NOT_LOGGED = b"[...]"


def _loggable(after: str, pending: bytes) -> bytes:
    """C{pending} input for the log (L{SyncError}), without credentials: nothing after an
    AUTH command's mechanism (its initial response and the lines after it are the user name
    and password), nothing at all after the command AUTH itself."""
    if after == "AUTH":
        return _NOT_LOGGED
    match = _AUTH_COMMAND.search(pending)
    if match is None:
        return pending
    return pending[: match.end()] + b" " + _NOT_LOGGED


_LAST_IN_GROUP = frozenset({"EHLO", "HELO", "DATA", "NOOP", "VRFY", "EXPN", "TURN"})
_PLAIN_CHALLENGE = Reply(334, "", "")
_LOGIN_USERNAME = Reply(334, "", "VXNlcm5hbWU6")  # "Username:"
_LOGIN_PASSWORD = Reply(334, "", "UGFzc3dvcmQ6")  # "Password:"


class ServerSession:
    """One ESMTP server session (sans-IO)."""

    def __init__(
        self, settings: SessionSettings, client: ClientInfo, awaitingGreeting: bool = False
    ) -> None:
        """
        @param awaitingGreeting: the driver sends the greeting later (L{greeting}): input
            received before that is early talk (refused with C{settings.rejectPregreet},
            otherwise kept until the greeting).  Without it, input is processed at once.
        """
        self.settings = settings
        self._awaitingGreeting = awaitingGreeting
        self.client = client
        #: What relay control said of the client's address, restored when TLS resets the
        #: session (authentication may have raised C{client.relayAllowed}).
        self._addressRelay = client.relayAllowed
        self._sasl: _Sasl | None = None
        self.errors = 0
        #: The name of the last command read (C{"UNKNOWN"} for one not recognized), for the
        #: log (L{Closing}).
        self._verb = "CONNECT"
        #: HELO, EHLO, RSET, NOOP, VRFY and HELP commands since the last message received
        #: (see C{SessionSettings.junkCommandLimit}).
        self.junkCommands = 0
        self.messages = 0
        self.mode = _COMMAND
        self.transaction: _Transaction | None = None
        self._buf = b""
        self._pos = 0
        self._waiting: type | None = None
        self._question: object | None = None
        self._out: list[object] = []
        #: The MAIL, RCPT or DATA command being answered, as C{(command, sender,
        #: recipient)}: its refusals are reported (L{Refused}).
        self._refusable: tuple[str, str | None, str | None] | None = None
        #: The message's content reader, in DATA mode.
        self._data: DataReader | None = None
        #: The client was refused at the greeting (554): every command but QUIT gets 503.
        self._refusedAtGreeting = False
        #: What the extensions offered in the last EHLO own: MAIL and RCPT parameters and
        #: commands, by name.
        self._owners: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = ({}, {}, {})
        #: From the first BDAT to BDAT LAST or RSET (RFC 3030); the chunk being read, and the
        #: one waiting for the answer to L{StartData}.
        self._chunking: _Chunking | None = None
        self._chunk: _Chunk | None = None

    # Driver API -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.mode == _CLOSED

    @property
    def inData(self) -> bool:
        """C{True} while message data is read: after the 354 reply to DATA, or in the octets
        of a BDAT chunk (the DATA time limits apply)."""
        return self.mode in (_DATA, _BDAT)

    @property
    def inMessage(self) -> bool:
        """C{True} from the 354 reply to DATA, or from the first BDAT chunk taken, until the
        reply to the end of the message is known: the client has a message in hand (a
        stopping relay lets it finish)."""
        return self.mode == _DATA or self._waiting is EndOfData or self._messageOpen

    @property
    def _messageOpen(self) -> bool:
        """The driver holds a message being received (L{AbortData} drops it)."""
        return self.mode == _DATA or (self._chunking is not None and self._chunking.open)

    @property
    def awaitingGreeting(self) -> bool:
        """C{True} until L{greeting} (for a session made with C{awaitingGreeting=True})."""
        return self._awaitingGreeting

    @property
    def waiting(self) -> bool:
        """C{True} while a question is unanswered (the driver should stop reading)."""
        return self._waiting is not None

    def greeting(self, refusal: Reply | None = None) -> list[object]:
        """The 220 greeting, then what input kept until now (without C{rejectPregreet})
        makes the session do.

        @param refusal: the reply refusing the client instead (RFC 5321 3.1): a C{554} (the
            session then answers every command but QUIT with C{503 5.5.1}, and QUIT with 221),
            or a C{421} or C{521} (RFC 7504), after which it closes.
        """
        if self.mode == _CLOSED:
            return []
        self._awaitingGreeting = False
        if refusal is not None and refusal.code != 554:
            return [Refused("CONNECT", refusal), *self.closeWith(refusal)]
        if refusal is not None:
            self._refusedAtGreeting = True
        out: list[object] = (
            [Reply(220, "", f"{self.settings.hostname} ESMTP mailrelay")]
            if refusal is None
            else [Refused("CONNECT", refusal), refusal]
        )
        if self._buf:
            out += self._run()
        return out

    def dataReceived(self, data: bytes) -> list[object]:
        if self.mode == _CLOSED:
            return []
        if self._pos:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        else:
            self._buf += data
        if self._awaitingGreeting:
            if self.settings.rejectPregreet:
                out: list[object] = [SyncError("", _loggable("", self._buf[:100]))]
                self._out = out
                self._close(SYNC_ERROR)
                return out
            return []
        return self._run()

    def closeWith(self, reply: Reply) -> list[object]:
        """Send C{reply} (a 421) and close: a time limit, a connection limit.  A message being
        received is abandoned."""
        if self.mode == _CLOSED:
            return []
        out: list[object] = []
        if self._messageOpen:
            out.append(AbortData())
        out += [reply, Close()]
        self.mode = _CLOSED
        self.transaction = None
        self._chunking = None
        self._sasl = None
        return out

    def answer(self, result: object) -> list[object]:
        """Answer the pending question, then go on reading buffered input."""
        kind, question = self._waiting, self._question
        if kind is None:
            raise RuntimeError("no question is pending")
        self._waiting = self._question = None
        if self.mode == _CLOSED:
            return []
        out = self._out = []
        self._refusable = _refusable(question)
        if kind is CheckMail:
            self._mailAnswered(question, result)  # type: ignore[arg-type]
        elif kind is CheckRecipient:
            self._rcptAnswered(question, result)  # type: ignore[arg-type]
        elif kind is StartData and self._chunk is not None:
            self._bdatStartAnswered(result)  # type: ignore[arg-type]
        elif kind is StartData:
            self._dataStartAnswered(result)  # type: ignore[arg-type]
        elif kind is EndOfData:
            self._dataEndAnswered(result)  # type: ignore[arg-type]
        elif kind is Authenticate:
            self._authAnswered(question, result)  # type: ignore[arg-type]
        elif kind is CheckHelo:
            self._heloAnswered(question, result)  # type: ignore[arg-type]
        elif kind is ExtensionCommand:
            self._extensionAnswered(result)  # type: ignore[arg-type]
        return out + self._run()

    def tlsStarted(self, description: str | None) -> list[object]:
        """The TLS handshake completed (after STARTTLS, or on an implicit TLS listener before
        the first command).  The session starts afresh: no HELO, no transaction, no
        authentication; the client must EHLO again.

        @param description: the TLS version and cipher (C{"TLSv1.3 TLS_AES_256_GCM_SHA384"}),
            kept in C{client.tls}.
        """
        if self.mode == _CLOSED:
            return []
        self.client.tls = description or "TLS"
        self.client.helo = None
        self.client.esmtp = False
        self.client.authUser = None
        self.client.relayAllowed = self._addressRelay
        self.transaction = None
        self._chunking = None
        self._sasl = None
        self._owners = ({}, {}, {})
        if self.mode in (_TLS, _SASL):
            self.mode = _COMMAND
        if self._awaitingGreeting:  # implicit TLS: the greeting has not been sent yet
            return []
        return self._run()

    def timedOut(self) -> list[object]:
        """The driver's timer expired (idle in command mode, or no data in DATA)."""
        return self.closeWith(
            Reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"))

    def connectionLost(self) -> list[object]:
        """The client went away: an unfinished transaction is dropped, as by RSET."""
        out: list[object] = []
        if self._messageOpen:
            out.append(AbortData())
        self.mode = _CLOSED
        self.transaction = None
        self._chunking = None
        return out

    # Internals ------------------------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        """Send C{reply}, after a L{Pause} once the session has made C{softErrorLimit}
        errors: Postfix's smtpd sleeps before every reply then, whatever it says ("sleep on
        anything", smtpd_chat.c); the reply's own error is counted after it."""
        settings = self.settings
        if settings.errorSleepTime > 0 and self.errors >= settings.softErrorLimit:
            self._out.append(Pause(settings.errorSleepTime))
        self._out.append(reply)

    def _reply(self, reply: Reply, countError: bool = True) -> None:
        self._noteRefusal(reply)
        self._send(reply)
        if reply.code >= 400 and countError:
            self.errors += 1
            if self.errors >= self.settings.maxErrors and self.mode != _CLOSED:
                self._tooManyErrors()

    def _tooManyErrors(self) -> None:
        self._out.append(Closing(f"too many errors after {self._verb}"))
        self._close(Reply(421, "4.7.0", f"{self.settings.hostname} Error: too many errors"))

    def _noteRefusal(self, reply: Reply) -> None:
        if reply.code >= 400 and self._refusable is not None:
            command, sender, recipient = self._refusable
            self._out.append(Refused(command, reply, sender, recipient))

    def _close(self, reply: Reply) -> None:
        if self._messageOpen:
            self._out.append(AbortData())
        self._send(reply)
        self._out.append(Close())
        self.mode = _CLOSED
        self.transaction = None
        self._chunking = None

    def _ask(self, question: object) -> None:
        self._waiting = type(question)
        self._question = question
        self._out.append(question)

    def _run(self) -> list[object]:
        result: list[object] = []
        self._out = result
        while self._waiting is None and self.mode != _CLOSED:
            if self.mode == _DATA:
                if not self._processData():
                    break
            elif self.mode == _BDAT:
                if not self._processChunk():
                    break
            elif self.mode == _TLS:
                break
            elif self.mode == _SASL:
                if not self._processSaslResponse():
                    break
            elif not self._processCommand():
                break
        if self._pos and self._pos >= len(self._buf):
            self._buf = b""
            self._pos = 0
        return result

    # Command mode ---------------------------------------------------------------------------

    def _takeLine(self) -> bytes | None:
        """The next line from the buffer, without its line end, or C{None} when none is
        complete yet (the session is closed when the partial line is too long)."""
        buf, pos = self._buf, self._pos
        end = buf.find(b"\n", pos)
        if end < 0:
            if len(buf) - pos > COMMAND_BUFFER_LIMIT:
                self._out.append(Closing(
                    f"line too long (more than {COMMAND_BUFFER_LIMIT} octets without a line end)"))
                self._close(Reply(421, "4.7.0",
                                  f"{self.settings.hostname} Error: line too long, closing"))
            return None
        raw = buf[pos:end]
        self._pos = end + 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        return raw

    def _processCommand(self) -> bool:
        self._refusable = None
        raw = self._takeLine()
        if raw is None:
            return False
        if self.errors >= self.settings.maxErrors:
            # Errors counted with a positive reply (junk commands): the hard limit is checked
            # at the next command, as Postfix's smtpd checks it before reading each one.
            self._tooManyErrors()
            return True
        self._verb = "UNKNOWN"
        limit = MAX_COMMAND_LINE
        auth = raw[:5].upper() == b"AUTH " and bool(self.settings.authMechanisms)
        if auth:
            limit += MAX_SASL_LINE
        if len(raw) + 2 > limit:
            # RFC 4954 4: an initial response too long is the exchange's line too long.
            self._reply(AUTH_LINE_TOO_LONG if auth else R.LINE_TOO_LONG)
            return True
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(Reply(500, "5.5.2", "Error: command is not valid UTF-8"))
            return True
        if "\r" in line or "\n" in line or "\x00" in line:  # (no generator: per command)
            self._reply(R.SYNTAX_ERROR)
            return True
        verb, _, arg = line.partition(" ")
        # A command name is ASCII: str.upper() would make "MAIL" of "maıl" (a dotless i).
        name = verb.upper() if verb.isascii() else "\x00"
        handler = getattr(self, "_cmd_" + name, None) if name.isalpha() else None
        self._verb = name if handler is not None or name in self._owners[2] else "UNKNOWN"
        if self._refusedAtGreeting and name != "QUIT":
            self._reply(Reply(503, "5.5.1", "Error: no SMTP service here, send QUIT"))
            return True
        if handler is None and name in self._owners[2]:
            handler = self._extensionCommand
            arg = f"{name} {arg}"
        if handler is None:
            if not verb:
                self._reply(R.SYNTAX_ERROR)
            elif name in _UNIMPLEMENTED:
                self._reply(R.NOT_IMPLEMENTED)
            else:
                self._reply(R.UNRECOGNIZED)
            return True
        if self.settings.rejectUnauthPipelining and self._pos < len(self._buf):
            if name != "QUIT" and (not self.client.esmtp or name in _LAST_IN_GROUP):
                pending = self._buf[self._pos : self._pos + 100]
                self._out.append(SyncError(name, _loggable(name, pending)))
                self._close(SYNC_ERROR)
                return True
        if name in _JUNK_COMMANDS:
            self.junkCommands += 1
            if self.junkCommands > self.settings.junkCommandLimit:
                self.errors += 1
        handler(arg)
        return True

    def _resetTransaction(self) -> None:
        """End the transaction (RSET, HELO/EHLO, the end of a message): a message sent by
        BDAT and not finished is dropped."""
        if self._chunking is not None and self._chunking.open:
            self._out.append(AbortData())
        self._chunking = None
        self.transaction = None

    def _cmd_EHLO(self, arg: str) -> None:
        self._helo(arg, esmtp=True)

    def _cmd_HELO(self, arg: str) -> None:
        self._helo(arg, esmtp=False)

    def _helo(self, arg: str, esmtp: bool) -> None:
        verb = "EHLO" if esmtp else "HELO"
        words = _HELO_SPACE.split(arg.strip(" \t"))
        name = " ".join(words)
        if not name or not name.isprintable():
            self._reply(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return
        if len(words) > 1:
            # RFC 5321 4.1.1.1 wants one domain or address literal; Postfix takes the words
            # together (broken clients send "EHLO My Computer"), and so do we, but say so.
            self._out.append(HeloWithSpaces(verb, name))
        if self.settings.checkHelo:
            self._ask(CheckHelo(name, esmtp))
            return
        self._greeted(name, esmtp)

    def _heloAnswered(self, question: CheckHelo, verdict: Verdict) -> None:
        if not self._verdictRefuses(verdict):
            self._greeted(question.name, question.esmtp)

    def _greeted(self, name: str, esmtp: bool) -> None:
        """Accept the HELO or EHLO name C{name}: reply with the extensions offered."""
        self._resetTransaction()
        self.client.helo = name
        self.client.esmtp = esmtp
        if esmtp:
            settings = self.settings
            lines = [settings.hostname, "PIPELINING", f"SIZE {settings.maxMessageSize}",
                     "8BITMIME", "ENHANCEDSTATUSCODES", "DSN"]
            if settings.chunking:
                lines.append("CHUNKING")
                if settings.binaryMIME:
                    lines.append("BINARYMIME")
            if self.client.tls:
                lines.append("REQUIRETLS")  # RFC 8689 2: only in a session over TLS
            lines.append("SMTPUTF8")
            if self.settings.starttls and not self.client.tls:
                lines.append("STARTTLS")
            if self._authOffered:
                lines.append("AUTH " + " ".join(self.settings.authMechanisms))
            if self.settings.extensions:
                lines += self._offerExtensions()
            self._reply(Reply(250, "", "\n".join(lines)))
        else:
            self._owners = ({}, {}, {})
            self._reply(Reply(250, "", self.settings.hostname))

    def _offerExtensions(self) -> list[str]:
        """The EHLO lines of the extensions offered to the client; what they own is then
        accepted from it."""
        lines: list[str] = []
        owners: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = ({}, {}, {})
        for extension in self.settings.extensions:
            line = extension.ehloLine(self.client)
            if line is None:
                continue
            lines.append(line)
            for owned, names in zip(
                owners,
                (extension.mailParameters, extension.rcptParameters, extension.verbs),
                strict=True,
            ):
                owned.update(dict.fromkeys(names, extension))
        self._owners = owners
        return lines

    def _extensionCommand(self, arg: str) -> None:
        verb, _, argument = arg.partition(" ")
        t = self.transaction
        self._ask(
            ExtensionCommand(self._owners[2][verb], verb, argument, t.envelope if t else None)
        )

    def _extensionAnswered(self, reply: Reply) -> None:
        if reply.code == 421:
            self._close(reply)
        else:
            self._reply(reply)

    def _cmd_MAIL(self, arg: str) -> None:
        self._refusable = ("MAIL", _givenPath(arg, "FROM:"), None)
        if self.client.helo is None:
            self._reply(R.NEED_HELO)
            return
        if self.settings.requireAuth and self.client.authUser is None:
            # (Before STARTTLS AUTH is not offered yet: TLS first, as RFC 3207 answers.)
            tlsFirst = not self._authOffered and self.settings.starttls and not self.client.tls
            self._reply(STARTTLS_REQUIRED if tlsFirst else AUTH_REQUIRED)
            return
        if self._chunking is not None:
            self._reply(Reply(503, "5.5.1", "Error: MAIL after BDAT"))
            return
        if self.transaction is not None:
            self._reply(R.NESTED_MAIL)
            return
        if arg[:5].upper() != "FROM:":
            self._reply(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            return
        try:
            path, params = address.splitArgument(arg[5:])
            envelope = Envelope(client=self.client)
            self._mailParams(envelope, params)
            sender = address.parseReversePath(path, utf8=envelope.smtputf8)
        except AddressError as e:
            self._reply(e.reply)
            return
        except _ParamError as e:
            self._reply(e.reply)
            return
        envelope.sender = "" if sender is None else str(sender)
        self._ask(CheckMail(envelope))

    def _mailParams(self, envelope: Envelope, params: list[tuple[str, str | None]]) -> None:
        seen: set[str] = set()
        for key, value in params:
            if key in seen:
                raise _ParamError(Reply(501, "5.5.4", f"Error: duplicate {key} parameter"))
            seen.add(key)
            if key == "SIZE":
                if value is None or not value.isdigit() or not value.isascii() or len(value) > 20:
                    raise _ParamError(Reply(501, "5.5.4", "Error: bad SIZE parameter"))
                envelope.size = int(value)
                if envelope.size > self.settings.maxMessageSize:
                    raise _ParamError(R.SIZE_EXCEEDED)
            elif key == "BODY":
                body = (value or "").upper()
                if body not in self._bodyTypes:
                    raise _ParamError(
                        Reply(501, "5.5.4", f"Error: unsupported BODY value {value!r}"))
                envelope.body = body
            elif key == "SMTPUTF8":
                if value is not None:
                    raise _ParamError(Reply(501, "5.5.4", "Error: SMTPUTF8 takes no value"))
                envelope.smtputf8 = True
            elif key == "RET":
                ret = (value or "").upper()
                if ret not in ("FULL", "HDRS"):
                    raise _ParamError(
                        Reply(501, "5.5.4", "Error: bad RET parameter (FULL or HDRS)"))
                envelope.ret = ret
            elif key == "ENVID":
                if not value:
                    raise _ParamError(Reply(501, "5.5.4", "Error: bad ENVID parameter"))
                decoded = address.xtextDecode(value)
                if len(decoded) > _XTEXT_MAX or not decoded.isprintable():
                    raise _ParamError(Reply(501, "5.5.4", "Error: bad ENVID parameter"))
                envelope.envid = decoded
            elif key == "REQUIRETLS" and (self.client.tls or self.settings.starttls):
                if value is not None:
                    raise _ParamError(Reply(501, "5.5.4", "Error: REQUIRETLS takes no value"))
                if not self.client.tls:
                    # RFC 8689 2: only in a session using TLS; as RFC 3207 says for a command
                    # that needs TLS first.
                    raise _ParamError(STARTTLS_REQUIRED)
                envelope.requireTLS = True
            elif key == "AUTH" and self.settings.authMechanisms:
                # RFC 4954 section 5: the submitter's identity, for trusted relays; we record
                # our own client's authentication instead, so it is checked and ignored.
                if not value:
                    raise _ParamError(Reply(501, "5.5.4", "Error: bad AUTH parameter"))
            elif key in self._owners[0]:
                kept = self._owners[0][key].mailParameter(self.client, envelope, key, value)
                if isinstance(kept, Reply):
                    raise _ParamError(kept)
                envelope.parameters[key] = kept
            else:
                raise _ParamError(Reply(555, "5.5.4", f"Error: unsupported MAIL parameter {key}"))
        for _key, value in params:
            if value is not None and not value.isascii() and not envelope.smtputf8:
                raise _ParamError(_NON_ASCII_PARAMETER)

    @property
    def _bodyTypes(self) -> tuple[str, ...]:
        """The C{BODY=} values taken (RFC 6152, RFC 3030)."""
        if self.settings.chunking and self.settings.binaryMIME:
            return ("7BIT", "8BITMIME", "BINARYMIME")
        return ("7BIT", "8BITMIME")

    def _mailAnswered(self, question: CheckMail, verdict: Verdict) -> None:
        if self._verdictRefuses(verdict):
            return
        self.transaction = _Transaction(question.envelope)
        self._reply(Reply(250, "2.1.0", "Ok"))

    def _verdictRefuses(self, verdict: Verdict) -> bool:
        """Send the reply of a refusing verdict; C{True} when it refused."""
        if verdict.kind in (VerdictKind.ACCEPT, VerdictKind.CONTINUE):
            return False
        if verdict.kind is VerdictKind.DISCONNECT:
            reply = verdict.reply or Reply(421, "4.7.0", "Error: closing connection")
            self._noteRefusal(reply)
            self._close(reply)
        else:
            self._reply(verdict.reply or R.VALIDATOR_FAILED)
        return True

    def _cmd_RCPT(self, arg: str) -> None:
        t = self.transaction
        sender = t.envelope.sender if t is not None else None
        self._refusable = ("RCPT", sender, _givenPath(arg, "TO:"))
        if self._chunking is not None:
            self._reply(Reply(503, "5.5.1", "Error: RCPT after BDAT"))
            return
        if t is None:
            self._reply(R.NEED_MAIL)
            return
        if arg[:3].upper() != "TO:":
            self._reply(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            return
        t.rcptAttempted += 1
        if len(t.envelope.recipients) >= self.settings.maxRecipients:
            t.overshoot += 1
            self._reply(R.TOO_MANY_RCPT,
                        countError=t.overshoot > self.settings.recipientOvershootLimit)
            return
        try:
            path, params = address.splitArgument(arg[3:])
            rcpt = self._rcptParams(params, t.envelope.smtputf8)
            mailbox = address.parseForwardPath(
                path, utf8=t.envelope.smtputf8, postmasterDomain=self.settings.hostname
            )
            rcpt.address = str(mailbox)
            rcpt.original = path[1:-1]
            self._extensionRcptParams(t.envelope, rcpt, params)
        except (AddressError, _ParamError) as e:
            self._reply(e.reply)
            return
        if rcpt.address in t.seen:
            # A duplicate is accepted once: the message is delivered to it once.
            self._reply(Reply(250, "2.1.5", "Ok"))
            return
        self._ask(CheckRecipient(t.envelope, rcpt, mailbox))

    def _rcptParams(self, params: list[tuple[str, str | None]], utf8: bool) -> Recipient:
        rcpt = Recipient(address="")
        seen: set[str] = set()
        for key, value in params:
            if key in seen:
                raise _ParamError(Reply(501, "5.5.4", f"Error: duplicate {key} parameter"))
            seen.add(key)
            if key == "NOTIFY":
                items = tuple((value or "").upper().split(","))
                if not items or not set(items) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or (
                    "NEVER" in items and len(items) > 1
                ) or len(set(items)) != len(items):
                    raise _ParamError(Reply(501, "5.5.4", "Error: bad NOTIFY parameter"))
                rcpt.notify = items
            elif key == "ORCPT":
                kind, sep, rest = (value or "").partition(";")
                if not sep or not kind or not rest or not re.fullmatch(r"[A-Za-z0-9-]+", kind):
                    raise _ParamError(Reply(501, "5.5.4", "Error: bad ORCPT parameter"))
                if not rest.isascii() and not utf8:
                    raise _ParamError(_NON_ASCII_PARAMETER)
                decoded = address.xtextDecode(rest) if kind.lower() != "utf-8" else rest
                if not decoded.isprintable() or len(decoded) > 500:
                    raise _ParamError(Reply(501, "5.5.4", "Error: bad ORCPT parameter"))
                rcpt.orcpt = f"{kind};{decoded}"
            elif key not in self._owners[1]:
                raise _ParamError(Reply(555, "5.5.4", f"Error: unsupported RCPT parameter {key}"))
        return rcpt

    def _extensionRcptParams(
        self, envelope: Envelope, rcpt: Recipient, params: list[tuple[str, str | None]]
    ) -> None:
        """Parse the RCPT parameters the extensions own, once the address is known."""
        owners = self._owners[1]
        for key, value in params:
            if key in owners:
                kept = owners[key].rcptParameter(self.client, envelope, rcpt, key, value)
                if isinstance(kept, Reply):
                    raise _ParamError(kept)
                rcpt.parameters[key] = kept

    def _rcptAnswered(self, question: CheckRecipient, verdict: Verdict) -> None:
        if self._verdictRefuses(verdict):
            return
        t = self.transaction
        if t is None or t.envelope is not question.envelope:  # pragma: no cover - defensive
            return
        t.envelope.recipients.append(question.recipient)
        t.seen.add(question.recipient.address)
        self._reply(Reply(250, "2.1.5", "Ok"))

    def _cmd_DATA(self, arg: str) -> None:
        if arg.strip():
            self._reply(Reply(501, "5.5.4", "Syntax: DATA"))
            return
        t = self.transaction
        self._refusable = ("DATA", t.envelope.sender if t is not None else None, None)
        if self._chunking is not None:
            # RFC 3030 2: DATA and BDAT cannot be used in one transaction.
            self._reply(Reply(503, "5.5.1", "Error: DATA after BDAT"))
            return
        if t is None:
            self._reply(R.NEED_MAIL)
            return
        if t.envelope.body == "BINARYMIME":
            self._reply(Reply(503, "5.5.1", "Error: BODY=BINARYMIME needs BDAT, not DATA"))
            return
        if not t.envelope.recipients:
            self._reply(R.NO_VALID_RCPT if t.rcptAttempted else R.NEED_RCPT)
            return
        self._ask(StartData(t.envelope))

    def _dataStartAnswered(self, refusal: Reply | None) -> None:
        if refusal is not None and refusal.code == 421:
            self._noteRefusal(refusal)
            self._close(refusal)
            return
        if refusal is not None:
            self._resetTransaction()
            self._reply(refusal)
            return
        self.mode = _DATA
        settings = self.settings
        self._data = DataReader(settings.maxMessageSize, settings.bareNewline, settings.nulBytes)
        self._send(R.START_DATA)

    # CHUNKING: BDAT (RFC 3030) ---------------------------------------------------------------

    def _cmd_BDAT(self, arg: str) -> None:
        """C{BDAT size [LAST]}: C{size} octets of the message follow the command line at once.

        Once the syntax is known to be good, the chunk's octets are read whatever the reply
        (they are never taken as commands), as Postfix does: a refused chunk is read, then
        refused; after a refused chunk the others are read and refused until BDAT LAST, which
        ends the transaction (RFC 3030 2: chunks already pipelined behind a failed one).
        """
        m = _BDAT_ARGUMENT.fullmatch(arg)
        if m is None:
            # Where the next command starts is unknown: the rest would be taken as commands.
            self._out.append(Closing("malformed BDAT command", f": {'BDAT ' + arg!r}"))
            self._close(Reply(521, "5.5.4", "Syntax: BDAT count [LAST]"))
            return
        size, last = int(m.group(1)), m.group(2) is not None
        t = self.transaction
        self._refusable = ("BDAT", t.envelope.sender if t is not None else None, None)
        settings = self.settings
        ch = self._chunking
        if ch is None:
            ch = self._chunking = _Chunking()
        total = ch.received + size
        if total > settings.maxMessageSize * 1.5:
            # Staying in step with a client sending that much costs more than it is worth
            # (Postfix's smtpd stops reading at 1.5 times its message_size_limit too).
            self._out.append(Closing(f"BDAT content beyond 1.5 times the message size limit "
                                     f"({int(settings.maxMessageSize * 1.5)} octets)"))
            self._close(R.SIZE_EXCEEDED)
            return
        ch.received = total
        refusal: Reply | None = None
        if size == 0 and not last:
            # Checked before an earlier error, and always counted (Postfix's bdat_cmd: "block
            # abuse involving empty chunks"): a chunk of no octets escapes the size bound,
            # so discarding it uncounted would let a client repeat it for ever.
            empty = EMPTY_CHUNK if settings.chunking else R.NOT_IMPLEMENTED
            self._readChunk(_Chunk(0, False, 0, empty))
            return
        if ch.error is not None:
            self._readChunk(_Chunk(size, last, size, Reply(
                ch.error.code, ch.error.enhanced,
                f"Error: {size} octets discarded after an earlier error"), logged=False))
            return
        if not settings.chunking:
            refusal = R.NOT_IMPLEMENTED
        elif t is None:
            refusal = R.NEED_MAIL
        elif not t.envelope.recipients:
            refusal = R.NO_VALID_RCPT if t.rcptAttempted else R.NEED_RCPT
        elif total > settings.maxMessageSize:
            refusal = R.SIZE_EXCEEDED
        chunk = _Chunk(size, last, size, refusal)
        if refusal is not None or ch.reader is not None:
            self._readChunk(chunk)
            return
        assert t is not None
        self._chunk = chunk
        self._ask(StartData(t.envelope, "BDAT"))

    def _bdatStartAnswered(self, refusal: Reply | None) -> None:
        chunk, ch, t = self._chunk, self._chunking, self.transaction
        assert chunk is not None and ch is not None and t is not None
        if refusal is None:
            settings = self.settings
            ch.reader = ChunkReader(settings.maxMessageSize, settings.bareNewline,
                                    settings.nulBytes, binary=t.envelope.body == "BINARYMIME")
            ch.open = True
        else:
            chunk.refusal = refusal
        self._readChunk(chunk)

    def _readChunk(self, chunk: _Chunk) -> None:
        self._chunk = chunk
        self.mode = _BDAT

    def _processChunk(self) -> bool:
        """Read what there is of the chunk.  Returns C{True} if it made progress."""
        chunk, ch = self._chunk, self._chunking
        assert chunk is not None and ch is not None
        take = min(chunk.left, len(self._buf) - self._pos)
        if take == 0 and chunk.left:
            return False
        if take:
            start = self._pos
            self._pos += take
            chunk.left -= take
            if chunk.refusal is None and ch.reader is not None:
                content = ch.reader.feed(self._buf[start : self._pos])
                if content is not None:
                    self._out.append(BodyData(content))
        if chunk.left == 0:
            self.mode = _COMMAND
            self._chunk = None
            self._chunkRead(chunk, ch)
        return True

    def _chunkRead(self, chunk: _Chunk, ch: _Chunking) -> None:
        """Answer a chunk read to its end."""
        t = self.transaction
        reader = ch.reader
        error = chunk.refusal or (reader.error if reader is not None else None)
        if chunk.last and error is None and reader is not None:
            tail = reader.end()
            if tail is not None:
                self._out.append(BodyData(tail))
            error = reader.error
        if ch.open and (chunk.last or error is not None):
            # The message ends here, taken or refused: the driver's answer is the reply.
            assert t is not None and reader is not None
            ch.open = False
            ch.ending = chunk.last
            self._ask(EndOfData(t.envelope, error, reader.size))
            return
        if error is None:
            self._reply(Reply(250, "2.0.0", f"Ok: {chunk.size} octets received"))
            return
        if not chunk.logged:
            self._refusable = None
        # Counted even when discarded after an earlier error: Postfix's skip_bdat fails the
        # command, so each refused BDAT is an error; else only 1.5 times the size limit
        # would bound a client sending chunks after a refused one.
        self._reply(error)
        if chunk.last:
            self._resetTransaction()
        elif ch.error is None:
            ch.error = error

    def _cmd_RSET(self, arg: str) -> None:
        if arg.strip():
            self._reply(Reply(501, "5.5.4", "Syntax: RSET"))
            return
        self._resetTransaction()
        self._reply(R.OK)

    def _cmd_NOOP(self, arg: str) -> None:
        self._reply(R.OK)

    def _cmd_QUIT(self, arg: str) -> None:
        self._close(R.BYE)

    def _cmd_VRFY(self, arg: str) -> None:
        if not arg.strip():
            self._reply(Reply(501, "5.5.4", "Syntax: VRFY address"))
            return
        self._reply(R.VRFY_CANNOT)

    def _cmd_HELP(self, arg: str) -> None:
        self._reply(R.HELP)

    # STARTTLS (RFC 3207) --------------------------------------------------------------------

    def _cmd_STARTTLS(self, arg: str) -> None:
        if self.client.tls:
            self._reply(Reply(503, "5.5.1", "Error: TLS already active"))
            return
        if not self.settings.starttls:
            self._reply(R.NOT_IMPLEMENTED)
            return
        if arg.strip():
            self._reply(Reply(501, "5.5.4", "Syntax: STARTTLS"))
            return
        if self.transaction is not None:
            self._reply(Reply(503, "5.5.1", "Error: MAIL transaction in progress"))
            return
        self._send(READY_FOR_TLS)
        # Whatever came after the STARTTLS line was sent in plaintext, before the handshake:
        # it must never be taken as a command of the TLS session.
        discarded = len(self._buf) - self._pos
        self._buf = b""
        self._pos = 0
        self.mode = _TLS
        self._out.append(StartTLS(discarded))

    # AUTH (RFC 4954) ------------------------------------------------------------------------

    @property
    def _authOffered(self) -> bool:
        """AUTH is offered (in EHLO) and accepted now: the listener has mechanisms, and TLS is
        active or not needed."""
        return bool(self.settings.authMechanisms) and (
            self.client.tls is not None or self.settings.authWithoutTLS
        )

    def _cmd_AUTH(self, arg: str) -> None:
        if not self.settings.authMechanisms:
            self._reply(R.NOT_IMPLEMENTED)
            return
        if self.client.helo is None or not self.client.esmtp:
            self._reply(Reply(503, "5.5.1", "Error: send EHLO first"))
            return
        if self.client.authUser is not None:
            self._reply(Reply(503, "5.5.1", "Error: already authenticated"))
            return
        if self.transaction is not None:
            self._reply(Reply(503, "5.5.1", "Error: MAIL transaction in progress"))
            return
        parts = arg.split(" ")
        if not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1]):
            self._reply(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
            return
        if not self._authOffered:
            self._reply(AUTH_NEED_TLS)
            return
        mechanism = parts[0].upper()
        if mechanism not in self.settings.authMechanisms:
            self._reply(AUTH_UNKNOWN_MECHANISM)
            return
        initial: bytes | None = None
        if len(parts) == 2:
            initial = self._decodeSasl(parts[1].encode("utf-8"), initial=True)
            if initial is None:
                return
        self._sasl = _Sasl(mechanism)
        if initial is not None:
            self._saslStep(initial)
        elif mechanism == "PLAIN":
            self.mode = _SASL
            self._send(_PLAIN_CHALLENGE)
        else:
            self.mode = _SASL
            self._send(_LOGIN_USERNAME)

    def _decodeSasl(self, data: bytes, initial: bool = False) -> bytes | None:
        """A base64 SASL response decoded, or C{None} after replying 501 (bad base64)."""
        if initial and data == b"=":
            return b""
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self._saslDone(AUTH_BAD_BASE64)
            return None

    def _saslDone(self, reply: Reply | None = None) -> None:
        """End the exchange (with C{reply}, unless a question will answer it)."""
        self._sasl = None
        if self.mode == _SASL:
            self.mode = _COMMAND
        if reply is not None:
            self._reply(reply)

    def _processSaslResponse(self) -> bool:
        raw = self._takeLine()
        if raw is None:
            return False
        if len(raw) > MAX_SASL_LINE:
            self._saslDone(AUTH_LINE_TOO_LONG)
            return True
        if raw == b"*":
            self._saslDone(AUTH_ABORTED)
            return True
        decoded = self._decodeSasl(raw)
        if decoded is not None:
            self._saslStep(decoded)
        return True

    def _saslStep(self, response: bytes) -> None:
        sasl = self._sasl
        assert sasl is not None
        if sasl.mechanism == "PLAIN":
            # RFC 4616: [authzid] NUL authcid NUL passwd
            parts = response.split(b"\0")
            if len(parts) != 3 or not parts[1]:
                self._saslDone(Reply(501, "5.5.2", "Error: malformed PLAIN response"))
                return
            authzid, username, password = parts
            self._authenticate(username, password, authzid)
        elif sasl.username is None:
            sasl.username = response
            self.mode = _SASL
            self._send(_LOGIN_PASSWORD)
        else:
            self._authenticate(sasl.username, response, b"")

    def _authenticate(self, username: bytes, password: bytes, authzid: bytes) -> None:
        mechanism = self._sasl.mechanism if self._sasl else ""
        self._saslDone()
        # A user name no checker can be asked about is still a failed attempt: the policy
        # logs it and counts it against the client (as a wrong password), never checking it.
        malformed = ""
        try:
            user = username.decode("utf-8")
            authz = authzid.decode("utf-8")
        except UnicodeDecodeError:
            malformed, authz = "not valid UTF-8", ""
        else:
            if not user:
                malformed = "empty"
            elif not user.isprintable():  # (NUL, controls, line separators, bidi overrides)
                malformed = "unprintable"
        if malformed:
            user, malformed = _shownName(username), f"user name {malformed}"
        elif not password:  # (RFC 4616: passwd = 1*SAFE; a checker may take it as anonymous)
            malformed = "password empty"
        self._ask(Authenticate(mechanism, user, password, authz, malformed))

    def _authAnswered(self, question: Authenticate, result: str | Reply) -> None:
        if isinstance(result, str):
            self.client.authUser = result
            self.client.relayAllowed = True
            self._reply(AUTH_OK)
        elif result.code == 421:
            self._close(result)
        else:
            self._reply(result)

    # DATA mode ------------------------------------------------------------------------------

    def _processData(self) -> bool:
        """Process buffered message data in bulk.  Returns C{True} if it made progress."""
        reader = self._data
        assert reader is not None
        step = reader.read(self._buf, self._pos)
        if step is None:
            return False
        self._pos, content, ended = step
        if content is not None:
            self._out.append(BodyData(content))
        if ended:
            self._data = None
            self.mode = _COMMAND
            t = self.transaction
            assert t is not None
            self._ask(EndOfData(t.envelope, reader.error, reader.size))
        return True

    def _dataEndAnswered(self, reply: Reply) -> None:
        ch = self._chunking
        self._resetTransaction()
        if ch is not None and not ch.ending:
            # A chunk before the last was refused: the others are discarded until BDAT LAST.
            ch.error = reply if not reply.isPositive else R.LOCAL_ERROR
            self._chunking = ch
        if reply.isPositive:
            self.messages += 1
            self.errors = 0
            self.junkCommands = 0
        if reply.code == 421:  # a message filter's disconnection
            self._close(reply)
            return
        self._reply(reply)


def _givenPath(arg: str, keyword: str) -> str | None:
    """The path a MAIL or RCPT argument gives, for the log: without its angle brackets,
    printable, at most 256 characters; C{None} without C{keyword}."""
    if arg[: len(keyword)].upper() != keyword:
        return None
    path = arg[len(keyword) :].strip().split(" ", 1)[0]
    if path.startswith("<") and path.endswith(">"):
        path = path[1:-1]
    path = path[:256]
    return path if path.isprintable() else "".join(c if c.isprintable() else "?" for c in path)


def _refusable(question: object) -> tuple[str, str | None, str | None] | None:
    """The command a question answers, as L{ServerSession._refusable} holds it."""
    if isinstance(question, CheckMail):
        return ("MAIL", question.envelope.sender, None)
    if isinstance(question, CheckRecipient):
        return ("RCPT", question.envelope.sender, question.recipient.original)
    if isinstance(question, StartData):
        return (question.command, question.envelope.sender, None)
    if isinstance(question, CheckHelo):
        return ("EHLO" if question.esmtp else "HELO", None, None)
    return None


class _ParamError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


#: Commands that never fail, counted against C{SessionSettings.junkCommandLimit} (Postfix's
#: SMTPD_CMD_FLAG_LIMIT commands, ETRN aside, which is not implemented here; and HELP).
_JUNK_COMMANDS = frozenset({"HELO", "EHLO", "RSET", "NOOP", "VRFY", "HELP"})
_UNIMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML"})
