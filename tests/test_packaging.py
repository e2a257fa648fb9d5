"""The wheel carries the dropin and not the tests, and twistd finds the plugin once installed.

Running from the repository root hides packaging mistakes (the current directory is on
sys.path), so this builds the wheel, installs it into a fresh venv and asks twistd from
another directory.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.harness import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True, cwd=build, timeout=300,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    (whl,) = out.glob("mailrelay-*.whl")
    return whl


def test_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/mailrelay_plugin.py" in names
    assert "mailrelay/smtp/server.py" in names and "mailrelay/spool/__init__.py" in names
    assert "mailrelay/delivery/smtp.py" in names and "mailrelay/smtp/client.py" in names
    assert "twisted/plugins/__init__.py" not in names and "twisted/__init__.py" not in names
    assert not any(n.startswith("tests/") for n in names)
    assert not any(n.endswith("dropin.cache") for n in names)
    (entryPoints,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entryPoints).decode()
    assert "mailrelay-sendmail = mailrelay.app.sendmail:main" in scripts
    # The sample configuration --help points to, a copy of etc/mailrelay.toml (not a link).
    sample = zipfile.ZipFile(wheel).read("mailrelay/config/sample.toml")
    assert sample == (REPO / "etc" / "mailrelay.toml").read_bytes()


def test_installed_wheel_is_found_by_twistd(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True, timeout=300,
    )
    # The dependencies come from the test environment; only lines of a .pth are added, so the
    # test environment's own .pth files (such as an editable install of this repository) are not.
    fresh_site = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (fresh_site / "_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.check_output([str(python), "-c", "import mailrelay; print(mailrelay.__file__)"],
                                    cwd=elsewhere, env=env, text=True)
    assert where.startswith(str(fresh_site)), where
    out = subprocess.run([str(python), "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()", "--help"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "mailrelay" in out.stdout and "pluggable SMTP relay" in out.stdout
    out = subprocess.run([str(python), "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()", "mailrelay", "--help"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--relay-network" in out.stdout and "--smarthost" in out.stdout
    # The sample configuration is installed with the package, and printed by its command.
    out = subprocess.run([str(python), "-m", "mailrelay.config.sample"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (REPO / "etc" / "mailrelay.toml").read_text()
    # The old path mailrelay.validators serves the installed dropin's plugin objects.
    check = ("import mailrelay.validators as old, twisted.plugins.mailrelay_plugin as dropin; "
             "assert old.regexPlugin is dropin.regexPlugin, old.regexPlugin")
    out = subprocess.run([str(python), "-c", check], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # The mailrelay command is installed, and python -m mailrelay runs it too.
    for command in ([str(env_dir / "bin" / "mailrelay")], [str(python), "-m", "mailrelay"]):
        out = subprocess.run([*command, "queue", "--help"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "hold" in out.stdout and "summary" in out.stdout, out


def test_dropin_cache_is_not_committed() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.check_output(["git", "ls-files"], cwd=REPO, text=True).split()
    assert not [f for f in files if f.endswith("dropin.cache")]
    assert "twisted/plugins/__init__.py" not in files


def test_readmeTestCommandIsWhatCIRuns() -> None:
    """README's second set-up command is the one .ci/run runs, word for word, and it installs
    the extras the suite and .ci/lint need."""
    run = (REPO / ".ci" / "run").read_text().splitlines()
    command = run[run.index("# The README's test command:") + 1]
    assert command in (REPO / "README.md").read_text().splitlines()
    assert "'.[test,lint]'" in command and command.endswith("&& .ci/lint")
