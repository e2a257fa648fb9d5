"""ESMTP extensions as the sans-IO session calls them (L{SessionSettings.extensions
<mailrelay.smtp.server.SessionSettings>}): a site's L{IESMTPExtension} plugin behind an
L{ExtensionAdapter}, which checks what the plugin answers and turns its failures into replies,
logged with its name (the session itself never logs and must never see an exception).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.logger import Logger

from mailrelay.envelope import (
    ClientInfo,
    Envelope,
    Recipient,
    SavedFields,
    savePluginKept,
    undoPluginChanges,
)
from mailrelay.interfaces import Reply
from mailrelay.metrics import (
    PLUGIN_SECONDS,
    boundedAnswer,
    child,
    heldPast,
    heldText,
    timePlugin,
)
from mailrelay.smtp.server import ServerSession

log = Logger()

__all__ = [
    "BUILTIN_KEYWORDS",
    "BUILTIN_MAIL",
    "BUILTIN_RCPT",
    "ExtensionAdapter",
    "checkExtensions",
]

#: The EHLO keywords the relay offers itself, or will (DSN, CHUNKING, BINARYMIME, REQUIRETLS).
BUILTIN_KEYWORDS = frozenset({
    "PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "STARTTLS", "AUTH",
    "DSN", "CHUNKING", "BINARYMIME", "REQUIRETLS",
})  # fmt: skip
#: The MAIL parameters the relay reads itself.
BUILTIN_MAIL = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH", "REQUIRETLS"})
#: The RCPT parameters the relay reads itself.
BUILTIN_RCPT = frozenset({"NOTIFY", "ORCPT"})
#: An EHLO keyword or a parameter name (RFC 5321 4.1.1.1 ehlo-keyword, esmtp-keyword).
_KEYWORD = re.compile(r"[A-Z0-9][A-Z0-9-]*\Z")
#: The commands the session knows (a command of an extension must be none of these).
_SESSION_COMMANDS = frozenset(
    {name[5:] for name in dir(ServerSession) if name.startswith("_cmd_")} | {"LHLO", "BDAT"}
)

#: The hook an extension's calls are timed and logged under (L{timePlugin}).
HOOK = "esmtp"

#: The reply to an extension command whose plugin failed.
COMMAND_FAILED = Reply(451, "4.3.0", "Error: temporary failure, try again later")


def _names(value: Any, what: str, name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (tuple, list, frozenset, set)):
        raise ValueError(
            f"ESMTP extension {name!r}: {what} must be a tuple of names, not {value!r}"
        )
    for item in value:
        if not isinstance(item, str) or not _KEYWORD.match(item):
            raise ValueError(
                f"ESMTP extension {name!r}: {item!r} in {what} is not an upper-case keyword"
            )
    return tuple(value)


class ExtensionAdapter:
    """One ESMTP extension plugin, for the sessions (see L{SessionSettings.extensions
    <mailrelay.smtp.server.SessionSettings>}).

    @ivar name: the plugin's name, for the log.
    @ivar plugin: the L{IESMTPExtension} provider.
    @ivar timeout: seconds one of its commands may take.
    """

    def __init__(self, name: str, plugin: Any, timeout: float, clock: Any) -> None:
        """
        @raise ValueError: its keyword, parameters or commands are not upper-case keywords.
        """
        self.name = name
        self.plugin = plugin
        self.timeout = timeout
        self.clock = clock
        keyword = plugin.keyword
        if not isinstance(keyword, str) or not _KEYWORD.match(keyword):
            raise ValueError(
                f"ESMTP extension {name!r}: keyword {keyword!r} is not an upper-case keyword"
            )
        self.keyword = keyword
        self.mailParameters = _names(plugin.mailParameters, "mailParameters", name)
        self.rcptParameters = _names(plugin.rcptParameters, "rcptParameters", name)
        self.verbs = _names(plugin.verbs, "verbs", name)

    def __repr__(self) -> str:
        return f"<ExtensionAdapter {self.name}: {self.keyword}>"

    def ehloLine(self, client: ClientInfo) -> str | None:
        """The plugin's EHLO line for C{client}, or C{None}: not offered (also when the
        plugin fails or gives a line that is not its keyword and printable ASCII)."""
        saved = savePluginKept((client,))
        started = time.perf_counter()
        try:
            line = self.plugin.ehloLine(client)
        except Exception:
            self._timed("ehloLine", client, started)
            undoPluginChanges(saved)
            log.failure(
                "ESMTP extension {plugin} failed giving its EHLO line to {client}; not offered",
                plugin=self.name,
                client=client.address,
            )
            return None
        self._timed("ehloLine", client, started)
        if self._changed(saved, "giving its EHLO line to", client):
            return None
        if line is None:
            return None
        if (
            not isinstance(line, str)
            or line.split(" ", 1)[0].upper() != self.keyword
            or len(line) > 500
            or not line.isascii()
            or not line.isprintable()
        ):
            log.error(
                "ESMTP extension {plugin} gave the EHLO line {line!r}, not its keyword "
                "{keyword} (and parameters) in printable ASCII; not offered",
                plugin=self.name,
                line=line,
                keyword=self.keyword,
            )
            return None
        return line

    def mailParameter(
        self, client: ClientInfo, envelope: Envelope, name: str, value: str | None
    ) -> Any:
        """What to keep of the MAIL parameter C{name}, or the L{Reply} refusing MAIL."""
        return self._parameter("MAIL", self.plugin.mailParameter, client, envelope, name, value)

    def rcptParameter(
        self,
        client: ClientInfo,
        envelope: Envelope,
        recipient: Recipient,
        name: str,
        value: str | None,
    ) -> Any:
        """What to keep of the RCPT parameter C{name}, or the L{Reply} refusing RCPT."""
        return self._parameter(
            "RCPT", self.plugin.rcptParameter, client, envelope, recipient, name, value
        )

    def _changed(self, saved: SavedFields, doing: str, client: ClientInfo) -> bool:
        """Whether the plugin changed what only the relay may (L{savePluginKept}: the
        client's relay permission and login, the sender, the recipients and their addresses),
        undoing it and logging it (C{doing}: what it was asked, as C{"answering XPRIO
        from"}): relay control has judged the recipient and the client, and a plugin must
        not change its verdict (docs/plugins.md, "Notes")."""
        problem = undoPluginChanges(saved)
        if problem is None:
            return False
        log.error(
            "ESMTP extension {plugin} {problem} {doing} {client}; refusing",
            plugin=self.name,
            problem=problem,
            doing=doing,
            client=client.address,
        )
        return True

    def _timed(self, call: str, client: ClientInfo, started: float) -> None:
        """Time the plugin's synchronous C{call} (L{timePlugin}: also logged when it held
        the reactor), and log it, once, when it held the reactor past the extension's
        timeout, naming the call.
        Its answer is kept: it returned, there is no later answer to refuse (a Deferred's
        after its timeout is refused, and so is a command's answer that held the reactor
        that long, L{command}); refusing it would only add a failure to the wait."""
        held = heldPast(self.timeout, started)
        if held is None:
            timePlugin(HOOK, self.name, None, started)  # (logged past BLOCKING_WARN_SECONDS)
            return
        child(PLUGIN_SECONDS, HOOK, self.name).observe(held)  # (this line says it, once)
        log.warn(
            "ESMTP extension {plugin} held the reactor for {held:.2f}s in {call} for "
            "{client}, past its timeout of {timeout:g}s: every connection of this process "
            "waited; its answer is used (ehloLine and the parameter parsers must answer "
            "from memory: look things up in command, or ahead of time)",
            plugin=self.name,
            held=held,
            call=call,
            client=client.address,
            timeout=self.timeout,
        )

    def _parameter(self, command: str, parse: Any, *args: Any) -> Any:
        name = args[-2]
        client = args[0]
        call = f"{command.lower()}Parameter {name}"
        saved = savePluginKept(args)
        started = time.perf_counter()
        try:
            kept = parse(*args)
        except ValueError as e:
            self._timed(call, client, started)
            undoPluginChanges(saved)
            return Reply(501, "5.5.4", f"Error: bad {name} parameter: {_oneLine(str(e))}")
        except Exception:
            self._timed(call, client, started)
            undoPluginChanges(saved)
            log.failure(
                "ESMTP extension {plugin} failed parsing the {command} parameter {name} of "
                "{client}",
                plugin=self.name,
                command=command,
                name=name,
                client=client.address,
            )
            return COMMAND_FAILED
        self._timed(call, client, started)
        if self._changed(saved, f"parsing {command} parameter {name} of", client):
            return COMMAND_FAILED
        if isinstance(kept, Reply):
            if kept.isPositive:
                log.error(
                    "ESMTP extension {plugin} refused the {command} parameter {name} with the "
                    "positive reply {reply}",
                    plugin=self.name,
                    command=command,
                    name=name,
                    reply=str(kept),
                )
                return COMMAND_FAILED
            return kept
        try:
            json.dumps(kept, allow_nan=False)
        except (TypeError, ValueError) as e:
            log.error(
                "ESMTP extension {plugin} parsed the {command} parameter {name} into "
                "{kept!r}, which is not JSON ({error}); refusing",
                plugin=self.name,
                command=command,
                name=name,
                kept=kept,
                error=str(e),
            )
            return COMMAND_FAILED
        return kept

    def command(
        self, client: ClientInfo, envelope: Envelope | None, verb: str, argument: str
    ) -> Deferred[Reply]:
        """The reply to the extension's command C{verb}: the plugin's, or C{451 4.3.0} when it
        fails, answers something else or does not answer within the timeout (also when its
        call held the reactor past the timeout, so that the timer could not fire, and then
        answered: that answer came too late, and is not believed).  Its time is counted in
        C{mailrelay_plugin_seconds} (hook C{esmtp}), and a call that held the reactor is
        logged (L{timePlugin}), as every hook's."""
        about: dict[str, Any] = {"plugin": self.name, "verb": verb, "client": client.address}
        saved = savePluginKept((client, envelope))
        started = time.perf_counter()
        d: Deferred[Any] = maybeDeferred(self.plugin.command, client, envelope, verb, argument)
        d, held = boundedAnswer(d, self.timeout, self.clock, started)
        if held is None:  # (timed when it answers, or its timeout gives it up)
            timePlugin(HOOK, self.name, d, started)
        else:  # (the timeout's line below says it held the reactor, once)
            child(PLUGIN_SECONDS, HOOK, self.name).observe(held)

        def answered(reply: Any) -> Reply:
            if self._changed(saved, f"answering {verb} from", client):
                return COMMAND_FAILED
            if isinstance(reply, Reply) and reply.code != 221 and not 300 <= reply.code < 400:
                return reply
            if isinstance(reply, Reply):
                # (A 3xx asks the client for more, which the session would take as commands;
                # after a 221 the client takes the connection as closing, and it is not.)
                log.error(
                    "ESMTP extension {plugin} answered {verb} from {client} with {reply}, not "
                    "a final reply (2xx but 221, 4xx, 5xx)",
                    reply=str(reply),
                    **about,
                )
                return COMMAND_FAILED
            log.error(
                "ESMTP extension {plugin} answered {reply!r} to {verb} from {client}, not a "
                "Reply",
                reply=reply,
                **about,
            )
            return COMMAND_FAILED

        def failed(failure: Any) -> Reply:
            undoPluginChanges(saved)
            if failure.check(TimeoutError):
                log.warn(
                    "ESMTP extension {plugin} did not answer {verb} from {client} within "
                    "{timeout:g}s{held}",
                    timeout=self.timeout,
                    held=heldText(held),
                    **about,
                )
            else:
                log.failure(
                    "ESMTP extension {plugin} failed answering {verb} from {client}",
                    failure,
                    **about,
                )
            return COMMAND_FAILED

        return d.addCallbacks(answered, failed)


def _oneLine(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:200]


def checkExtensions(adapters: Sequence[ExtensionAdapter]) -> None:
    """Refuse extensions whose keyword, parameters or commands are the relay's own or
    another's.

    @raise ValueError: naming the extension and what it takes.
    """
    taken: dict[str, dict[str, str]] = {
        "keyword": dict.fromkeys(BUILTIN_KEYWORDS, "the relay"),
        "MAIL parameter": dict.fromkeys(BUILTIN_MAIL, "the relay"),
        "RCPT parameter": dict.fromkeys(BUILTIN_RCPT, "the relay"),
        "command": dict.fromkeys(_SESSION_COMMANDS, "the relay"),
    }
    for adapter in adapters:
        for what, names in (
            ("keyword", (adapter.keyword,)),
            ("MAIL parameter", adapter.mailParameters),
            ("RCPT parameter", adapter.rcptParameters),
            ("command", adapter.verbs),
        ):
            for name in names:
                owner = taken[what].get(name)
                if owner is not None:
                    raise ValueError(
                        f"ESMTP extension {adapter.name!r}: the {what} {name} is already "
                        f"{owner}'s"
                    )
                taken[what][name] = f"ESMTP extension {adapter.name!r}"
