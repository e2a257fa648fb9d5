"""The relay process: from a L{Config} to the running services (spool, control socket,
delivery, sessions, listeners), and a reload on SIGHUP (or the control socket's C{reload})."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailrelay.address import hostPort
from mailrelay.app.delivery import InlineDelivery, makeDelivery, makeSpool
from mailrelay.app.listeners import (
    ListenError,
    ListenerService,
    SessionsService,
    _Carried,
    makeListeners,
)
from mailrelay.app.loadedcode import LoadedCode, describeChanged
from mailrelay.app.logs import LevelFilter, installTwistdObserver
from mailrelay.app.plugins import availablePlugins, pluginBuilder
from mailrelay.app.services import OrderedMultiService, PluginServices, PluginStartError
from mailrelay.config import Config, loadConfig, overriddenKeys, readConfigFile
from mailrelay.config.checks import postmasterHasNowhereToGo, sendersRoutingPostmaster
from mailrelay.config.plugins import buildHooks, makeContext
from mailrelay.config.schema import given
from mailrelay.config.values import resolveProcessCount
from mailrelay.endpoints import socketKey
from mailrelay.errors import ConfigError
from mailrelay.metrics import ProcessMetrics
from mailrelay.receive.protocol import Sessions
from mailrelay.spool import Spool

__all__ = ["RelayService", "makeRelayService"]

log = Logger()


#: Settings a reload cannot change: the running relay keeps them until it is restarted.
_RESTART_ONLY = (
    ("spoolDirectory", "spool.directory"),
    ("spoolSync", "spool.sync"),
    ("metricsListen", "metrics.listen"),
    ("forkChildren", "relay.fork_children"),
)


@dataclass
class _Plan:
    """A configuration built and checked, ready to run."""

    config: Config
    configText: bytes | None
    #: C{(endpoint, factory, role)} of each listener, in the configuration's order.
    listeners: list[tuple[str, Any, str]]
    #: The delivery side's services and queue manager (built in every mode: this checks the
    #: routes and backends).
    delivery: tuple[list[Any], Any]
    #: The plugin objects that are services, with their names, in order.
    services: tuple[tuple[str, Any], ...] = ()
    #: The AUTH throttle its listeners count in (the acceptor processes' too), or C{None}.
    throttle: Any = None
    #: The limiter its listeners count in, the acceptor processes' too (C{None} with a
    #: C{[rate_limiter]} plugin: each process has its own instance).
    limiter: Any = None
    #: What the next reload carries over once this configuration runs (L{_Carried.copy}).
    carried: _Carried = field(default_factory=_Carried)


def _sayBounceLifetimeLowered(config: Config) -> None:
    """Say when C{[queue] bounce_lifetime} is larger than C{max_lifetime}: the queue uses
    C{max_lifetime} for mail from the null sender (L{QueuePolicy.lifetime
    <mailrelay.queue.policy.QueuePolicy.lifetime>}), as Postfix's qmgr warns that
    C{bounce_queue_lifetime} is larger than C{maximal_queue_lifetime} and adjusts it."""
    queue = config.queue
    if queue.bounceLifetime > queue.maxLifetime:
        log.warn(
            "{source}: queue.bounce_lifetime ({bounceLifetime:g}) is larger than "
            "queue.max_lifetime ({maxLifetime:g}): mail from the null sender expires after "
            "max_lifetime",
            source=config.source or "(embedded default)",
            bounceLifetime=queue.bounceLifetime,
            maxLifetime=queue.maxLifetime,
        )


def _sayWherePostmasterMailGoes(config: Config) -> None:
    """Say when mail to postmaster at the relay's host name has nowhere to go (no C{[queue]
    postmaster}, the name routed only by its MX lookup, but for the senders whose sender
    route takes it): it is refused (L{RelayControl <mailrelay.policy.chain.RelayControl>}),
    and the bounces that cannot be returned are dropped.  Postfix delivers both locally
    (postmaster@$myhostname, and C{2bounce_notice_recipient}, to the person its aliases
    name)."""
    if postmasterHasNowhereToGo(config):
        senders = sendersRoutingPostmaster(config)
        log.warn(
            "{source}: queue.postmaster is not set and nothing routes {hostname} but its MX "
            "lookup (normally this relay: a loop): mail to postmaster@{hostname} (and "
            "<postmaster>) is refused (550 5.1.1){but}, and bounces that cannot be returned "
            "are logged and dropped; set [queue] postmaster to a mailbox elsewhere, or route "
            "{hostname} ([[routes]], a smarthost)",
            source=config.source or "(embedded default)",
            hostname=config.hostname,
            but=f" but from the senders of [[sender_routes]] that route it ({', '.join(senders)})"
            if senders else "",
        )


class RelayService(OrderedMultiService):
    """The whole relay: the spool, the plugins that are services, the delivery side, the
    sessions and the listeners, started in that order and stopped in the reverse one (see
    L{OrderedMultiService}).

    L{reload} (on SIGHUP) re-reads the configuration file, builds and checks everything,
    and only then replaces what runs; if anything is wrong the relay keeps running as it was.
    """

    def __init__(
        self,
        reactor: Any,
        configPath: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.configPath = configPath
        self.overrides = dict(overrides or {})
        #: The names of L{overrides} the command line did not give: defaults made absolute
        #: once (L{mailrelay.app.tap.Options.pinnedOverrides}).
        self.pinned: frozenset[str] = frozenset()
        self.sessions = Sessions()
        self.carried = _Carried()
        self.config: Config | None = None
        #: The AUTH throttle and limiter of the running configuration (L{_Plan}).
        self.throttle: Any = None
        self.limiter: Any = None
        self.spool: Spool | None = None
        self.delivery: Any = None
        #: The acceptor processes (L{mailrelay.app.acceptors.AcceptorPool}).
        self.acceptors: Any = None
        #: C{(uid, gid)} twistd runs the relay as after its privileged start, or C{None}.
        self.runAs: tuple[int, int] | None = None
        #: The metrics of the child processes (delivery and acceptors), as they report them.
        self.childMetrics = ProcessMetrics()
        self.listeners: dict[str, ListenerService] = {}
        self._sessionsService: SessionsService | None = None
        self.control: Any = None
        #: Why the last reload did not take (C{None} after one that did).
        self.reloadError: str | None = None
        #: The files of the modules loaded at start-up (L{LoadedCode}; set by C{twistd
        #: mailrelay} once it has built us), or C{None}: nothing to compare.
        self.loadedCode: LoadedCode | None = None
        #: The files of the modules the fork server had loaded, which the children it forks
        #: share (a site's plugin modules are not among them); C{None}: the children are
        #: new processes, which load everything anew.
        self.forkedCode: frozenset[str] | None = None
        #: What the last reload warned of (the code changed since the start), or C{None}.
        self.reloadWarning: str | None = None
        #: The listeners the acceptor processes cannot share (logged once).
        self._unshared: set[str] = set()
        self._queueControl: Any = None
        self.plugins = PluginServices()
        #: What plugins keep across reloads (L{mailrelay.interfaces.PluginContext.keep}).
        self.kept: dict[str, Any] = {}
        #: The log level filter (C{[log] level}), changed by a reload.
        self.logLevels = LevelFilter()
        #: twistd's options (C{ServerOptions}), when twistd runs us: see L{setServiceParent}.
        self.twistdOptions: Any = None
        #: A copy of the standard error of the command that ran a daemonizing twistd (whose
        #: own is /dev/null once it daemonized), until the relay has started: a start that
        #: fails writes its whole message there (L{_failedStart}).
        self.startErrors: int | None = None
        #: The notifications to systemd (L{mailrelay.app.systemd.Notifier}), when twistd
        #: runs us.
        self.systemd: Any = None
        #: What starts the child processes (L{mailrelay.app.forkserver.ForkServer}), or
        #: C{None}: the reactor (C{spawnProcess}).
        self.spawner: Any = None

    def setServiceParent(self, parent: Any) -> None:
        """Under twistd, C{parent} is the application, whose logging has not begun: give it
        twistd's own observer behind L{logLevels} (see L{installTwistdObserver})."""
        if self.twistdOptions is not None:
            installTwistdObserver(parent, self.twistdOptions, self.logLevels)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        options = getattr(self, "twistdOptions", None) or {}
        logfile = options.get("logfile")
        if self.runAs is not None and logfile and logfile != "-" and not options.get("syslog"):
            from mailrelay.app.logs import giveLogFile

            giveLogFile(logfile, *self.runAs)
        if self.runAs is not None and options.get("pidfile"):
            from mailrelay.app.logs import checkPidFile

            checkPidFile(options["pidfile"], *self.runAs)
        self._start(self._privilegedStart)

    def _privilegedStart(self) -> None:
        # Before the spool is touched (given to the run user, recovered): a relay started by
        # mistake on the spool of one running must leave it as it is.
        if self.control is not None:
            self.control.refuseIfAnother()
        super().privilegedStartService()

    def startService(self) -> None:
        self._start(super().startService)
        self.publishListeners()
        self.startedWell()

    def stopService(self) -> Any:
        if self.control is not None and self.config is not None:
            from mailrelay.app.published import unpublish

            unpublish(self.config.spoolDirectory)  # (first: a new submission is not taken)
        return super().stopService()

    def publishListeners(self) -> None:
        """Publish in the spool directory, beside the control socket, the listeners as they
        are bound (L{mailrelay.app.published}), for C{mailrelay-sendmail}: at the start and
        after a reload.  A failure is logged: the command then finds the configuration
        file's listeners only."""
        from mailrelay.app.published import boundListeners, publish

        config = self.config
        if self.control is None or config is None:
            return
        try:
            publish(config.spoolDirectory, config.hostname, config.maxMessageSize,
                    boundListeners(config, self.listeners))
        except OSError as e:
            log.warn("{error}: mailrelay-sendmail finds the listeners of the configuration "
                     "file only", error=e.strerror or str(e))

    def startedWell(self) -> None:
        """The relay has started: let go of the command's standard error
        (L{startErrors}), or a caller reading it to its end would wait until we stop."""
        fd, self.startErrors = self.startErrors, None
        if fd is not None:
            os.close(fd)

    def _start(self, start: Any) -> None:
        """Run C{start}; if it fails, stop what it began before failing: the spool's threads
        (which would keep the process alive) and the delivery process (which would run on
        without us), so that a failed start leaves no process behind."""
        try:
            start()
        except BaseException as e:
            if self.spool is not None:
                self.spool.stop()
            for child in (self.acceptors, self.delivery):
                if child is not None and child.running:
                    child.stopService()
            if isinstance(e, SystemExit):
                self._failedStart(e)
            raise

    def _failedStart(self, exit: SystemExit) -> None:
        """The start failed with C{exit} (its message said): tell twistd's waiting parent
        when it daemonized, and remove twistd's pid file, as twistd does for the errors it
        catches -- it catches C{Exception} only.  Without the word on its status pipe, the
        parent (the command that was run) would wait for it forever."""
        options = self.twistdOptions or {}
        message = exit.code if isinstance(exit.code, str) else f"exit status {exit.code}"
        told = self._tellStartError(message)
        pipe = options.get("statusPipe")
        if pipe is not None:
            options["statusPipe"] = None
            # As twistd's own report: its parent prints what follows "1 ", 100 octets at
            # most, so the whole message went to the command's standard error when it could.
            report = ("the relay did not start: see the error above" if told
                      else message).encode("utf-8", "replace")[:98]
            try:
                os.write(pipe, b"1 " + report)
            except OSError:
                pass
            finally:
                os.close(pipe)
        pidfile = options.get("pidfile")
        if pidfile:
            try:
                with open(pidfile, "rb") as f:
                    ours = f.read().strip() == str(os.getpid()).encode()
                if ours:
                    os.unlink(pidfile)
            except OSError:
                pass

    def _tellStartError(self, message: str) -> bool:
        """Write C{message} whole on the command's standard error (L{startErrors}), which
        is then let go; whether it was."""
        fd, self.startErrors = self.startErrors, None
        if fd is None:
            return False
        data = message.encode("utf-8", "replace") + b"\n"
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:
            return False
        finally:
            os.close(fd)
        return True

    def _passwordUsers(self) -> dict[str, dict[str, str]] | None:
        """The users the running configuration's AUTH serves with, by password file, for
        an acceptor process started now; C{None} without a password file."""
        checker = self.carried.passwords
        return None if checker is None else {checker.path: checker.table()}

    def _listenerFiles(self) -> dict[str, bytes]:
        """The bytes of the certificates and keys the running configuration's listeners
        serve (C{tls_certificate}, C{tls_key}, C{tls_certificates}, an C{ssl:} endpoint's
        C{privateKey=}, C{certKey=} and C{extraCertChain=}), by path, for an
        acceptor process started now: it serves them as the relay does, whatever the files
        hold now (a reload refused keeps the running ones)."""
        files: dict[str, bytes] = {}
        for listener in self.config.listeners if self.config is not None else ():
            loaded = [listener.certificate, listener.endpointCertificate,
                      *(tls for _, tls in listener.sniCertificates)]
            for tls in loaded:
                if tls is not None:
                    files.update(tls.files)
        return files

    def enqueue(self, queueID: str) -> None:
        """A message was committed: hand it to the delivery side."""
        if self.delivery is not None:
            self.delivery.enqueue(queueID)

    def _rescan(self) -> None:
        """An acceptor process ended unexpectedly: the delivery side looks for what it may
        have committed without telling."""
        if self.delivery is not None:
            self.delivery.rescan()

    def plan(
        self, config: Config, configText: bytes | None, available: dict[str, Any] | None = None
    ) -> _Plan:
        """Build everything C{config} describes, without touching what runs, with the
        installed plugins C{available} (by default, looked for: L{availablePlugins}).

        @raise ConfigError: a plugin, certificate, password file, route or backend is refused.
        """
        assert self.spool is not None
        _sayBounceLifetimeLowered(config)
        _sayWherePostmasterMailGoes(config)
        carried = self.carried.copy()  # (the relay's, only once the plan runs)
        context = makeContext(
            config, self.reactor, resolver=self._resolver(config, carried), kept=self.kept
        )
        if available is None:
            available = availablePlugins()
        build = pluginBuilder(config, self.reactor, available, context)
        inline = config.queueProcess == "inline"
        hooks = buildHooks(config, build, "inline" if inline else "relay")
        # (In a delivery process of its own, the delivery side's plugins are built here only
        # to check them: the delivery process builds and runs its own.)
        deliveryHooks = hooks if inline else buildHooks(config, build, "delivery")
        delivery = makeDelivery(config, self.reactor, self.spool, build, deliveryHooks)
        listeners = makeListeners(
            config,
            self.reactor,
            build,
            carried,
            self.spool,
            self.sessions,
            self.enqueue,
            hooks,
        )
        throttle = carried.throttle if config.auth is not None else None
        limiter = carried.limiter if config.rateLimiter is None else None
        return _Plan(
            config, configText, listeners, delivery, hooks.services, throttle, limiter, carried
        )

    def _resolver(self, config: Config, carried: _Carried) -> Any:
        """The resolver of C{config}'s name servers, kept across reloads in C{carried}
        (shared with the reverse lookups)."""
        from mailrelay.route import makeResolver

        resolvers = carried.resolvers
        if config.nameservers not in resolvers:
            resolvers[config.nameservers] = makeResolver(
                list(config.nameservers) or None, reactor=self.reactor
            )
        return resolvers[config.nameservers]

    def build(self, plan: _Plan) -> None:
        """Add the services of the first configuration."""
        config = self.config = plan.config
        assert self.spool is not None
        self.logLevels.setLevel(config.logLevel)
        self.throttle, self.limiter, self.carried = plan.throttle, plan.limiter, plan.carried
        if config.metricsListen is not None:  # (a restart changes it, not a reload)
            from mailrelay.metrics import enable

            enable()
        if config.hold:
            log.warn("queue.hold is set: mail is accepted and spooled, nothing is delivered")
        self._sayOverridden(config, plan.configText)
        self.plugins.current = list(plan.services)
        self.plugins.setServiceParent(self)
        services, queue = plan.delivery
        if config.queueProcess == "inline":
            self.delivery = InlineDelivery(services, queue, config.hold)
        else:
            from mailrelay.queue.process import DeliveryProcessService

            self.delivery = DeliveryProcessService(
                self.reactor,
                config.source,
                self.overrides,
                configText=plan.configText,
                drainTime=config.drainTime,
                hold=config.hold,
                metrics=self.childMetrics,
            )
            self.delivery.spawner = self.spawner
        self.delivery.setServiceParent(self)
        # After the delivery side, before the sessions: the acceptors are told to stop when
        # the relay begins to (L{AcceptorPool.beginShutdown}), and the delivery side stops
        # once they have ended, with the messages they queued.
        from mailrelay.app.acceptors import AcceptorPool

        self.acceptors = AcceptorPool(
            self.reactor,
            config.source,
            self.overrides,
            plan.configText,
            self._acceptorCount(config),
            config.drainTime,
            self.sharedSockets,
            self.enqueue,
            self.childMetrics,
            throttle=lambda: self.throttle,
            limiter=lambda: self.limiter,
            users=self._passwordUsers,
            tlsFiles=self._listenerFiles,
        )
        self.acceptors.spawner = self.spawner
        self.acceptors.rescan = self._rescan
        self.acceptors.setServiceParent(self)
        self._sessionsService = SessionsService(self.sessions, self.reactor, config.drainTime)
        self._sessionsService.setServiceParent(self)
        for index, (endpoint, factory, role) in enumerate(plan.listeners):
            where = self.listenerWhere(config, index)
            listener = ListenerService(self.reactor, endpoint, factory, role, where)
            listener.setServiceParent(self)
            self.listeners[endpoint] = listener
        if config.metricsListen is not None:
            # Last: it listens after the SMTP listeners and stops before them.
            from mailrelay.app.metrics import MetricsService

            MetricsService(self.reactor, config.metricsListen, self).setServiceParent(self)

    def reload(self) -> bool:
        """Re-read the configuration file and run on it, or log why not and keep running on
        the one in use.  Returns whether the new configuration is in use.  systemd, when it
        runs us, is told (L{systemd}: C{RELOADING=1}, then C{READY=1})."""
        if not self.running:
            self.reloadError = "the relay is stopping"
            return False
        if self.systemd is not None:
            self.systemd.reloading()
        try:
            self.reloadWarning = self.codeChanged()
            if self.reloadWarning is not None:
                log.warn("{warning}", warning=self.reloadWarning)
            return self._reload()
        finally:
            if self.systemd is not None:
                self.systemd.ready(self.summary())

    def codeChanged(self) -> str | None:
        """What to say of the code on disk changed since the start (L{LoadedCode}), or
        C{None}: a reload keeps the code loaded at start-up -- but for what the children it
        starts import anew (L{forkedCode})."""
        if self.loadedCode is None:
            return None
        changed = self.loadedCode.changed()
        shared = self.forkedCode if getattr(self.spawner, "gone", None) is None else None
        anew = changed if shared is None else [path for path in changed if path not in shared]
        return describeChanged(changed, anew)

    def summary(self) -> str:
        """What runs, in a few words (for C{systemctl status})."""
        delivery = self.delivery.state() if self.delivery is not None else "down"
        acceptors = len(self.acceptors.describe()["running"]) if self.acceptors else 0
        extra = f", {acceptors} acceptor process(es)" if acceptors else ""
        return f"{len(self.listeners)} listener(s){extra}, delivery {delivery}"

    def _acceptorCount(self, config: Config) -> int:
        """How many acceptor processes C{config} asks for (C{[relay] processes} less ours)."""
        return resolveProcessCount(config.processes) - 1

    def sharedSockets(self) -> list[tuple[str, int, str]]:
        """C{(endpoint, fd, family)} of the listening sockets the acceptor processes share
        (L{mailrelay.app.acceptors.sharedSocket}): every SMTP listener's (an C{ssl:} one's
        too: its TLS layer is in the listener's factory) but those whose port wraps its
        connections, which this process serves alone."""
        from mailrelay.app.acceptors import sharedSocket

        result = []
        for endpoint, listener in self.listeners.items():
            shared = sharedSocket(listener.port, listener._switch)
            if shared is not None:
                result.append((endpoint, *shared))
            elif listener.port is not None and endpoint not in self._unshared:
                self._unshared.add(endpoint)
                log.warn(
                    "listener {endpoint}: served by the relay's process only (acceptor "
                    "processes cannot share a listener whose port wraps its connections)",
                    endpoint=endpoint,
                )
        return result

    def _reload(self) -> bool:
        source = self.configPath or "(embedded default)"
        try:
            text = readConfigFile(self.configPath) if self.configPath is not None else None
            config = loadConfig(self.configPath, self.overrides, text=text)
            self._checkReloadable(config)
            plan = self.plan(config, text)
            added, respelled = self._listenNew(plan)
            self._startPlugins(plan, added)
        except (ConfigError, ListenError) as e:
            self.reloadError = str(e)
            log.error(
                "configuration not reloaded (still running on the previous one): {error}",
                error=str(e),
            )
            return False
        except Exception as e:
            self.reloadError = f"unexpected error: {e!r} (see the log)"
            log.failure("configuration not reloaded (still running on the previous one)")
            return False
        self.reloadError = None
        self._swap(plan, added, respelled)
        log.info("configuration reloaded from {source}", source=source)
        self._sayOverridden(config, text)
        return True

    def listenerWhere(self, config: Config, index: int) -> str:
        """Where the endpoint of listener C{index} of C{config} is set, for messages: the
        file and key, or the command line's option."""
        if given(self.overrides, "listen"):
            return "--listen"
        return f"{config.source or '(embedded default)'}: listeners[{index}].endpoint"

    def _checkReloadable(self, config: Config) -> None:
        old = self.config
        assert old is not None
        def shown(value: Any) -> str:
            return "(not set)" if value is None else str(value)

        for attribute, key in _RESTART_ONLY:
            if getattr(config, attribute) != getattr(old, attribute):
                raise ConfigError(
                    f"changed from {shown(getattr(old, attribute))} to "
                    f"{shown(getattr(config, attribute))}: a restart is needed for this setting",
                    file=config.source or "(embedded default)",
                    key=key,
                )
        if config.queueProcess != old.queueProcess:
            raise ConfigError(
                f"changed from {old.queueProcess!r} to {config.queueProcess!r}: a restart is "
                "needed for this setting",
                file=config.source or "(embedded default)",
                key="queue.process",
            )

    def _sayOverridden(self, config: Config, text: bytes | None) -> None:
        """Say which settings of the file the command line's options replace: a change of
        them in the file does nothing (a reload says it again)."""
        for key, option in overriddenKeys(text, self.overrides):
            name = option.removeprefix("--").replace("-", "_")
            if name in self.pinned:
                log.warn("{key} in {source} is not used until the relay is restarted: it "
                         "runs on the default, {value}", key=key, source=config.source,
                         value=self.overrides[name])
                continue
            log.warn("{key} in {source} is not used: {option} on the command line replaces it",
                     key=key, source=config.source, option=option)

    def _listenNew(self, plan: _Plan) -> tuple[list[ListenerService], dict[str, str]]:
        """Listen on the endpoints the new configuration adds; if one cannot be listened
        on, close those just opened and raise L{ListenError}.

        @return: the new listeners, and the endpoints that are another spelling of the
            socket of a listener whose spelling is gone (C{tcp:port=25:backlog=128} for
            C{tcp:25}): new spelling to old; that listener keeps its socket (L{_swap}).
        """
        added: list[ListenerService] = []
        respelled: dict[str, str] = {}
        wanted = {endpoint for endpoint, _, _ in plan.listeners}
        bySocket = {
            key: description
            for description in self.listeners
            if description not in wanted and (key := socketKey(description)) is not None
        }

        def refuse(error: ListenError) -> None:
            for opened in added:
                opened.stopService()
            raise error

        for index, (endpoint, factory, role) in enumerate(plan.listeners):
            if endpoint in self.listeners:
                continue
            where = self.listenerWhere(plan.config, index)
            key = socketKey(endpoint)
            old = bySocket.pop(key, None) if key is not None else None
            if old is not None:  # (an ssl: endpoint's TLS is its factory's: switched too)
                respelled[endpoint] = old
                continue
            listener = ListenerService(self.reactor, endpoint, factory, role, where)
            try:
                listener.listen()
            except ListenError as e:
                # A listener this reload closes may hold the port on other addresses.
                held = key and next((d for k, d in bySocket.items()
                                     if (k[0], k[2]) == (key[0], key[2])), None)
                if key and held:
                    e = ListenError(
                        f"{e} (port {key[2]} is held by the listener {held}, which this "
                        "reload closes: moving a port between addresses takes a restart)")
                refuse(e)
            added.append(listener)
        return added, respelled

    def _startPlugins(self, plan: _Plan, added: list[ListenerService]) -> None:
        """Start the plugin services C{plan} adds, before anything is swapped; if one fails
        to start, close the listeners just opened (C{added}) and raise L{ConfigError} naming
        it (the services started for C{plan} are stopped again: L{PluginServices.startNew})."""
        try:
            self.plugins.startNew(plan.services)
        except PluginStartError as e:
            for listener in added:
                listener.stopService()
            raise ConfigError(str(e), file=plan.config.source or "(embedded default)") from None

    def _swap(
        self, plan: _Plan, added: list[ListenerService], respelled: dict[str, str]
    ) -> None:
        config = plan.config
        assert self.spool is not None
        self.config = config
        self.logLevels.setLevel(config.logLevel)
        # (Not before: a reload that fails keeps the running ones.)
        self.throttle, self.limiter, self.carried = plan.throttle, plan.limiter, plan.carried
        self.spool.minFreeSpace = config.minFreeSpace
        if self.control is not None:  # ([spool] mailq_users may name users now)
            self.control.openToListing()
        wanted = {endpoint: (factory, role) for endpoint, factory, role in plan.listeners}
        renamed = {old: new for new, old in respelled.items()}
        for endpoint, listener in list(self.listeners.items()):
            if endpoint in wanted:
                listener.switch(*wanted[endpoint])
            elif endpoint in renamed:
                new = renamed[endpoint]
                del self.listeners[endpoint]
                listener.respell(new)
                listener.switch(*wanted[new])
                self.listeners[new] = listener
                log.info("listener {old} is now {new} (the same socket, kept)", old=endpoint,
                         new=new)
            else:
                del self.listeners[endpoint]
                listener.disownServiceParent()  # stops listening; its sessions carry on
                log.info("listener {endpoint} removed", endpoint=endpoint)
        for listener in added:
            listener.setServiceParent(self)  # already listening: startService only
            self.listeners[listener.description] = listener
        assert self._sessionsService is not None
        self._sessionsService.drainTime = config.drainTime
        self.plugins.swap(plan.services, self.sessions.whenGone(), self.reactor, config.drainTime)
        services, queue = plan.delivery
        if config.queueProcess == "inline":
            self.delivery.reload(services, queue, config.hold)
        else:
            self.delivery.reload(
                plan.configText, self.overrides, config.drainTime, config.hold
            )
        assert self.acceptors is not None
        self.acceptors.reload(
            plan.configText, self.overrides, self._acceptorCount(config), config.drainTime
        )
        self.publishListeners()


    # -- the control socket -------------------------------------------------------------------

    def queueCommand(self, command: Any, arguments: dict[str, Any]) -> Deferred[Any]:
        """Have the queue manager answer the queue command C{command} (L{mailrelay.queue.
        commands}); when none can, the commands that only read the queue are answered from
        the spool here, the others fail with L{QueueUnavailable} saying why."""
        from mailrelay.app.control import queueControl
        from mailrelay.queue.commands import READ_ONLY, callControl
        from mailrelay.queue.control import QueueUnavailable

        delivery = self.delivery
        if isinstance(delivery, InlineDelivery) and not delivery.hold:
            control = self._queueControl
            if control is None or control.manager is not delivery.queue:
                control = self._queueControl = queueControl(
                    self.spool, delivery.queue, self.reactor
                )
            return callControl(control, command, arguments)
        if isinstance(delivery, InlineDelivery):
            d: Deferred[Any] = Deferred()
            d.errback(QueueUnavailable("no queue manager runs: [queue] hold = true"))
        else:
            d = delivery.queueCommand(command, arguments)
        if command in READ_ONLY:

            def fromSpool(failure: Any) -> Deferred[Any]:
                failure.trap(QueueUnavailable)
                offline = queueControl(self.spool, None, self.reactor, str(failure.value))
                return callControl(offline, command, arguments)

            d.addErrback(fromSpool)
        return d

    def status(self) -> Deferred[dict[str, Any]]:
        """What C{mailrelay status} shows: the process, its configuration, listeners and
        sessions, the delivery side and the queue (L{QueueStatus}; C{{"error": ...}} when
        it cannot be had)."""
        from mailrelay import __version__
        from mailrelay.queue.commands import QueueStatus

        config = self.config
        assert config is not None
        listeners = []
        for endpoint, listener in self.listeners.items():
            address = None
            if listener.port is not None:
                host = listener.port.getHost()
                address = hostPort(str(getattr(host, "host", host)), getattr(host, "port", ""))
            listeners.append({"endpoint": endpoint, "role": listener.role, "address": address})
        delivery = self.delivery
        if isinstance(delivery, InlineDelivery):
            manager = "off" if delivery.hold else delivery.queue.state()
            deliveryInfo: dict[str, Any] = {"mode": "inline", "state": manager}
        else:
            deliveryInfo = {"mode": "separate", **delivery.describe()}
        result: dict[str, Any] = {
            "pid": os.getpid(),
            "version": __version__,
            "running": bool(self.running),
            "started": self.control.startedAt if self.control is not None else None,
            "config": config.source or "(embedded default)",
            "code": self.codeChanged(),
            "hostname": config.hostname,
            "spool": str(config.spoolDirectory),
            "hold": config.hold,
            "listeners": listeners,
            "sessions": len(self.sessions.live),
            "delivery": deliveryInfo,
            "acceptors": self.acceptors.describe() if self.acceptors is not None else None,
        }
        if result["acceptors"] is not None:  # (and theirs, as they last said)
            result["sessions"] += result["acceptors"]["sessions"]

        def queue(answer: Any) -> dict[str, Any]:
            result["queue"] = answer
            return result

        def failed(failure: Any) -> dict[str, Any]:
            return queue({"error": failure.getErrorMessage()})

        return self.queueCommand(QueueStatus, {}).addCallbacks(queue, failed)


def makeRelayService(
    config: Config,
    reactor: Any,
    overrides: dict[str, Any] | None = None,
    configText: bytes | None = None,
    runAs: tuple[int, int] | None = None,
    spawner: Any = None,
    available: dict[str, Any] | None = None,
) -> RelayService:
    """Build the whole relay from a checked configuration.

    @param overrides: the command-line options the configuration was loaded with; the
        delivery process loads the same configuration with them, and so does a reload.
    @param configText: the bytes of the configuration file C{config} was loaded from (the
        delivery process gets them rather than reading the file, which may have changed).
    @param runAs: C{(uid, gid)} of the user twistd runs the relay as once it has dropped
        its privileges (C{--uid}/C{--gid}), or C{None}: the spool is given to that user and
        started as that user.
    @param spawner: what starts the child processes (L{RelayService.spawner}).
    @param available: the installed plugins by name, when just looked for (by default,
        looked for: L{availablePlugins}); a reload looks again.
    @raise ConfigError: a plugin is unknown or refuses its options.
    """
    from mailrelay.app.control import ControlService

    top = RelayService(reactor, config.source, overrides)
    top.spawner = spawner
    top.spool = makeSpool(config, reactor, top, owner=runAs)
    top.runAs = runAs
    top.control = ControlService(top, config.spoolDirectory)
    top.control.setServiceParent(top)
    top.build(top.plan(config, configText, available))
    return top


