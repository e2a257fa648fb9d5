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
