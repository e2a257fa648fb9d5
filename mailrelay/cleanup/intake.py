"""The intake: the one way into the spool.

Every message enters the spool here, whoever made it: one received by SMTP, fed as it
arrives (L{Intake.open}, then L{IncomingMessage.write} and L{IncomingMessage.finish}), or one
the relay made itself and gives whole, such as a delivery status notification
(L{Intake.submit}).  Each goes the same way:

  1. a spool writer, under a queue id the spool allocates (L{ISpool.openMessage});
  2. header processing (L{HeaderProcessor}): the header section is held back until complete
     (a section longer than C{maxHeaderSize} is refused: 552 5.6.0);
  3. the header stampers (L{runStampers}) add their fields; the body streams on to the spool;
  4. the hop check: more than C{maxHops} C{Received:} fields is a mail loop (554 5.4.6);
  5. the message filters (L{mailrelay.interfaces.IMessageFilter}), in order, which see the
     whole message (L{mailrelay.cleanup.filters}) and may add, remove or replace header
     fields, rewrite the envelope sender (logged) or refuse it; with fields changed, the
     message is written again with them;
     (a C{TLS-Required: No} field, RFC 8689, is noted on the envelope before them:
     C{tlsRequiredNo});
  6. the commit: the message is durable before its 250;
  7. the queue observers of the message are told (C{observe}; they never delay it), then
     the queue of the new queue id (C{notify}; not for a message submitted with
     C{notify=False}: its maker schedules it);
  8. one log line, as Postfix's: C{from=<...> nrcpt=N size=N client=... result=...} (no
     C{client=} for a message made here).

The hop check comes before the filters, as in Postfix's cleanup: a looping message is refused
before a filter spends any work on it.  Stampers that answer at once cost no Deferred round
trip; one that answers later holds the data written meanwhile (L{IncomingMessage.write} says
so, so that the SMTP side can stop reading).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.cleanup.filters import FILTER_FAILED_TEXT, FilterContext
from mailrelay.cleanup.stamping import (
    STAMPING_FAILED,
    ConfiguredStamper,
    HeaderProcessor,
    StampingFailed,
    runStampers,
)
from mailrelay.envelope import ClientInfo, Envelope, savePluginKept, undoPluginChanges
from mailrelay.errors import SpoolError
from mailrelay.headers import HEADER_SECTION_LIMIT
from mailrelay.interfaces import (
    CONTINUE,
    IIncomingMessage,
    IIntake,
    IMessageWriter,
    ISpool,
    MessageRefused,
    Reply,
    StampContext,
    StampResult,
    Verdict,
    VerdictKind,
    threadHandOff,
)
from mailrelay.metrics import MESSAGE_BYTES, MESSAGES, child, replyClass
from mailrelay.smtp import replies as R

log = Logger()

#: The message filters' verdict when one fails (a chain's C{failed}; see L{Intake}).
FILTER_FAILED = Verdict.defer(FILTER_FAILED_TEXT)
#: The reply of a filter's C{DISCONNECT} without one of its own.
_DISCONNECT = Reply(421, "4.7.0", "Error: closing connection")


@implementer(IIntake)
class Intake:
    """The intake of one relay: its spool, stampers, filters and hop limit.

    @ivar spool: the L{ISpool} messages are written into (it allocates their queue ids).
    @ivar stampers: the L{ConfiguredStamper}s, in order.
    @ivar clock: an C{IReactorTime}: time stamps, the stampers' timeouts.
    @ivar hostname: this relay's host name, for the stampers.
    @ivar maxHops: C{Received:} fields beyond this many make the message refused as a loop.
    @ivar notify: called with the queue id of each message once it is durable (the queue
        manager picks it up without rescanning the spool), or C{None}.
    @ivar filters: the message filters, as one chain of the policy runner
        (L{mailrelay.policy.runner.PolicyChain} of C{filterMessage}, interpreting answers
        with L{mailrelay.cleanup.filters.filterVerdict}, failing with L{FILTER_FAILED}), or
        C{None}: C{filters.run(context, subject=queueID)} answers a Deferred L{Verdict}.
    @ivar observe: called with the envelope of each message once it is durable (the queue
        observers: L{mailrelay.queue.observers.Observers.messageQueued}), or C{None}.
    @ivar deferToThread: runs blocking work (reading a message for the filters) in a thread.
    @ivar dropHeaders: the names (lower case) of the header fields removed from every
        message, as Postfix's cleanup removes C{message_drop_headers} (C{Bcc:}, ...).
    @ivar maxHeaderSize: C{[limits] header_size}: a message whose header section is longer
        is refused (L{R.HEADER_TOO_LONG}), not stamped nor stored.
    @ivar postmaster: C{[queue] postmaster}, or C{None}: where mail to postmaster at
        C{hostname} goes (L{aliasPostmaster}, at the commit: the stampers and filters see
        the recipients given at RCPT).
    """

    def __init__(
        self,
        spool: ISpool,
        stampers: Sequence[ConfiguredStamper],
        clock: IReactorTime,
        hostname: str,
        maxHops: int = 50,
        notify: Callable[[str], object] | None = None,
        filters: Any = None,
        observe: Callable[[Envelope], object] | None = None,
        deferToThread: Callable[..., Deferred[Any]] | None = None,
        dropHeaders: Collection[str] = (),
        postmaster: str | None = None,
        maxHeaderSize: int = HEADER_SECTION_LIMIT,
    ) -> None:
        self.spool = spool
        self.postmaster = postmaster
        self.maxHeaderSize = maxHeaderSize
        self.dropHeaders = frozenset(name.lower() for name in dropHeaders)
        self.stampers = tuple(stampers)
        self.clock = clock
        self.hostname = hostname
        self.maxHops = maxHops
        self.notify = notify
        self.filters = filters if filters else None
        self.observe = observe
        self.deferToThread = deferToThread or threadHandOff(clock)

    def hasFreeSpace(self, needed: int) -> bool:
        return bool(self.spool.hasFreeSpace(needed))

    def open(
        self,
        envelope: Envelope,
        client: ClientInfo | None,
        listenerOptions: dict[str, Any] | None = None,
    ) -> IncomingMessage | Reply:
        """Start a message (see L{IIntake.open}); sets C{envelope.queueID}."""
        return self._open(envelope, client, listenerOptions or {}, self.notify)

    def submit(
        self,
        envelope: Envelope,
        message: bytes,
        *,
        notify: bool = True,
        queueID: str | None = None,
    ) -> Deferred[str]:
        """Spool a whole message made here (see L{IIntake.submit})."""
        opened = self._open(envelope, None, {}, self.notify if notify else None, queueID)
        if isinstance(opened, Reply):
            return fail(MessageRefused(opened))
        opened.write(message)

        def queued(reply: Reply) -> str:
            if not reply.isPositive:
                raise MessageRefused(reply)
            return opened.queueID

        return opened.finish().addCallback(queued)

    def _open(
        self,
        envelope: Envelope,
        client: ClientInfo | None,
        listenerOptions: dict[str, Any],
        notify: Callable[[str], object] | None,
        queueID: str | None = None,
    ) -> IncomingMessage | Reply:
        try:
            writer = self.spool.openMessage(queueID)
        except SpoolError as e:
            log.error("cannot create queue file: {error}", error=str(e))
            return R.LOCAL_ERROR
        envelope.queueID = writer.queueID
        return IncomingMessage(self, envelope, client, writer, listenerOptions, notify)


def aliasPostmaster(envelope: Envelope, hostname: str, postmaster: str) -> None:
    """Mail to postmaster at C{hostname} (which the relay accepts from anyone, RFC 5321
    4.5.1) goes to C{postmaster} (C{[queue] postmaster}), as Postfix delivers
    postmaster@$myhostname locally, to the person its aliases(5) name: the recipient
    becomes that address, its ORCPT (when the client gave none) the address it replaces,
    and a recipient already there is not added twice."""
    own = {id(r) for r in envelope.recipients if _isPostmasterAt(r.address, hostname)}
    if not own or _isPostmasterAt(postmaster, hostname):
        return  # (nothing to do; or [queue] postmaster is that very address)
    present = any(r.address == postmaster for r in envelope.recipients)
    kept = []
    for recipient in envelope.recipients:
        if id(recipient) in own:
            if present:
                continue
            present = True
            recipient.orcpt = recipient.orcpt or f"rfc822;{recipient.address}"
            log.info(
                "{queueID}: to=<{address}> goes to the postmaster, <{postmaster}>",
                queueID=envelope.queueID,
                address=recipient.address,
                postmaster=postmaster,
            )
            recipient.address = postmaster
        kept.append(recipient)
    envelope.recipients = kept


def _isPostmasterAt(address: str, hostname: str) -> bool:
    local, _, domain = address.rpartition("@")
    return local.lower() == "postmaster" and domain.lower() == hostname


@implementer(IIncomingMessage)
class IncomingMessage:
    """One message on its way into the spool (see L{IIncomingMessage}).

    @ivar envelope: its envelope.
    @ivar client: the client it comes from, or C{None} when made here.
    """

    def __init__(
        self,
        intake: Intake,
        envelope: Envelope,
        client: ClientInfo | None,
        writer: IMessageWriter,
        listenerOptions: dict[str, Any],
        notify: Callable[[str], object] | None = None,
    ) -> None:
        """
        @param notify: called with the queue id once the message is durable, or C{None}.
        """
        self.intake = intake
        self.envelope = envelope
        #: What the policy accepted (sender, recipients, their DSN parameters, the client's
        #: relay permission and login), checked again at commit: the stampers may only add
        #: header fields.
        self._accepted = savePluginKept([client, envelope])
        self.client = client
        self._writer = writer
        self._listenerOptions = listenerOptions
        self._notify = notify
        self._now = intake.clock.seconds()
        #: Set by the write that called stampers answering later, for that write to return.
        self._started: Deferred[None] | None = None
        self._processor = HeaderProcessor(writer.write, self._stamp, intake.maxHeaderSize)
        #: Finished or abandoned: nothing more is written.
        self._closed = False

    @property
    def queueID(self) -> str:
        return str(self._writer.queueID)

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        """The header fields as received (C{(name, raw)} pairs), once the stampers ran."""
        return self._processor.headers

    def write(self, data: bytes) -> Deferred[None] | None:
        if self._closed:
            return None
        self._processor.write(data)
        started, self._started = self._started, None
        return started

    def _stamp(self, headers: list[tuple[str, bytes]]) -> StampResult | Deferred[StampResult]:
        context = StampContext(
            hostname=self.intake.hostname,
            client=self.client,
            envelope=self.envelope,
            headers=headers,
            listenerOptions=self._listenerOptions,
            now=self._now,
            complete=self._processor.complete,
        )
        result = runStampers(self.intake.stampers, context, self.intake.clock)
        if isinstance(result, Deferred) and not result.called:
            started: Deferred[None] = Deferred()
            self._started = started

            def ended(outcome: object) -> object:
                started.callback(None)
                return outcome

            result.addBoth(ended)
        return result

    def finish(self, error: Reply | None = None, size: int | None = None) -> Deferred[Reply]:
        if self._closed:
            return succeed(error or R.LOCAL_ERROR)  # abandoned already
        self._closed = True
        if error is not None:
            self._processor.abort()  # a stamper still at work is not waited for
            return succeed(self._refuse(error, size))
        # The stampers were called when the header section ended: wait for their answer.
        d: Deferred[Any] = self._processor.finish()
        if not self._processor.complete:
            # Longer than maxHeaderSize: never stamped, nothing stored past it.  Refused, as
            # Sendmail's MaxHeadersLength and Exim's header_maxsize refuse it, rather than
            # cut as Postfix's header_size_limit cuts one field: what is acknowledged is
            # delivered whole.
            return succeed(self._refuse(R.HEADER_TOO_LONG, size))
        return d.addCallbacks(self._stamped, self._notStamped, errbackArgs=(size,))

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        log.info("{queueID}: message not completed, dropped", queueID=self.queueID)
        self._writer.abort()
        self._processor.abort()

    def _notStamped(self, failure: Failure, size: int | None) -> Reply:
        if not failure.check(StampingFailed):  # already logged, naming the stamper
            log.failure("{queueID}: header stamping failed", failure, queueID=self.queueID)
        return self._refuse(STAMPING_FAILED, size)

    def _stamped(self, _: object) -> Reply | Deferred[Reply]:
        if self._processor.count("Received") > self.intake.maxHops:
            return self._refuse(R.TOO_MANY_HOPS)
        envelope = self.envelope
        # RFC 8689 4.1: the field is ignored when MAIL carried REQUIRETLS.
        if not envelope.requireTLS and tlsRequiredNo(self.headers):
            envelope.tlsRequiredNo = True
        if envelope.smtputf8:  # (whether it needs SMTPUTF8 on the way out: see Envelope)
            processor = self._processor
            envelope.utf8Header = (
                not processor.added.isascii()
                or any(not raw.isascii() for _, raw in self.headers)
            )
        drop = self.intake.dropHeaders
        dropped = [raw for name, raw in self.headers if name.lower() in drop]
        if self.intake.filters is None and not dropped:
            return self._commit()
        return self._filter(dropped)

    def _filter(self, dropped: Sequence[bytes]) -> Deferred[Reply]:
        """Run the message filters, if any, on the message without the C{dropped} fields,
        then commit (the message written again when fields were dropped or the filters
        added or removed some), or refuse."""
        intake, writer = self.intake, self._writer
        context = FilterContext(
            intake.hostname,
            self.client,
            self.envelope,
            self._listenerOptions,
            writer.size,
            writer.read,
            intake.deferToThread,
        )
        context.drop(dropped)
        d: Deferred[Verdict] = (
            succeed(CONTINUE) if intake.filters is None
            else intake.filters.run(context, subject=self.queueID)
        )

        def judged(verdict: Verdict) -> Reply | Deferred[Reply]:
            if verdict.kind not in (VerdictKind.CONTINUE, VerdictKind.ACCEPT):
                return self._refuse(verdict.reply or _DISCONNECT)
            envelope = self.envelope
            if context.originalSender is not None:
                self._senderRewritten(context.originalSender)
            if not context.changed:
                return self._commit()
            if envelope.smtputf8 and not envelope.utf8Header:
                envelope.utf8Header = any(
                    not f.isascii() for f in context.prepend + context.append + context.replaced)
            return context.message().addCallbacks(self._rewritten, self._notRewritten)

        return d.addCallback(judged)

    def _senderRewritten(self, original: str) -> None:
        """A filter rewrote the envelope sender (C{FilterResult.sender}) from C{original}:
        the new one is kept at the commit, and logged."""
        envelope = self.envelope
        self._accepted = [
            (obj, name, envelope.sender if obj is envelope and name == "sender" else value)
            for obj, name, value in self._accepted
        ]
        log.info(
            "{queueID}: sender=<{original}> rewritten to <{sender}>",
            queueID=self.queueID,
            original=original,
            sender=envelope.sender,
        )

    def _rewritten(self, message: bytes) -> Reply | Deferred[Reply]:
        """Write the message again, with the filters' fields, under its queue id."""
        self._writer.abort()
        try:
            self._writer = self.intake.spool.openMessage(self.queueID)
        except SpoolError as e:
            log.error(
                "{queueID}: cannot create queue file: {error}", queueID=self.queueID, error=str(e)
            )
            return self._refuse(R.LOCAL_ERROR, len(message))
        self._writer.write(message)
        return self._commit()

    def _notRewritten(self, failure: Failure) -> Reply:
        log.failure(
            "{queueID}: reading the message for its filters failed", failure, queueID=self.queueID
        )
        return self._refuse(R.LOCAL_ERROR)

    def _refuse(self, reply: Reply, size: int | None = None) -> Reply:
        """Drop the message; C{reply} answers its end."""
        self._writer.abort()
        self._logResult(reply, self._writer.size if size is None else size)
        return reply

    def _commit(self) -> Deferred[Reply] | Reply:
        envelope = self.envelope
        changed = undoPluginChanges(self._accepted)
        if changed is not None:
            # Committed, the message would be queued for other recipients (or DSN requests)
            # than those the client was told were accepted -- or for none, and dropped after
            # its 250.
            log.error(
                "{queueID}: a plugin {changed} after the sender and recipients were accepted; "
                "refused, not queued",
                queueID=self.queueID,
                changed=changed,
            )
            return self._refuse(STAMPING_FAILED)
        if self.intake.postmaster is not None:
            # Here, as Postfix's cleanup rewrites what smtpd gave it: the stampers (the
            # Received: field's "for" clause) and filters saw the recipients given at RCPT.
            aliasPostmaster(envelope, self.intake.hostname, self.intake.postmaster)
        writer = self._writer
        envelope.arrival = self.intake.clock.seconds()
        envelope.messageSize = writer.size
        d: Deferred[Any] = writer.commit(envelope)
        return d.addCallbacks(self._committed, self._notCommitted)

    def _committed(self, _: object) -> Reply:
        queueID = self.queueID
        reply = Reply(250, "2.0.0", f"Ok: queued as {queueID}")
        self._logResult(reply, self._writer.size)
        # The observers first: a queue manager may deliver at once (a backend answering
        # without I/O), and an observer must hear of a message before of its delivery.
        observe = self.intake.observe
        if observe is not None:
            try:
                observe(self.envelope)
            except Exception:
                log.failure("{queueID}: telling the queue observers failed", queueID=queueID)
        notify = self._notify
        if notify is not None:
            try:
                notify(queueID)
            except Exception:
                log.failure("{queueID}: queue manager refused the new entry", queueID=queueID)
        return reply

    def _notCommitted(self, failure: Failure) -> Reply:
        log.error(
            "{queueID}: spool commit failed: {error}",
            queueID=self.queueID,
            error=failure.getErrorMessage(),
        )
        self._logResult(R.LOCAL_ERROR, self._writer.size)
        return R.LOCAL_ERROR

    def _logResult(self, reply: Reply, size: int) -> None:
        """The message's one line (Postfix's cleanup and qmgr lines in one): where it came
        from (nothing for a message made here), and what became of it."""
        envelope = self.envelope
        client = self.client
        user = client.authUser if client else None
        origin = "local" if client is None else "smtp"
        child(MESSAGES, replyClass(reply.code), origin).inc()
        if reply.isPositive:
            child(MESSAGE_BYTES, origin).inc(size)
        log.info(
            "{queueID}: from=<{sender}> nrcpt={nrcpt} size={size}{origin}{sasl}{tlsPolicy} "
            "result={result}",
            queueID=envelope.queueID,
            sender=envelope.sender,
            nrcpt=len(envelope.recipients),
            size=size,
            client=client.address if client else None,
            origin=f" client={client.address}" if client else "",
            sasl=f" sasl_username={user}" if user else "",
            sasl_username=user,
            tlsPolicy=" requiretls" if envelope.requireTLS else (
                " tls_required=no" if envelope.tlsRequiredNo else ""),
            tls=client.tls if client else None,
            result=str(reply),
            accepted=reply.isPositive,
        )


def tlsRequiredNo(headers: list[tuple[str, bytes]]) -> bool:
    """Whether the header fields (C{(name, raw)} pairs) hold C{TLS-Required: No} (RFC 8689
    3; the value is case-insensitive and may be folded)."""
    for name, raw in headers:
        if name.lower() == "tls-required":
            value = raw.partition(b":")[2]
            if b"".join(value.split()).lower() == b"no":
                return True
    return False
