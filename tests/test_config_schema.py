"""Tests for L{mailrelay.config.schema} and the relay's keys declared with it
(L{mailrelay.config.keys}): the sample configuration documents every key under its table and
nothing else, its switched-on settings are the defaults, and a mistyped key gets a
did-you-mean in every table."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailrelay.config import loadConfig
from mailrelay.config.keys import OVERRIDE_OPTIONS, TOP
from mailrelay.config.schema import At, Computed, Key, Override, Part, Source, Table
from mailrelay.config.values import boolean, integer, string
from mailrelay.delivery import BUILTIN_BACKENDS
from mailrelay.errors import ConfigError, describeValue, joinKey

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "mailrelay.toml"

#: Keys the sample shows only in an explanation ("#   key = ..."), with why.
EXPLAINED = {
    # password_file and checker cannot both be set: the password file has the line.
    "auth.checker",
    # password and password_file cannot both be set: password_file has the line.
    "smarthost.password",
}
#: Settings the sample switches on at a value other than the default, with that value.
NOT_DEFAULT = {"spool.directory": "/var/spool/mailrelay"}  # the conventional directory


def uncommentSettings(text: str) -> str:
    """Switch on every setting of the sample: lines where C{#} is right before a key or
    a table header (explanations have a space after the C{#})."""
    return re.sub(r"(?m)^#(?=[A-Za-z\[])", "", text)


def tables(table: Table = TOP, path: str = "") -> dict[str, Table]:
    """Every table of the schema by its dotted path (C{""}: the top level)."""
    found = {path: table}
    for name, key, _ in table.walk(path):
        if isinstance(key.parse, Table):
            found[name] = key.parse
    return found


def keyOf(table: Table, name: str) -> tuple[Key, Table] | None:
    """Key C{name} of C{table} (or of its included table), with the table declaring it."""
    for owner in (table, *table.includes):
        if name in (key.name for key in owner.keys):
            return owner.key(name), owner
    return None


def settings(data: Any, table: Table, path: str) -> dict[str, dict[str, Any]]:
    """The settings C{data} (a table, or an array of them, as read by tomllib) gives, by
    the dotted path of their table: the values of each key (every table of an array)."""
    found: dict[str, dict[str, Any]] = {path: {}}
    for entry in data if table.array else [data]:
        for name, value in entry.items():
            found[path].setdefault(name, []).append(value)
            key = keyOf(table, name)
            if key is not None and isinstance(key[0].parse, Table):
                for below, values in settings(value, key[0].parse, joinKey(path, name)).items():
                    for k, v in values.items():
                        found.setdefault(below, {}).setdefault(k, []).extend(v)
    return found


def explanations(text: str) -> set[str]:
    """The keys the sample shows in explanations (C{#   key = ...} under a table's header, or
    C{#   [table.key]}), as dotted paths."""
    header = ""
    found: set[str] = set()
    for line in text.splitlines():
        if match := re.match(r"#?\[\[?([\w.]+)\]\]?\s*$", line):
            header = match.group(1)
        elif match := re.match(r"#\s+\[([\w.]+)\]\s*$", line):
            header = match.group(1)
            found.add(header)
        elif match := re.match(r"#\s+(\w+) = ", line):
            found.add(joinKey(header, match.group(1)))
    return found


# ---------------------------------------------------------------------------------------------
# The sample configuration, etc/mailrelay.toml


def test_sampleDocumentsEveryKeyAndNothingElse() -> None:
    """Each key of the schema has a line (switched on, or off with a "#" right before it)
    under its table, or for the keys in L{EXPLAINED} (and those of their tables) an
    explanation; no other key has one (but a plugin's own options)."""
    text = SAMPLE.read_text(encoding="utf-8")
    lines = settings(tomllib.loads(uncommentSettings(text)), TOP, "")
    explained = explanations(text)
    schema = tables()
    missing, unknown = [], []
    for path, table in schema.items():
        for name in table.names:
            dotted = joinKey(path, name)
            if any(dotted == e or dotted.startswith(e + ".") for e in EXPLAINED):
                assert name not in lines.get(path, {}), f"{dotted} has a line"
                assert dotted in explained, f"{dotted} has no explanation"
            elif name not in lines.get(path, {}):
                missing.append(dotted)
    for path, found in lines.items():
        assert path in schema, f"[{path}] is not a table of the schema"
        if schema[path].options is None:
            unknown.extend(joinKey(path, name) for name in found if name not in schema[path].names)
    assert (missing, unknown) == ([], [])


def test_sampleRoutesShowEveryBuiltInBackend() -> None:
    """The sample's routes show each built-in backend."""
    data = tomllib.loads(uncommentSettings(SAMPLE.read_text(encoding="utf-8")))
    assert {route["backend"] for route in data["routes"]} >= set(BUILTIN_BACKENDS)


def test_sampleSettingsAreTheDefaults(tmp_path: Path) -> None:
    """Every setting the sample switches on has its default value (but those in
    L{NOT_DEFAULT}), read as the loader reads both."""
    lines = settings(tomllib.loads(SAMPLE.read_text(encoding="utf-8")), TOP, "")
    at = At(Source(None, tmp_path, tmp_path), scope={"hostname": "relay.example.com"})
    checked = []
    for path, found in lines.items():
        table = tables()[path]
        for name, values in found.items():
            dotted = joinKey(path, name)
            key = keyOf(table, name)
            if key is None or isinstance(key[0].parse, Table) or key[0].required:
                continue  # a plugin's option, a table, or a key without a default
            if dotted in NOT_DEFAULT:
                assert values == [NOT_DEFAULT[dotted]]
                continue
            default = key[1].default(key[0], at.child(dotted))
            for value in values:
                assert key[0].parse(value, at.child(dotted)) == default, dotted
            checked.append(dotted)
    assert "auth.throttle_after" not in checked  # [auth] is off in the sample
    assert {"queue.min_backoff", "delivery.timeouts.data_done", "listeners.mode"} <= set(checked)


# ---------------------------------------------------------------------------------------------
# Every table: a mistyped key gets a did-you-mean


def inlineTOML(value: Any) -> str:
    """C{value} (strings, integers, tables, arrays) as an inline TOML value."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {inlineTOML(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(inlineTOML(v) for v in value) + "]"
    return describeValue(value)


#: What each array of tables needs before the tables below it are read.
ENTRY = {"listeners": {"endpoint": "tcp:2525"}}


def mistyped() -> list[tuple[str, str]]:
    """(table path, key) for every key of every table that refuses unknown keys."""
    return [
        (path, name)
        for path, table in tables().items()
        if table.options is None
        for name in table.names
    ]


@pytest.mark.parametrize(("path", "name"), mistyped())
def test_mistypedKeyGetsDidYouMean(tmp_path: Path, path: str, name: str) -> None:
    """A key with its first letter typed twice is refused with the key meant, wherever it is."""
    typo = name[0] + name
    value: dict[str, Any] = {typo: 1}
    parts = path.split(".") if path else []
    for depth in range(len(parts), 0, -1):
        table = tables()[".".join(parts[:depth])]
        entry = dict(ENTRY.get(".".join(parts[:depth]), {}), **value)
        value = {parts[depth - 1]: [entry] if table.array else entry}
    file = tmp_path / "mailrelay.toml"
    file.write_text("\n".join(f"{k} = {inlineTOML(v)}" for k, v in value.items()) + "\n")
    with pytest.raises(ConfigError) as e:
        loadConfig(str(file))
    assert e.value.key is not None and e.value.key.endswith(typo)
    assert f'unknown key "{typo}" (did you mean "{name}"?)' in str(e.value)


def test_overrideOptionsComeFromTheKeys() -> None:
    """The command-line options are those the keys declare."""
    assert OVERRIDE_OPTIONS == {
        "hostname": "--hostname",
        "spool": "--spool",
        "relay_network": "--relay-network",
        "accept_domain": "--accept-domain",
        "smarthost": "--smarthost",
        "listen": "--listen",
    }


# ---------------------------------------------------------------------------------------------
# The machinery, on a table of its own


@dataclass(frozen=True)
class Pet:
    name: str
    legs: int = 4
    tame: bool = True
    where: str = ""


PETS = Table(
    (
        Key("name", string, "Its name.", required="is required", unique="is already the name of"),
        Key("legs", integer(0, 8), "How many legs."),
        Key("tame", boolean, "Whether it is tame.", default=False),
    ),
    target=Pet,
    array=True,
    where="where",
)


def cliPets(value: Any, at: At) -> tuple[Pet, ...]:
    """Pets from the command line: names only."""
    return tuple(Pet(string(name, at), where=at.key) for name in value)


ZOO = Table(
    (
        Key("keeper", string, "Who.", default=Computed(lambda at: f"keeper of {at.key}")),
        Key("pets", PETS, "Its pets.", default=[], cli=Override("pet", "--pet", cliPets)),
    ),
    build=lambda fields, at: fields,
)


def read(value: Any, overrides: dict[str, Any] | None = None) -> Any:
    source = Source("zoo.toml", Path("/etc"), Path("/tmp"), overrides or {})
    return ZOO.read(value, At(source, "zoo"))


def test_defaultsFromTheKeyOrTheField() -> None:
    """A key's own default is read by its parser; else its field's default is taken; a
    computed default is computed where it is needed."""
    zoo = read({"pets": [{"name": "rex"}]})
    assert zoo == {"keeper": "keeper of zoo.keeper", "pets": (Pet("rex", 4, False, "zoo.pets[0]"),)}


def test_unknownKeyDidYouMean() -> None:
    with pytest.raises(ConfigError) as e:
        read({"pets": [{"name": "rex", "leg": 3}]})
    assert str(e.value) == (
        'zoo.toml: zoo.pets[0].leg: unknown key "leg" (did you mean "legs"?); the keys allowed '
        "in a [[zoo.pets]] table are: name, legs, tame"
    )


def test_unknownKeyInALaterElementNamesItsTableHeader() -> None:
    """An element of an array of tables is named by its TOML header (C{[[zoo.pets]]}), not
    by a header no file can hold (C{[zoo.pets[1]]}): the key's path says which element."""
    with pytest.raises(ConfigError) as e:
        read({"pets": [{"name": "rex"}, {"name": "tom", "x": 1}]})
    assert str(e.value) == (
        'zoo.toml: zoo.pets[1].x: unknown key "x"; the keys allowed in a [[zoo.pets]] table '
        "are: name, legs, tame"
    )


def test_requiredAndUnique() -> None:
    with pytest.raises(ConfigError, match=r"zoo\.pets\[1\]\.name: is required"):
        read({"pets": [{"name": "rex"}, {"legs": 2}]})
    with pytest.raises(ConfigError) as e:
        read({"pets": [{"name": "rex"}, {"name": "rex"}]})
    assert str(e.value) == (
        'zoo.toml: zoo.pets[1].name: "rex" is already the name of zoo.pets[0].name'
    )


def test_overrideReplacesTheFile() -> None:
    """A command-line option replaces the file's value, and its messages name the option and
    no file."""
    zoo = read({"pets": "not even an array"}, {"pet": ["tom"]})
    assert zoo["pets"] == (Pet("tom", where="--pet"),)
    assert read({"pets": []}, {"pet": []})["pets"] == ()  # an empty list: not given
    with pytest.raises(ConfigError) as e:
        read({}, {"pet": [5]})
    assert (e.value.file, str(e.value)) == (None, "--pet: must be a string, not 5")


def test_arrayShape() -> None:
    with pytest.raises(ConfigError) as e:
        read({"pets": [5]})
    assert str(e.value) == "zoo.toml: zoo.pets[0]: must be a table ([[zoo.pets]]), not 5"
    with pytest.raises(ConfigError, match=r"must be an array of tables \(\[\[zoo\.pets\]\]\)"):
        read({"pets": {"name": "rex"}})


@dataclass(frozen=True)
class Diet:
    food: str = "hay"
    meals: int = 2

    def __post_init__(self) -> None:
        if self.meals > 5:
            raise ValueError(f"{self.meals} meals a day is too many")


@dataclass(frozen=True)
class Stable:
    diet: Diet
    name: str = "stable"


STABLE = Table(
    (
        Key("name", string, "Its name."),
        Key("food", string, "What they eat."),
        Key("meals", integer(0, 9), "How often."),
    ),
    target=Stable,
    part=Part("diet", Diet),
)


def test_partFillsATypeOfItsOwn() -> None:
    """The keys of a part fill its type (with its defaults), which fills a field of the
    table's; a value the type refuses is refused naming the file and the table."""
    at = At(Source("zoo.toml", Path("/etc"), Path("/tmp")), "stable")
    assert STABLE.read({"food": "oats"}, at) == Stable(Diet("oats", 2))
    assert STABLE.default(STABLE.key("meals"), at) == 2
    assert STABLE.read({"name": "b", "meals": 3}, at) == Stable(Diet("hay", 3), "b")
    with pytest.raises(ConfigError) as e:
        STABLE.read({"meals": 7}, at)
    assert str(e.value) == "zoo.toml: stable: 7 meals a day is too many"
