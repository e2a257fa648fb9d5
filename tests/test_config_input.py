"""Configuration of the input checks (issue 7, point 4): C{nul_bytes}, and upper bounds of
the integer settings, each refused with the file, the key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailrelay.config import loadConfig
from mailrelay.errors import ConfigError


def load(tmp_path: Path, text: str):
    path = tmp_path / "mailrelay.toml"
    path.write_text(text, encoding="utf-8")
    return loadConfig(str(path))


def refused(tmp_path: Path, text: str, key: str) -> str:
    """The message of the error loading C{text}, checked to name the file and C{key}."""
    path = tmp_path / "mailrelay.toml"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        loadConfig(str(path))
    assert e.value.file == str(path) and e.value.key == key
    message = str(e.value)
    assert message.startswith(f"{path}: {key}: ")
    return message


def test_nul_bytes(tmp_path: Path) -> None:
    c = load(tmp_path, '[[listeners]]\nendpoint = "tcp:25"\n'
                       '[[listeners]]\nendpoint = "tcp:26"\nnul_bytes = "normalize"\n')
    assert [listener.nul_bytes for listener in c.listeners] == ["reject", "normalize"]
    assert refused(tmp_path, '[[listeners]]\nendpoint = "tcp:25"\nnul_bytes = "strip"',
                   "listeners[0].nul_bytes").endswith(
        'must be "reject" or "normalize", not "strip"')
