"""The envelope of one message: who sent it, to whom, from where, and each recipient's state.

The envelope is what the spool stores beside the message body, as JSON (never pickle), and
what every plugin sees.  Addresses are kept as text in their canonical form (see
L{mailrelay.address}); the null reverse-path is the empty string.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from operator import attrgetter
from typing import Any

ENVELOPE_VERSION = 1

#: Recipient states.  A message leaves the spool when no recipient is C{PENDING}.
PENDING = "pending"
DELIVERED = "delivered"
BOUNCED = "bounced"
RECIPIENT_STATES = (PENDING, DELIVERED, BOUNCED)


@dataclass
class ClientInfo:
    """What is known of the SMTP client of one session.

    @ivar address: the client's IP address as text (C{"127.0.0.1"}, C{"::1"}).
    @ivar port: the client's source port.
    @ivar rdns: the client's reverse DNS name, forward-confirmed, or C{None} ("unknown").
    @ivar helo: the HELO/EHLO argument, or C{None} before HELO/EHLO.
    @ivar esmtp: C{True} after EHLO, C{False} after HELO.
    @ivar tls: a description of the TLS session (C{"TLSv1.3 TLS_AES_256_GCM_SHA384"}) or C{None}.
    @ivar authUser: the authenticated user name, or C{None}.
    @ivar relayAllowed: C{True} when the client may relay to any domain (it is in a relay
        network, or authenticated).
    @ivar listener: the name of the listener (its endpoint description) the client came in on.
    @ivar notes: the session's notes: what plugins note about the client for later stages
        (Haraka's connection notes), by key (prefix keys with the plugin's name).  They must
        be JSON values (str, int, float, bool, None, lists and string-keyed dicts of them):
        they are stored in the envelope of each message of the session.
    """

    address: str
    port: int = 0
    rdns: str | None = None
    helo: str | None = None
    esmtp: bool = False
    tls: str | None = None
    authUser: str | None = None
    relayAllowed: bool = False
    listener: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        """The RFC 3848 protocol name for C{Received:} (SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA)."""
        if not self.esmtp:
            return "SMTP"
        name = "ESMTP"
        if self.tls:
            name += "S"
        if self.authUser:
            name += "A"
        return name


@dataclass
class Recipient:
    """One recipient of a message.

    @ivar address: the canonical forward-path without angle brackets (C{"user@example.com"}).
    @ivar original: the path as the client wrote it, without angle brackets.
    @ivar notify: the DSN NOTIFY values (C{("SUCCESS", "FAILURE")}, C{("NEVER",)}) or C{None}.
    @ivar orcpt: the DSN ORCPT parameter as received (C{"rfc822;user@example.com"}, xtext
        decoded) or C{None}.
    @ivar state: one of L{RECIPIENT_STATES}.
    @ivar attempts: delivery attempts made for this recipient.
    @ivar lastResult: the last delivery diagnostic (RFC 3464 Diagnostic-Code form, e.g.
        C{"smtp; 550 5.1.1 user unknown"}), or C{None}.
    @ivar status: the RFC 3463 status of the last attempt or final outcome (C{"5.1.1"}).
    @ivar remoteMTA: the RFC 3464 Remote-MTA of the last attempt (C{"dns; mx.example.org"}).
    @ivar remoteAddress: the address that Remote-MTA's status came from (C{"192.0.2.1"}),
        for the texts that name the server as Postfix's do (C{mx.example.org[192.0.2.1]}),
        or C{None}; not stored when C{None}.
    @ivar finalTime: when the recipient was delivered or bounced (seconds since the epoch).
    @ivar reason: what notices and the queue listing say of the last attempt where it is
        not what C{lastResult} says (L{mailrelay.interfaces.RecipientResult.reason}: a
        suspended next hop's deferral), or C{None}; not stored when C{None}.
    @ivar parameters: the RCPT parameters owned by ESMTP extensions, as they parsed them, by
        parameter name (see L{mailrelay.interfaces.IESMTPExtension}).
    @ivar noticeOwed: the success notice (RFC 3461 NOTIFY=SUCCESS) owed for this recipient,
        delivered, and not yet queued: its RFC 3464 action (C{"delivered"}, C{"relayed"}),
        recorded with the delivery (what the notice says is the recipient's C{lastResult},
        C{remoteMTA}, C{finalTime} and C{orcpt}), cleared when the notice is queued; or
        C{None}.  Stored only when set, like L{noticeID}.
    @ivar noticeID: the queue id that notice is to have (so that after a crash it is made
        again only if it was not queued), or C{None}.
    @ivar command: the command whose reply C{lastResult} is, when a server refused or
        deferred the recipient (C{"RCPT TO"}, C{"end of DATA"}: what the notice's text says,
        as Postfix's "(in reply to RCPT TO command)"), or C{None}; not stored when C{None}.
    """

    address: str
    original: str = ""
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    state: str = PENDING
    attempts: int = 0
    lastResult: str | None = None
    status: str | None = None
    remoteMTA: str | None = None
    finalTime: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    noticeOwed: str | None = None
    noticeID: str | None = None
    remoteAddress: str | None = None
    command: str | None = None

    @property
    def domain(self) -> str:
        """The domain part (after the last C{@}), or C{""}."""
        return self.address.rpartition("@")[2] if "@" in self.address else ""


@dataclass
class Envelope:
    """The envelope of one message.

    @ivar queueID: the queue id, assigned when DATA starts; C{None} before.
    @ivar sender: the canonical reverse-path without brackets; C{""} is the null sender.
    @ivar recipients: accepted recipients, in RCPT order.
    @ivar size: the declared SIZE parameter, or C{None}.
    @ivar body: the BODY parameter (C{"7BIT"}, C{"8BITMIME"}) or C{None}.
    @ivar smtputf8: C{True} when MAIL carried SMTPUTF8.
    @ivar ret: the DSN RET parameter (C{"FULL"}, C{"HDRS"}) or C{None}.
    @ivar envid: the DSN ENVID parameter (xtext decoded) or C{None}.
    @ivar requireTLS: MAIL carried C{REQUIRETLS} (RFC 8689; taken over TLS only): the
        message may only be relayed over verified TLS to next hops offering REQUIRETLS.
    @ivar utf8Header: for an SMTPUTF8 message, whether a header field of it holds UTF-8
        (noted by the intake): one whose addresses and header are ASCII goes without
        SMTPUTF8 to a server that does not offer it; C{None}: not known (not stored).
    @ivar tlsRequiredNo: the message has a C{TLS-Required: No} header field and MAIL had no
        C{REQUIRETLS} (RFC 8689 4.1): its sender asks that TLS policies (MTA-STS, DANE, a
        route's verified TLS) not stop its delivery.
    @ivar client: the client the message came from.
    @ivar arrival: arrival time, seconds since the epoch (end of DATA).
    @ivar messageSize: size in octets of the stored message (headers we added included).
    @ivar attempts: delivery attempts made for the message.
    @ivar nextAttempt: when the next delivery attempt is due (seconds since the epoch), or
        C{None} for "as soon as possible".
    @ivar delayWarned: a delay warning (DSN action "delayed") was sent.
    @ivar isBounce: this message is a delivery status notification we generated.
    @ivar held: the operator put the message on hold (C{mailrelay queue hold}): it stays
        queued, and is not delivered, until released.  Stored only when true, so that the
        envelopes of mail not on hold keep the form earlier versions read.
    @ivar parameters: the MAIL parameters owned by ESMTP extensions, as they parsed them, by
        parameter name (see L{mailrelay.interfaces.IESMTPExtension}).
    @ivar notes: the transaction's notes: what plugins note about the message for later
        stages, the delivery side included (Haraka's transaction notes), by key (prefix keys
        with the plugin's name); JSON values only, stored with the envelope.
    @ivar noticeOf: for a success notice, the queue id of the message it reports on, whose
        recipients' marks (L{Recipient.noticeID}) name it until they are cleared: it is not
        delivered before (after a crash, the message may still be about to queue it).
        Stored only when set.
    """

    sender: str = ""
    recipients: list[Recipient] = field(default_factory=list)
    queueID: str | None = None
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    requireTLS: bool = False
    tlsRequiredNo: bool = False
    utf8Header: bool | None = None
    client: ClientInfo | None = None
    arrival: float | None = None
    messageSize: int = 0
    attempts: int = 0
    nextAttempt: float | None = None
    delayWarned: bool = False
    isBounce: bool = False
    held: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    noticeOf: str | None = None

    @property
    def pendingRecipients(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def toDict(self) -> dict[str, Any]:
        # Field by field rather than dataclasses.asdict, whose deep copies cost more than the
        # rest of the serialisation (profiled: it is written for every message).
        # (Each object's values in one attrgetter call, not a getattr per field.)
        d = dict(zip(_ENVELOPE_FIELDS, _ENVELOPE_VALUES(self), strict=True))
        d["version"] = ENVELOPE_VERSION
        if not self.held:
            del d["held"]
        if self.utf8Header is None:
            del d["utf8Header"]
        if self.noticeOf is None:
            del d["noticeOf"]
        client = self.client
        if client is not None:
            c = dict(zip(_CLIENT_FIELDS, _CLIENT_VALUES(client), strict=True))
            c["protocol"] = client.protocol
            d["client"] = c
        recipients = []
        for r in self.recipients:
            rd = dict(zip(_RECIPIENT_FIELDS, _RECIPIENT_VALUES(r), strict=True))
            if r.notify is not None:
                rd["notify"] = list(r.notify)
            if r.reason is None:  # (as before it existed: older relays read it)
                del rd["reason"]
            if r.remoteAddress is None:
                del rd["remoteAddress"]
            if r.command is None:
                del rd["command"]
            if r.noticeOwed is None:
                del rd["noticeOwed"], rd["noticeID"]
            recipients.append(rd)
        d["recipients"] = recipients
        return d

    def toJSON(self) -> bytes:
        """Serialise to UTF-8 JSON (stable key order)."""
        return _ENCODER.encode(self.toDict()).encode("utf-8")

    @classmethod
    def fromDict(cls, d: dict[str, Any]) -> Envelope:
        """The envelope L{toDict} made.

        @raise ValueError: C{d} is not such a dict: another version, a missing field, or a
            field of the wrong type (the message names it); a field it does not know (a later
            version's) is skipped.
        """
        if not isinstance(d, dict):
            raise ValueError(f"an envelope is a JSON object, not {_shown(d)}")
        version = d.get("version")
        if version != ENVELOPE_VERSION:
            raise ValueError(f"unsupported envelope version {_shown(version)}")
        d = dict(d)
        d.pop("version")
        client = d.pop("client", None)
        if client is not None:
            client = _fields(client, ClientInfo, _CLIENT_KINDS, "client.")
            client.pop("protocol", None)
            client = ClientInfo(**client)
        recipients = d.pop("recipients", [])
        if not isinstance(recipients, list):
            raise ValueError(f"recipients: {_shown(recipients)} is not a list")
        recipients = [
            Recipient(**_fields(r, Recipient, _RECIPIENT_KINDS, f"recipients[{n}]."))
            for n, r in enumerate(recipients)
        ]
        return cls(client=client, recipients=recipients, **_fields(d, cls, _ENVELOPE_KINDS, ""))

    @classmethod
    def fromJSON(cls, data: bytes) -> Envelope:
        """The envelope L{toJSON} wrote.

        @raise ValueError: C{data} is not such JSON (see L{fromDict}).
        """
        try:
            d = json.loads(data.decode("utf-8"))
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        return cls.fromDict(d)


# -- what plugins may not change --------------------------------------------------------------


#: What a site plugin must leave as it found it (it may change notes): the client's relay
#: permission and login, the envelope's sender and recipients, each recipient's address and
#: DSN parameters.  (Not the client's reverse name: the relay sets it while a connect
#: plugin may be waiting.)
PLUGIN_KEPT = {
    ClientInfo: ("relayAllowed", "authUser"),
    Envelope: ("sender", "recipients"),
    Recipient: ("address", "notify", "orcpt"),
}

#: What L{savePluginKept} saved: C{(object, field, value)}.
SavedFields = list[tuple[Any, str, Any]]


def savePluginKept(args: Sequence[Any]) -> SavedFields:
    """The fields of L{PLUGIN_KEPT} of the client, envelope and recipients among C{args}, or
    held by them (a message filter's context: its C{client} and C{envelope}), lists copied,
    to check and restore after a site plugin."""
    objects: list[Any] = []
    for arg in args:
        held = () if type(arg) in PLUGIN_KEPT else (
            getattr(arg, "client", None), getattr(arg, "envelope", None))
        for obj in (arg, *held):
            if type(obj) in PLUGIN_KEPT and not any(obj is o for o in objects):
                objects.append(obj)
                if isinstance(obj, Envelope):
                    objects.extend(obj.recipients)
    saved: SavedFields = []
    for obj in objects:
        for name in PLUGIN_KEPT[type(obj)]:
            value = getattr(obj, name)
            saved.append((obj, name, list(value) if isinstance(value, list) else value))
    return saved


def undoPluginChanges(saved: SavedFields) -> str | None:
    """What a site plugin changed of C{saved}, undoing it; or C{None}."""
    problem = None
    for obj, name, value in saved:
        current = getattr(obj, name)
        if current != value:
            problem = problem or (f"changed the {type(obj).__name__}'s {name} (only notes may "
                                  "change)")
            if isinstance(value, list) and isinstance(current, list):
                current[:] = value
            else:
                setattr(obj, name, value)
    return problem


def _shown(value: Any) -> str:
    """C{value} for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _isNumber(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: What each stored field may hold, by kind: checked when an envelope is read back, so that
#: a damaged one is refused there (see L{mailrelay.spool.CorruptEntry}), not where a field is
#: used.  A kind ending in "?" also allows C{None}.
_KINDS: dict[str, tuple[str, Any]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "count": ("an integer >= 0", lambda v: _isNumber(v) and isinstance(v, int) and v >= 0),
    "time": ("a finite number", _isNumber),
    "strings": (
        "a list of strings",
        lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
    ),
    "state": (f"one of {', '.join(RECIPIENT_STATES)}", lambda v: v in RECIPIENT_STATES),
    "object": ("a JSON object", lambda v: isinstance(v, dict)),
    "notice": ("delivered or relayed", lambda v: v in ("delivered", "relayed")),
}
_ENVELOPE_KINDS = {
    "sender": "str", "queueID": "str?", "size": "count?", "body": "str?", "smtputf8": "bool",
    "ret": "str?", "envid": "str?", "requireTLS": "bool", "tlsRequiredNo": "bool",
    "utf8Header": "bool?",
    "arrival": "time?", "messageSize": "count",
    "attempts": "count", "nextAttempt": "time?", "delayWarned": "bool", "isBounce": "bool",
    "held": "bool",
    "parameters": "object", "notes": "object", "noticeOf": "str?",
}  # fmt: skip
_CLIENT_KINDS = {
    "address": "str", "port": "count", "rdns": "str?", "helo": "str?", "esmtp": "bool",
    "tls": "str?", "authUser": "str?", "relayAllowed": "bool", "listener": "str",
    "protocol": "str", "notes": "object",
}  # fmt: skip
_RECIPIENT_KINDS = {
    "address": "str", "original": "str", "notify": "strings?", "orcpt": "str?", "state": "state",
    "attempts": "count", "lastResult": "str?", "status": "str?", "remoteMTA": "str?",
    "finalTime": "time?", "parameters": "object", "reason": "str?", "noticeOwed": "notice?",
    "noticeID": "str?", "remoteAddress": "str?", "command": "str?",
}  # fmt: skip


def _fields(d: Any, kind: type, kinds: dict[str, str], where: str) -> dict[str, Any]:
    """The fields of the stored C{kind} C{d} (a JSON object), checked against C{kinds}, as
    keyword arguments for C{kind} (a list of strings made a tuple).

    A field not in C{kinds} is skipped: a later version added it (an operator rolled back
    with mail queued), and what it adds is lost, not the message (Postfix's rule: queue file
    records unknown to a version are skipped, not fatal).

    @raise ValueError: C{d} is not an object, lacks a required field, or has one of the wrong
        type; C{where} prefixes the field's name in the message.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{where[:-1] or kind.__name__}: {_shown(d)} is not a JSON object")
    for f in fields(kind):
        if f.name not in d and f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{where}{f.name}: missing")
    result = {}
    for name, value in d.items():
        spec = kinds.get(name)
        if spec is None:  # a later version's field: skipped, as Postfix skips such records
            continue
        if not (value is None and spec.endswith("?")):
            description, check = _KINDS[spec.rstrip("?")]
            if not check(value):
                raise ValueError(f"{where}{name}: {_shown(value)} is not {description}")
        result[name] = tuple(value) if isinstance(value, list) else value
    return result


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))
_CLIENT_FIELDS = tuple(f.name for f in fields(ClientInfo))
_RECIPIENT_FIELDS = tuple(f.name for f in fields(Recipient))
#: The values of those fields, in their order, in one call (L{Envelope.toDict}).
_ENVELOPE_VALUES = attrgetter(*_ENVELOPE_FIELDS)
_CLIENT_VALUES = attrgetter(*_CLIENT_FIELDS)
_RECIPIENT_VALUES = attrgetter(*_RECIPIENT_FIELDS)
# No indent: only then does json use its C encoder (the pure-Python one cost 0.1 ms per message).
_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(", ", ": "))
