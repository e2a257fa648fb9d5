"""The relay's child processes forked from a copy of the relay made at start-up (a fork
server), so that they share its memory instead of loading everything again.

A child process of the relay (the delivery process, an acceptor process) started as a new
Python (C{python -m mailrelay.app.deliveryprocess}) imports Twisted, OpenSSL and mailrelay
all over again: some 40 MiB of its own, as much as the relay's.  Forked from the relay, it
shares those pages with it (copy on write) -- but a fork of the running relay would carry
its reactor (epoll set, waker, signal handlers), its threads' locks and its sessions into
the child.  So the relay forks once, at start-up, before it has a reactor, a thread or a
signal handler of its own: C{twistd mailrelay} (L{mailrelay.app.tap.makeService}) imports
what the children run, moves every object out of the garbage collector's way
(C{gc.freeze}: a collection writes to the header of each object it visits, which would copy
every page), and forks the fork server (L{ForkServer.start}).

The fork server only forks the relay's children, on request, over a Unix socket pair: the
relay sends the command line it would have run and the descriptors the child gets (its
pipes and control socket, passed with C{SCM_RIGHTS}); the server forks a process that puts
them in place, closes everything else, puts the signals back to their defaults and runs the
child module's C{forkedMain} -- which installs the child's own reactor, as a new process
would -- and exits.  The server answers the child's process id, and when a child exits, its
status.  The relay's side of each child is a L{ForkedProcess}: an ordinary Twisted process
transport (pipes, signals) whose end comes from the server's report instead of C{waitpid}.

Each process dies with its parent: the server with the relay (C{PR_SET_PDEATHSIG}, SIGKILL),
its children with the server (SIGTERM: they finish their work and exit, as when the relay
dies).  The server ignores SIGINT, SIGTERM and SIGHUP (a Ctrl-C or systemd's stop is for
the relay, which stops the children and then the server by closing its socket).  When the
server is gone (killed), children are started the ordinary way again (fork and exec), and
the end of those it had forked is seen by their process ids (C{pidfd}).

The server is used only when it can run as the children would: under C{twistd --nodaemon}
(a daemon's children are the daemon's, forked after this), without C{--chroot} or
C{--euid}, on Linux; it drops to C{--uid}/C{--gid} and takes C{--umask} and C{--rundir}
itself, as twistd does for the relay after C{makeService}.  Otherwise, with C{[relay]
fork_children = false}, and for a child module it does not know, the relay starts its
children as new processes.
"""

from __future__ import annotations

import errno
import gc
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.process import Process, _BaseProcess
from twisted.logger import Logger

from mailrelay.app.loadedcode import ImportsFromNow, LoadedCode

log = Logger()

__all__ = [
    "CHILD_MODULES", "ForkServer", "ForkedProcess", "forRelay", "forkedConfig", "forkedPlugins",
    "preload",
]

#: The child modules the server may run (each has a C{forkedMain(argv)}).
CHILD_MODULES = frozenset({"mailrelay.app.deliveryprocess", "mailrelay.app.acceptorprocess"})

#: The largest request or report (a command line, with the configuration's overrides).
_MAX_MESSAGE = 1 << 20
#: At most this many descriptors go with one request.
_MAX_FDS = 64
#: Seconds the relay waits for the server to answer a request.
_ANSWER_TIMEOUT = 10.0
#: A child's exit status when the server could not report it (it was gone).
UNKNOWN_STATUS = 255 << 8

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15

#: The names C{ps} and C{top} show (15 bytes at most) for the server and each child module:
#: forked, they would all show the relay's.
NAMES = {
    "": "mr-forkserver",
    "mailrelay.app.deliveryprocess": "mr-delivery",
    "mailrelay.app.acceptorprocess": "mr-acceptor",
}


def _prctl(option: int, argument: Any) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, argument, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def deathSignal(sig: int) -> None:
    """Have the kernel send us C{sig} when our parent dies (Linux's C{PR_SET_PDEATHSIG});
    raises C{OSError} (C{AttributeError} where the C library has no C{prctl})."""
    _prctl(_PR_SET_PDEATHSIG, int(sig))


def _name(module: str) -> None:
    """Name this process as L{NAMES} says for C{module}."""
    _prctl(_PR_SET_NAME, NAMES.get(module, "mr-child").encode())


#: What the relay itself imports after the fork as it builds and starts
#: (L{mailrelay.app.tap.makeService}, its first session), imported before it by L{preload}:
#: an import after the fork writes to what the relay shares with the server and the
#: children (C{sys.modules}, the import system's caches, the reference count of each name
#: the module imports), copying those pages -- 1.3 MiB more of the relay's own memory at
#: rest than the modules' code shared (issue 11).
RELAY_MODULES = (
    "mailrelay.app.control",
    "mailrelay.app.files",
    "mailrelay.app.memory",
    "mailrelay.app.relay",
    "mailrelay.app.systemd",
    "mailrelay.receive.extensions",
    "mailrelay.receive.rdns",
)


def preload(modules: Iterable[str]) -> None:
    """Import what the children run, so that the fork server (and each child) shares it with
    the relay: the child modules, their lazy imports, the default reactor's module (not
    installed), the built-in backends, and C{modules} (the factories of the configured
    built-in plugins); and what the relay imports after the fork (L{RELAY_MODULES})."""
    from mailrelay.app import acceptorprocess, deliveryprocess

    deliveryprocess.preload()
    acceptorprocess.preload()
    for name in RELAY_MODULES:
        importlib.import_module(name)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # the child will say what is wrong with it
            pass


def usable(twistdOptions: Any) -> str | None:
    """Why the fork server cannot be used under C{twistdOptions} (twistd's options, C{None}
    when not run by twistd) in this process now, or C{None} when it can."""
    if not sys.platform.startswith("linux"):
        return "not on Linux"
    if twistdOptions is None:
        return "not run by twistd"
    if not twistdOptions.get("nodaemon"):
        return "twistd daemonizes (no --nodaemon)"
    if twistdOptions.get("chroot"):
        return "twistd --chroot"
    if twistdOptions.get("euid"):
        return "twistd --euid"
    if "twisted.internet.reactor" in sys.modules:
        return "a reactor is already installed"
    if threading.active_count() != 1:
        return "threads are running"
    return None


def hasChildren(config: Any) -> bool:
    """Whether the relay of C{config} starts child processes: a delivery process of its
    own (C{[queue] process = "separate"}) or acceptor processes."""
    from mailrelay.config.values import resolveProcessCount

    return config.queueProcess == "separate" or resolveProcessCount(config.processes) > 1


@dataclass(frozen=True)
class ForkedConfig:
    """The configuration the relay parsed before it forked the fork server, and what it
    parsed it from: in the server's image, so that the delivery process it forks first can
    take it rather than parse the same bytes again (L{forkedConfig})."""

    #: The file's path as it was given (C{None}: the built-in defaults): the relay's is
    #: absolute, as its children are given it (L{mailrelay.app.tap.Options}).
    path: str | None
    #: The command line's overrides (L{mailrelay.config.loadConfig}'s).
    overrides: dict[str, Any]
    #: The file's bytes.
    text: bytes | None
    #: The current directory it was parsed in (relative paths are relative to it).
    cwd: str
    #: The configuration (L{mailrelay.config.Config}).
    config: Any
    #: The installed plugins by name, as found just before the fork (L{forkedPlugins}).
    plugins: dict[str, Any]


#: In the fork server and the children it forks: what the relay parsed before the fork
#: (L{forRelay}).  C{None} in any other process.
_forkedConfig: ForkedConfig | None = None


def forkedConfig(path: str | None, overrides: dict[str, Any], text: bytes | None) -> Any:
    """The configuration the relay parsed before it forked the fork server, if this process
    was forked by that server and it was parsed from C{path}, C{overrides} and
    C{text} in this same current directory; else C{None} (parse it).

    A child that takes it does not run the parser again: parsing copied 1.0 MiB of the
    pages it shares with the relay and the server (the parser's code and objects, as
    CPython counts references and specialises the code it runs; issue 11).  It was parsed
    as the relay's (its listeners' certificates loaded), a fraction of a second before.
    """
    parsed = _forkedConfig
    if parsed is None:
        return None
    if (parsed.path, parsed.overrides, parsed.text, parsed.cwd) != (
        path, overrides, text, os.getcwd()
    ):
        return None
    return parsed.config


def forkedPlugins(config: Any) -> dict[str, Any] | None:
    """The installed plugins by name as the relay found them just before it forked the fork
    server, when C{config} is the configuration it parsed then, taken by this child
    (L{forkedConfig}); else C{None} (look for them:
    L{mailrelay.config.plugins.availablePlugins}).

    Looking again, the first delivery process read Twisted's plugin cache anew and made
    its objects, copying 0.5 MiB of the pages it shares with the relay and the server
    (issue 11); a child on any other configuration (a reload's, a restart's) looks again,
    and sees a plugin installed since.
    """
    parsed = _forkedConfig
    return parsed.plugins if parsed is not None and parsed.config is config else None


def forRelay(
    config: Any,
    twistdOptions: Any,
    runAs: tuple[int, int] | None,
    parsedFrom: tuple[str | None, dict[str, Any], bytes | None] | None = None,
) -> ForkServer | None:
    """The fork server of the relay about to be built from C{config} under twistd's options
    C{twistdOptions} (as C{runAs} once privileges are dropped), started; or C{None} when the
    relay has no children to fork (its queue manager in its own process, no acceptor
    process) or the server cannot be used (logged).

    @param parsedFrom: what C{config} was parsed from: C{(path, overrides, text)} as given
        to L{mailrelay.config.loadConfig} in this directory; the server keeps it for the
        first delivery process (L{forkedConfig}, L{ForkServer.offerForkedConfig}).
    """
    global _forkedConfig
    if not hasChildren(config):
        return None
    why = "relay.fork_children = false" if not config.forkChildren else usable(twistdOptions)
    if why is None:
        specs = (*config.plugins, *config.headerStampers, *config.recipientValidators,
                 *config.routers, *config.backends)
        plugins = [spec.plugin for spec in specs]
        modules = _factoryModules(plugins)
        if config.metricsListen is not None:
            # The children count too (each imports it at start): imported here, as root
            # if the relay starts so -- as its run user it may not read the installation.
            modules.append("prometheus_client")
        try:
            preload(modules)
            why = usable(twistdOptions)  # (a site's dropin may have installed a reactor)
        except Exception as e:
            why = f"preloading failed: {e!r}"
    if why is not None:
        log.info("the relay's children are started as new processes ({why})", why=why)
        return None
    if parsedFrom is not None:
        from mailrelay.app.plugins import availablePlugins

        path, overrides, text = parsedFrom
        forked = _forkedConfig = ForkedConfig(
            path, dict(overrides), text, os.getcwd(), config, availablePlugins()
        )
    try:
        server = ForkServer.start(runAs, twistdOptions.get("umask"), twistdOptions.get("rundir"))
    except OSError as e:
        log.warn("cannot start the fork server ({error}): the relay's children are started "
                 "as new processes", error=e)
        return None
    finally:
        _forkedConfig = None  # (the server's, not the relay's: it parses its reloads)
    if parsedFrom is not None:
        server.forkedConfigText = (parsedFrom[2],)
        server.plugins = forked.plugins
    log.info("fork server started (pid {pid})", pid=server.pid)
    return server


def _factoryModules(names: Iterable[str]) -> list[str]:
    """The modules of the factories of the built-in plugins named C{names} (a site's are
    left to each process: what its module does when imported is its own)."""
    from mailrelay.app.plugins import availablePlugins

    available = availablePlugins()
    modules = []
    for name in names:
        factory = getattr(available.get(name), "factory", None)
        if isinstance(factory, str) and factory.startswith("mailrelay."):
            modules.append(factory.partition(":")[0])
    return modules


class ForkServer:
    """The relay's end of the fork server: L{spawnProcess} (as C{reactor.spawnProcess})
    starts a child through it, or the ordinary way when it cannot."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self._sock = sock
        #: The server's process id.
        self.pid = pid
        self._reactor: Any = None
        self._reader: Any = None
        #: The children it forked that have not ended, by process id.
        self._children: dict[int, ForkedProcess] = {}
        #: Reports of children that ended before we knew of them (their id still unknown).
        self._early: dict[int, int] = {}
        #: Why it is no longer used (C{None} while it is).
        self.gone: str | None = None
        #: The files of the modules the server was forked with, which the children it forks
        #: share (L{start} notes them before the fork: see L{LoadedCode}).
        self.forkedCode = LoadedCode({})
        #: Their paths.
        self.forkedFiles: frozenset[str] = frozenset()
        self._imports = ImportsFromNow()
        #: The bytes of the configuration the server was forked with, the very object the
        #: relay parsed (L{forkedConfig}), while no child was offered it.
        self.forkedConfigText: tuple[bytes | None] | None = None
        #: The installed plugins by name as found just before the fork (L{forRelay}), for
        #: the relay to build its first configuration with: looked for again after the
        #: fork, the relay copied 0.3 MiB of the pages it shares with the server and the
        #: children (issue 11).  C{None}: unknown.
        self.plugins: dict[str, Any] | None = None

    @classmethod
    def start(
        cls,
        runAs: tuple[int, int] | None = None,
        umask: int | None = None,
        rundir: str | None = None,
    ) -> ForkServer:
        """Freeze what this process holds out of the garbage collector's way and fork the
        server (as C{runAs}, with C{umask}, in C{rundir}).

        @raise OSError: it cannot be forked.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        forkedCode = LoadedCode.now()
        forkedFiles = frozenset(forkedCode.stamps)
        gc.collect()
        from mailrelay.app.memory import releaseFreeMemory

        releaseFreeMemory()  # (the start-up's garbage: not in the image the children share)
        gc.freeze()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # pragma: no cover - the server, measured by the tests from outside
            code = 1
            try:
                ours.close()
                code = _Server(theirs, parent, runAs, umask, rundir).run()
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        server = cls(ours, pid)
        server.forkedCode, server.forkedFiles = forkedCode, forkedFiles
        server._imports.start()
        return server

    def offerForkedConfig(self, configText: bytes | None) -> bool:
        """Whether the child about to be forked (the delivery process) may take the
        configuration the server was forked with rather than parse C{configText}
        (L{forkedConfig}): C{configText} is the very bytes object it was parsed from (not a
        reload's), and no child was asked this before.  Once only: a child started later
        (a restart) parses its configuration as a new process would, reading again the
        files it names."""
        offered, self.forkedConfigText = self.forkedConfigText, None
        return offered is not None and offered[0] is configText and self.gone is None

    def loadedCode(self) -> LoadedCode:
        """The files of the modules loaded now (once): those the server was forked with and
        those imported since (without a pass over every loaded module: see L{LoadedCode})."""
        return LoadedCode.now(self._imports.stop(), earlier=self.forkedCode)

    def attach(self, reactor: Any) -> None:
        """Read the server's reports of children's ends with C{reactor}."""
        if self._reactor is not None:
            return
        from twisted.internet import abstract

        server = self

        class Reader(abstract.FileDescriptor):
            def fileno(self) -> int:
                return server._sock.fileno()

            def doRead(self) -> None:
                server._readReports()

        self._reactor = reactor
        self._sock.setblocking(False)
        self._reader = Reader(reactor)
        self._reader.startReading()

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: str,
        args: list[str],
        env: dict[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: dict[int, Any] | None = None,
    ) -> Any:
        """C{reactor.spawnProcess}: a child module of L{CHILD_MODULES} run as C{python -m}
        is forked by the server (a L{ForkedProcess}); anything else, or anything when the
        server is gone, is started by the reactor."""
        reactor = self._reactor
        assert reactor is not None, "attach() first"
        module = args[2] if len(args) > 2 and args[1] == "-m" else None
        if (
            self.gone is None
            and module in CHILD_MODULES
            and path is None
            and uid is None
            and gid is None
            and not usePTY
        ):
            try:
                return ForkedProcess(
                    reactor, self, list(args), dict(os.environ if env is None else env),
                    processProtocol, childFDs or {0: "w", 1: "r", 2: "r"},
                )
            except _ServerGone as e:
                self._lost(str(e))
        return reactor.spawnProcess(
            processProtocol, executable, args, env=env, path=path, uid=uid, gid=gid,
            usePTY=usePTY, childFDs=childFDs,
        )

    # -- the requests and reports ---------------------------------------------------------

    def fork(self, args: list[str], env: dict[str, str], fdmap: dict[int, int]) -> int:
        """Have the server fork a child running C{args} (C{python -m module ...}) with the
        environment C{env} and the descriptors C{fdmap} (the child's number -> ours); its
        process id.  @raise _ServerGone: the server did not answer."""
        if self.gone is not None:
            raise _ServerGone(self.gone)
        request = json.dumps(
            {"module": args[2], "argv": _withoutParentPid(args[3:]), "env": env,
             "fds": list(fdmap)}
        ).encode()
        try:
            self._sock.sendmsg(
                [request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                             struct.pack(f"{len(fdmap)}i", *fdmap.values()))],
            )
        except OSError as e:
            raise _ServerGone(f"cannot reach it: {e}") from None
        deadline = time.monotonic() + _ANSWER_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            ready = select.select([self._sock], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                raise _ServerGone(f"no answer in {_ANSWER_TIMEOUT:g}s")
            try:
                message = self._receive()
            except BlockingIOError:
                continue
            if message is None:
                raise _ServerGone("it exited")
            if "forked" in message:
                return int(message["forked"])
            if "error" in message:
                raise OSError(errno.EAGAIN, f"the fork server could not fork: {message['error']}")
            self._report(message)

    def _receive(self) -> dict[str, Any] | None:
        """The next message from the server; C{None} at its end.  @raise BlockingIOError:
        none now."""
        try:
            data = self._sock.recv(_MAX_MESSAGE)
        except ConnectionResetError:
            return None
        if not data:
            return None
        result: dict[str, Any] = json.loads(data)
        return result

    def _readReports(self) -> None:
        while self.gone is None:
            try:
                message = self._receive()
            except BlockingIOError:
                return
            if message is None:
                self._lost("it exited")
                return
            self._report(message)

    def _report(self, message: dict[str, Any]) -> None:
        pid, status = int(message["exited"]), int(message["status"])
        child = self._children.pop(pid, None)
        if child is None:
            self._early[pid] = status
        else:
            child.processEnded(status)

    def track(self, child: ForkedProcess) -> None:
        """C{child} was forked: report its end to it (at once if it has ended already)."""
        assert child.pid is not None
        status = self._early.pop(child.pid, None)
        if status is not None:
            child.processEnded(status)
        elif self.gone is not None:
            _watchEnd(self._reactor, child)
        else:
            self._children[child.pid] = child

    def _lost(self, why: str) -> None:
        """The server is gone: start children the ordinary way from now on, and see the end
        of those it forked by their process ids."""
        if self.gone is not None:
            return
        self.gone = why
        log.error(
            "the fork server (pid {pid}) is gone ({why}): the relay's children are started "
            "as new processes from now on",
            pid=self.pid,
            why=why,
        )
        if self._reader is not None:
            self._reader.stopReading()
        self._sock.close()
        children, self._children = list(self._children.values()), {}
        for child in children:
            _watchEnd(self._reactor, child)

    def close(self) -> None:
        """Tell the server to exit (the relay is ending)."""
        if self.gone is None:
            self.gone = "closed"
            if self._reader is not None:
                self._reader.stopReading()
            self._sock.close()


class _ServerGone(Exception):
    """The fork server cannot fork (it is gone, or does not answer)."""


def _withoutParentPid(argv: list[str]) -> list[str]:
    """C{argv} without its C{--parent-pid N}: a forked child dies with the fork server,
    which dies with the relay."""
    result = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--parent-pid":
            skip = True
        elif not arg.startswith("--parent-pid="):
            result.append(arg)
    return result


def _watchEnd(reactor: Any, child: ForkedProcess) -> None:
    """See the end of C{child}, which the fork server can no longer report, by its process
    id (a C{pidfd}, readable once it has ended); its status is unknown."""
    pid = child.pid
    if pid is None:
        return
    child.statusUnknown = True  # (for the log: mailrelay.queue.process.endReason)
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        child.processEnded(UNKNOWN_STATUS)
        return
    except OSError:  # no pidfd (Linux before 5.3): look every half second
        _pollEnd(reactor, child, pid)
        return
    from twisted.internet import abstract

    class Watch(abstract.FileDescriptor):
        def fileno(self) -> int:
            return fd

        def doRead(self) -> None:
            self.stopReading()
            os.close(fd)
            child.processEnded(UNKNOWN_STATUS)

    Watch(reactor).startReading()


def _pollEnd(reactor: Any, child: ForkedProcess, pid: int) -> None:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # (PermissionError: alive, as another
        child.processEnded(UNKNOWN_STATUS)  # user: the id was reused, ours is gone)
        return
    reactor.callLater(0.5, _pollEnd, reactor, child, pid)


# -- the relay's end of a forked child --------------------------------------------------------


class ForkedProcess(Process):
    """A child forked by the fork server: Twisted's process transport (its pipes, C{write},
    C{closeStdin}, C{signalProcess}, the protocol's callbacks) but for how it starts (the
    server forks it) and how its end is known (the server reports its status: it is not our
    child to wait for)."""

    def __init__(
        self,
        reactor: Any,
        server: ForkServer,
        args: list[str],
        env: dict[str, str],
        proto: Any,
        childFDs: dict[int, Any],
    ) -> None:
        self._reactor = reactor
        #: Its end is seen without its status (the server that forked it is gone).
        self.statusUnknown = False
        _BaseProcess.__init__(self, proto)
        self.pipes: dict[int, Any] = {}
        helpers: dict[int, int] = {}  # child's number -> our end of its pipe
        fdmap: dict[int, int] = {}  # child's number -> the descriptor it gets
        opened: list[int] = []
        try:
            for childFD, target in childFDs.items():
                if target in ("r", "w"):
                    readFD, writeFD = os.pipe()
                    opened += [readFD, writeFD]
                    fdmap[childFD], helpers[childFD] = (
                        (writeFD, readFD) if target == "r" else (readFD, writeFD)
                    )
                else:
                    fdmap[childFD] = int(target)
            self.pid = server.fork(args, env, fdmap)  # type: ignore[assignment]
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        self.status = -1
        self.proto = proto
        for childFD, ourFD in helpers.items():
            os.close(fdmap[childFD])
            if childFDs[childFD] == "r":
                self.pipes[childFD] = self.processReaderFactory(reactor, self, childFD, ourFD)
            else:
                self.pipes[childFD] = self.processWriterFactory(
                    reactor, self, childFD, ourFD, forceReadHack=True
                )
        try:
            if self.proto is not None:
                self.proto.makeConnection(self)
        except BaseException:
            log.failure("forked child {pid}: its protocol failed to connect", pid=self.pid)
        server.track(self)

    def reapProcess(self) -> None:
        """Not our child: the fork server reports its end (L{ForkServer.track})."""


# -- the server --------------------------------------------------------------------------------


class _Server:  # pragma: no cover - runs in the fork server, tested from outside
    """The fork server's loop, in its own process."""

    def __init__(
        self,
        sock: socket.socket,
        relay: int,
        runAs: tuple[int, int] | None,
        umask: int | None,
        rundir: str | None,
    ) -> None:
        self.sock = sock
        self.relay = relay
        self.runAs = runAs
        self.umask = umask
        self.rundir = rundir
        self.wakeR, self.wakeW = os.pipe()
        self.pid = os.getpid()

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        keep = {self.sock.fileno(), self.wakeR, self.wakeW, 1, 2}
        _closeAllBut(keep)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if self.umask is not None:
            os.umask(self.umask)
        if self.rundir is not None:
            os.chdir(self.rundir)
        if self.runAs is not None:
            from twisted.python.util import switchUID

            switchUID(*self.runAs)
        # (After the switch, which clears it.)  Die with the relay; it may be gone already.
        deathSignal(signal.SIGKILL)
        if os.getppid() != self.relay:
            return 1
        _name("")
        os.set_blocking(self.wakeW, False)
        signal.set_wakeup_fd(self.wakeW)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self.wakeR, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.wakeR:
                    os.read(self.wakeR, 4096)
                    self.reap()
                elif not self.serve():
                    return 0

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.send({"exited": pid, "status": status})

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.send(json.dumps(message).encode())
        except OSError:  # the relay is gone: we are about to be killed
            pass

    def serve(self) -> bool:
        """Answer one request; C{False} at the end of the relay's socket."""
        try:
            data, ancillary, _, _ = self.sock.recvmsg(
                _MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * struct.calcsize("i"))
            )
        except ConnectionResetError:
            return False
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % struct.calcsize("i")
                fds += struct.unpack(f"{usable // struct.calcsize('i')}i", payload[:usable])
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            request = json.loads(data)
            fdmap = dict(zip(request["fds"], fds, strict=True))
            pid = os.fork()
        except Exception as e:
            self.send({"error": f"{type(e).__name__}: {e}"})
        else:
            if pid == 0:
                _runChild(self, request, fdmap)
            self.send({"forked": pid})
        finally:
            for fd in fds:
                os.close(fd)
        return True


def _closeAllBut(keep: set[int]) -> None:  # pragma: no cover - in forked processes
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _setEnvironment(env: dict[str, str], environ: Any = os.environ) -> None:
    """Make C{environ} (this process's environment) C{env}: left alone when it is that
    already -- a child is usually given the relay's, which the server was forked with.
    Emptied and filled again, every variable's objects were freed and made anew, copying
    0.5 MiB of the pages a child shares with the relay and the server (issue 11)."""
    if dict(environ) != env:
        environ.clear()
        environ.update(env)


def _runChild(
    server: _Server, request: dict[str, Any], fdmap: dict[int, int]
) -> None:  # pragma: no cover - runs in the forked child, tested from outside
    """In the child just forked: put its descriptors in place, close the rest, restore the
    signals, run the module's C{forkedMain}, exit.  Never returns."""
    code: Any = 1
    try:
        deathSignal(signal.SIGTERM)
        if os.getppid() != server.pid:  # the server is gone already
            raise SystemExit(1)
        _name(request["module"])
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Move the received descriptors above the numbers they get, then place them.
        import fcntl

        above = max(fdmap, default=0) + 1
        moved = {child: fcntl.fcntl(fd, fcntl.F_DUPFD, above) for child, fd in fdmap.items()}
        _closeAllBut(set(moved.values()))
        for child, fd in moved.items():
            os.dup2(fd, child)  # (inheritable: the child's own children may need them)
        _closeAllBut(set(moved))
        _setEnvironment(request["env"])
        from mailrelay.endpoints import rereadPassedSockets

        rereadPassedSockets()  # (the relay's systemd sockets are not the child's)
        sys.argv = [request["module"], *request["argv"]]
        module = importlib.import_module(request["module"])
        code = module.forkedMain(request["argv"])
    except SystemExit as e:
        code = e.code
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))
