"""The files of the modules loaded at start-up, and which changed since
(L{mailrelay.app.loadedcode}): what a reload and C{mailrelay status} warn of."""

from __future__ import annotations

import os
import types
from pathlib import Path

from mailrelay.app.loadedcode import LoadedCode, describeChanged


def module(path: Path | str | None) -> types.ModuleType:
    m = types.ModuleType("m")
    if path is not None:
        m.__file__ = str(path)
    return m


def test_only_changed_files_are_named(tmp_path: Path) -> None:
    kept, edited, touched, removed = (tmp_path / f"{n}.py" for n in "abcd")
    for path in (kept, edited, touched, removed):
        path.write_text("x = 1\n")
    code = LoadedCode.now([module(p) for p in (kept, edited, touched, removed)])
    assert code.changed() == []
    edited.write_text("x = 2  # longer\n")
    stat = touched.stat()  # (same size, another time: a reinstall of the same file)
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    removed.unlink()
    assert code.changed() == sorted(map(str, (edited, touched, removed)))


def test_modules_without_a_file_on_disk_are_left_out(tmp_path: Path) -> None:
    code = LoadedCode.now([module(None), module("<frozen zipimport>"), module("relative.py")])
    assert code.stamps == {} and code.changed() == []


def test_the_whole_process_by_default() -> None:
    code = LoadedCode.now()
    assert os.path.abspath(__file__) in code.stamps or __file__ in code.stamps
    assert code.changed() == []


def test_what_is_said() -> None:
    assert describeChanged([]) is None
    one = describeChanged(["/site/plugin.py"])
    assert one is not None and "(1 file of loaded modules: /site/plugin.py);" in one
    assert one.endswith("restart the relay (not reload) to run the new code")
    many = describeChanged([f"/lib/m{n}.py" for n in range(5)])
    assert many is not None
    assert "(5 files of loaded modules: /lib/m0.py, /lib/m1.py, /lib/m2.py and 2 more)" in many


def test_what_is_said_of_files_the_new_processes_import_anew() -> None:
    """Children forked from the fork server share only what it loaded, before the relay
    imported a site's plugin modules (and new processes share nothing): after a reload the
    delivery process imports an edited plugin module anew.  "The relay and the processes
    it starts go on running the code loaded at start-up" was not so: what is said names
    the files they may load anew, beside the relay's old code."""
    said = describeChanged(["/lib/mailrelay/x.py", "/site/plugin.py"], anew=["/site/plugin.py"])
    assert said is not None
    assert said.startswith("the code on disk changed since the relay started (2 files of "
                           "loaded modules: /lib/mailrelay/x.py, /site/plugin.py); ")
    assert ("the relay goes on running the code loaded at start-up, but the processes it "
            "starts (the delivery process, the acceptors) import 1 of them anew when they use "
            "it (/site/plugin.py), running the new code beside the relay's old: restart the "
            "relay (not reload) to run the new code everywhere") in said, said
    assert describeChanged(["/lib/a.py"], anew=[]) == describeChanged(["/lib/a.py"])


def test_extending_what_was_noted_earlier(tmp_path: Path) -> None:
    """The relay notes what it loaded before it forks its fork server, then what it imported
    since (held, not copied: see LoadedCode): a change to a file of either is found."""
    first, second, both = (tmp_path / f"{n}.py" for n in "abc")
    for path in (first, second, both):
        path.write_text("x = 1\n")
    earlier = LoadedCode.now([module(first), module(both)])
    code = LoadedCode.now([module(second), module(both)], earlier=earlier)
    assert code.stamps == {str(second): code.stamps[str(second)], str(both): earlier.stamps[
        str(both)]}
    assert code.earlier is earlier and code.changed() == []
    for path in (first, second, both):
        path.write_text("x = 22\n")
    assert code.changed() == sorted(map(str, (first, second, both)))  # (each once)
    assert earlier.changed() == sorted(map(str, (first, both)))


def test_the_imports_from_now_on(tmp_path: Path, monkeypatch) -> None:
    """ImportsFromNow names the modules imported while it runs, not those loaded before nor
    those that failed to import; stopped, it leaves the import system as it was."""
    import sys

    from mailrelay.app.loadedcode import ImportsFromNow

    for name in ("loadedbefore", "loadedafter", "loadedlater"):
        (tmp_path / f"{name}.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("loadedbefore", "loadedafter", "loadedlater"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import loadedbefore  # noqa: F401

    finders = list(sys.meta_path)
    imports = ImportsFromNow()
    imports.start()
    import loadedafter
    import loadedbefore  # noqa: F401, F811 - (loaded already)

    try:
        import loadednowhere  # noqa: F401
    except ImportError:
        pass
    assert imports.stop() == [loadedafter]
    assert sys.meta_path == finders
    import loadedlater  # noqa: F401

    assert imports.stop() == []


def test_the_fork_servers_code_is_what_it_was_forked_with_and_imported_since(
    tmp_path: Path, monkeypatch
) -> None:
    """ForkServer.loadedCode: the files of the modules the relay had loaded at the fork
    (noted then) and of those it imported since, as one LoadedCode."""
    import socket
    import sys

    from mailrelay.app.forkserver import ForkServer

    forked, imported = tmp_path / "atfork.py", tmp_path / "sincefork.py"
    forked.write_text("x = 1\n")
    imported.write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sincefork", raising=False)
    ours, theirs = socket.socketpair()
    try:
        server = ForkServer(ours, 0)
        server.forkedCode = LoadedCode.now([module(forked)])
        server._imports.start()
        import sincefork  # noqa: F401

        code = server.loadedCode()
        assert set(code.stamps) == {str(imported)} and code.earlier is server.forkedCode
        forked.write_text("x = 22\n")
        imported.write_text("x = 22\n")
        assert code.changed() == sorted(map(str, (forked, imported)))
    finally:
        ours.close()
        theirs.close()
