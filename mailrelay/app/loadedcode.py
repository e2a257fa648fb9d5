"""Whether the code the relay runs is still the code installed on disk.

A reload (SIGHUP, C{mailrelay reload}) re-reads the configuration, not the code: the modules
the relay imported at start-up -- mailrelay's, Twisted's, a site's plugins -- stay as they
were loaded, and the delivery and acceptor processes it forks from the copy made at
start-up (L{mailrelay.app.forkserver}) run what that copy holds too -- but not a site's
plugin modules, imported by the relay after the copy was made: those they import anew (and
children started as new processes import everything anew).  After an upgrade (C{pip
install -U}), or once a site has edited its plugin, a reload would seem to have taken the
change while the old code goes on running, or runs beside the new in the children, and a
module first imported after the change would mix new code with old.  As a Postfix upgrade
wants C{postfix stop}/C{start} for its master, this wants a restart; so the relay notes, at
start-up, each loaded module's file (its size and modification time), and a reload or
C{mailrelay status} says which of them changed since, and which of those the children import
anew.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["ImportsFromNow", "LoadedCode", "describeChanged"]

#: How many changed files a message names.
NAMED = 3


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_size, status.st_mtime_ns)


class LoadedCode:
    """The files of the modules loaded when it was made, with their size and modification
    time then (L{now}); L{changed} names those that differ today.

    It may extend one made earlier (C{earlier}), which it holds rather than copies: the
    relay notes what it loaded before it forks its fork server, then only what it imports
    after (L{ImportsFromNow}) -- a second pass over every module, or a copy of the first
    one's table, would write to the reference count of each module, its name and its file
    name, copying the pages the fork server and its children share with it (some 2 MiB of
    issue 11's base memory)."""

    def __init__(
        self, stamps: dict[str, tuple[int, int] | None], earlier: LoadedCode | None = None
    ) -> None:
        #: The files noted when it was made (not those of C{earlier}).
        self.stamps = stamps
        self.earlier = earlier

    @classmethod
    def now(
        cls, modules: Iterable[Any] | None = None, earlier: LoadedCode | None = None
    ) -> LoadedCode:
        """The files of C{modules} (default: every module loaded, C{sys.modules}): those
        with a C{__file__} on disk (not the built-in, frozen or zip-imported ones); beside
        those of C{earlier}."""
        if modules is None:
            modules = list(sys.modules.values())
        stamps = {}
        for module in modules:
            path = getattr(module, "__file__", None)
            if isinstance(path, str) and os.path.isabs(path):
                stamps[path] = _stamp(path)
        return cls(stamps, earlier)

    def changed(self) -> list[str]:
        """The files written, replaced or removed since (in a stable order), of this one
        and of those it extends."""
        changed: set[str] = set()
        code: LoadedCode | None = self
        while code is not None:
            changed.update(path for path, stamp in code.stamps.items() if _stamp(path) != stamp)
            code = code.earlier
        return sorted(changed)


class ImportsFromNow:
    """Notes the modules imported from when it is started until it is stopped (a finder
    first on C{sys.meta_path} that finds nothing, asked first for each module not yet
    loaded), without looking at those loaded already (see L{LoadedCode})."""

    def __init__(self) -> None:
        self._names: list[str] = []

    def start(self) -> None:
        sys.meta_path.insert(0, self)  # type: ignore[arg-type]

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        self._names.append(name)

    def stop(self) -> list[Any]:
        """Stop noting; the modules imported meanwhile (those loaded now)."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # type: ignore[arg-type]
        names, self._names = dict.fromkeys(self._names), []
        return [sys.modules[name] for name in names if name in sys.modules]


def describeChanged(changed: list[str], anew: Iterable[str] = ()) -> str | None:
    """What to tell about the files L{LoadedCode.changed} found, or C{None} for none.

    @param anew: those of C{changed} that the processes the relay starts from now on would
        import themselves rather than share with it (a site's plugin modules, imported by
        the relay after it forked the fork server; everything, for children started as new
        processes).
    """
    if not changed:
        return None
    files = "file" if len(changed) == 1 else "files"
    said = (
        f"the code on disk changed since the relay started ({len(changed)} {files} of loaded "
        f"modules: {_names(changed)}"
    )
    fresh = set(anew)
    anew = [path for path in changed if path in fresh]
    if not anew:
        return (
            f"{said}); the relay and the processes it starts go on running the code loaded "
            "at start-up: restart the relay (not reload) to run the new code"
        )
    them = "it" if len(anew) == 1 else "them"
    return (
        f"{said}); the relay goes on running the code loaded at start-up, but the processes it "
        f"starts (the delivery process, the acceptors) import {len(anew)} of them anew when "
        f"they use {them} ({_names(anew)}), running the new code beside the relay's old: "
        "restart the relay (not reload) to run the new code everywhere"
    )


def _names(paths: list[str]) -> str:
    named = ", ".join(paths[:NAMED])
    more = f" and {len(paths) - NAMED} more" if len(paths) > NAMED else ""
    return named + more
