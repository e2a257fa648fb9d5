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


#: (TOML table, key, largest value accepted): every integer setting has an upper bound.
BOUNDS = [
    ("limits", "message_size", 10**20 - 1),
    ("limits", "recipients", 100_000),
    ("limits", "errors", 10_000),
    ("limits", "hops", 1_000),
    ("spool", "min_free_space", 10**18),
    ("queue", "active_limit", 1_000_000),
    ("delivery", "destination_concurrency", 10_000),
    ("auth", "throttle_after", 1_000_000),
    ("auth", "max_failures", 1_000_000),
    ("[listeners]", "max_connections", 1_000_000),
    ("[listeners]", "max_connections_per_client", 1_000_000),
    ("[listeners]", "connection_rate_limit", 1_000_000_000),
    ("[listeners]", "message_rate_limit", 1_000_000_000),
    ("[listeners]", "user_message_rate_limit", 1_000_000_000),
    ("[listeners]", "min_data_rate", 1_000_000_000),
]


def setting(table: str, key: str, value: int) -> tuple[str, str]:
    """The TOML text setting C{key} of C{table} to C{value}, and the key's dotted name."""
    if table == "[listeners]":
        return f'[[listeners]]\nendpoint = "tcp:25"\n{key} = {value}', f"listeners[0].{key}"
    if table == "auth":
        return f'[auth]\npassword_file = "passwd"\n{key} = {value}', f"auth.{key}"
    return f"[{table}]\n{key} = {value}", f"{table}.{key}"


@pytest.mark.parametrize(("table", "key", "maximum"), BOUNDS)
def test_integer_settings_have_upper_bounds(tmp_path: Path, table: str, key: str,
                                            maximum: int) -> None:
    (tmp_path / "passwd").write_text("")
    text, dotted = setting(table, key, maximum)
    load(tmp_path, text)  # the largest value is accepted
    for value in [v for v in (maximum + 1, 2**63 - 1, 10**30) if v > maximum]:
        text, dotted = setting(table, key, value)
        message = refused(tmp_path, text, dotted)
        assert message.endswith(f"no larger than {maximum}, not {value}") or message.endswith(
            f"no larger than {maximum} (20 digits, RFC 1870), not {value}"), message


def test_message_size_limit_is_the_20_digits_of_rfc_1870(tmp_path: Path) -> None:
    text = "[limits]\nmessage_size = 100000000000000000000"
    message = refused(tmp_path, text, "limits.message_size")
    assert message.endswith(
        "must be a positive integer no larger than 99999999999999999999 (20 digits, RFC 1870), "
        "not 100000000000000000000")
