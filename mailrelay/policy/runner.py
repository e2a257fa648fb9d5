"""The policy chain runner: one hook's plugins asked in order, for every verdict hook.

A L{PolicyChain} holds the plugins serving one hook (connect, HELO, MAIL, RCPT, DATA, the
message filters at the end of data), each a L{ConfiguredPlugin} with its name and timeout,
and runs them as L{mailrelay.interfaces.IRecipientValidator} describes for every verdict
hook:

  - in the configured order, one at a time, each asked only when those before it continued;
  - the first verdict other than C{CONTINUE} decides (C{ACCEPT} ends the chain passing);
  - a plugin that raises, whose Deferred fails, that answers something that is not a
    well-formed verdict, that leaves notes which are not JSON, that changes what it may only
    read (the sender, the recipients, a recipient's address, the client's relay permission:
    undone), or that does not answer within
    its timeout (its Deferred is then cancelled; a call that held the reactor past its
    timeout, whose timer could not fire, answered too late as well) makes the chain
    answer its C{failed}
    verdict (a deferral): a failing plugin never accepts.  Each such failure is logged once,
    naming the hook and the plugin.

Plugins answering at once cost no Deferred of their own and no timer: a timeout is only set
on an answer that is still to come.  A chain with no plugins answers C{CONTINUE} at once.

The relay's own checks that are part of a stage (the MAIL stage's sender binding, message
rates and free space: L{mailrelay.policy.sender}) are plugins of the same chains, built in
and first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.envelope import (
    ClientInfo,
    Envelope,
    SavedFields,
    savePluginKept,
    undoPluginChanges,
)
from mailrelay.interfaces import (
    CONTINUE,
    BadAnswer,
    ConfiguredPlugin,
    Verdict,
    VerdictKind,
    checkVerdict,
)
from mailrelay.metrics import dropAnswer, heldPast, heldText, timePlugin

log = Logger()

__all__ = ["BadAnswer", "ConfiguredPlugin", "PolicyChain", "checkVerdict"]  # (three are values)

def _notesProblem(args: Sequence[Any]) -> str | None:
    """Why the notes of the client or envelope among C{args} cannot be stored, or C{None}."""
    for arg in args:
        notes = arg.notes if isinstance(arg, (ClientInfo, Envelope)) else None
        if notes:
            try:
                json.dumps(notes, allow_nan=False)
            except (TypeError, ValueError) as e:
                return f"left {type(arg).__name__} notes that are not JSON: {e}"
    return None


class PolicyChain:
    """The plugins serving one hook, run as the module docstring says.

    @ivar hook: the hook's name (C{"rcpt"}), for the log.
    @ivar plugins: the L{ConfiguredPlugin}s, in order.
    """

    def __init__(
        self,
        hook: str,
        method: str,
        plugins: Sequence[ConfiguredPlugin],
        clock: IReactorTime,
        failed: Verdict,
        interpret: Callable[[Any, Sequence[Any]], Verdict] | None = None,
    ) -> None:
        """
        @param method: the method of the plugins the chain calls, with the arguments of
            L{run}.
        @param clock: for the timeouts.
        @param failed: the chain's answer when a plugin fails (a deferral).
        @param interpret: C{interpret(answer, args)}: the L{Verdict} a plugin's answer means
            (raising L{BadAnswer} for one the hook does not take); by default the answer
            itself, checked by L{checkVerdict}.
        @raise TypeError: a plugin lacks the method, or one has a timeout and there is no
            C{clock}.
        @raise ValueError: a timeout that is neither C{None} nor a number > 0.
        """
        for configured in plugins:
            if not callable(getattr(configured.plugin, method, None)):
                raise TypeError(f"{hook} plugin {configured.name!r} has no method {method}()")
            timeout = configured.timeout
            if timeout is not None and (
                isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
            ):
                raise ValueError(
                    f"the timeout of {hook} plugin {configured.name!r} must be > 0, "
                    f"not {timeout!r}"
                )
            if timeout is not None and clock is None:
                raise TypeError(f"{hook} plugin {configured.name!r} has a timeout: give a clock")
        self.hook = hook
        self.method = method
        self.plugins = tuple(plugins)
        self.clock = clock
        self.failed = failed
        self._interpret = interpret or (lambda answer, args: checkVerdict(answer))
        self._calls = tuple(getattr(c.plugin, method) for c in self.plugins)

    def __len__(self) -> int:
        return len(self.plugins)

    def __repr__(self) -> str:
        return f"<PolicyChain {self.hook}: {', '.join(c.name for c in self.plugins) or '-'}>"

    def run(self, *args: Any, subject: str = "") -> Deferred[Verdict]:
        """Ask the plugins, in order, about C{args} (the hook method's arguments).

        @param subject: what is judged, for the log (a client address, a recipient).
        @return: a Deferred firing with the deciding verdict, C{CONTINUE} when every plugin
            continued, or the chain's C{failed} verdict; it never fails.  Cancelling it
            cancels the plugin being waited for (the chain then answers C{failed}).
        """
        result = self._from(0, args, subject)
        return result if isinstance(result, Deferred) else succeed(result)

    def _from(self, index: int, args: tuple[Any, ...], subject: str) -> Verdict | Deferred[Verdict]:
        """Run the plugins from C{index} on: the verdict, or a Deferred of it when a plugin
        answers later."""
        calls = self._calls
        while index < len(calls):
            configured = self.plugins[index]
            saved = None if configured.builtin else savePluginKept(args)
            started = perf_counter()
            try:
                answer = calls[index](*args)
            except Exception:
                if saved:
                    undoPluginChanges(saved)
                return self._failed(Failure(), index, subject)
            if not configured.builtin:
                answer = timePlugin(self.hook, configured.name, answer, started)
            held = heldPast(configured.timeout, started)
            if held is not None:  # (answered after its timeout: not believed)
                dropAnswer(answer)
                if saved:
                    undoPluginChanges(saved)
                return self._failed(Failure(TimeoutError()), index, subject, held)
            if isinstance(answer, Deferred):
                return self._later(index, answer, args, subject, saved)
            verdict = self._judge(index, answer, args, subject, saved)
            if verdict.kind is not VerdictKind.CONTINUE:
                return verdict
            index += 1
        return CONTINUE

    def _judge(
        self, index: int, answer: Any, args: tuple[Any, ...], subject: str,
        saved: SavedFields | None = None,
    ) -> Verdict:
        """The verdict C{answer} of plugin C{index} means, or C{failed} (logged).  C{saved}:
        what a site plugin must not have changed (L{savePluginKept})."""
        configured = self.plugins[index]
        changed = undoPluginChanges(saved) if saved else None
        try:
            verdict = self._interpret(answer, args)
            problem = changed or (None if configured.builtin else _notesProblem(args))
        except BadAnswer as e:
            problem = changed or str(e)
        if problem is not None:
            log.error(
                "{hook} plugin {plugin} {problem} for {subject}; deferring",
                hook=self.hook,
                plugin=configured.name,
                problem=problem,
                subject=subject,
            )
            return self.failed
        return verdict

    def _later(
        self, index: int, d: Deferred[Any], args: tuple[Any, ...], subject: str,
        saved: SavedFields | None = None,
    ) -> Deferred[Verdict]:
        timeout = self.plugins[index].timeout
        if timeout is not None:
            d.addTimeout(timeout, self.clock)

        def answered(answer: Any) -> Verdict | Deferred[Verdict]:
            verdict = self._judge(index, answer, args, subject, saved)
            if verdict.kind is not VerdictKind.CONTINUE:
                return verdict
            return self._from(index + 1, args, subject)

        def failed(failure: Failure) -> Verdict:
            if saved:
                undoPluginChanges(saved)
            return self._failed(failure, index, subject)

        return d.addCallbacks(answered, failed)

    def _failed(
        self, failure: Failure, index: int, subject: str, held: float | None = None
    ) -> Verdict:
        """Log the failure of plugin C{index} and answer C{failed}.  C{held}: how long its
        call held the reactor, when that was past its timeout."""
        configured = self.plugins[index]
        about: dict[str, Any] = {"hook": self.hook, "plugin": configured.name, "subject": subject}
        if failure.check(TimeoutError):
            log.warn(
                "{hook} plugin {plugin} did not answer within {timeout:g}s for {subject}; "
                "deferring{held}",
                timeout=configured.timeout,
                held=heldText(held),
                **about,
            )
        elif failure.check(CancelledError):
            log.info("{hook} plugin {plugin} cancelled for {subject}", **about)
        else:
            log.failure("{hook} plugin {plugin} failed for {subject}; deferring", failure, **about)
        return self.failed
