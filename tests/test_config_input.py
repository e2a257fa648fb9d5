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
    assert [listener.settings.nulBytes for listener in c.listeners] == ["reject", "normalize"]
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
    ("queue", "delivery_limit", 100_000),
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


#: (TOML table, key) of every setting in seconds.
SECONDS = [
    ("limits", "idle_timeout"), ("limits", "data_timeout"),
    ("queue", "min_backoff"), ("queue", "max_backoff"), ("queue", "max_lifetime"),
    ("queue", "bounce_lifetime"), ("queue", "delay_warning"), ("queue", "rescan_interval"),
    ("delivery", "connection_cache_time"), ("delivery.timeouts", "connect"),
    ("delivery.timeouts", "data_done"),
    ("auth", "failure_delay"), ("auth", "failure_window"),
    ("[listeners]", "rate_window"), ("[listeners]", "greet_pause"),
    ("[listeners]", "max_session_time"),
    ("[[header_stampers]]", "timeout"), ("[[recipient_validators]]", "timeout"),
]  # fmt: skip


def secondsSetting(table: str, key: str, value: float) -> tuple[str, str]:
    """As L{setting}, for a setting in seconds (the plugin tables too)."""
    if table == "[[header_stampers]]":
        return f'[[header_stampers]]\nplugin = "default"\n{key} = {value}', f"header_stampers[0].{key}"
    if table == "[[recipient_validators]]":
        return (f'[[recipient_validators]]\nplugin = "accepted-domains"\ndomains = ["a.test"]\n'
                f"{key} = {value}", f"recipient_validators[0].{key}")
    if table == "queue" and key == "min_backoff":
        # max_backoff must be at least min_backoff
        return f"[queue]\nmax_backoff = 1e9\n{key} = {value}", f"queue.{key}"
    return setting(table, key, value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("table", "key"), SECONDS)
def test_settings_in_seconds_have_an_upper_bound(tmp_path: Path, table: str, key: str) -> None:
    """At most 10**9 s (about 31 years): a larger one was accepted, then failed where it was
    used (max_lifetime = 1e12 made every delay warning fail: "year 33715 is out of range")."""
    (tmp_path / "passwd").write_text("")
    load(tmp_path, secondsSetting(table, key, 1_000_000_000)[0])  # the largest accepted
    for value in (1_000_000_001, 1e12, 1e300):
        text, dotted = secondsSetting(table, key, value)
        message = refused(tmp_path, text, dotted)
        assert "no larger than 1000000000 (about 31 years), not " in message, message
