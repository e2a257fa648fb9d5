"""The queue's commands on the control channel, in Twisted's AMP.

The C{mailrelay} command sends them to the relay over its control socket; the relay
answers them itself when the queue manager runs in its process, and forwards them to the
delivery process otherwise, over an AMP connection of their own (a socket pair: see
L{mailrelay.queue.process}).  Both ends answer with the same L{QueueLocator}, which hands
each command to a L{QueueControl} method (L{QUEUE_COMMANDS}); a command's answer is one JSON
value, C{result} (see each method), and its errors are L{ERRORS}.

AMP limits a value to 65,535 octets; a L{JSON} argument is split over as many values as it
needs, so that a long listing or a message's header section fits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.protocols import amp

from mailrelay.errors import SpoolError
from mailrelay.queue.control import (
    BadRequest,
    NotPermitted,
    QueueControl,
    QueueUnavailable,
    UnknownEntry,
)

__all__ = [
    "ERRORS",
    "JSON",
    "QUEUE_COMMANDS",
    "READ_ONLY",
    "RESULT",
    "QueueBounce",
    "QueueDelete",
    "QueueFlush",
    "QueueHold",
    "QueueList",
    "QueueLocator",
    "QuietAMP",
    "QueueRelease",
    "QueueShow",
    "QueueStatus",
    "QueueSummary",
    "callControl",
    "makeCommand",
]

#: The octets of one AMP value a L{JSON} argument puts in each part.
_PART = 60000


class JSON(amp.Argument):
    """Any JSON value, as UTF-8, split over values C{name}, C{name.1}, C{name.2}...: the
    first part holds the number of the others, then its share."""

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value = self.retrieve(objects, amp._wireNameToPythonIdentifier(name), proto)
        data = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        parts = [data[i : i + _PART] for i in range(0, len(data), _PART)] or [b""]
        strings[name] = str(len(parts) - 1).encode("ascii") + b":" + parts[0]
        for n, part in enumerate(parts[1:], 1):
            strings[name + b"." + str(n).encode("ascii")] = part

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        head = self.retrieve(strings, name, proto)
        count, _, first = head.partition(b":")
        parts = [first]
        for n in range(1, int(count) + 1):
            parts.append(strings.pop(name + b"." + str(n).encode("ascii")))
        objects[amp._wireNameToPythonIdentifier(name)] = json.loads(b"".join(parts))


#: The errors of every queue command: the exception travels with its message.
ERRORS: dict[type[Exception], bytes] = {
    QueueUnavailable: b"QUEUE_UNAVAILABLE",
    UnknownEntry: b"UNKNOWN_ENTRY",
    BadRequest: b"BAD_REQUEST",
    NotPermitted: b"NOT_PERMITTED",
    SpoolError: b"SPOOL_ERROR",
}

#: The response of every command: one JSON value.
RESULT: list[tuple[bytes, amp.Argument]] = [(b"result", JSON())]
_IDS: tuple[bytes, amp.Argument] = (b"ids", amp.ListOf(amp.Unicode()))
_ALL: tuple[bytes, amp.Argument] = (b"all_entries", amp.Boolean())


def makeCommand(
    name: bytes,
    doc: str,
    *arguments: tuple[bytes, amp.Argument],
    errors: dict[type[Exception], bytes] | None = None,
) -> type[amp.Command]:
    """An AMP command called C{name}, taking C{arguments} and answering L{RESULT}."""
    return type(
        name.decode("ascii").title().replace("-", ""),
        (amp.Command,),
        {
            "__doc__": doc,
            "commandName": name,
            "arguments": list(arguments),
            "response": RESULT,
            "errors": dict(errors if errors is not None else ERRORS),
        },
    )


#: The most entries of the queue a page of L{QueueList} holds for the users that may only
#: list the queue (L{mailrelay.app.control}), and the pages the C{mailrelay} command asks.
LIST_PAGE = 2000

QueueList = makeCommand(
    b"queue-list",
    "A page of the queue (L{QueueControl.entries}).",
    (b"cursor", amp.Unicode(optional=True)),
    (b"limit", amp.Integer()),
)
QueueShow = makeCommand(
    b"queue-show",
    "One entry, its envelope and header section (L{QueueControl.show}).",
    (b"queueID", amp.Unicode()),
    (b"body", amp.Boolean()),
)
QueueSummary = makeCommand(
    b"queue-summary",
    "Messages by domain and age (L{QueueControl.summary}).",
    (b"senders", amp.Boolean()),
    (b"states", amp.ListOf(amp.Unicode())),
)
QueueStatus = makeCommand(
    b"queue-status", "The queue manager's state and the queue's size (L{QueueControl.status})."
)
QueueHold = makeCommand(
    b"queue-hold", "Put entries on hold (L{QueueControl.hold}).", _IDS, _ALL
)
QueueRelease = makeCommand(
    b"queue-release",
    "Release entries from hold (L{QueueControl.release}).",
    _IDS,
    _ALL,
)
QueueFlush = makeCommand(
    b"queue-flush",
    "Attempt entries now (L{QueueControl.flush}).",
    _IDS,
    (b"domain", amp.Unicode(optional=True)),
)
QueueDelete = makeCommand(
    b"queue-delete",
    "Delete entries (L{QueueControl.delete}).",
    _IDS,
    (b"all_deferred", amp.Boolean()),
)
QueueBounce = makeCommand(
    b"queue-bounce", "Return entries to their senders (L{QueueControl.bounce}).", _IDS
)


#: Each queue command and the L{QueueControl} method that answers it.
QUEUE_COMMANDS: dict[type[amp.Command], str] = {
    QueueList: "entries",
    QueueShow: "show",
    QueueSummary: "summary",
    QueueStatus: "status",
    QueueHold: "hold",
    QueueRelease: "release",
    QueueFlush: "flush",
    QueueDelete: "delete",
    QueueBounce: "bounce",
}


#: The queue commands that only read the queue.
READ_ONLY = frozenset({QueueList, QueueShow, QueueSummary, QueueStatus})


def callControl(
    control: QueueControl, command: type[amp.Command], arguments: dict[str, Any]
) -> Deferred[Any]:
    """The C{result} of C{command} with C{arguments} (as AMP decodes them), answered by
    C{control}."""
    method = getattr(control, QUEUE_COMMANDS[command])
    return maybeDeferred(lambda: Deferred.fromCoroutine(method(**arguments)))


def _responder(command: type[amp.Command]) -> Callable[..., Deferred[dict[str, Any]]]:
    def respond(self: QueueLocator, **arguments: Any) -> Deferred[dict[str, Any]]:
        return self.queueCommand(command, arguments).addCallback(lambda r: {"result": r})

    respond.__name__ = QUEUE_COMMANDS[command]
    return command.responder(respond)


class QuietAMP(amp.AMP):
    """AMP without its log lines for each connection made and lost (a control command is
    one connection: the commands that change something log what they do)."""

    def makeConnection(self, transport: Any) -> None:
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Any = None) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None  # type: ignore[assignment]


class QueueLocator(amp.CommandLocator):
    """Answers the queue commands with L{queueCommand}."""

    def queueCommand(
        self, command: type[amp.Command], arguments: dict[str, Any]
    ) -> Deferred[Any]:
        """The C{result} of C{command} with C{arguments}.  Override."""
        raise NotImplementedError

    queueList = _responder(QueueList)
    queueShow = _responder(QueueShow)
    queueSummary = _responder(QueueSummary)
    queueStatus = _responder(QueueStatus)
    queueHold = _responder(QueueHold)
    queueRelease = _responder(QueueRelease)
    queueFlush = _responder(QueueFlush)
    queueDelete = _responder(QueueDelete)
    queueBounce = _responder(QueueBounce)


class ControlLocator(QueueLocator):
    """Answers the queue commands with a L{QueueControl} (the delivery process's side)."""

    def __init__(self, control: QueueControl) -> None:
        self.control = control

    def queueCommand(
        self, command: type[amp.Command], arguments: dict[str, Any]
    ) -> Deferred[Any]:
        return callControl(self.control, command, arguments)
