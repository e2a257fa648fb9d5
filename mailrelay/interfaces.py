"""Every interface a mailrelay plugin can implement, the verdicts plugins return, the values
the stages exchange (replies, routes, results) and L{MailRelayPlugin}.

A site plugin is an object providing L{IMailRelayPlugin}, exposed from a module in any
C{twisted/plugins/} directory on C{sys.path}.  The configuration names it; mailrelay calls its
C{build} with the plugin's own configuration table and checks the result with
C{zope.interface.verify.verifyObject} against the interface the plugin says it provides.
See C{docs/plugins.md}.
"""

from __future__ import annotations

import enum
import importlib
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface, implementer

from mailrelay.envelope import BOUNCED as BOUNCED  # re-exported: DeliveryEvent.outcome
from mailrelay.envelope import DELIVERED as DELIVERED
from mailrelay.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from mailrelay.envelope import ClientInfo, Envelope, Recipient


# -- SMTP replies (smtp/ sends them; every stage may make one)


#: The longest reply line, without its CRLF (RFC 5321 4.5.3.1.5: 512 octets with it).
_MAX_REPLY_LINE = 510
#: What a reply's text may not hold, but for its line breaks (RFC 5321 4.2: HT, SP to "~").
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
#: An RFC 3463 enhanced status code (C{class "." subject "." detail}).
_ENHANCED_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply, possibly multi-line.

    @ivar code: the three-digit basic code.
    @ivar enhanced: the RFC 3463 enhanced status code (C{"2.0.0"}) or C{""} when the reply
        must not carry one (greeting, EHLO/HELO, 354).
    @ivar text: the text; several lines are separated by C{"\\n"}.
    """

    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"bad SMTP reply code {self.code}")
        if "\r" in self.text:
            raise ValueError("reply text must not contain CR")
        if self.enhanced and not _ENHANCED_STATUS.fullmatch(self.enhanced):
            # (A CR LF in it would put a reply of its own on the wire.)
            raise ValueError(f"bad enhanced status code {self.enhanced!r} (RFC 3463: "
                             "class.subject.detail, as 5.7.1)")

    @property
    def isPositive(self) -> bool:
        return self.code < 400

    @property
    def isTransient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def isPermanent(self) -> bool:
        return self.code >= 500

    def toBytes(self) -> bytes:
        """The reply on the wire: printable ASCII and tabs (any other character is C{?}:
        text from a plugin or a DNS list may hold some, a client without SMTPUTF8 takes no
        8-bit text and RFC 5321 4.2's textstring no control character), each line cut to
        512 octets with its CRLF (RFC 5321 4.5.3.1.5)."""
        text = self.text
        if not text.isprintable():  # (a line break, a tab, 8-bit or a control character)
            text = _CONTROL_CHARACTERS.sub("?", text)
        lines = text.split("\n") or [""]
        out = []
        prefix = f"{self.enhanced} " if self.enhanced else ""
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}"[:_MAX_REPLY_LINE] + "\r\n")
        return "".join(out).encode("ascii", "replace")

    def __str__(self) -> str:
        return self.toBytes().decode("utf-8").rstrip("\r\n").replace("\r\n", " / ")


# -- verdicts and recipient policy (policy/)


class VerdictKind(enum.Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    DEFER = "defer"
    DISCONNECT = "disconnect"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a policy plugin decided.

    - C{CONTINUE}: no opinion, ask the next plugin in the chain (the end of the chain accepts).
    - C{ACCEPT}: accept now; later plugins are not asked.
    - C{REJECT}: refuse with a 5xx C{reply}.
    - C{DEFER}: refuse for now with a 4xx C{reply}; the client should retry later.
    - C{DISCONNECT}: send C{reply} (421 by default) and close the connection.
    """

    kind: VerdictKind
    reply: Reply | None = None

    @classmethod
    def accept(cls) -> Verdict:
        return ACCEPT

    @classmethod
    def continue_(cls) -> Verdict:
        return CONTINUE

    @classmethod
    def reject(
        cls, text: str = "Error: rejected", code: int = 550, enhanced: str = "5.7.1"
    ) -> Verdict:
        if not 500 <= code <= 599 or not enhanced.startswith("5."):
            raise ValueError(f"a reject needs a 5xx code and 5.x.x status, not {code} {enhanced}")
        return cls(VerdictKind.REJECT, Reply(code, enhanced, text))

    @classmethod
    def defer(
        cls, text: str = "Error: try again later", code: int = 451, enhanced: str = "4.3.0"
    ) -> Verdict:
        if not 400 <= code <= 499 or not enhanced.startswith("4."):
            raise ValueError(f"a defer needs a 4xx code and 4.x.x status, not {code} {enhanced}")
        return cls(VerdictKind.DEFER, Reply(code, enhanced, text))

    @classmethod
    def disconnect(
        cls, text: str = "Error: closing connection", enhanced: str = "4.7.0"
    ) -> Verdict:
        return cls(VerdictKind.DISCONNECT, Reply(421, enhanced, text))


CONTINUE = Verdict(VerdictKind.CONTINUE)
ACCEPT = Verdict(VerdictKind.ACCEPT)


#: The verdict kinds that end a chain refusing, and the reply codes each allows.
_REFUSING_CODES = {
    VerdictKind.REJECT: range(500, 600),
    VerdictKind.DEFER: range(400, 500),
    VerdictKind.DISCONNECT: range(421, 422),
}


@dataclass(frozen=True)
class ConfiguredPlugin:
    """One plugin serving one hook, as configured: what the chains
    (L{mailrelay.policy.runner.PolicyChain}) and the observers run.

    @ivar name: the plugin's name, for the log (a built-in check's own name).
    @ivar plugin: the object serving the hook (it provides the hook's interface).
    @ivar timeout: seconds one answer may take; C{None}: no bound of the chain's (a built-in
        check bounded by its own).
    @ivar builtin: one of the relay's own checks, which touch no notes.
    """

    name: str
    plugin: Any
    timeout: float | None = 30.0
    builtin: bool = False


class BadAnswer(Exception):
    """A plugin answered something its hook does not take; the message says what."""


def checkVerdict(answer: Any) -> Verdict:
    """C{answer}, which must be a well-formed L{Verdict}: a reject with a 5xx reply, a
    deferral with a 4xx one, a disconnection with a 421 (or none: the default).

    @raise BadAnswer: it is not.
    """
    if not isinstance(answer, Verdict):
        raise BadAnswer(f"answered {answer!r}, not a Verdict")
    codes = _REFUSING_CODES.get(answer.kind)
    if codes is not None:
        reply = answer.reply
        if reply is None and answer.kind is not VerdictKind.DISCONNECT:
            raise BadAnswer(f"answered {answer.kind.value} without a reply")
        if reply is not None and reply.code not in codes:
            raise BadAnswer(f"answered {answer.kind.value} with the reply {reply}")
    return answer


class IRecipientValidator(Interface):
    """Decides whether one recipient (one RCPT command) is accepted.

    Validators run in the order the configuration lists them, after relay control has allowed
    the recipient (relay control cannot be configured away).  The first verdict other than
    C{CONTINUE} decides; when every validator continues, the recipient is accepted.
    A validator that raises, fails its Deferred, or does not answer within its timeout makes
    the recipient deferred (451 4.3.0): a failing plugin never accepts.

    The rules every verdict hook follows (connect, HELO, MAIL, RCPT, DATA; the message
    filters at the end of data likewise): the plugins serving a hook run in the order of the
    configuration, one at a time, each asked only when those before it answered
    C{CONTINUE}.  The first other verdict decides: C{ACCEPT} passes the stage at once (later
    plugins of that hook are not asked; the other hooks still are), C{REJECT} and C{DEFER}
    refuse with their reply, C{DISCONNECT} answers 421 and closes the connection.  When every
    plugin continues, the stage passes.  A plugin that raises, whose Deferred fails, that
    answers anything but a well-formed L{Verdict} (a reject with a 5xx reply, a defer with a
    4xx one), or that does not answer within its C{timeout} (default 30 seconds; its Deferred
    is then cancelled) makes the stage deferred with C{451 4.3.0} (C{421} at connect), logged
    once with the plugin's name.  A plugin that prefers to fail open (a DNS list that does not
    answer) answers C{CONTINUE} itself, before its timeout.  Plugins run on the reactor
    thread: one that needs I/O returns a Deferred (see L{PluginContext.deferToThread}).
    """

    def validateRecipient(client: ClientInfo, envelope: Envelope, recipient: Recipient) -> Any:
        """Judge C{recipient}.

        @param client: the session's client (address, HELO, TLS, user, relay permission).
        @param envelope: the transaction so far (sender, recipients already accepted).
        @param recipient: the recipient being judged; C{recipient.address} is canonical
            (domain lower-cased, without trailing dot, IDNA A-labels).
        @return: a L{Verdict} or a C{Deferred} firing with one.
        """



class IConnectionPolicy(Interface):
    """Judges a client when it connects, and the name it greets with (HELO/EHLO).

    C{checkConnect} runs once per connection, after the PROXY header (the client is the real
    one) and the reverse lookup (C{client.rdns} is set, or C{None} when the client has no
    forward-confirmed name), before the greeting; the greeting waits for it.  Its verdict:
    C{REJECT} sends the reject's reply instead of the greeting, as C{554} (or C{521}, RFC
    7504), and then answers every command but QUIT with C{503 5.5.1} (RFC 5321 3.1);
    C{DEFER} and C{DISCONNECT} send C{421} instead of the greeting and close.

    C{checkHelo} runs for each HELO or EHLO command: C{REJECT} or C{DEFER} refuses the
    command with its reply (the client is not greeted: MAIL needs another HELO), C{DISCONNECT}
    closes.  C{client.helo} is still the previous name (or C{None}) while it runs.

    Both are verdict hooks: see L{IRecipientValidator} for the rules every verdict hook
    follows (order, timeouts, failures).  A plugin serving only one of them answers
    C{CONTINUE} from the other, or is configured with C{hooks = ["connect"]}.
    """

    def checkConnect(client: ClientInfo) -> Any:
        """Judge the client that just connected.

        @param client: address, port, C{rdns}, C{listener}, C{relayAllowed} (in a relay
            network); C{client.notes} is empty and the plugin's to fill.
        @return: a L{Verdict} or a Deferred firing with one.
        """

    def checkHelo(client: ClientInfo, name: str) -> Any:
        """Judge the name the client gives in HELO or EHLO.

        @param name: the argument as sent (one word, printable; not checked further).
        @return: a L{Verdict} or a Deferred firing with one.
        """


class ISenderValidator(Interface):
    """Judges the sender of a transaction (one MAIL command).

    Run after the relay's own MAIL checks, which are sender validators too (built in, and
    always first): the sender binding of C{[auth.senders]} (553 5.7.1), the listener's
    message rates (450 4.7.1) and the spool's free space for the SIZE announced (452 4.3.1).
    A verdict hook (see L{IRecipientValidator}); the transaction starts when it passes.
    """

    def validateSender(client: ClientInfo, envelope: Envelope) -> Any:
        """Judge C{envelope.sender} (C{""}: the null sender, for bounces).

        @param envelope: the transaction being started: C{sender} (canonical), the MAIL
            parameters (C{size}, C{body}, C{smtputf8}, C{ret}, C{envid}, and the ESMTP
            extensions' in C{parameters}); C{envelope.notes} is empty and the plugin's to
            fill, C{envelope.client} is C{client}.
        @return: a L{Verdict} or a Deferred firing with one.
        """


class IDataPolicy(Interface):
    """Judges a transaction at its DATA command (or its first BDAT chunk), when every
    recipient is known (the place for greylisting: the sender, the recipients and the client
    are all there).

    A verdict hook (see L{IRecipientValidator}); C{REJECT} and C{DEFER} answer the DATA
    command (the transaction ends, as after RSET), C{DISCONNECT} closes.  It runs before the
    message gets its queue id.
    """

    def checkData(client: ClientInfo, envelope: Envelope) -> Any:
        """Judge the transaction C{envelope} (sender and the recipients accepted).

        @return: a L{Verdict} or a Deferred firing with one.
        """


class IESMTPExtension(Interface):
    """An SMTP service extension (RFC 5321 2.2): an EHLO keyword, the MAIL and RCPT
    parameters it owns and, optionally, commands of its own.

    The relay asks C{ehloLine} at each EHLO; an extension that gives a line for the client is
    offered to it, and only then are its parameters and commands accepted from that client
    (else C{555 5.5.4} for a parameter, C{500 5.5.2} for a command, as for any unknown one).
    A parameter's value is parsed by the extension; what it answers is kept in
    C{envelope.parameters} (MAIL) or C{recipient.parameters} (RCPT) under the parameter's
    name, stored with the message (the delivery side and the queue see it) and given to the
    sender and recipient validators.  Its keyword, parameters and commands must not be the
    relay's own (SIZE, BODY, AUTH, DSN's RET/ENVID/NOTIFY/ORCPT, SMTPUTF8; EHLO, MAIL, ...)
    nor another extension's: the relay refuses such a configuration at start-up.

    C{ehloLine}, C{mailParameter} and C{rcptParameter} answer at once, on the reactor thread
    (no Deferreds: they are part of parsing a command); C{command} may answer later.  An
    exception from C{ehloLine} leaves the extension out of that EHLO reply; from a parameter
    parser it refuses the command with C{501 5.5.4}; from C{command}, C{451 4.3.0}.  Each is
    logged with the plugin's name.
    """

    keyword = Attribute("The EHLO keyword, upper case (C{'MT-PRIORITY'}, C{'XACME'}).")
    mailParameters = Attribute(
        "The MAIL parameters it owns, upper case (a tuple, possibly empty): C{('MT-PRIORITY',)}."
    )
    rcptParameters = Attribute("The RCPT parameters it owns, upper case (a tuple).")
    verbs = Attribute(
        "The commands it implements, upper case (a tuple, usually empty): C{('XACME',)}."
    )

    def ehloLine(client: ClientInfo) -> Any:
        """The EHLO line offering the extension to C{client} (its keyword, then any
        parameters: C{"MT-PRIORITY MIXER"}), or C{None} not to offer it to this client."""

    def mailParameter(client: ClientInfo, envelope: Envelope, name: str, value: str | None) -> Any:
        """Parse the MAIL parameter C{name} (one of C{mailParameters}).

        @param value: its value as sent (xtext not decoded), or C{None} for C{NAME} alone.
        @return: what to keep in C{envelope.parameters[name]}: any JSON value (C{None} is kept
            too), or a L{Reply} (4xx or 5xx) refusing the MAIL command.
        @raise ValueError: the value is bad: C{501 5.5.4 Error: bad NAME parameter:} and
            the exception's message.
        """

    def rcptParameter(
        client: ClientInfo, envelope: Envelope, recipient: Recipient, name: str, value: str | None
    ) -> Any:
        """Parse the RCPT parameter C{name} (one of C{rcptParameters}) of C{recipient} (whose
        address is set); as L{mailParameter}, kept in C{recipient.parameters[name]}."""

    def command(client: ClientInfo, envelope: Envelope | None, verb: str, argument: str) -> Any:
        """Carry out the command C{verb} (one of C{verbs}) with C{argument} (the rest of the
        line, C{""} when none).

        @param envelope: the transaction in progress, or C{None}.
        @return: the L{Reply} to send, or a Deferred firing with one: a final reply, 2xx
            (but 221), 4xx or 5xx; any other is a failure (C{451 4.3.0}).  A C{421} reply
            closes the connection after it is sent.
        """


# -- intake (cleanup/)


@dataclass
class StampContext:
    """What a header stamper is told when the header section of a message is complete.

    @ivar hostname: this relay's host name.
    @ivar client: the client the message came from, or C{None} for a message the relay made
        itself (a delivery status notification; see L{IIntake.submit}).
    @ivar envelope: the envelope; C{envelope.queueID} is set.
    @ivar headers: the message's header section as received, one C{(name, raw_field)} pair
        per field; C{name} is as written, C{raw_field} is the whole field including its name,
        continuation lines and the final CRLF.
    @ivar listenerOptions: the options of the listener the message came in on
        (C{add_message_id}, C{add_date}, ...).
    @ivar now: the time stamp to use, seconds since the epoch.
    @ivar complete: whether C{headers} is the whole header section.  The relay's intake
        always says C{True}: a section longer than C{[limits] header_size} (at most what
        it holds before it stamps, 100 KiB) is refused without calling the stampers.  A
        stamper given C{False} (another caller) must take a field's absence as saying
        nothing.
    """

    hostname: str
    client: ClientInfo | None
    envelope: Envelope
    headers: list[tuple[str, bytes]]
    listenerOptions: dict[str, Any] = field(default_factory=dict)
    now: float = 0.0
    complete: bool = True

    def hasHeader(self, name: str) -> bool:
        lname = name.lower()
        return any(n.lower() == lname for n, _ in self.headers)

    def count(self, name: str) -> int:
        lname = name.lower()
        return sum(1 for n, _ in self.headers if n.lower() == lname)


@dataclass
class StampResult:
    """Header fields a stamper adds: whole fields, each ending in CRLF, with no bare CR or LF.

    @ivar prepend: fields put above the message's first header (trace fields: C{Received:}).
    @ivar append: fields put after the message's last header (C{Message-Id:}, C{Date:}).
    """

    prepend: list[bytes] = field(default_factory=list)
    append: list[bytes] = field(default_factory=list)


class IHeaderStamper(Interface):
    """Adds header fields to each message accepted.

    Stampers run in configuration order once the header section of a message has arrived,
    before its body is stored.  They run on the reactor thread and must not block: one that
    needs I/O returns a Deferred (the client's further data is held, and reading paused,
    until it fires).  The message itself is never changed otherwise.  Prepended fields of a
    later stamper go above those of an earlier one, as trace fields do hop after hop.

    A stamper that raises, whose Deferred fails, that does not answer within its configured
    C{timeout} (the Deferred is then cancelled), or that returns anything but a
    L{StampResult} of well-formed fields makes the message refused at its end of data with
    C{451 4.3.0} (the client retries later); the failure is logged once, naming the plugin.
    A failing stamper never lets a message through unstamped.
    """

    def stamp(context: StampContext) -> Any:
        """Return the fields to add to the message described by C{context}: a
        L{StampResult}, or a Deferred firing with one."""


@dataclass(frozen=True)
class FilterResult:
    """What a message filter answers: a verdict, and header fields to add.

    @ivar verdict: C{CONTINUE} (the next filter is asked), C{ACCEPT} (later filters are not
        asked), C{REJECT} or C{DEFER} (the message is refused with its reply: nothing is
        spooled), C{DISCONNECT} (refused with 421, and the connection closed).
    @ivar prepend: whole header fields (each ending in CRLF, no bare CR or LF) put above the
        message's first field (C{DKIM-Signature:}, C{Authentication-Results:}); those of a
        later filter go above an earlier one's, as trace fields do.
    @ivar append: whole header fields put after the message's last header field.
    @ivar remove: header fields of the message to delete, each byte for byte as
        L{IFilterContext.read} gave it (name, continuation lines and CRLF): an
        C{Authentication-Results:} forged with this relay's authserv-id (RFC 8601 section 5).
        Every field of the header section equal to one is deleted; a filter must have read
        the message, and may only remove fields that are there (not the fields filters add).
    @ivar replace: C{(field, replacement)} pairs: each field of the header section equal to
        C{field} (byte for byte, as for C{remove}; one an earlier filter added too, as the
        message read shows it) becomes C{replacement} where it stands, a
        whole well-formed field of the same name (an address rewritten in C{From:}, as
        Postfix's cleanup rewrites with C{canonical_maps}).  The message must have been read.
    @ivar sender: the new envelope sender, or C{None} (unchanged): an address (C{user@domain},
        ASCII unless the message is SMTPUTF8); the null sender is never rewritten, nor does a
        sender become null.  Later filters, the queue and the notifications (DSNs go to it)
        see the new sender; the log says the rewrite.
    """

    verdict: Verdict = CONTINUE
    prepend: tuple[bytes, ...] = ()
    append: tuple[bytes, ...] = ()
    remove: tuple[bytes, ...] = ()
    replace: tuple[tuple[bytes, bytes], ...] = ()
    sender: str | None = None


class IFilterContext(Interface):
    """What a message filter is given: the message, complete and stamped but not yet spooled,
    and where it comes from.  Made by the intake (L{mailrelay.cleanup.filters.FilterContext});
    L{mailrelay.testing.makeFilterContext} makes one for tests."""

    hostname = Attribute("This relay's host name.")
    client = Attribute(
        "The L{ClientInfo} the message came from (its C{notes} included), or C{None} for a "
        "message the relay made itself (a delivery status notification)."
    )
    envelope = Attribute(
        "The L{Envelope}: C{queueID} is set, the recipients are known; C{envelope.notes} are "
        "stored with the message."
    )
    listenerOptions = Attribute("The options of the listener it came in on (as stampers see).")
    size = Attribute("Octets of the message as it stands (earlier filters' fields included).")
    deferToThread = Attribute(
        "C{deferToThread(f, *args, **kwargs)}: C{f} run in the relay's thread pool, as a "
        "Deferred (see L{PluginContext.deferToThread})."
    )

    def read() -> Any:
        """The whole message as it will be spooled: CRLF lines, not dot-stuffed, the header
        stampers' fields and the fields of the filters before this one included.

        Read off the reactor thread (from the spool's temporary file, or its memory for a
        small message) the first time a filter asks, and then kept for the message's other
        filters: a Deferred firing with C{bytes}.
        """


class IMessageFilter(Interface):
    """Sees each message whole at its end of data, before it is committed to the spool: it
    may add header fields (a DKIM signature, C{Authentication-Results:}) or refuse the message
    (a virus, a failed DMARC policy).

    Filters run in the order of the configuration once the header stampers have added their
    fields and the hop count is checked; the message is spooled (and the client gets its
    C{250}) only when every filter has answered, so a C{250} means filtered and durable.  A
    verdict hook (see L{IRecipientValidator}): the first verdict other than C{CONTINUE}
    decides for the verdict, while the fields of every filter that answered C{CONTINUE} or
    C{ACCEPT} are added.  A filter that fails, is too slow or adds a malformed field makes the
    message refused with C{451 4.3.0}, logged with its name.  Filters also see the messages
    the relay makes (delivery status notifications, C{client} C{None}); refusing one makes it
    owed again at the next delivery attempt.

    A filter never blocks the reactor: L{IFilterContext.read} reads off it, and CPU-heavy or
    blocking work goes to L{IFilterContext.deferToThread}.  Its C{timeout} bounds all of it.
    """

    def filterMessage(context: IFilterContext) -> Any:
        """Judge the message C{context} describes.

        @return: a L{FilterResult}, a L{Verdict} (no fields), C{None} (as C{CONTINUE}), or a
            Deferred firing with one of them.
        """


class IRewritingFilter(Interface):
    """A marker a message filter (L{IMessageFilter}) declares when it rewrites addresses or
    header fields: the envelope sender (L{FilterResult.sender}), fields replaced or removed
    (C{replace}, C{remove}), as the built-in C{sender-canonical} does.

    What a signature covers must not change after it is made (RFC 6376 5.4: a DKIM
    signature covers C{From:} and the fields of its C{h=}): the relay refuses, at start,
    reload and C{mailrelay check}, a configuration that puts such a filter after an
    L{ISigningFilter}, naming both entries.  Declared with the filter's class::

        @implementer(IMessageFilter, IRewritingFilter)
        class ViaRewriter: ...

    (A filter that only adds fields, C{FilterResult.prepend} and C{append}, declares
    nothing.)
    """


class ISigningFilter(Interface):
    """A marker a message filter (L{IMessageFilter}) declares when it signs the message as
    it stands (a DKIM signature, as the built-in C{dkim-sign} makes; an ARC seal): every
    L{IRewritingFilter} must come before it in the configuration.  A filter that rewrites
    and then signs what it rewrote declares both: it must come after every other signing
    filter, and before every other rewriting one.
    """


class MessageRefused(Exception):
    """The intake refused a message given to it whole (L{IIntake.submit}).

    @ivar reply: why, as the reply an SMTP client would have had (C{str()} shows it).
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class IIncomingMessage(Interface):
    """One message on its way into the spool (from L{IIntake.open}): written as it arrives,
    then finished or abandoned."""

    queueID = Attribute("The queue id the message is spooled under.")
    envelope = Attribute("The L{Envelope}; its C{queueID} is set.")

    def write(data: bytes) -> Any:
        """Add C{data} (CRLF lines, as received, without SMTP dot-stuffing).

        @return: C{None}, or a Deferred when the header stampers were called by this write and
            have not answered yet: the data given meanwhile is held, so a caller reading from
            a client should read no more until it fires (it never fails).
        """

    def finish(error: Reply | None = None, size: int | None = None) -> Any:
        """The message ended: stamp, check, commit and notify, or drop it when C{error}.

        @param error: the reply refusing the message (too big, a bad line), or C{None}.
        @param size: the octets received, for the log line of a refused message (default:
            those written).
        @return: a Deferred firing with the reply to the end of the message: C{250} once the
            message is durable and the queue told of it, else a 4xx or 5xx (never fails).
        """

    def abort() -> None:
        """The message is abandoned (the client went away): drop what was written."""


class IIntake(Interface):
    """The one way into the spool: a message received by SMTP and one the relay makes itself
    (a delivery status notification) go the same way: a queue id, header processing and
    the header stampers, the hop check, the filters, the commit, and the queue told.

    Every message gets one log line, as Postfix's cleanup and qmgr lines in one, written by
    the intake once the message is spooled or refused (C{client=} and C{sasl_username=}
    only for a message received from a client)::

        QID: from=<a@example.com> nrcpt=2 size=1234 client=192.0.2.7 result=250 2.0.0 Ok: ...
        QID: from=<> nrcpt=1 size=3456 result=250 2.0.0 Ok: queued as QID
    """

    def hasFreeSpace(needed: int) -> bool:
        """Whether the spool can take a message of C{needed} octets now."""

    def open(envelope: Envelope, client: ClientInfo | None, listenerOptions: Any) -> Any:
        """Start a message from C{client} (C{None}: made here): an L{IIncomingMessage}, or
        the L{Reply} refusing it (the spool cannot take it now)."""

    def submit(
        envelope: Envelope, message: bytes, *, notify: bool = True, queueID: str | None = None
    ) -> Any:
        """Spool a message the relay made itself (a delivery status notification), given
        whole: CRLF lines, the header section first, not dot-stuffed.

        It is stamped as mail with no client (L{StampContext.client} is C{None}, the
        listener options empty: the built-in stamper adds C{Received:}, and C{Message-Id:}
        and C{Date:} when the message has none, so its maker need not write them), then
        checked for hops and filtered like any other message.

        The envelope is the maker's, but for three fields the intake sets, as for every
        message: C{queueID}, allocated by the spool (L{ISpool.openMessage}), set as soon as
        the message is opened; C{arrival}, the time of the commit on the intake's clock;
        C{messageSize}, the octets stored (stamped fields included).  And
        C{tlsRequiredNo} is set when the message has a C{TLS-Required: No} field and the
        envelope no C{requireTLS} (RFC 8689 4.1).  The rest (sender, recipients,
        C{isBounce}, C{client}, C{body}, C{smtputf8}, ...) is stored as given.

        The intake logs the message's one line (see L{IIntake}); its maker logs no other
        C{from=} line for it, only its own event under its own id (the queue:
        C{ORIGINAL: sender non-delivery notification: QID}, as Postfix's bounce daemon).

        @param notify: tell the queue of the message once it is durable, as for a message
            received (the intake's C{notify}); C{False} when the caller schedules it
            itself (the queue manager, committing the notifications of an attempt before
            recording the attempt, enqueues their ids once all are committed).
        @param queueID: the queue id the message is to have (the queue manager's success
            notices have the id their marks name, so that one already queued is not queued
            twice: the spool refuses an id taken); C{None}: a new one.
        @return: a Deferred firing with its queue id once it is durable (and, with
            C{notify}, the queue told), or failing with L{MessageRefused} carrying the
            reply an SMTP client would have had: 451 4.3.0 when the spool cannot take it
            or a stamper or filter fails, 554 5.4.6 for too many hops, a filter's refusal.
            Nothing is left in the spool then.
        """


# -- spool (spool/)


class IMessageWriter(Interface):
    """Writes one message into a spool; made by L{ISpool.openMessage}.

    Nothing written is visible to anyone before L{commit} has succeeded; L{abort} (or a failed
    commit) leaves no trace.
    """

    queueID = Attribute("The message's queue id (a string safe as a file name).")
    size = Attribute("Octets written so far.")

    def write(data: bytes) -> None:
        """Append C{data}.  Never raises: a failure to store it (disk full) is remembered and
        makes L{commit} fail; writes after L{commit} or L{abort} are ignored."""

    def commit(envelope: Envelope) -> Any:
        """Make the message and C{envelope} a durable entry of the spool.

        C{envelope.queueID} must be this writer's L{queueID}; C{envelope.messageSize} is set to
        the octets written.  The envelope is copied now: later changes to it are not stored.

        @return: a C{Deferred} firing with C{None} once the entry is durable (only then may
            anyone be told it is queued), or failing with L{mailrelay.errors.SpoolError}; the
            message is then gone.
        """

    def abort() -> None:
        """Drop the message.  Idempotent; does nothing once L{commit} has been called and has
        not failed."""

    def read() -> bytes:
        """Everything written so far, from the start (for the message filters, once every
        write is done and before the commit).  May block (a message big enough to be in a
        file is read from it): call it off the reactor thread.

        @raise OSError: the temporary file cannot be read.
        """


class ISpool(Interface):
    """The durable store of queued messages: one entry per message, an envelope beside it.

    L{mailrelay.spool.Spool} keeps it in a directory; L{mailrelay.spool.memory.MemorySpool} in
    memory, for tests.  Failures are L{mailrelay.errors.SpoolError}s (raised, or through Deferreds).
    """

    def openMessage(queueID: str | None = None) -> IMessageWriter:
        """A writer for a new message.

        @param queueID: the id to store it under; C{None} (the usual case): the spool allocates
            a new one (L{IMessageWriter.queueID}).
        @raise mailrelay.errors.SpoolError: the message cannot be created.
        """

    def newQueueID() -> str:
        """A new queue id, for an entry to be opened later under it (L{openMessage}): the
        queue manager's success notices, whose id is recorded before they are made."""

    def hasFreeSpace(needed: int = 0) -> bool:
        """Whether C{needed} more octets still leave the spool's reserve free."""

    def queueIDs() -> list[str]:
        """The ids of the committed entries, sorted (by arrival)."""

    def messagePath(queueID: str) -> Path:
        """The path of the committed message C{queueID} (CRLF lines), for a backend to read."""

    def loadEnvelope(queueID: str) -> Envelope:
        """A fresh copy of the committed envelope of C{queueID}.

        @raise mailrelay.errors.EntryGone: there is no such entry (any more).
        @raise mailrelay.errors.CorruptEntry: the entry is damaged (see L{quarantine}).
        @raise mailrelay.errors.SpoolError: it cannot be read now.
        @raise ValueError: C{queueID} is not a queue id.
        """

    def updateEnvelope(envelope: Envelope) -> Any:
        """Durably replace the envelope of the entry C{envelope.queueID}: a Deferred firing
        with C{None}, or failing with L{mailrelay.errors.SpoolError}."""

    def remove(queueID: str) -> Any:
        """Remove the entry C{queueID} (an entry already gone is fine): a Deferred firing with
        C{None}, or failing with L{mailrelay.errors.SpoolError}."""

    def quarantine(queueID: str, problem: str) -> Any:
        """Move the damaged entry C{queueID} aside for the operator, logging C{problem}: a
        Deferred firing with where its files went (a list of paths, possibly empty), or
        failing with L{mailrelay.errors.SpoolError} (the entry stays)."""


# -- routing (route/)


#: The TLS policies of a client connection (see L{RouteOptions.tls}).
TLS_POLICIES = ("none", "may", "required", "implicit")

#: L{RouteOptions.caFile} meaning the platform's trust store, whatever the backend's default
#: (as C{ca_file = ""} in the configuration).
PLATFORM_TRUST_STORE = ""


def checkSourceAddresses(settings: Any) -> None:
    """Check the C{sourceAddress} (IPv4) and C{sourceAddress6} (IPv6) of L{RouteOptions} or
    of L{mailrelay.smtp.clientsettings.ClientSettings}: each C{None} or an address of its
    version in canonical form (not an IPv4-mapped one: a socket bound to it reaches no IPv6
    address).

    @raise ValueError: the message names the field and the value.
    """
    for name, version in (("sourceAddress", 4), ("sourceAddress6", 6)):
        value = getattr(settings, name)
        if value is None:
            continue
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            address = None
        if (address is None or address.version != version or str(address) != value
                or getattr(address, "ipv4_mapped", None) is not None):
            raise ValueError(f"{name} must be an IPv{version} address, not {value!r}")


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """The client settings a route sets for its next hop, over the backend's defaults.

    C{None} leaves a setting to the backend (for the built-in C{smtp} backend: C{[delivery]};
    for C{lmtp}: no TLS, no AUTH).  A value is hashable and compares equal only when every
    setting is the same, the password included (which C{repr} never shows): deliveries share
    a connection only when their options are equal.

    @ivar tls: C{"none"} (never STARTTLS), C{"may"} (STARTTLS when offered, unverified),
        C{"required"} (STARTTLS with a verified certificate, or no delivery) or
        C{"implicit"} (TLS from the first byte, verified).
    @ivar caFile: the path of a PEM bundle of trusted CA certificates, or
        L{PLATFORM_TRUST_STORE} (C{""}) for the platform's trust store.
    @ivar username: log in (AUTH) as this user; needs C{password}.
    @ivar password: the AUTH password; needs C{username}.
    @ivar authWithoutTLS: whether AUTH may be sent on a connection without TLS.
    @ivar sourceAddress: the local IPv4 address to connect from (SMTP only: an C{lmtp}
        route that sets it is deferred with 4.3.5).
    @ivar sourceAddress6: the local IPv6 address to connect from (SMTP only, as
        C{sourceAddress}).
    @ivar fallbackRelay: the SMTP next hops (C{"[relay.example]:587"}, C{"example.net"}) the
        recipients are tried at, in order, when every host of the route's next hop failed
        with a temporary error (Postfix's C{smtp_fallback_relay}; SMTP only); C{None}: the
        backend's (which it uses for mail to the recipients' own domain's MX hosts only).
        Not a client setting (L{changes} leaves it out): the backend reads it itself.
    @raise ValueError: a bad setting (the message names it).
    """

    tls: str | None = None
    caFile: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    authWithoutTLS: bool | None = None
    sourceAddress: str | None = None
    sourceAddress6: str | None = None
    fallbackRelay: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.tls is not None and self.tls not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {', '.join(TLS_POLICIES)}, not {self.tls!r}")
        for name in ("caFile", "username", "password"):
            value = getattr(self, name)
            if name == "caFile" and value == PLATFORM_TRUST_STORE:
                continue
            if value is not None and (not isinstance(value, str) or not value or "\0" in value):
                shown = "(the value is not shown here)" if name == "password" else repr(value)
                raise ValueError(f"{name} must be a non-empty string without NUL, not {shown}")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.authWithoutTLS is not None and not isinstance(self.authWithoutTLS, bool):
            raise ValueError(f"authWithoutTLS must be a bool, not {self.authWithoutTLS!r}")
        checkSourceAddresses(self)
        relays = self.fallbackRelay
        if relays is not None:
            if not isinstance(relays, tuple) or not all(
                isinstance(r, str) and r and "\0" not in r for r in relays
            ):
                raise ValueError(
                    f"fallbackRelay must be a tuple of SMTP next hops, not {relays!r}")
            if not relays:
                raise ValueError("fallbackRelay must list at least one SMTP next hop, not ()")

    def changes(self) -> dict[str, Any]:
        """The settings this route sets (those not C{None}), by name."""
        return {
            name: getattr(self, name)
            for name in (
                "tls",
                "caFile",
                "username",
                "password",
                "authWithoutTLS",
                "sourceAddress",
                "sourceAddress6",
            )
            if getattr(self, name) is not None
        }

    def refusedBy(self, backend: str) -> str | None:
        """Why a route to C{backend} cannot carry these options (C{None}: it can).

        They are the settings of a client connection: an C{smtp} route takes them all, an
        C{lmtp} one all but a source address and a fallback relay, any other backend
        (C{maildir}, C{discard}, a site backend) none, as Postfix's transport(5) gives
        per-transport options only to the transports that take them.  C{[[routes]]}
        refuses such a table and the routing table such a rule; a router's route carrying
        them is deferred (4.3.5), never delivered without them.
        """
        if backend == "smtp":
            return None
        client = backend == "lmtp"
        given = [*self.changes(), *(["fallbackRelay"] if self.fallbackRelay else [])]
        lmtpRefuses = ("sourceAddress", "sourceAddress6", "fallbackRelay")
        names = [name for name in given if not client or name in lmtpRefuses]
        if not names:
            return None
        if client:
            why = [w for w, given in (
                ("LMTP connections are not bound to a source address",
                 names != ["fallbackRelay"]),
                ("LMTP deliveries go to no fallback relay", "fallbackRelay" in names),
            ) if given]
            return f"an lmtp route takes no {', '.join(names)} ({'; '.join(why)})"
        return f'only smtp and lmtp routes take {", ".join(names)}, not a "{backend}" route'


@dataclass(frozen=True, slots=True)
class Route:
    """Where one recipient goes next: what the router chose, handed to the backend as is.

    Recipients of one message with the same route (all three fields equal) share one
    delivery.

    @ivar backend: the name of a configured delivery backend (C{"smtp"}, C{"lmtp"},
        C{"maildir"}, C{"discard"}, or a site backend's name).
    @ivar nexthop: the backend-specific destination: for C{smtp} a domain to look up by MX
        (C{"example.org"}) or a host without MX lookup (C{"[smtp.example.net]:587"}); for
        C{lmtp} C{"host:port"} or C{"unix:/path"}; for C{maildir} a directory template; for
        C{discard} and site backends the backend's name, unless the router says otherwise.
    @ivar options: the L{RouteOptions} of this route (TLS policy, CA file, credentials): the
        backend applies them over its defaults for this delivery only.  Two routes to the
        same next hop may carry different options.
    @raise TypeError: a field of the wrong type.
    """

    backend: str
    nexthop: str
    options: RouteOptions = RouteOptions()

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not isinstance(self.nexthop, str):
            raise TypeError(
                f"a Route's backend and nexthop are strings, not {self.backend!r}, "
                f"{self.nexthop!r}"
            )
        if not isinstance(self.options, RouteOptions):
            raise TypeError(f"a Route's options are RouteOptions, not {self.options!r}")


class IRouter(Interface):
    """Maps each recipient to a delivery backend and next hop.

    The queue manager routes every pending recipient at each delivery attempt.  The site's
    routers, plugins named by C{[[routers]]} tables, are asked first, in the order the
    configuration lists them (L{mailrelay.route.chain.RouterChain}); when each has fallen
    through, the routing table decides (C{[[routes]]}, then the sender's
    C{[[sender_routes]]}, then the smarthost, then the recipient domain's MX hosts:
    L{mailrelay.route.table.RoutingTable}).

    A router answers with one of:

      - a L{Route}: the recipient goes there; later routers and the table are not asked.
        C{route.backend} names a built-in or C{[[backends]]} backend (an unknown name defers
        the recipient), C{route.nexthop} is in that backend's notation.  C{route.options}
        are for C{smtp} and C{lmtp} routes only (an C{lmtp} one without a source address:
        L{RouteOptions.refusedBy}): a route to another backend that carries any defers the
        recipient (4.3.5, logged), as C{[[routes]]} refuses such a table.
      - C{None} or L{CONTINUE}: no opinion; the next router (at the end, the table) decides.
      - a L{TransientFailure <mailrelay.errors.TransientFailure>} (raised, or failing the
        Deferred): the recipient is deferred and routed again at its next attempt.
      - a L{PermanentFailure <mailrelay.errors.PermanentFailure>}: the recipient bounces,
        with the failure's status and diagnostic (no route will ever exist).

    Routing fails closed: a router that fails in any other way, answers anything else, or
    does not answer within its C{timeout} (its Deferred is then cancelled; default 30 s)
    defers the recipient, logged with the router's name; the mail is never routed by the
    next router or the table instead.  Routers are asked on the reactor thread, for each
    recipient of each attempt: one that needs I/O returns a Deferred, and should answer
    from memory when it can.
    """

    def route(envelope: Envelope, recipient: Recipient) -> Any:
        """Route C{recipient} of the message C{envelope} (whose C{queueID} is set).

        @param recipient: the recipient; C{recipient.address} is canonical (domain
            lower-cased, IDNA A-labels) and C{recipient.domain} is its domain (C{""} for
            C{<postmaster>}).
        @return: a L{Route}, C{None} or L{CONTINUE}, or a Deferred firing with one.
        @raise mailrelay.errors.TransientFailure: defer the recipient.
        @raise mailrelay.errors.PermanentFailure: bounce the recipient.
        """


# -- delivery (delivery/)


class DeliveryStatus(enum.Enum):
    """The outcome of one delivery attempt for one recipient."""

    DELIVERED = "delivered"
    TRANSIENT = "transient"  # 4xx, connection trouble, time-out: retry later
    PERMANENT = "permanent"  # 5xx: bounce


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What happened to one recipient in one delivery attempt.

    @ivar address: the recipient's canonical address (as in L{Recipient.address}).
    @ivar status: delivered, transient or permanent failure.
    @ivar code: the RFC 3463 status code (C{"2.0.0"}, C{"4.4.1"}, C{"5.1.1"}); its class must
        agree with C{status}.
    @ivar diagnostic: RFC 3464 Diagnostic-Code form, C{"smtp; 550 5.1.1 user unknown"}, or for
        failures that are not a reply C{"X-mailrelay; connection refused by 192.0.2.1"}.
    @ivar remoteMTA: RFC 3464 Remote-MTA form (C{"dns; mx.example.org"}), or C{None}.
    @ivar dsnRelayed: the next hop took the recipient's DSN request (it offered DSN and was
        given NOTIFY): from here on, success notices are its job, not ours (RFC 3461 5.2).
    @ivar relay: for the log, the server that answered, as Postfix's C{relay=} says it:
        C{"mx.example.org[192.0.2.1]:25"}; C{None}: the route's next hop is logged instead.
    @ivar tls: for the log, the TLS of the connection that answered:
        C{"TLSv1.3 TLS_AES_256_GCM_SHA384 verified"} (or C{unverified}: encrypted, the
        certificate not checked), C{None} without TLS.
    @ivar final: a delivery, not a relay: the message reached the recipient's mailbox (a
        maildir, an LMTP store, a pipe command), so a success notice says C{delivered}; else
        it says C{relayed} (RFC 3464 section 2.3.3).
    @ivar command: for the log, the command whose reply C{diagnostic} is, as Postfix names
        it (C{"MAIL FROM"}, C{"RCPT TO"}, C{"DATA"}, C{"end of DATA"}, C{"BDAT"}): the line
        of a deferral or a bounce says C{(in reply to RCPT TO command)}; C{None} when the
        result is no server's reply.
        Not compared: two results are equal whatever command they answered.
    @ivar reason: what the log and a notice's text say of the result, where it is not
        what C{diagnostic} says: a next hop's suspension defers its mail with the failure's
        diagnostic (C{"smtp; 421 4.3.2 busy"}, the DSN's Diagnostic-Code) and the reason
        C{"delivery temporarily suspended: host H said: 421 4.3.2 busy"}, as Postfix keeps
        a DSN's reason apart from its diagnostic text; C{None}: the diagnostic says it.
    @ivar remoteAddress: the address the server that gave the status was reached at
        (C{"192.0.2.1"}; an LMTP socket's path), with C{remoteMTA}, which stays its name
        (RFC 3464 2.3.5): the texts name the server as Postfix's do, C{"host
        mx.example.org[192.0.2.1] said: ..."} (smtp_proto.c, its C{namaddr}); C{None}
        where C{remoteMTA} is, or not known.  Not compared, as C{command}.
    """

    address: str
    status: DeliveryStatus
    code: str
    diagnostic: str
    remoteMTA: str | None = None
    dsnRelayed: bool = False
    relay: str | None = None
    tls: str | None = None
    final: bool = False
    command: str | None = field(default=None, compare=False)
    reason: str | None = None
    remoteAddress: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        expected = {
            DeliveryStatus.DELIVERED: "2",
            DeliveryStatus.TRANSIENT: "4",
            DeliveryStatus.PERMANENT: "5",
        }
        if not self.code.startswith(expected[self.status] + "."):
            raise ValueError(f"status {self.status.value} does not match code {self.code}")


class IDeliveryBackend(Interface):
    """Delivers one message to some of its recipients, along one L{Route}.

    The queue manager calls C{deliver} once per group of a message's pending recipients with
    the same route, and bounds each call by the backend's timeout (C{[[backends]] timeout}
    for a site backend): an answer that does not come in time counts as a transient failure
    of every recipient of the call, and a late answer is ignored.
    """

    def deliver(envelope: Envelope, recipients: Any, route: Route, messagePath: Path) -> Any:
        """Deliver the message stored at C{messagePath} (CRLF lines, as relayed) to
        C{recipients} (a sequence of L{Recipient}) along C{route}.

        @param route: the L{Route} the router chose for these recipients: C{route.backend}
            is this backend's name, C{route.nexthop} where to deliver, and C{route.options}
            the L{RouteOptions} to use for this delivery over the backend's own defaults
            (never looked up again by the next hop's name: two routes to one next hop may
            differ); only C{smtp} and C{lmtp} routes carry any (the queue defers a route
            to another backend that does, before calling it).  A backend must never
            deliver with weaker settings than these; when it cannot meet them (TLS required
            but unavailable), the recipients fail transiently, with a diagnostic saying
            why.
        @return: a Deferred firing with one L{RecipientResult} per recipient, in order.  The
            Deferred should not fail; if it does, every recipient counts as a transient
            failure (retried), never as delivered.
        """


# -- observers (cleanup/ and queue/)


class IQueueObserver(Interface):
    """Told of each message once it is durably queued: it never delays mail.

    Called on the reactor thread after the commit, with the client's C{250} on its way (and
    for each delivery status notification the relay queues, in the process that makes it).
    The answer is ignored; a Deferred is awaited only to log its failure or its not
    answering within the plugin's C{timeout}, never by the mail.  An exception is logged
    with the plugin's name.  (A webhook per message, a counter, an archive index.)
    """

    def messageQueued(envelope: Envelope) -> Any:
        """The message C{envelope} (C{queueID}, C{arrival}, C{messageSize}, C{client},
        C{notes} set) is queued.  Do not change the envelope: it is a copy nobody reads back.

        @return: anything, or a Deferred (its result is dropped).
        """


#: L{DeliveryEvent.outcome}: delivered, deferred (it stays queued and is retried) or bounced
#: (C{DELIVERED} and C{BOUNCED} are the recipient states of L{mailrelay.envelope} too).
DEFERRED = "deferred"


@dataclass(frozen=True)
class DeliveryEvent:
    """What one delivery attempt made of one recipient.

    @ivar envelope: the message's envelope as recorded after the attempt (C{queueID},
        C{sender}, C{client}, C{notes}, every recipient's state).
    @ivar recipient: the recipient (in C{envelope.recipients}).
    @ivar outcome: L{DELIVERED}, L{DEFERRED} or L{BOUNCED}.
    @ivar result: the L{RecipientResult} of the attempt (status code, diagnostic, remote MTA).
        For a recipient bounced because the message outlived the queue lifetime it is the
        last attempt's (a 4xx), whose status C{recipient.status} keeps (as Postfix returns
        the deferred reason's).
    @ivar relay: where it went (C{"dns; mx.example.org"}-like, as logged C{relay=}).
    @ivar attempts: the recipient's attempts so far, this one included.
    @ivar nextAttempt: for L{DEFERRED}, when the message is tried again (seconds since the
        epoch); else C{None}.
    """

    envelope: Envelope
    recipient: Recipient
    outcome: str
    result: RecipientResult
    relay: str
    attempts: int
    nextAttempt: float | None = None


class IDeliveryObserver(Interface):
    """Told what each delivery attempt made of each recipient: delivered, deferred, bounced.
    It never delays mail (a webhook on delivery, statistics, auto-whitelisting).

    Called by the queue manager (in the delivery process, unless C{[queue] process =
    "inline"}) once the attempt's outcome is recorded in the spool, one call per recipient
    tried, on the reactor thread.  As for L{IQueueObserver}, the answer is ignored and a
    failure (or no answer within the plugin's C{timeout}) is only logged.
    """

    def deliveryAttempted(event: DeliveryEvent) -> Any:
        """One recipient was tried (see L{DeliveryEvent}).

        @return: anything, or a Deferred (its result is dropped).
        """


# -- abuse limits (receive/)


class IRateLimiter(Interface):
    """The shared state of the abuse limits: sessions open and events counted, per key.

    The server builds the keys (opaque text such as C{"tcp:25 conn 192.0.2.7"}); an
    implementation only counts.  The built-in L{mailrelay.receive.limits.MemoryRateLimiter}
    keeps the counts in memory, per relay process.  Several relays behind one MX or load
    balancer can share one implementation backed by a store such as Redis
    (C{acquire}/C{release} as C{INCR}/C{DECR}, C{hit} as C{INCR} plus C{EXPIRE} on the first
    event).

    Every method may return a Deferred.  An answer that fails, does not come within
    L{mailrelay.receive.limits.LIMITER_TIMEOUT} seconds (also one returned by a call that held
    the reactor that long), or (of C{acquire} and C{hit}) is not
    a count (an C{int} >= 0), is logged and the limit is not applied for that event: the
    limits never stop mail because their store is down, and acknowledging a message never
    depends on it.
    """

    def acquire(key: str) -> Any:
        """One more concurrent session for C{key}.

        @return: the number of sessions open for C{key} now, this one included (an C{int}, or
            a Deferred firing with one).  Every C{acquire} that answered is matched by one
            L{release}, also when the session is then refused for being over the limit, or
            when the answer came after the time-out (its Deferred is not cancelled then:
            a late count is waited for, and released).
        """

    def release(key: str) -> Any:
        """A session counted by L{acquire} ended.  The result (or the Deferred's) is ignored."""

    def hit(key: str, window: float) -> Any:
        """Count one event for C{key} in fixed windows of C{window} seconds.

        @return: the events counted for C{key} in its current window, this one included (an
            C{int}, or a Deferred firing with one).  A window starts with the first event
            counted after the previous window ended, as with Postfix's anvil(8) and a Redis
            C{INCR} with C{EXPIRE}.
        """


# -- plugins (app/plugins.py finds and builds them)


def threadHandOff(reactor: Any) -> Callable[..., Any]:
    """C{deferToThread(f, *args, **kwargs)} in C{reactor}'s thread pool; a reactor without one
    (a C{task.Clock} in a test) runs the function at once, as C{maybeDeferred} does."""
    from twisted.internet.defer import maybeDeferred

    if not callable(getattr(reactor, "getThreadPool", None)):
        return maybeDeferred

    def deferToThread(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)

    return deferToThread


_FlatSemaphore: Any = None


def flatSemaphore(tokens: int) -> Any:
    """A C{twisted.internet.defer.DeferredSemaphore} of C{tokens} whose release hands the
    token to the next waiter without nesting: a waiter that gets it and gives it back at once
    (its work ended synchronously) has it handed on by the release already running, in a
    loop, not by a release called within the previous one.  Twisted's nests them, one
    stack level per waiter, so that a few hundred waiters ending at once (deliveries to a
    suspended next hop, or not started because the queue is stopping) raise RecursionError
    in the middle of the chain, and the Deferreds left behind never fire.  Waiters are
    served in the same order."""
    global _FlatSemaphore
    if _FlatSemaphore is None:
        from twisted.internet.defer import DeferredSemaphore

        class FlatSemaphore(DeferredSemaphore):
            _releasing = False
            _owed = 0

            def release(self) -> None:
                self._owed += 1
                if self._releasing:
                    return  # (the release running below us hands it on, after its own)
                self._releasing = True
                try:
                    while self._owed:
                        self._owed -= 1
                        DeferredSemaphore.release(self)
                finally:
                    self._releasing = False

        _FlatSemaphore = FlatSemaphore
    return _FlatSemaphore(tokens)


@dataclass
class PluginContext:
    """What a plugin's C{build} may use, and keep for later.

    The relay makes one per configuration it loads (at start-up and at each reload), shared
    by every plugin it builds; L{mailrelay.testing.makePluginContext} makes one for tests.

    @ivar hostname: this relay's host name.
    @ivar configDir: the directory of the configuration file, to resolve relative paths
        (the current directory when running on the embedded default).
    @ivar reactor: the reactor: timers (C{callLater}), network I/O, the thread pool.  The
        relay always sets it (a test's context may hold a C{task.Clock}).
    @ivar resolver: a C{twisted.names} C{IResolver} asking the name servers of C{[dns]
        nameservers} (or the system's), the one the relay's own lookups use: C{lookupAddress},
        C{lookupMailExchange}, C{lookupText}, C{lookupPointer}, ... never block.  C{None} only
        in a context made by hand without one.
    @ivar deferToThread: C{deferToThread(f, *args, **kwargs)}: C{f} called in the reactor's
        thread pool, as a Deferred of its result (for blocking libraries: SQLite, a DNS
        library of its own, CPU-heavy work).  Without a reactor that has a thread pool, C{f}
        runs at once (C{maybeDeferred}): what a test with a C{task.Clock} wants.
    @ivar source: the configuration file the plugin's options come from, for messages
        (C{None}: the embedded default).
    @ivar kept: the objects L{keep} keeps, shared by the contexts of one relay process.
    @ivar timeout: the seconds one call of the plugin being built may take (its entry's
        C{timeout}: the relay cuts a call there and fails it), or C{None}; see
        L{checkTimeout}.
    @ivar entry: where the plugin being built is configured (C{"plugins[2]"}), or C{None}.
    @ivar monotonic: the clock to measure durations on (how long a record lives, how long
        ago something was seen): C{time.monotonic}, which no step of the system clock (NTP,
        C{date -s}) moves, where C{reactor.seconds()} moves with it; a test's context gives
        its C{task.Clock}'s C{seconds}.
    @ivar processes: how many processes accept connections with this configuration
        (C{[relay] processes}, resolved): what a plugin keeps in memory (L{keep}) is kept
        in each of them, not shared.
    @ivar recipientDelimiter: the characters that separate a user from an address
        extension (C{[delivery] recipient_delimiter}, Postfix's C{recipient_delimiter}:
        C{"+"} makes C{bob+lists} the user C{bob}), C{""} for none; for a plugin that looks
        addresses up as Postfix's tables do (L{mailrelay.address.splitExtension}).
    """

    hostname: str
    configDir: Path
    reactor: Any = None
    resolver: Any = None
    deferToThread: Callable[..., Any] = None  # type: ignore[assignment]  # set after init
    source: str | None = None
    kept: dict[str, Any] = field(default_factory=dict, repr=False)
    timeout: float | None = None
    entry: str | None = None
    monotonic: Callable[[], float] = time.monotonic
    processes: int = 1
    recipientDelimiter: str = ""
    #: The warnings L{checkTimeout} gave for this configuration (each is given once).
    warned: set[str] = field(default_factory=set, repr=False, compare=False)
    #: In the relay's child processes: what the relay said of the configuration (the
    #: warnings of L{checkTimeout}) is not said again.
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.deferToThread is None:
            self.deferToThread = threadHandOff(self.reactor)

    def keep(self, key: str, make: Callable[[], Any]) -> Any:
        """The object kept under C{key} in this relay process, made by C{make()} the first
        time: a plugin's state that must outlive a reload (which builds every plugin anew),
        such as an in-memory greylisting table or a connection pool.  Prefix C{key} with the
        plugin's name; the object must not hold on to a previous build's options."""
        try:
            return self.kept[key]
        except KeyError:
            value = self.kept[key] = make()
            return value

    def checkTimeout(self, option: str, seconds: float) -> bool:
        """Say (a warning in the log) when the plugin's own time limit C{option}, of
        C{seconds}, is not below its entry's L{timeout}: the relay would cut every slow call
        first and fail it (a 4xx), so the plugin's own way with a slow answer (fail open,
        tag, a temporary error of its own) would never act.  Returns whether it is below.
        """
        if self.timeout is None or seconds < self.timeout:
            return True
        self.warn(
            option,
            f"= {seconds:g}s is not below the plugin's timeout of {self.timeout:g}s: the "
            f"relay cuts a slow call at {self.timeout:g}s and fails it (4xx), so the plugin's "
            f"own handling of a slow answer never acts; make {option} shorter",
        )
        return False

    def warn(self, option: str, text: str) -> None:
        """Say (a warning in the log, once per configuration and option; not in the relay's
        child processes, L{quiet}) that the plugin's C{option} is unwise: C{"FILE:
        plugins[2].OPTION TEXT"}.  The configuration is not refused."""
        if self.quiet:
            return
        from twisted.logger import Logger

        where = ".".join(p for p in (self.entry, option) if p)
        if where in self.warned:  # (the relay builds a plugin once per process side)
            return
        self.warned.add(where)
        Logger().warn(
            "{source}: {where} {text}",
            source=self.source or "(embedded default)",
            where=where,
            text=text,
        )

    def readOptions(self, schema: Any, options: dict[str, Any]) -> Any:
        """Read a plugin's C{options} with the configuration's own machinery: the keys of
        C{schema} (a L{mailrelay.config.schema.Table}, e.g. from
        L{mailrelay.config.schema.pluginOptions}) are parsed and checked, the absent ones take
        their defaults, relative file names are made absolute against L{configDir}, and an
        unknown key is refused with a did-you-mean.

        @return: what the table builds (its C{target} dataclass, or the namespace of
            L{pluginOptions <mailrelay.config.schema.pluginOptions>}).
        @raise ConfigError: naming the option and its value (the relay adds the file and the
            table).
        """
        from mailrelay.config.schema import readPluginOptions

        return readPluginOptions(schema, options, self.configDir, self.source)


class IOnlineCheck(Interface):
    """Optional, for a plugin object that is a service: what of its configuration only the
    network can tell (the DKIM signer: whether DNS publishes its keys).  The plugin looks
    by itself once started, and logs what it found; C{mailrelay check} asks after building
    the configuration (nothing started) and prints the problems as warnings, as
    C{opendkim-testkey} would: none fails the check."""

    def checkOnline(clock: Any = None, timeout: float | None = None) -> Any:
        """Look; a Deferred, which never fails, of the findings: C{(kind, text)} pairs, the
        text naming the plugin, C{kind} C{"ok"} (all is well), C{"problem"} (to fix: a
        warning) or C{"unchecked"} (it could not be looked at: the text says why, as a
        lookup not answered within C{timeout} seconds of C{clock}, when given)."""


class IMailRelayPlugin(IPlugin):
    """What a C{twisted/plugins/} dropin exposes, one object per plugin.

    The configuration selects a plugin by C{name} in a plugin list (for example
    C{[[recipient_validators]] plugin = "recipient-map"}); the rest of that table is passed to
    C{build} as C{options}.
    """

    name = Attribute("Unique name the configuration uses, e.g. C{'recipient-map'}.")
    provides = Attribute(
        "The interface the objects C{build} returns provide (e.g. L{IRecipientValidator}), or "
        "a tuple of them for an object serving several hooks (C{(IDataPolicy, "
        "IDeliveryObserver)}); each is checked with C{verifyObject}."
    )
    description = Attribute("One line saying what the plugin does.")

    def build(options: dict[str, Any], context: PluginContext) -> Any:
        """Build the plugin from its configuration table.

        @param options: the plugin's table without the C{plugin} key (and without the keys
            the loader itself uses, such as C{timeout}).
        @raise mailrelay.errors.ConfigError: an option is missing, unknown or wrong; the
            message names the key and value.
        @return: an object providing C{self.provides} (each of them, for a tuple); it may
            also provide C{twisted.application.service.IService}: it is then started with
            the relay (before the listeners) and stopped after the sessions have ended.
        """


@implementer(IPlugin, IMailRelayPlugin)
@dataclass(frozen=True)
class MailRelayPlugin:
    """A ready-made L{IMailRelayPlugin}: a name, the interface provided, and a factory.

    C{factory} is either a callable C{factory(options, context)} or a string
    C{"package.module:function"} imported only when the plugin is built, so that scanning
    the dropin stays cheap.  Site dropins can use this class too::

        from mailrelay.interfaces import IRecipientValidator
        from mailrelay.plugins import MailRelayPlugin
        acmeRecipients = MailRelayPlugin(
            name="acme-recipients",
            provides=IRecipientValidator,
            description="Recipients from ACME's directory",
            factory="acme_mailrelay.recipients:build",
        )
    """

    name: str
    provides: Any  # an InterfaceClass such as IRecipientValidator, or a tuple of them
    description: str
    factory: str | Callable[[dict[str, Any], PluginContext], Any] = field(repr=False)

    def build(self, options: dict[str, Any], context: PluginContext) -> Any:
        factory = self.factory
        if isinstance(factory, str):
            moduleName, sep, attr = factory.partition(":")
            if not sep or not moduleName or not attr:
                raise ConfigError(
                    f"plugin {self.name!r} has a bad factory {factory!r} (want 'module:function')"
                )
            try:
                factory = getattr(importlib.import_module(moduleName), attr)
            except (ImportError, AttributeError) as e:
                raise ConfigError(
                    f"plugin {self.name!r}: cannot load its factory {factory!r}: {e}"
                ) from e
        return factory(options, context)


def providedBy(plugin: Any) -> tuple[Any, ...]:
    """The interfaces an L{IMailRelayPlugin} declares (its C{provides}, as a tuple)."""
    provides = plugin.provides
    return tuple(provides) if isinstance(provides, (tuple, list)) else (provides,)


# -- the hooks of [[plugins]] (app/ builds them into chains; config/ checks their names)


@dataclass(frozen=True)
class Hook:
    """One hook a C{[[plugins]]} entry may serve (its C{hooks} key names them).

    @ivar name: the hook's name in the configuration (C{"connect"}).
    @ivar interface: the interface whose providers serve it.
    @ivar method: the method called (C{None}: the interface is used as a whole).
    @ivar stage: when it runs, in a few words (for C{--list-plugins} and messages).
    @ivar process: where it runs: C{"relay"} (the SMTP side), C{"delivery"} (the queue
        manager's process, the relay's own with C{[queue] process = "inline"}) or C{"both"}.
    """

    name: str
    interface: Any
    method: str | None
    stage: str
    process: str = "relay"


#: Every hook of C{[[plugins]]}, in the order of a message's life.  (Header stampers, routers,
#: delivery backends, credential checkers and rate limiters have tables of their own.)
HOOKS: tuple[Hook, ...] = (
    Hook("connect", IConnectionPolicy, "checkConnect", "at connect, before the greeting"),
    Hook("helo", IConnectionPolicy, "checkHelo", "at each HELO/EHLO"),
    Hook("esmtp", IESMTPExtension, None, "EHLO keywords, MAIL/RCPT parameters, commands"),
    Hook("mail", ISenderValidator, "validateSender", "at MAIL, after the built-in checks"),
    Hook("rcpt", IRecipientValidator, "validateRecipient", "at RCPT, after relay control"),
    Hook("data", IDataPolicy, "checkData", "at DATA, every recipient known"),
    Hook(
        "message", IMessageFilter, "filterMessage", "at the end of data, before the commit",
        "both",
    ),
    Hook("queue", IQueueObserver, "messageQueued", "once a message is queued", "both"),
    Hook(
        "delivery", IDeliveryObserver, "deliveryAttempted", "after each delivery attempt",
        "delivery",
    ),
)

#: L{HOOKS} by name.
HOOKS_BY_NAME: dict[str, Hook] = {hook.name: hook for hook in HOOKS}
