"""The built-in C{sender-canonical} plugin: its table (Postfix's canonical(5) format and
lookup order), the rewriting of address header fields, and the filter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailrelay.builtin.canonicalmap import MapFile, parseCanonicalMap
from mailrelay.errors import ConfigError

LOCAL = frozenset({"relay.example.net", "localhost"})

TABLE = """\
# the site's machines
root@web1.internal      ops@example.com
root                    postmaster@example.com
@web1.internal          @example.com
  # a comment inside
@app3.lan
    @example.com
Nagios@LOCALHOST        monitoring@example.com
"jo smith"@lan.internal  jo.smith@example.com
josé@lan.internal       jose@example.com
@Bücher.example         @example.com
"""


def table() -> object:
    return parseCanonicalMap(TABLE.splitlines(), "canonical")


@pytest.mark.parametrize(
    ("address", "result"),
    [
        ("root@web1.internal", "ops@example.com"),  # user@domain first
        ("ROOT@web1.internal", "ops@example.com"),  # keys ignore case
        ("www-data@web1.internal", "www-data@example.com"),  # @domain keeps the user
        ("WWW-Data@app3.lan", "WWW-Data@example.com"),  # (continued line; case kept)
        ("root@relay.example.net", "postmaster@example.com"),  # user: a local domain
        ("root@localhost", "postmaster@example.com"),
        ("nagios@localhost", "monitoring@example.com"),  # user@domain before user
        ("root@elsewhere.example", None),  # user: only for the local domains
        ("nobody@example.com", None),
        ('"jo smith"@lan.internal', "jo.smith@example.com"),
        ("josé@lan.internal", "jose@example.com"),  # UTF-8 local part (RFC 6531)
        ("hans@xn--bcher-kva.example", "hans@example.com"),  # IDNA: A-labels
        ("ops@example.com", None),
    ],
)
def test_lookup_order_is_canonical5s(address: str, result: str | None) -> None:
    """canonical(5) ADDRESS REWRITING: user@domain, then user when the domain is the
    relay's own, then @domain; an @domain result keeps the local part."""
    assert table().lookup(address, LOCAL) == result  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("root@web1.internal\n", "canonical:1: a line is a pattern and its result"),
        ("\n# c\nroot a@b.example c@d.example\n", "canonical:3: text after the result"),
        ("root ops\n", "canonical:1: the result 'ops' must be user@domain or @domain"),
        ("root@ a@b.example\n", "canonical:1: bad pattern address 'root@'"),
        ("@bad_domain..x a@b.example\n", "canonical:1: bad pattern domain"),
        ("root @bad..x\n", "canonical:1: bad result domain"),
        ("a@b.example\tc@[192.0.2.1]\n", "canonical:1: bad result address"),
        ("root a@b.example\nROOT c@d.example\n", "canonical:2: pattern given twice (first on line 1)"),
        ("x y@z.example\n@web1.internal a@b.example\n@WEB1.internal @c.example\n",
         "canonical:3: pattern given twice (first on line 2)"),
    ],
)
def test_a_bad_line_is_named(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parseCanonicalMap(text.splitlines(), "canonical")
    assert raised.value.message.startswith(error) and raised.value.key == "map"


def test_the_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    """As the password file: a changed file is read again; a broken one keeps the table
    read before and says why, once."""
    path = tmp_path / "canonical"
    path.write_text("root@web1.internal ops@example.com\n")
    watched = MapFile(str(path))
    assert watched.current()[0].lookup("root@web1.internal", LOCAL) == "ops@example.com"
    path.write_text("root@web1.internal admin@example.com\n@app3.lan @example.com\n")
    table, problem = watched.current()
    assert problem is None and table.lookup("root@web1.internal", LOCAL) == "admin@example.com"
    path.write_text("root@web1.internal\n")
    os.utime(path, ns=(1, 1))
    table, problem = watched.current()
    assert problem is not None and problem.startswith(f"{path}:1: a line is a pattern")
    assert table.lookup("root@web1.internal", LOCAL) == "admin@example.com"
    assert watched.current() == (table, None)  # (said once)
    path.unlink()
    table, problem = watched.current()
    assert problem == f"cannot read the map {path}: No such file or directory"
    assert table.lookup("x@app3.lan", LOCAL) == "x@example.com"


def test_a_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read the map {tmp_path}/none: No such file"):
        MapFile(str(tmp_path / "none"))
    (tmp_path / "latin1").write_bytes(b"# ok\nroot@web1.internal jos\xe9@example.com\n")
    with pytest.raises(ConfigError, match=f"{tmp_path}/latin1:2: not UTF-8 text"):
        MapFile(str(tmp_path / "latin1"))
