"""What each process imports, which is most of what it holds (issue 11's base memory): the
libraries of a feature that is not configured stay out of the relay's process and of its
delivery process.  Each check runs the real code in a fresh interpreter (the delivery
process's entry module as the relay starts it; the relay built from its configuration as
C{twistd mailrelay} builds it) and reads its C{sys.modules}; each has its counterpart that
configures the feature and sees the library loaded, so that the check can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

#: The libraries of the metrics endpoint ([metrics] listen): the Prometheus client, and
#: Twisted's web server that serves it.
METRICS_LIBRARIES = ("prometheus_client", "twisted.web")
#: The password hashing library of AUTH ([auth]).
AUTH_LIBRARIES = ("argon2",)

_CHILD = """
import atexit, json, os, runpy, sys
def dump():
    with open(os.environ["MODULES_FILE"], "w") as f:
        json.dump(sorted(sys.modules), f)
atexit.register(dump)
sys.argv = ["mailrelay.app.deliveryprocess", *sys.argv[1:]]
runpy.run_module("mailrelay.app.deliveryprocess", run_name="__main__", alter_sys=True)
"""

_RELAY = """
import json, sys
from twisted.internet import reactor
from mailrelay.app.tap import Options, makeService
options = Options()
options.parseOptions(sys.argv[1:])
makeService(options)
print(json.dumps(sorted(sys.modules)))
"""


def loaded(modules: list[str], prefixes: tuple[str, ...]) -> set[str]:
    """The packages of C{prefixes} that C{modules} holds."""
    return {p for p in prefixes for m in modules if m == p or m.startswith(p + ".")}


def configFile(tmp_path: Path, text: str, listener: str = "") -> Path:
    """A configuration: a listener (with the options C{listener}), the spool in
    C{tmp_path}, and C{text}."""
    path = tmp_path / "mailrelay.toml"
    path.write_text(
        f'[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n{listener}'
        f'[spool]\ndirectory = "{tmp_path / "spool"}"\n' + text
    )
    return path


def deliveryProcessModules(tmp_path: Path, config: Path) -> list[str]:
    """The modules the delivery process (C{python -m mailrelay.app.deliveryprocess}, as the
    relay starts it) has loaded when it exits: its input ends at once, so it builds its
    services, starts them, and stops."""
    out = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, "--config", str(config), "--overrides",
         json.dumps({"hostname": "relay.test"})],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "MODULES_FILE": str(out)},
    )
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    assert b"queue manager started" in result.stdout, result.stdout.decode()
    return json.loads(out.read_text())


def relayModules(tmp_path: Path, config: Path) -> list[str]:
    """The modules loaded once the relay is built from C{config} (C{twistd mailrelay}'s
    makeService), before it starts."""
    result = subprocess.run(
        [sys.executable, "-c", _RELAY, "--config", str(config), "--hostname", "relay.test"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, cwd=tmp_path, text=True,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def authConfig(tmp_path: Path) -> Path:
    """A listener offering AUTH, and an [auth] table with a password file of one user."""
    from argon2 import PasswordHasher

    users = tmp_path / "users"
    users.write_text(f"alice:{PasswordHasher().hash('secret')}\n")
    return configFile(tmp_path, f'[auth]\npassword_file = "{users}"\n',
                      listener="auth = true\nauth_without_tls = true\n")


def test_deliveryProcessWithoutMetricsLoadsNoExporter(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    modules = deliveryProcessModules(tmp_path, configFile(tmp_path, ""))
    assert loaded(modules, METRICS_LIBRARIES + AUTH_LIBRARIES) == set()


def test_deliveryProcessWithMetricsLoadsTheClient(tmp_path: Path) -> None:
    """The delivery process counts (and reports to the relay) when metrics are served; it
    never serves them itself."""
    (tmp_path / "spool").mkdir()
    config = configFile(tmp_path, '[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    modules = deliveryProcessModules(tmp_path, config)
    assert loaded(modules, METRICS_LIBRARIES) == {"prometheus_client"}


def test_relayWithoutMetricsLoadsNoExporter(tmp_path: Path) -> None:
    modules = relayModules(tmp_path, configFile(tmp_path, ""))
    assert loaded(modules, METRICS_LIBRARIES + AUTH_LIBRARIES) == set()


def test_relayWithAuthLoadsArgon2(tmp_path: Path) -> None:
    modules = relayModules(tmp_path, authConfig(tmp_path))
    assert loaded(modules, METRICS_LIBRARIES + AUTH_LIBRARIES) == set(AUTH_LIBRARIES)


def test_relayWithMetricsLoadsTheExporter(tmp_path: Path) -> None:
    config = configFile(tmp_path, '[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    modules = relayModules(tmp_path, config)
    assert loaded(modules, METRICS_LIBRARIES) == set(METRICS_LIBRARIES)


_RELAY_AFTER_PRELOAD = """
import json, sys
from twisted.internet import reactor
from mailrelay.app import forkserver
from mailrelay.app.tap import Options, makeService
forkserver.preload([])
before = set(sys.modules)
options = Options()
options.parseOptions(sys.argv[1:])
makeService(options)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_the_relay_imports_none_of_its_own_modules_after_the_fork(tmp_path: Path) -> None:
    """What the relay imports as it builds itself is imported before it forks its fork
    server (mailrelay.app.forkserver.RELAY_MODULES): an import after the fork copies pages
    the relay shares with the server and the children."""
    config = configFile(tmp_path, "")
    result = subprocess.run(
        [sys.executable, "-c", _RELAY_AFTER_PRELOAD, "--config", str(config),
         "--hostname", "relay.test"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, cwd=tmp_path, text=True,
    )
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.splitlines()[-1])
    assert [m for m in imported if m.startswith("mailrelay.")] == [], imported
