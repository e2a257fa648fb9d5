"""A site's plugins, one for each hook, as docs/plugins.md shows them (it quotes this file;
tests/test_docs_plugins.py checks that the quotes stay verbatim).  They run in the real
C{twistd -n mailrelay} in tests/test_e2e_hooks.py, found on PYTHONPATH through the dropin
C{twisted/plugins/sitehooks_plugin.py}, and without sockets in
tests/test_example_sitehooks.py.

What the observers see is written to the file of their C{log} option, one JSON object per
line, so that the tests can read what happened inside the relay's (and the delivery
process's) plugins.  See README.md beside this file.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.application.service import Service
from zope.interface import implementer

from mailrelay.config.schema import Key, pluginOptions
from mailrelay.config.values import fileName, nonEmpty, strings
from mailrelay.interfaces import (
    CONTINUE,
    FilterResult,
    IConnectionPolicy,
    IDataPolicy,
    IDeliveryObserver,
    IESMTPExtension,
    IHeaderStamper,
    IMessageFilter,
    IQueueObserver,
    ISenderValidator,
    Reply,
    StampResult,
    Verdict,
)


class Log:
    """Appends one JSON object per line to a file (from any process)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, **event: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), **event}) + "\n")


LOG = Key("log", fileName, "The file events are written to.", required="is required")


@implementer(IConnectionPolicy)
class Gate:
    """Refuses listed clients at connect and bad names at HELO; notes who connected."""

    def __init__(self, options: Any) -> None:
        self.reject = options.reject or ()
        self.badHelo = options.badHelo or ()

    def checkConnect(self, client: Any) -> Verdict:
        if client.address in self.reject:
            return Verdict.reject(f"Error: {client.address} is listed", 554, "5.7.1")
        client.notes["gate"] = {"connected": client.address}
        return CONTINUE

    def checkHelo(self, client: Any, name: str) -> Verdict:
        if name in self.badHelo:
            return Verdict.reject(f"Error: HELO {name} refused", 550, "5.7.1")
        return CONTINUE


def buildGate(options: dict[str, Any], context: Any) -> Gate:
    schema = pluginOptions(
        Key("reject", strings, "Client addresses refused at connect."),
        Key("bad_helo", strings, "HELO names refused."),
    )
    return Gate(context.readOptions(schema, options))


@implementer(ISenderValidator)
class Senders:
    """Refuses some senders at MAIL; notes that the sender was checked."""

    def __init__(self, refused: tuple[str, ...]) -> None:
        self.refused = refused

    def validateSender(self, client: Any, envelope: Any) -> Verdict:
        if envelope.sender in self.refused:
            return Verdict.reject("Error: sender refused by site policy", 550, "5.7.1")
        envelope.notes["senders"] = "checked"
        return CONTINUE


def buildSenders(options: dict[str, Any], context: Any) -> Senders:
    schema = pluginOptions(Key("reject", strings, "Senders refused.", default=[]))
    return Senders(context.readOptions(schema, options).reject)


@implementer(IDataPolicy, IDeliveryObserver)
class Grey(Service):
    """Greylisting at DATA (each sender deferred once), told of deliveries, and a service
    (its start and stop logged)."""

    def __init__(self, log: Log, seen: set[str], name: str) -> None:
        self.log = log
        self.seen = seen
        self.setName(name)

    def checkData(self, client: Any, envelope: Any) -> Verdict:
        if envelope.sender not in self.seen:
            self.seen.add(envelope.sender)
            return Verdict.defer("Greylisted, try again later", 451, "4.7.1")
        return CONTINUE

    def deliveryAttempted(self, event: Any) -> None:
        self.log.write(hook="delivery", rcpt=event.recipient.address, outcome=event.outcome,
                       notes=event.envelope.notes)

    def startService(self) -> None:
        super().startService()
        self.log.write(hook="service", event="start", name=self.name)

    def stopService(self) -> None:
        super().stopService()
        self.log.write(hook="service", event="stop", name=self.name)


def buildGrey(options: dict[str, Any], context: Any) -> Grey:
    schema = pluginOptions(LOG, Key("name", nonEmpty("a name"), "The service's name."))
    read = context.readOptions(schema, options)
    seen = context.keep("site-grey:seen", set)  # survives reloads
    return Grey(Log(read.log), seen, read.name or "grey")


@implementer(IMessageFilter)
class Filter:
    """Reads the whole message: refuses it when it contains a word, else adds a field."""

    def __init__(self, word: str) -> None:
        self.word = word.encode()

    def filterMessage(self, context: Any) -> Any:
        def judge(message: bytes) -> Any:
            if self.word in message:
                return Verdict.reject("Error: message refused by content filter", 554, "5.7.1")
            context.envelope.notes["filter"] = {"size": len(message)}
            field = f"X-Site-Filter: checked {len(message)} octets\r\n".encode()
            return FilterResult(prepend=(field,))

        return context.read().addCallback(judge)


def buildFilter(options: dict[str, Any], context: Any) -> Filter:
    schema = pluginOptions(Key("reject_word", nonEmpty("a word"), "Refuse messages with it."))
    return Filter(context.readOptions(schema, options).rejectWord or "VIRUS")


@implementer(IQueueObserver, IDeliveryObserver)
class Observer:
    """Logs each message queued and each delivery attempt (it never delays mail)."""

    def __init__(self, log: Log) -> None:
        self.log = log

    def messageQueued(self, envelope: Any) -> None:
        self.log.write(hook="queue", queueID=envelope.queueID, bounce=envelope.isBounce,
                       notes=envelope.notes, client=envelope.client and envelope.client.notes)

    def deliveryAttempted(self, event: Any) -> None:
        self.log.write(hook="delivery", queueID=event.envelope.queueID,
                       rcpt=event.recipient.address, outcome=event.outcome)


def buildObserver(options: dict[str, Any], context: Any) -> Observer:
    return Observer(Log(context.readOptions(pluginOptions(LOG), options).log))


@implementer(IESMTPExtension)
class Extension:
    """The XSITE extension: the MAIL parameter XSITE-TAG and the command XSITE."""

    keyword = "XSITE"
    mailParameters = ("XSITE-TAG",)
    rcptParameters = ()
    verbs = ("XSITE",)

    def ehloLine(self, client: Any) -> str:
        return "XSITE TAG"

    def mailParameter(self, client: Any, envelope: Any, name: str, value: str | None) -> Any:
        if not value or not value.isalnum():
            raise ValueError("a tag is letters and digits")
        return value.lower()

    def rcptParameter(self, *args: Any) -> Any:  # pragma: no cover - owns none
        raise ValueError("no RCPT parameters")

    def command(self, client: Any, envelope: Any, verb: str, argument: str) -> Reply:
        gate = client.notes.get("gate", {})
        return Reply(250, "2.0.0", f"site says hello to {gate.get('connected', '?')}")


def buildExtension(options: dict[str, Any], context: Any) -> Extension:
    context.readOptions(pluginOptions(), options)
    return Extension()


@implementer(IHeaderStamper)
class Stamp:
    """Adds the client's address and name to each message received (none to the relay's
    own messages, which have no client)."""

    def stamp(self, context: Any) -> StampResult:
        client = context.client
        if client is None:
            return StampResult()
        name = client.rdns or "unknown"
        return StampResult(append=[f"X-Site-Client: {name} [{client.address}]\r\n".encode()])


def buildStamp(options: dict[str, Any], context: Any) -> Stamp:
    context.readOptions(pluginOptions(), options)  # no options: any key is refused
    return Stamp()


def buildBroken(options: dict[str, Any], context: Any) -> Any:
    raise RuntimeError("cannot reach the policy server at 192.0.2.99")
