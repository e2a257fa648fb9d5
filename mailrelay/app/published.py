"""What a running relay publishes in its spool directory for the local commands: the file
C{listeners.json}, naming the addresses its listeners are bound to, with their mode, TLS
mode and PROXY setting, its host name and message size limit, and its process id.

C{mailrelay-sendmail} reads it (L{readPublished}) to reach the relay running on a spool
directory: the one C{--spool} names, or the configuration file's.  So a relay whose
listeners the file does not name is reached too: one started with C{--listen} (and
C{--spool}) on the command line alone, or listening on a port chosen at start-up
(C{tcp:0}).  Postfix's sendmail reaches the running system the same way, through the queue
directory of its configuration (C{sendmail -C}, C{MAIL_CONFIG}): postdrop writes to its
C{maildrop} and wakes the pickup service at C{public/pickup} there.

The relay writes the file at start and after each reload that took (L{publish}; written
whole, then renamed into place, mode 0644), and removes it when it stops (L{unpublish}).
A file left by a relay that was killed names a process that is gone: no relay runs there.
Other users read it when the spool directory is searchable (mode 0711, as the relay makes it
for C{[spool] mailq_users}); it holds nothing private.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mailrelay.config.types import Config, ListenerView, LocalView

__all__ = [
    "PUBLISHED",
    "PublishedError",
    "boundListeners",
    "publish",
    "publishedPath",
    "readPublished",
    "unpublish",
]

#: The file's name in the spool directory.
PUBLISHED = "listeners.json"


class PublishedError(ValueError):
    """The published file cannot be read, or is not what a relay writes (the message names
    the file)."""


def publishedPath(spoolDirectory: str | os.PathLike[str]) -> Path:
    """The published file of the relay whose spool is C{spoolDirectory}."""
    return Path(os.path.abspath(spoolDirectory)) / PUBLISHED


def _escaped(text: str) -> str:
    """C{text} as a value of a Twisted endpoint description (C{:} and C{\\} escaped)."""
    return re.sub(r"([:\\])", r"\\\1", text)


def _boundEndpoint(address: Any) -> str | None:
    """The server endpoint description of the socket bound at C{address} (what a port's
    C{getHost} says), or C{None} for an address of another kind."""
    kind = getattr(address, "type", None)
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if kind == "TCP" and isinstance(host, str) and isinstance(port, int):
        family = "tcp6" if ":" in host else "tcp"
        return f"{family}:{port}:interface={_escaped(host)}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if isinstance(name, str) and name:
        return f"unix:{_escaped(name)}"
    return None


def boundListeners(config: Config, services: Mapping[str, Any]) -> tuple[ListenerView, ...]:
    """The SMTP listeners of C{config} as they are bound: the address its service (in
    C{services}, by endpoint; C{port}: what it listens on, or C{None}) got, with the
    listener's mode, TLS mode (C{implicit} for an C{ssl:} endpoint) and PROXY setting; those
    not listening are left out."""
    bound = []
    for listener in config.listeners:
        settings = listener.settings
        service = services.get(settings.name)
        port = getattr(service, "port", None)
        endpoint = None if port is None else _boundEndpoint(port.getHost())
        if endpoint is None:
            continue
        tlsMode = "implicit" if settings.endpointTLS is not None else settings.tlsMode
        bound.append(ListenerView(endpoint, settings.mode, tlsMode, settings.proxyProtocol))
    return tuple(bound)


def publish(
    spoolDirectory: str | os.PathLike[str],
    hostname: str,
    maxMessageSize: int,
    listeners: Iterable[ListenerView],
) -> None:
    """Write the file of the relay running as this process on C{spoolDirectory}: whole,
    then renamed into place (a reader never sees half of it), mode 0644.

    @raise OSError: it could not be written (the message names the file).
    """
    path = publishedPath(spoolDirectory)
    data = {
        "pid": os.getpid(),
        "hostname": hostname,
        "message_size": maxMessageSize,
        "listeners": [
            {"endpoint": v.endpoint, "mode": v.mode, "tls_mode": v.tlsMode,
             "proxy_protocol": v.proxyProtocol}
            for v in listeners
        ],
    }
    text = json.dumps(data, indent=1).encode() + b"\n"
    temporary = path.with_name(f".{PUBLISHED}.{os.getpid()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # (whatever the umask)
            os.write(fd, text)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as e:
        with_name = OSError(e.errno, f"cannot write {path}: {e.strerror or e}")
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise with_name from None


def unpublish(spoolDirectory: str | os.PathLike[str]) -> None:
    """Remove the file, when this process wrote it (a relay refused at start on the spool
    of another leaves that one's)."""
    path = publishedPath(spoolDirectory)
    try:
        if json.loads(path.read_bytes()).get("pid") == os.getpid():
            os.unlink(path)
    except (OSError, ValueError, AttributeError):
        pass


def _alive(pid: int) -> bool:
    """Whether process C{pid} exists (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def readPublished(spoolDirectory: str | os.PathLike[str]) -> LocalView | None:
    """What the relay running on C{spoolDirectory} publishes, as a L{LocalView} (its
    C{source}: the file), or C{None} when no relay runs there: no file, or one left by a
    process that is gone.

    @raise PublishedError: the file cannot be read (this user may not: the message says
        why), or is not what a relay writes.
    """
    path = publishedPath(spoolDirectory)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PublishedError(f"{path}: cannot be read: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise PublishedError(f"{path}: not JSON: {e}") from None

    def problem(what: str) -> PublishedError:
        return PublishedError(f"{path}: {what}")

    if not isinstance(data, dict):
        raise problem("not a JSON object")
    pid = data.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise problem("pid: not a process id")
    if not _alive(pid):
        return None
    hostname = data.get("hostname")
    if not isinstance(hostname, str) or not hostname:
        raise problem("hostname: not a host name")
    size = data.get("message_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise problem("message_size: not a number of octets")
    entries = data.get("listeners")
    if not isinstance(entries, list):
        raise problem("listeners: not a list")
    listeners = []
    for index, entry in enumerate(entries):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("endpoint"), str)
            and isinstance(entry.get("mode"), str)
            and isinstance(entry.get("tls_mode"), (str, type(None)))
            and isinstance(entry.get("proxy_protocol"), bool)
        ):
            raise problem(f"listeners[{index}]: not a listener")
        listeners.append(ListenerView(
            entry["endpoint"], entry["mode"], entry["tls_mode"], entry["proxy_protocol"]
        ))
    return LocalView(str(path), hostname, size, tuple(listeners), str(path.parent))
