"""The C{mailrelay} command (also C{python -m mailrelay}): the operator's tools, as Postfix's
C{postqueue}, C{postsuper}, C{postcat}, C{qshape} and C{postfix check|status|reload|stop}.

    mailrelay [--config FILE | --spool DIR] [--json] COMMAND ...

It talks to the running relay over its control socket (L{mailrelay.app.control}), found in
the spool directory of the configuration (C{--config}, or C{--spool}; by default the
relay's own default, C{./mailrelay-spool}); when none answers on the file's, the command says
that a relay started before its C{spool.directory} was changed is reached with C{--spool}.
Output is for people, or with C{--json} for scripts.  Exit status: 0 done, 1 failed (the
relay is not running, an unknown queue id, a configuration error...), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailrelay.queue.commands import QuietAMP

__all__ = ["main"]


def _seconds(text: str) -> float:
    """A number of seconds greater than 0 (C{--timeout})."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


class CommandFailed(Exception):
    """The command failed; the message says why (printed after C{mailrelay: }).

    @ivar status: the exit status: 1, or 2 for a request the relay refused as asked wrong
        (a usage error).
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _count(number: int, noun: str) -> str:
    """C{"1 message"}, C{"2 messages"}."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


class RelayDown(CommandFailed):
    """No relay answers on the control socket."""


#: Where the processes of the machine are listed (Linux's proc file system).
PROC = Path("/proc")


def _isRelay(argv: list[str]) -> bool:
    """Whether C{argv} is the command line of a relay's process: C{twistd ... mailrelay}, or
    one of its children (C{python -m mailrelay.app.deliveryprocess}, the acceptors'); not
    the C{mailrelay} command's."""
    if "mailrelay" in argv and any(os.path.basename(a).startswith("twistd") for a in argv):
        return True
    return any(
        a == "-m" and module.startswith("mailrelay.app.") and module.endswith("process")
        for a, module in zip(argv, argv[1:], strict=False)
    )


def relaysStartedWith(config: str) -> list[int] | None:
    """The process ids of the relays' processes started with the configuration file
    C{config} (its path resolved in each one's working directory), in order; C{None} when
    the processes cannot be listed (no C{/proc})."""
    wanted = os.path.realpath(config)
    try:
        entries = [entry for entry in os.listdir(PROC) if entry.isdigit()]
    except OSError:
        return None
    found = []
    for entry in entries:
        try:
            argv = [a.decode("utf-8", "replace")
                    for a in (PROC / entry / "cmdline").read_bytes().split(b"\0")[:-1]]
        except OSError:  # (gone meanwhile)
            continue
        if not _isRelay(argv):
            continue
        for arg, value in zip(argv, [*argv[1:], ""], strict=True):
            if arg.startswith("--config="):
                path = arg[len("--config="):]
            elif arg == "--config":
                path = value
            else:
                continue
            if not os.path.isabs(path):
                try:
                    path = os.path.join(os.readlink(PROC / entry / "cwd"), path)
                except OSError:  # (another user's: where it runs is not ours to see)
                    path = os.path.join("/nonexistent", path)
            if os.path.realpath(path) == wanted:
                found.append(int(entry))
    return sorted(found)


def _relayDownWithConfig(config: str, spool: Path, error: RelayDown) -> str:
    """What to say when no relay answers on C{spool}, the spool directory the configuration
    file C{config} names now.  A relay started before its C{spool.directory} was changed
    runs on the old one until it is restarted (a reload cannot move it), and the file no
    longer leads there: when a relay's process started with that file runs (or the
    processes cannot be listed), say so and how to reach it.  A directory no relay has run
    on is said so: not "not running"."""
    if not os.path.isdir(spool):
        first = f"no relay runs on {spool}: it does not exist"
    elif not os.path.isdir(spool / "queue"):
        first = f"no relay runs on {spool}: it holds no spool (no relay has run on it)"
    else:
        first = str(error)
    running = relaysStartedWith(config)
    if running == []:
        return first
    reach = ("runs on its old spool until it is restarted: name that one with --spool "
             "(mailrelay --spool OLD-SPOOL stop)")
    if running is None:
        return f"{first}; a relay started before spool.directory in {config} was changed {reach}"
    return (f"{first}; a relay started with {config} runs (process {running[0]}): started "
            f"before spool.directory in {config} was changed, it {reach}")


# -- finding and talking to the relay ---------------------------------------------------------


def spoolDirectory(config: str | None, spool: str | None) -> Path:
    """The spool directory of the relay the options name: C{spool} as given, or the
    configuration file's C{[spool] directory} (only that table is read, so that an error
    elsewhere in the file does not keep the operator from a running relay), or the
    default; whether this user may write there is not asked.

    @raise CommandFailed: the file cannot be read, or its spool directory is wrong.
    """
    from dataclasses import replace

    from mailrelay.config.keys import DEFAULT_SPOOL, SPOOL
    from mailrelay.config.loader import _readFile
    from mailrelay.config.schema import At, Computed, Source
    from mailrelay.config.values import defaultSpoolDirectory, spoolPath
    from mailrelay.errors import ConfigError

    # The directory's path only: whether we may write there is the relay's business (its
    # control socket says who may use it).
    table = replace(SPOOL, keys=tuple(
        replace(key, parse=spoolPath, default=Computed(defaultSpoolDirectory(DEFAULT_SPOOL,
                                                                             spoolPath)))
        if key.target == "spoolDirectory" else key
        for key in SPOOL.keys
    ))
    cwd = Path(os.path.abspath(os.getcwd()))
    try:
        if spool is not None:
            return Path(os.path.abspath(spool))
        if config is None:
            fields = table.read({}, At(Source(None, cwd, cwd)).child("spool"))
        else:
            data = _readFile(config)
            directory = Path(os.path.abspath(os.path.dirname(config) or "."))
            at = At(Source(config, directory, cwd)).child("spool")
            fields = table.read(data.get("spool", {}), at)
    except ConfigError as e:
        raise CommandFailed(f"configuration error: {e}") from None
    return Path(fields["spoolDirectory"])


def connect(path: Path) -> socket.socket:
    """A connection to the control socket C{path}.

    @raise CommandFailed: the relay is not running, or the socket may not be used by us.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise RelayDown(f"the relay is not running (no control socket answers at {path})"
                        ) from None
    except PermissionError:
        sock.close()
        raise CommandFailed(
            f"permission denied on the control socket {path}: run this as the user the "
            "relay runs as, or as root (to list the queue: as a user of its [spool] "
            "mailq_users)"
        ) from None
    except OSError as e:
        sock.close()
        raise CommandFailed(f"cannot connect to the control socket {path}: {e}") from None
    return sock


class _Client(QuietAMP):
    """Our end of the control connection: C{closed} fires when the relay closes it."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if not self.closed.called:
            self.closed.callback(None)


class Session:
    """A conversation with the relay over its control socket, in the reactor run for the
    command.

    @ivar closed: fires when the relay has closed the connection.
    """

    def __init__(self, reactor: Any, sock: socket.socket) -> None:
        from twisted.internet.protocol import Factory

        self.reactor = reactor
        self.protocol = _Client()
        self.closed = self.protocol.closed
        sock.setblocking(False)
        reactor.adoptStreamConnection(
            sock.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: self.protocol)
        )
        sock.close()

    async def call(self, command: Any, **arguments: Any) -> Any:
        """The C{result} of C{command}.  @raise CommandFailed: it failed (the message is the
        relay's)."""
        from twisted.internet import error as ierror
        from twisted.internet.defer import CancelledError
        from twisted.protocols.amp import UnknownRemoteError

        from mailrelay.queue.control import BadRequest

        try:
            response = await self.protocol.callRemote(command, **arguments)
        except CancelledError:
            raise  # --timeout: the caller says so
        except (ierror.ConnectionDone, ierror.ConnectionLost):
            raise CommandFailed("the relay closed the connection before it answered") from None
        except UnknownRemoteError:
            raise CommandFailed("the relay failed to answer (see its log)") from None
        except BadRequest as e:
            raise CommandFailed(str(e), status=2) from None  # asked wrong: a usage error
        except Exception as e:
            raise CommandFailed(str(e) or f"the command failed ({type(e).__name__})") from None
        return response["result"]

    def close(self) -> None:
        transport = self.protocol.transport
        if transport is not None:
            transport.loseConnection()


# -- output ----------------------------------------------------------------------------------


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(seconds))


def _fullTime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(seconds))


_MARKS = {"active": "*", "hold": "!", "corrupt": "?"}


class EntryPrinter:
    """The queue as C{postqueue -p} shows it, printed as its pages come (as Postfix's showq
    streams it), so that listing a large queue does not hold it in memory: a line per
    message (queue id, C{*} when active, C{!} when on hold; size; arrival; sender), then
    each recipient, a pending one after its last delay reason, the others with their state;
    L{end} prints the total."""

    #: A queue id's width (20 characters: L{mailrelay.spool.ids}) and its mark's.
    width = 21

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.count = 0
        self.size = 0

    def entries(self, entries: Sequence[dict[str, Any]]) -> None:
        """Print C{entries}, the next page of the queue (the heading before the first)."""
        out, width = self.out, self.width
        indent = " " * (width + 1 + 8 + 1 + 19 + 2)
        for e in entries:
            if not self.count:
                print(
                    f"{'-Queue ID-':<{width}} {'--Size--':>8} {'----Arrival Time---':<19}  "
                    "-Sender/Recipient-------",
                    file=out,
                )
            self.count += 1
            queueID = e["queue_id"] + _MARKS.get(e["queue_name"], "")
            if e["queue_name"] == "corrupt":
                print(
                    f"{queueID:<{width}} {'?':>8} {'?':<19}  (unreadable: {e['error']})", file=out
                )
                print(file=out)
                continue
            self.size += e["message_size"]
            sender = e["sender"] or "MAILER-DAEMON"
            print(
                f"{queueID:<{width}} {e['message_size']:>8} {_when(e['arrival_time']):<19}  "
                f"{sender}",
                file=out,
            )
            for r in e["recipients"]:
                if r["state"] == "pending":
                    if r.get("delay_reason"):
                        print(f"{' ' * (width + 6)}({r['delay_reason']})", file=out)
                    print(f"{indent}{r['address']}", file=out)
                else:
                    print(f"{indent}{r['address']} ({r['state']}, {r['status']})", file=out)
            print(file=out)

    def end(self) -> None:
        """Print the total (or that the queue is empty)."""
        if not self.count:
            print("Mail queue is empty", file=self.out)
            return
        kbytes = (self.size + 1023) // 1024
        s = "s" if self.count != 1 else ""
        print(f"-- {kbytes} Kbytes in {self.count} Request{s}.", file=self.out)


def printEntries(entries: Sequence[dict[str, Any]], out: TextIO) -> None:
    """The queue C{entries} as C{postqueue -p} shows it (see L{EntryPrinter})."""
    printer = EntryPrinter(out)
    printer.entries(entries)
    printer.end()


def printShow(shown: dict[str, Any], out: TextIO) -> None:
    """One entry as C{postcat -q} shows it: the envelope's records, then the message."""
    e, envelope = shown["entry"], shown["envelope"]
    queueID = e["queue_id"]
    print(f"*** ENVELOPE RECORDS {e['queue_name']}/{queueID} ***", file=out)
    print(f"message_size: {e['message_size']}", file=out)
    print(f"message_arrival_time: {_fullTime(e['arrival_time'])}", file=out)
    client = envelope.get("client")
    if client:
        name = client.get("rdns") or "unknown"
        print(f"client: {name}[{client['address']}]:{client['port']}", file=out)
        for key, label in (
            ("helo", "helo"),
            ("protocol", "protocol"),
            ("tls", "tls"),
            ("authUser", "sasl_username"),
            ("listener", "listener"),
        ):
            if client.get(key):
                print(f"{label}: {client[key]}", file=out)
    for key, label in (("envid", "envid"), ("ret", "ret"), ("body", "body")):
        if envelope.get(key):
            print(f"{label}: {envelope[key]}", file=out)
    print(f"sender: {e['sender'] or '<>'}", file=out)
    print(f"attempts: {e['attempts']}", file=out)
    if e["next_attempt"] is not None and e["queue_name"] != "hold":
        print(f"next_attempt: {_fullTime(e['next_attempt'])}", file=out)
    if envelope.get("noticeOf"):
        # (A success notice: the message whose recipients' notice_owed marks name it.)
        print(f"notice_of: {envelope['noticeOf']}", file=out)
    for r in envelope["recipients"]:
        print(f"recipient: {r['address']}", file=out)
        if r.get("original") and r["original"] != r["address"]:
            print(f"  original: {r['original']}", file=out)
        for key, label in (("orcpt", "orcpt"), ("notify", "notify")):
            if r.get(key):
                value = r[key]
                print(f"  {label}: {','.join(value) if isinstance(value, list) else value}",
                      file=out)
        print(f"  state: {r['state']}, attempts: {r['attempts']}"
              + (f", status: {r['status']}" if r.get("status") else ""), file=out)
        if r.get("lastResult"):
            # (As the listing's delay_reason: the reason where one is recorded apart, and
            # then the diagnostic it stands beside.)
            print(f"  reason: {r.get('reason') or r['lastResult']}", file=out)
            if r.get("reason"):
                print(f"  diagnostic: {r['lastResult']}", file=out)
        if r.get("remoteMTA"):
            print(f"  remote_mta: {r['remoteMTA']}", file=out)
            if r.get("remoteAddress"):  # (the address its status came from: name[address])
                print(f"  remote_address: {r['remoteAddress']}", file=out)
        if r.get("noticeOwed"):
            print(f"  notice_owed: {r['noticeOwed']} (queue id {r.get('noticeID')})", file=out)
    print(f"*** MESSAGE CONTENTS {e['queue_name']}/{queueID} ***", file=out)
    out.write(shown["headers"].replace("\r\n", "\n"))
    if shown.get("headers_truncated"):
        print("[... header section cut short]", file=out)
    if "body" in shown:
        out.write("\n" if shown["headers"].endswith("\n") else "\n\n")
        out.write(shown["body"].replace("\r\n", "\n"))
        if shown.get("body_truncated"):
            print("\n[... body cut short]", file=out)
    print(f"*** MESSAGE FILE END {e['queue_name']}/{queueID} ***", file=out)


def printSummary(summary: dict[str, Any], out: TextIO) -> None:
    """Messages by domain and age, as C{qshape} shows them."""
    rows = [["TOTAL", *summary["total"]], *summary["rows"]]
    width = max(len(str(row[0])) for row in rows) + 1
    labels = summary["labels"]
    cells = [
        max(len(labels[i]) + 1, 5, *(len(str(row[i + 1])) + 1 for row in rows))
        for i in range(len(labels))
    ]
    print(" " * width + "".join(f"{label:>{w}}" for label, w in zip(labels, cells, strict=True)),
          file=out)
    for row in rows:
        print(f"{row[0]:>{width}}" + "".join(f"{n:>{w}}" for n, w in zip(row[1:], cells,
                                                                          strict=True)), file=out)


def printResults(result: dict[str, Any], done: str, out: TextIO, err: TextIO) -> bool:
    """Each entry's result, one line each (failures on C{err}); whether all were done."""
    ok = True
    for item in result["results"]:
        line = f"{item['queue_id']}: {item['result']}"
        if item["ok"]:
            print(line, file=out)
        else:
            print(f"mailrelay: {line}", file=err)
            ok = False
    count = result["count"]
    print(f"mailrelay: {done}: {_count(count, 'message')}", file=out)
    return ok


def printStatus(status: dict[str, Any], out: TextIO) -> None:
    """C{mailrelay status}: a few lines for people."""
    state = "running" if status.get("running", True) else "stopping"
    print(
        f"mailrelay is {state} (pid {status['pid']}, version {status['version']}, since "
        f"{_fullTime(status['started'])})",
        file=out,
    )
    print(f"configuration: {status['config']}", file=out)
    if status.get("code"):
        print(f"code: {status['code']}", file=out)
    print(f"hostname: {status['hostname']}", file=out)
    print(f"spool: {status['spool']}", file=out)
    for n, listener in enumerate(status["listeners"]):
        label = "listeners:" if n == 0 else ""
        role = f" ({listener['role']})" if listener["role"] else ""
        where = "closed" if listener["address"] is None else f"on {listener['address']}"
        print(f"{label:<11}{listener['endpoint']}{role} {where}", file=out)
    print(f"sessions: {status['sessions']} open", file=out)
    delivery = status["delivery"]
    if delivery["mode"] == "inline":
        text = f"in the relay's process, queue manager {delivery['state']}"
    else:
        text = f"delivery process {delivery['state']}"
        if delivery.get("pid"):
            text += f" (pid {delivery['pid']}, since {_fullTime(delivery['since'])})"
        if delivery.get("restarts"):
            text += f", restarted {_count(delivery['restarts'], 'time')}"
        if delivery.get("retiring"):
            text += ", previous ones finishing: " + ", ".join(map(str, delivery["retiring"]))
    if status.get("hold"):
        text += "; [queue] hold = true: nothing is delivered"
    print(f"delivery: {text}", file=out)
    acceptors = status.get("acceptors") or {}
    if acceptors.get("count") or acceptors.get("retiring"):
        running = acceptors["running"]
        text = f"{len(running)} of {acceptors['count']} running"
        if running:
            text += " (" + ", ".join(
                f"pid {a['pid']} since {_fullTime(a['since'])}" for a in running
            ) + ")"
        if acceptors.get("restarts"):
            text += f", restarted {_count(acceptors['restarts'], 'time')}"
        if acceptors.get("retiring"):
            text += ", previous ones finishing: " + ", ".join(map(str, acceptors["retiring"]))
        print(f"acceptor processes: {text}", file=out)
    queue = status.get("queue", {})
    if "error" in queue:
        print(f"queue: unknown ({queue['error']})", file=out)
        return
    print(f"queue manager: {queue['manager']}", file=out)
    parts = ", ".join(f"{n} {name}" for name, n in queue["queues"].items() if n)
    print(
        f"queue: {_count(queue['messages'], 'message')}, "
        f"{_count(queue['recipients'], 'recipient')} pending"
        + (f" ({parts})" if parts else ""),
        file=out,
    )


# -- the commands ----------------------------------------------------------------------------


def _dump(value: Any, out: TextIO) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=None, sort_keys=False), file=out)


def _output(value: Any, options: Any, out: TextIO, printer: Callable[[Any, TextIO], None]) -> int:
    """Print C{value} as JSON (C{--json}) or with C{printer}; exit status 0."""
    if options.json:
        _dump(value, out)
    else:
        printer(value, out)
    return 0


async def queueList(session: Session, options: Any, out: TextIO, err: TextIO) -> int:
    from mailrelay.queue.commands import LIST_PAGE, QueueList

    printer = EntryPrinter(out)
    cursor = None
    while True:
        page = await session.call(QueueList, cursor=cursor, limit=LIST_PAGE)
        if options.json:
            for entry in page["entries"]:
                _dump(entry, out)
        else:
            printer.entries(page["entries"])
        cursor = page["next"]
        if cursor is None:
            break
    if not options.json:
        printer.end()
    return 0


async def queueShow(session: Session, options: Any, out: TextIO, err: TextIO) -> int:
    from mailrelay.queue.commands import QueueShow

    shown = await session.call(QueueShow, queueID=options.id, body=options.body)
    return _output(shown, options, out, printShow)


async def queueSummary(session: Session, options: Any, out: TextIO, err: TextIO) -> int:
    from mailrelay.queue.commands import QueueSummary

    summary = await session.call(QueueSummary, senders=options.sender, states=options.state)
    return _output(summary, options, out, printSummary)


#: Queue ids sent in one control message (AMP: 64 KiB a value; an id takes 22 octets).
_IDS_AT_ONCE = 1000


def _changing(command: Any, done: str, **fixed: Any) -> Callable[..., Any]:
    """A queue command changing entries: call it with the options, print the results."""

    async def run(session: Session, options: Any, out: TextIO, err: TextIO) -> int:
        arguments = {name: getattr(options, attribute) for name, attribute in fixed.items()}
        ids = list(dict.fromkeys(options.ids))  # (an id given twice is taken once)
        # One control message holds at most 64 KiB a value: ids go _IDS_AT_ONCE at a time.
        result = await session.call(command, ids=ids[:_IDS_AT_ONCE], **arguments)
        for start in range(_IDS_AT_ONCE, len(ids), _IDS_AT_ONCE):
            more = await session.call(command, ids=ids[start : start + _IDS_AT_ONCE],
                                      **arguments)
            result["results"].extend(more["results"])
            result["count"] += more["count"]
        if options.json:
            _dump(result, out)
            return 0 if all(item["ok"] for item in result["results"]) else 1
        if not result["results"] and not options.ids:
            count = result["count"]
            print(f"mailrelay: {done}: {_count(count, 'message')}", file=out)
            return 0
        return 0 if printResults(result, done, out, err) else 1

    return run


async def status(session: Session, options: Any, out: TextIO, err: TextIO) -> int:
    from mailrelay.app.control import Status

    return _output(await session.call(Status), options, out, printStatus)


async def reload(session: Session, options: Any, out: TextIO, err: TextIO) -> int:
    from mailrelay.app.control import Reload

    result = await session.call(Reload)
    if options.json:
        _dump(result, out)
    elif result["reloaded"]:
        print(f"mailrelay: configuration reloaded from {result['source']}", file=out)
    else:
        print(
            "mailrelay: configuration not reloaded (still running on the previous one): "
            f"{result['error']}",
            file=err,
        )
    if not options.json and result.get("warning"):
        print(f"mailrelay: warning: {result['warning']}", file=err)
    return 0 if result["reloaded"] else 1


async def stop(session: Session, options: Any, out: TextIO, err: TextIO) -> int:
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    from mailrelay.app.control import Stop

    result = await session.call(Stop)
    pid = result["pid"]
    if not options.json:
        print(f"mailrelay: stopping (pid {pid})", file=out)
    if options.no_wait:
        if options.json:
            _dump({"pid": pid, "stopped": False}, out)
        return 0
    # The relay closes the connection once everything has stopped (or exits).
    try:
        await session.closed.addTimeout(options.timeout, session.reactor)
    except DeferredTimeout:
        if options.json:
            _dump({"pid": pid, "stopped": False}, out)
        else:
            print(f"mailrelay: still stopping after {options.timeout:g}s", file=err)
        return 1
    if options.json:
        _dump({"pid": pid, "stopped": True}, out)
    else:
        print("mailrelay: stopped", file=out)
    return 0


# -- mailrelay check ---------------------------------------------------------------------------


def check(options: Any, out: TextIO, err: TextIO) -> int:
    """Load and build the whole configuration, as the relay would (plugins, certificates,
    password files, routes, backends); with C{-n}, print the effective configuration; with
    C{--sample}, print the sample configuration instead (a start for /etc/mailrelay.toml)."""
    if getattr(options, "sample", False):
        from mailrelay.config.sample import sampleConfig

        out.write(sampleConfig())
        return 0
    from twisted.internet import reactor
    from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
    from zope.interface import implementer

    from mailrelay.app.control import checkSocketPath, controlSocketPath
    from mailrelay.app.relay import RelayService
    from mailrelay.config import loadConfig, readConfigFile
    from mailrelay.config.effective import effectiveConfiguration
    from mailrelay.errors import ConfigError
    from mailrelay.spool import Spool

    path = options.config
    overrides = {"spool": options.spool} if options.spool is not None else {}
    # What the relay would log as warnings while building (an expired certificate, a
    # plugin's time limit its timeout cuts...): said here too, as postfix check does.
    warnings: list[str] = []

    @implementer(ILogObserver)
    def warned(event: dict[str, Any]) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            warnings.append(formatEvent(event))

    globalLogPublisher.addObserver(warned)
    try:
        text = readConfigFile(path) if path is not None else None
        config = loadConfig(path, overrides, text=text)
        relay = RelayService(reactor, path, overrides)
        relay.spool = Spool(config.spoolDirectory, reactor=reactor)  # never started
        plan = relay.plan(config, text)
        warnings += _unknownSockets(relay, config)
        try:
            checkSocketPath(controlSocketPath(config.spoolDirectory))
        except OSError as e:
            raise ConfigError(str(e), file=config.source, key="spool.directory") from None
    except ConfigError as e:
        if options.json:
            _dump({"ok": False, "error": str(e), "warnings": warnings}, out)
        else:
            _printWarnings(warnings, err)
            print(f"mailrelay: configuration error: {e}", file=err)
        return 1
    finally:
        globalLogPublisher.removeObserver(warned)
    warnings += _checkOnline(reactor, plan.services)
    if not options.json:
        _printWarnings(warnings, err)
    source = path or "(embedded default)"
    if options.json:
        result: dict[str, Any] = {"ok": True, "config": source, "warnings": warnings}
        if options.n:
            result["effective"] = effectiveConfiguration(path, overrides, text)
        _dump(result, out)
    elif options.n:
        out.write(effectiveConfiguration(path, overrides, text))
    else:
        print(f"mailrelay: configuration {source}: ok", file=out)
    return 0


#: How long C{check} waits for each of the plugins' network checks (a DNS lookup).
ONLINE_CHECK_TIME = 10.0


def _checkOnline(reactor: Any, services: Any) -> list[str]:
    """What the plugins that can check their configuration over the network
    (L{IOnlineCheck}: the DKIM signer's key records) find wrong, or could not check, run
    on C{reactor} (a few seconds at most: L{ONLINE_CHECK_TIME}); as C{opendkim-testkey},
    but none fails the check (the relay would run, and warn likewise)."""
    from twisted.internet.defer import gatherResults

    from mailrelay.interfaces import IOnlineCheck

    checks = [plugin.checkOnline(reactor, ONLINE_CHECK_TIME)
              for _, plugin in services if IOnlineCheck.providedBy(plugin)]
    if not checks:
        return []
    found: list[str] = []
    d = gatherResults(checks, consumeErrors=True)
    d.addCallback(lambda lists: found.extend(
        text for findings in lists for kind, text in findings if kind != "ok"))
    d.addErrback(lambda f: found.append(f"a plugin's network check failed: {f.value!r}"))
    d.addBoth(lambda _: reactor.stop() if reactor.running else None)
    if not d.called:
        reactor.run(installSignalHandlers=False)
    return found


def _unknownSockets(relay: Any, config: Any) -> list[str]:
    """What C{check} cannot know of the listeners of C{config}: outside socket activation,
    whether systemd will pass a C{systemd:} endpoint its socket (only its syntax is checked;
    under socket activation, the configuration refuses it if not)."""
    from mailrelay.endpoints import passedSockets

    if passedSockets().inheritedDescriptors():
        return []
    return [
        f"{relay.listenerWhere(config, index)}: {listener.settings.name}: only its syntax is "
        "checked (systemd passed this process no socket): the relay can listen on it only "
        "when a systemd socket unit passes it the socket"
        for index, listener in enumerate(config.listeners)
        if listener.settings.name.startswith("systemd:")
    ]


def _printWarnings(warnings: list[str], err: TextIO) -> None:
    for warning in warnings:
        print(f"mailrelay: warning: {warning}", file=err)


# -- the command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", default=argparse.SUPPRESS, metavar="FILE",
        help="the relay's configuration file (its spool holds the control socket)",
    )
    common.add_argument(
        "--spool", default=argparse.SUPPRESS, metavar="DIR",
        help="the relay's spool directory (instead of the configuration's)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS,
        help="print JSON for scripts (one object per message for queue list)",
    )
    common.add_argument(
        "--timeout", type=_seconds, default=argparse.SUPPRESS, metavar="SECONDS",
        help="how long to wait for the relay (default: 600; stop: 120)",
    )
    parser = argparse.ArgumentParser(
        prog="mailrelay",
        parents=[common],
        description="Operate a running mailrelay: its queue, configuration and process.",
        epilog="Without --config or --spool, the relay's defaults apply: the spool "
        "./mailrelay-spool.  Exit status: 0 done, 1 failed, 2 usage error.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    queue = commands.add_parser("queue", parents=[common], help="list and change the queue")
    queueCommands = queue.add_subparsers(dest="queueCommand", required=True, metavar="ACTION")
    p = queueCommands.add_parser(
        "list", parents=[common], help="list the queued messages (postqueue -p, -j)"
    )
    p.set_defaults(run=queueList)
    p = queueCommands.add_parser(
        "show", parents=[common], help="show a message's envelope and headers (postcat -q)"
    )
    p.add_argument("id", help="the queue id")
    p.add_argument("--body", action="store_true", help="show the body too")
    p.set_defaults(run=queueShow)
    p = queueCommands.add_parser(
        "summary", parents=[common], help="messages by domain and age in minutes (qshape)"
    )
    p.add_argument("--sender", action="store_true", help="by sender domain instead")
    p.add_argument(
        "--state", action="append", default=[], metavar="QUEUE",
        help="only messages in this queue: active, incoming, deferred, hold (repeatable)",
    )
    p.set_defaults(run=queueSummary)

    from mailrelay.queue.commands import (
        QueueBounce,
        QueueDelete,
        QueueFlush,
        QueueHold,
        QueueRelease,
    )

    changing: tuple[tuple[str, Any, str, str, str, str | None, dict[str, Any], str], ...] = (
        (
            "flush", QueueFlush,
            "attempt delivery now: everything, some ids, or a domain (postqueue -f, -i, -s)",
            "scheduled for delivery now", "*",
            "--domain", {"help": "the messages with a recipient in this domain"}, "domain",
        ),
        (
            "hold", QueueHold, "put messages on hold (postsuper -h)", "placed on hold", "*",
            "--all", {"action": "store_true", "help": "every queued message"}, "all_entries",
        ),
        (
            "release", QueueRelease, "release messages from hold (postsuper -H)",
            "released from hold", "*",
            "--all", {"action": "store_true", "help": "every message on hold"}, "all_entries",
        ),
        (
            "delete", QueueDelete, "delete messages, unreported (postsuper -d)", "deleted", "*",
            "--all-deferred", {"action": "store_true", "help": "every deferred message"},
            "all_deferred",
        ),
        (
            "bounce", QueueBounce, "return messages to their senders now, with a DSN",
            "returned to the sender", "+", None, {}, "",
        ),
    )
    for name, command, helpText, done, count, flag, flagOptions, argument in changing:
        p = queueCommands.add_parser(name, parents=[common], help=helpText)
        p.add_argument("ids", nargs=count, metavar="ID")
        fixed = {}
        if flag is not None:
            p.add_argument(flag, **flagOptions)
            fixed[argument] = flag[2:].replace("-", "_")
        p.set_defaults(run=_changing(command, done, **fixed))

    p = commands.add_parser(
        "check", parents=[common],
        help="load and build the configuration as the relay would (postfix check)",
    )
    p.add_argument(
        "-n", action="store_true", help="print the effective configuration (postconf -n)"
    )
    p.add_argument(
        "--sample", action="store_true",
        help="print the commented sample configuration, every key documented (check nothing)",
    )
    p.set_defaults(local=check)
    p = commands.add_parser("status", parents=[common], help="is it running, and how")
    p.set_defaults(run=status)
    p = commands.add_parser(
        "reload", parents=[common], help="reload the configuration (SIGHUP)"
    )
    p.set_defaults(run=reload)
    p = commands.add_parser("stop", parents=[common], help="stop the relay (SIGTERM)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for it to stop")
    p.set_defaults(run=stop)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the C{mailrelay} command; its exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    options = _parser().parse_args(argv)
    for name, default in (("config", None), ("spool", None), ("json", False), ("timeout", None)):
        if not hasattr(options, name):
            setattr(options, name, default)
    if options.timeout is None:
        options.timeout = 120.0 if options.command == "stop" else 600.0
    if getattr(options, "local", None) is not None:
        return int(options.local(options, out, err))
    try:
        from mailrelay.app.control import controlSocketPath

        spool = spoolDirectory(options.config, options.spool)
    except CommandFailed as e:
        # (The file cannot be read for its spool directory: the relay was not reached.)
        more = ("; nothing was reloaded: a running relay goes on with the configuration it "
                "has" if options.command == "reload" else "")
        print(f"mailrelay: {e}{more}", file=err)
        return 1
    try:
        sock = connect(controlSocketPath(spool))
    except RelayDown as e:
        down = str(e)
        if options.spool is None and options.config is not None:
            down = _relayDownWithConfig(options.config, spool, e)
        if options.run is not queueList:
            print(f"mailrelay: {down}", file=err)
            return 1
        # As Postfix's postqueue: "Mail system is down -- accessing queue directly".
        print(f"mailrelay: {down}; reading the queue in {spool} directly", file=err)
        return _direct(spool, options, out, err)
    except CommandFailed as e:
        print(f"mailrelay: {e}", file=err)
        return 1
    return _converse(sock, options, out, err)


class _DirectSession:
    """What L{queueList} asks of a L{Session}, answered from the spool's files (the relay
    is down): its entries as the relay lists them, the queue manager's view (active) aside."""

    def __init__(self, spool: Path) -> None:
        from twisted.internet.task import Clock

        from mailrelay.queue.control import QueueControl
        from mailrelay.spool import Spool

        clock = Clock()
        clock.advance(time.time())
        self.control = QueueControl(Spool(spool, reactor=clock), None, clock)

    async def call(self, command: Any, **arguments: Any) -> Any:
        from mailrelay.queue.commands import QueueList
        from mailrelay.spool import SpoolError

        assert command is QueueList
        try:
            return await self.control.entries(**arguments)
        except SpoolError as e:
            raise CommandFailed(str(e)) from None


def _direct(spool: Path, options: Any, out: TextIO, err: TextIO) -> int:
    """Run the command (L{queueList}) on the spool's files."""
    try:
        result = Deferred.fromCoroutine(options.run(_DirectSession(spool), options, out, err))
        box: list[Any] = []
        result.addBoth(box.append)
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return int(box[0])
    except CommandFailed as e:
        print(f"mailrelay: {e}", file=err)
        return 1


def _quietStdout() -> None:
    """Our reader went away (C{mailrelay queue list | head}): write the rest nowhere, so
    that Python's flush at exit does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _converse(sock: socket.socket, options: Any, out: TextIO, err: TextIO) -> int:
    from twisted.internet import reactor

    exitCode = [1]

    async def run() -> None:
        session = Session(reactor, sock)
        try:
            exitCode[0] = await options.run(session, options, out, err)
        except CommandFailed as e:
            print(f"mailrelay: {e}", file=err)
            exitCode[0] = e.status
        finally:
            session.close()

    def start() -> None:
        d = Deferred.fromCoroutine(run())
        d.addTimeout(options.timeout, reactor)

        def failed(failure: Any) -> None:
            from twisted.internet.defer import TimeoutError as DeferredTimeout

            if failure.check(BrokenPipeError):
                _quietStdout()
            elif failure.check(DeferredTimeout):
                print(
                    f"mailrelay: the relay did not answer within {options.timeout:g}s",
                    file=err,
                )
            else:
                print(f"mailrelay: {failure.getTraceback()}", file=err)

        d.addErrback(failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return exitCode[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
