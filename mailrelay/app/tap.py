"""C{twistd mailrelay}: command-line options and makeService, nothing else."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from mailrelay import __version__

log = Logger()


class Options(usage.Options):
    synopsis = (
        "[--config FILE] [--listen ENDPOINT]... [--hostname FQDN] [--spool DIR] "
        "[--relay-network CIDR]... [--accept-domain DOMAIN]... [--smarthost HOST[:PORT]]"
    )
    longdesc = (
        "Run the mailrelay mail relay.  Options override the configuration file; with neither, "
        "an embedded default listens on tcp:2525:interface=127.0.0.1, spools to "
        "./mailrelay-spool and relays only for 127.0.0.0/8 and ::1.  A list option given on "
        "the command line replaces that whole list."
    )
    optFlags = [
        [
            "list-plugins",
            None,
            "Print the installed plugins, what they provide, and the chain of each hook for "
            "the configuration (--config), then exit.",
        ],
    ]
    optParameters = [
        [
            "config",
            "c",
            None,
            "TOML configuration file (mailrelay check --sample prints a commented "
            "sample of every key).",
        ],
        ["hostname", None, None, "This relay's fully qualified host name."],
        ["spool", None, None, "Spool directory."],
        ["smarthost", None, None, "Default next hop: HOST[:PORT], [HOST]:PORT for no MX lookup."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["relay_network"] = []
        self["accept_domain"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Twisted server endpoint to listen on, e.g. tcp:25 (repeatable)."""
        self["listen"].append(endpoint)

    def opt_relay_network(self, cidr: str) -> None:
        """Client network allowed to relay, e.g. 10.0.0.0/8 (repeatable)."""
        self["relay_network"].append(cidr)

    def opt_accept_domain(self, domain: str) -> None:
        """Domain accepted from anyone (repeatable)."""
        self["accept_domain"].append(domain)

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"mailrelay {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        # Resolved once, against the directory twistd was started in (as twistd does its
        # --pidfile): the relay names the file so (mailrelay status, reload) and reads it so
        # at each reload, which may come after twistd's --rundir changed directory, and its
        # children, started there, use the same spool.
        for key in ("config", "spool"):
            if self[key] is not None:
                self[key] = os.path.abspath(self[key])
        if self["list-plugins"]:
            raise SystemExit(listPlugins(self["config"], self.overrides()))
        serverOptions = getattr(self, "parent", None)  # twistd's, when it runs us
        if serverOptions is not None and serverOptions.get("pidfile"):
            # Now: twistd checks its pid file before it builds the relay.
            from mailrelay.app.logs import refuseStalePidFile

            refuseStalePidFile(serverOptions["pidfile"])

    def overrides(self) -> dict[str, Any]:
        """The options given, in the form L{mailrelay.config.loadConfig} takes."""
        result: dict[str, Any] = {}
        for key in ("listen", "relay_network", "accept_domain"):
            if self[key]:
                result[key] = list(self[key])
        for key in ("hostname", "spool", "smarthost"):
            if self[key] is not None:
                result[key] = self[key]
        return result

    def pinnedOverrides(self, text: bytes | None) -> dict[str, Any]:
        """L{overrides}, and the default spool (C{./mailrelay-spool}, when neither C{--spool}
        nor the configuration file's bytes C{text} name one) as an absolute C{spool}: the
        directory twistd was started in, which the relay's children and its reloads, after
        twistd's C{--rundir} changed directory, must still use."""
        from mailrelay.config import overriddenKeys
        from mailrelay.config.keys import DEFAULT_SPOOL

        result = self.overrides()
        default = os.path.abspath(DEFAULT_SPOOL)
        if "spool" not in result and not overriddenKeys(text, {"spool": default}):
            result["spool"] = default
        return result


def listPlugins(path: str | None, overrides: dict[str, Any]) -> int:
    """Print what C{--list-plugins} prints (L{mailrelay.app.plugins.describePlugins}) for the
    configuration C{path} (C{None}: the embedded default); the exit status (1 for a
    configuration error, printed to stderr)."""
    import sys

    from mailrelay.app.plugins import availablePlugins, describePlugins
    from mailrelay.config import loadConfig
    from mailrelay.errors import ConfigError

    try:
        available = availablePlugins()
        config = loadConfig(path, overrides)
    except ConfigError as e:
        print(f"mailrelay: configuration error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(describePlugins(available, config))
    return 0


def makeService(options: Options) -> Any:
    """Load and check the configuration, then build the relay; SIGHUP will reload it.

    A configuration error stops start-up: its message (file, key, value) goes to stderr and
    twistd exits with status 1.
    """
    from mailrelay.app.forkserver import forRelay, hasChildren
    from mailrelay.app.services import catchStopSignals, stopOnSignals

    # First: a stop asked while the relay starts (before the reactor runs, which installs
    # Twisted's handlers) stops it once started, rather than killing it half made; a
    # SIGHUP meanwhile reloads it once started.
    stopSignals = catchStopSignals()
    from mailrelay.config import loadConfig, readConfigFile
    from mailrelay.errors import ConfigError
    from mailrelay.namedfile import explainPermissions, runAsUser
    from mailrelay.route.ownaddr import exportPassedSockets

    explainPermissions()  # (the relay: its unreadable files' messages name its user)

    path = options["config"]
    serverOptions = getattr(options, "parent", None)  # twistd's, when it runs us
    user = runAs(serverOptions)
    # (Checked as for the user we will run as.)
    runAsUser(*(user if user is not None else (None, None)))
    # Where the sockets systemd passed us are bound, for our children (the delivery
    # process knows the relay by its listeners' addresses: it is passed no socket).
    exportPassedSockets()
    try:
        text = readConfigFile(path) if path is not None else None
        overrides = options.pinnedOverrides(text)
        config = loadConfig(path, overrides, text=text)
        # Before the reactor exists: the fork server must not have one (see its module).
        # (It lists the installed plugins: two of one name are refused there first.)
        forkServer = forRelay(config, serverOptions, user, (path, overrides, text))
    except ConfigError as e:
        raise SystemExit(f"mailrelay: configuration error: {e}") from None
    from mailrelay.app.loadedcode import LoadedCode

    # What the fork server loaded, which the children it forks share: not the site's plugin
    # modules, which the relay imports as it builds (a reload's children import them anew).
    forked = forkServer.forkedFiles if forkServer is not None else None

    from twisted.internet import reactor

    from mailrelay.app.relay import makeRelayService

    if forkServer is not None:
        forkServer.attach(reactor)
        reactor.addSystemEventTrigger("after", "shutdown", forkServer.close)
    try:
        relay = makeRelayService(
            config, reactor, overrides, configText=text, runAs=user,
            spawner=forkServer, available=forkServer.plugins if forkServer is not None else None,
        )
    except ConfigError as e:
        raise SystemExit(f"mailrelay: configuration error: {e}") from None
    relay.pinned = frozenset(overrides.keys() - options.overrides().keys())
    # Every module is loaded now, the plugins' too: a reload will say which changed since.
    relay.loadedCode = forkServer.loadedCode() if forkServer is not None else LoadedCode.now()
    # (Without children, nothing is imported anew; without the fork server, all is.)
    relay.forkedCode = forked if hasChildren(config) else frozenset(relay.loadedCode.stamps)
    from mailrelay.app.files import raiseFileLimit

    raiseFileLimit(
        (listener.settings.maxConnections for listener in config.listeners),
        deliveryLimit=config.queue.deliveryLimit,
    )
    relay.twistdOptions = serverOptions
    if serverOptions is not None and not serverOptions.get("nodaemon"):
        # twistd will daemonize, its standard error becoming /dev/null, and its parent
        # prints 100 octets of why a start failed: the relay keeps the command's standard
        # error to say all of it there (RelayService.startErrors).
        relay.startErrors = os.dup(2)
    # Now, not once the reactor runs: twistd listens before it runs the reactor, and a SIGHUP
    # meanwhile (a reload during a restart) took the signal's default action, ending us.
    installReloadSignal(reactor, relay, stopSignals)
    if not installRotateSignalNow(reactor, serverOptions):
        reactor.callWhenRunning(installRotateSignal, reactor)
    stopOnSignals(reactor, stopSignals)
    from mailrelay.app.clocksteps import followClockSteps

    followClockSteps(reactor)
    notifySystemd(reactor, relay)
    from mailrelay.app.memory import releaseFreeMemory, unmapLibraryCode

    reactor.callWhenRunning(releaseFreeMemory)  # (what building the relay left free)
    reactor.callWhenRunning(unmapLibraryCode)  # (what importing mapped of the libraries)
    return relay


def notifySystemd(reactor: Any, relay: Any) -> None:
    """Tell systemd (C{Type=notify}) when C{relay} runs (once started), reloads (see
    L{RelayService.reload}) and begins to stop."""
    from mailrelay.app.systemd import Notifier

    relay.systemd = Notifier(reactor)
    reactor.callWhenRunning(lambda: relay.systemd.ready(relay.summary()))
    # Added before twistd's own trigger that stops the relay: it runs first.
    reactor.addSystemEventTrigger("before", "shutdown", relay.systemd.stopping)


def runAs(serverOptions: Any) -> tuple[int, int] | None:
    """C{(uid, gid)} of the user twistd will run us as (its C{--uid} and C{--gid}, the group
    being the user's own when only C{--uid} is given, as twistd does), when it starts as
    root and drops privileges; else C{None}."""
    import os
    import pwd

    if serverOptions is None or os.geteuid() != 0:
        return None
    uid, gid = serverOptions.get("uid"), serverOptions.get("gid")
    if uid is None and gid is None:
        return None
    if uid is not None and gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    return (-1 if uid is None else uid, -1 if gid is None else gid)


def installReloadSignal(reactor: Any, relay: Any, received: Sequence[int] = ()) -> None:
    """SIGHUP reloads the configuration (as C{postfix reload} does), instead of ending the
    process; one that comes before the reactor runs reloads once it runs (and the relay has
    started), as does one in C{received}, caught while the relay was built
    (L{mailrelay.app.services.catchStopSignals}): once however many came."""
    import signal

    def onSignal(signum: int, frame: Any) -> None:
        reactor.callFromThread(relay.reload)

    signal.signal(signal.SIGHUP, onSignal)
    if signal.SIGHUP in received:
        onSignal(signal.SIGHUP, None)


def twistdLogsToFile(serverOptions: Any) -> bool:
    """Whether twistd, run with C{serverOptions}, logs to a file (and so installs its own
    SIGUSR1 handler, which rotates it), as its C{UnixAppLogger} decides: not with
    C{--syslog}, C{--logfile=-}, nor C{--nodaemon} without C{--logfile}."""
    logfile = serverOptions.get("logfile")
    if serverOptions.get("syslog") or logfile == "-":
        return False
    return bool(logfile) or not serverOptions.get("nodaemon")


def installRotateSignalNow(reactor: Any, serverOptions: Any) -> bool:
    """Install L{installRotateSignal}'s handler now, as the relay is built, where twistd
    will install none of its own (no log file): twistd listens before it runs the reactor,
    and a SIGUSR1 meanwhile took its default action, killing the relay.  Whether it did
    (with a log file, twistd's rotation is installed after the relay is built, before it
    listens; not under twistd, the caller installs it once the reactor runs)."""
    if serverOptions is None or twistdLogsToFile(serverOptions):
        return False
    installRotateSignal(reactor)
    return True


def installRotateSignal(reactor: Any) -> None:
    """SIGUSR1 still rotates twistd's log file; without one (standard output, as under
    systemd, or syslog) twistd leaves it at its default, which would kill the relay on the
    spot: it is logged instead.  (Once the reactor runs: twistd installs its handler after
    building the relay, only where none is set.)"""
    import signal

    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):

        def noLogFile(signum: int, frame: Any) -> None:
            reactor.callFromThread(log.info, "SIGUSR1: no log file to rotate (twistd logs "
                                   "to standard output or syslog without --logfile)")

        signal.signal(signal.SIGUSR1, noLogFile)
