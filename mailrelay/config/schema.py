"""The machinery of the configuration's schema: each key is declared once, as a L{Key} of a
L{Table}, and everything else is derived from that declaration.

A L{Key} says what the key is called, how its value is read (its parser), its default, what
it means, and which field of which type it fills.  A L{Table} lists its keys, the type they
fill, and the checks that involve several of them.  Reading a table (L{Table.read}) refuses
unknown keys with a did-you-mean, reads each key (from the command line, the file or the
default), runs the table's check and builds its type; the list of keys a table allows, the
command-line options and the keys C{etc/mailrelay.toml} must document all come from the
same declarations (see L{mailrelay.config.keys}).

A parser is a function C{parse(value, at)}: C{value} is what the file (or the command line)
holds, C{at} (an L{At}) says where, and a bad value raises the L{ConfigError} of
C{at.error(message)}, which names the file, the key and, in the message, the value.  A
L{Table} is a parser too: that is how tables nest.

A value module, like L{mailrelay.config.values}: it imports only the values, so that the
stages may use it to read their plugins' options.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mailrelay.errors import ConfigError, describeValue, joinKey

__all__ = [
    "MISSING",
    "At",
    "Computed",
    "Key",
    "Override",
    "Parser",
    "Part",
    "Reading",
    "Source",
    "Table",
    "given",
    "pluginOptions",
    "readPluginOptions",
    "tableOf",
]


class _Missing:
    """The type of L{MISSING}."""

    def __repr__(self) -> str:
        return "MISSING"


#: No value: a key without a default of its own, a field without a default.
MISSING: Any = _Missing()

#: A parser: C{parse(value, at)} returns the value read, or raises C{at.error(...)}.
Parser = Callable[[Any, "At"], Any]


@dataclass(frozen=True)
class Source:
    """What one load reads.

    @ivar file: the configuration file as given, or C{None} (the defaults only).
    @ivar directory: the absolute directory of the file (the current directory without one),
        against which the file's relative paths are resolved.
    @ivar cwd: the current directory, against which the command line's paths are resolved.
    @ivar overrides: the command-line options, by L{Override.name}.
    @ivar listenerTLS: load the listeners' certificates and keys, and the password file of
        their AUTH; C{False} in a process that serves no listener (the delivery process),
        which then reads none of them.
    @ivar relayUsers: the users (name: hash) the relay serves with, by password file: an
        acceptor process serves with them when that file is refused now
        (L{mailrelay.config.checks.checkAuth}).
    @ivar relayFiles: the bytes of the listeners' certificates and keys the relay serves,
        by path: an acceptor process serves them rather than read the files, which may have
        changed since (into a state the relay refuses) or be readable by root only.
    """

    file: str | None
    directory: Path
    cwd: Path
    overrides: Mapping[str, Any] = field(default_factory=dict)
    listenerTLS: bool = True
    relayUsers: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    relayFiles: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class At:
    """Where a value is read, for the messages about it and for its relative paths.

    @ivar source: the load.
    @ivar key: the dotted key (C{listeners[0].endpoint}; C{""} for the top level), or the
        command-line option (C{--listen}).
    @ivar base: the directory relative paths are relative to; C{None} for the file's.
    @ivar cli: the value comes from the command line: messages name the option and no file.
    @ivar scope: the values read so far in the tables above (the top level's, by field).
    """

    source: Source
    key: str = ""
    base: Path | None = None
    cli: bool = False
    scope: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def error(self, message: str) -> ConfigError:
        """The L{ConfigError} saying C{message} about the value here."""
        return ConfigError(message, file=None if self.cli else self.source.file, key=self.key)

    def child(self, name: str) -> At:
        """Key C{name} of the table here."""
        return replace(self, key=joinKey(self.key, name))

    def item(self, index: int) -> At:
        """Item C{index} of the array here (a command-line list has no indexes)."""
        return self if self.cli else replace(self, key=f"{self.key}[{index}]")

    def option(self, option: str) -> At:
        """The command-line option C{option}, whose relative paths are the current
        directory's."""
        return replace(self, key=option, cli=True, base=self.source.cwd)

    def path(self, text: str) -> str:
        """C{text} (C{~} expanded) as an absolute path, relative to L{base}."""
        base = self.source.directory if self.base is None else self.base
        return os.path.abspath(base / os.path.expanduser(text))


def _make(target: type, fields: dict[str, Any], at: At) -> Any:
    """C{target(**fields)}: a type of the runtime, which checks its values too.  The checks
    of the configuration come first, with better messages; should a value get past them,
    the type's complaint still names the file and the table."""
    try:
        return target(**fields)
    except ValueError as e:
        raise at.error(str(e)) from None


def given(overrides: Mapping[str, Any], name: str) -> bool:
    """Whether the command line gave option C{name}: not absent, not C{None}, not C{[]}."""
    value = overrides.get(name)
    return value is not None and value != [] and value != ()


def tableHeader(key: str) -> str:
    """Where the table at C{key} is, by the TOML header that opens it: C{in [queue]}; for an
    element of an array of tables C{in a [[routes]] table} (C{routes[3]} is no header: the
    key's own path, which the message starts with, says which element)."""
    header = re.sub(r"\[\d+\]", "", key)
    return f"in a [[{header}]] table" if key.endswith("]") else f"in [{header}]"


def tableOf(value: Any, at: At) -> dict[str, Any]:
    """C{value}, which must be a table."""
    if not isinstance(value, dict):
        raise at.error(f"must be a table ([{at.key}]), not {describeValue(value)}")
    return value


@dataclass(frozen=True)
class Override:
    """A command-line option that replaces a key's value, list and all.

    @ivar name: its name in the overrides L{mailrelay.config.loadConfig} takes
        (C{"relay_network"}).
    @ivar option: the option as typed (C{"--relay-network"}), which messages name.
    @ivar parse: how the option's value is read, when not by the key's parser.
    """

    name: str
    option: str
    parse: Parser | None = None


@dataclass(frozen=True)
class Computed:
    """A default worked out when it is needed: C{compute(at)} returns the value (the system's
    host name, a directory relative to the current one)."""

    compute: Callable[[At], Any]


@dataclass(frozen=True)
class Key:
    """One key of a table, declared once.

    @ivar name: the key as written in the file.
    @ivar parse: reads the value the file gives (or the default): a parser, or a L{Table}.
    @ivar doc: what the key is for, in one sentence (C{etc/mailrelay.toml} explains it).
    @ivar default: the value when the key is absent, written as in the file and read by
        C{parse}; a L{Computed} default; or L{MISSING}: the default of the field it fills
        (taken as it is), or no value at all when that has none (the table's check then
        decides).
    @ivar field: the field of the table's type the value fills; C{None} for C{name} in
        camelCase (C{min_backoff} fills C{minBackoff}).
    @ivar required: the message refusing a table without the key, when it must be there.
    @ivar cli: the command-line option that replaces the key's value.
    @ivar unique: in an array of tables, the phrase refusing a value that an earlier table
        has already given (C{"is already listed as"}; the earlier key follows).
    """

    name: str
    parse: Parser
    doc: str
    default: Any = MISSING
    field: str | None = None
    required: str | None = None
    cli: Override | None = None
    unique: str | None = None

    @property
    def target(self) -> str:
        """The field the key fills: L{field}, or the name in camelCase."""
        if self.field is not None:
            return self.field
        first, *rest = self.name.split("_")
        return first + "".join(word.title() for word in rest)


@dataclass(frozen=True)
class Part:
    """The keys of a table that fill a type of their own, whose value fills one field of the
    table's: the keys of C{[queue]} that fill a L{mailrelay.queue.policy.QueuePolicy} (the
    C{queue} field of the L{mailrelay.config.types.Config} the others fill), so that the
    configuration holds the type the runtime uses, not a copy of it.

    @ivar field: the field of the table's type the part fills.
    @ivar target: the part's dataclass: the keys whose fields are its fields fill it (and take
        its fields' defaults); the table's check may add to them.
    """

    field: str
    target: type

    @property
    def names(self) -> frozenset[str]:
        """The fields of the part."""
        return frozenset(f.name for f in dataclasses.fields(self.target))


@dataclass
class Reading:
    """A table being read, as its check (L{Table.check}) sees it.

    @ivar fields: the values read so far, by field; the check may add and replace some.
    @ivar raw: the table as written in the file.
    @ivar at: where the table is.
    @ivar table: its schema.
    """

    fields: dict[str, Any]
    raw: Mapping[str, Any]
    at: At
    table: Table

    def given(self, name: str) -> bool:
        """Whether the file gives key C{name}."""
        return name in self.raw

    def key(self, name: str) -> str:
        """The dotted key of C{name} here, for messages."""
        return self.at.child(name).key

    def error(self, name: str, message: str) -> ConfigError:
        """The L{ConfigError} saying C{message} about key C{name}."""
        return self.at.child(name).error(message)

    def readIncluded(self, defaults: Mapping[str, Any] | None = None) -> Any:
        """Read the keys of the table's included table (L{Table.includes}) found here.

        @param defaults: values (by field) of the keys absent, instead of their defaults.
        """
        (included,) = self.table.includes
        given = {name: value for name, value in self.raw.items() if name in included.names}
        return included.read(given, self.at, defaults=defaults)


@dataclass(frozen=True, eq=False)
class Table:
    """A table of the file (C{[name]}) or an array of tables (C{[[name]]}).

    @ivar keys: its keys, in the order messages list them (and they are read in, unless
        C{order} says otherwise).
    @ivar target: the dataclass whose fields the keys fill, whose fields' defaults are the
        keys' defaults.
    @ivar part: the keys that fill a type of their own instead (see L{Part}).
    @ivar build: makes the table's value from its fields: C{build(fields, at)}; C{None} for
        C{target(**fields)}.
    @ivar check: C{check(reading)}, the checks involving several keys, once they are read
        (see L{Reading}).
    @ivar merge: the table's value is its fields, which fill the enclosing table's target
        (C{[limits]} fills the top level's L{mailrelay.config.types.Config}).
    @ivar array: an array of tables.
    @ivar includes: a table whose keys are allowed here too, but read by the check (when and
        as it sees fit: a route's transport keys).
    @ivar options: the field that gets the keys not listed, which are then all allowed (a
        plugin's own options); C{None}: an unknown key is refused, with a did-you-mean.
    @ivar where: the field that gets the table's key (C{"routes[2]"}), for later messages.
    @ivar scope: the fields read here are visible below (as L{At.scope}).
    @ivar order: the order the keys are read in, when not L{keys}' (each one after those it
        depends on).
    @ivar shape: what an array of tables looks like, for the message refusing another
        value; C{None} for C{"an array of tables ([[name]])"}.
    @ivar empty: the message refusing an empty array, when one will not do.
    @ivar place: how messages name the table when it has no key of its own (a plugin's
        options: C{"in the plugin's options"}); C{None}: C{"at the top level"}.
    """

    keys: tuple[Key, ...]
    target: type | None = None
    part: Part | None = None
    build: Callable[[dict[str, Any], At], Any] | None = None
    check: Callable[[Reading], None] | None = None
    merge: bool = False
    array: bool = False
    includes: tuple[Table, ...] = ()
    options: str | None = None
    where: str | None = None
    scope: bool = False
    order: tuple[str, ...] = ()
    shape: str | None = None
    empty: str | None = None
    place: str | None = None

    def __post_init__(self) -> None:
        if self.order and sorted(self.order) != sorted(key.name for key in self.keys):
            raise ValueError(f"order {self.order} does not list each key once")

    @property
    def names(self) -> tuple[str, ...]:
        """The keys allowed in the table (its own, then the included ones)."""
        return tuple(key.name for key in self.keys) + tuple(
            name for table in self.includes for name in table.names
        )

    def key(self, name: str) -> Key:
        """The key called C{name}."""
        for key in self.keys:
            if key.name == name:
                return key
        raise KeyError(name)

    def walk(self, prefix: str = "") -> Iterator[tuple[str, Key, Table]]:
        """Every key of the table and of the tables in it: C{(dotted path, key, the table
        declaring it)}, the tables' own keys before their keys'."""
        for key in self.keys:
            path = joinKey(prefix, key.name)
            yield path, key, self
            if isinstance(key.parse, Table):
                yield from key.parse.walk(path)
        for table in self.includes:
            yield from table.walk(prefix)

    def default(self, key: Key, at: At) -> Any:
        """The value of C{key} when it is absent (L{Key.default}), or L{MISSING}."""
        if isinstance(key.default, Computed):
            return key.default.compute(at)
        if key.default is not MISSING:
            return key.parse(key.default, at)
        target = self.target
        if self.part is not None and key.target in self.part.names:
            target = self.part.target
        if target is not None and dataclasses.is_dataclass(target):
            for f in dataclasses.fields(target):
                if f.name == key.target:
                    if f.default is not dataclasses.MISSING:
                        return f.default
                    if f.default_factory is not dataclasses.MISSING:
                        return f.default_factory()
        return MISSING

    def __call__(self, value: Any, at: At) -> Any:
        """Read C{value}, found at C{at}: a table, or an array of tables."""
        return self.readArray(value, at) if self.array else self.read(value, at)

    def checkShape(self, value: Any, at: At) -> dict[str, Any]:
        """C{value}, which must be a table holding no key the table does not allow."""
        table = tableOf(value, at)
        if self.options is None:
            allowed = self.names
            for name in table:
                if name not in allowed:
                    close = difflib.get_close_matches(name, allowed, n=1)
                    hint = f" (did you mean {describeValue(close[0])}?)" if close else ""
                    where = tableHeader(at.key) if at.key else (self.place or "at the top level")
                    raise at.child(name).error(
                        f"unknown key {describeValue(name)}{hint}; "
                        f"the keys allowed {where} are: {', '.join(allowed)}"
                    )
        return table

    def read(
        self,
        value: Any,
        at: At,
        *,
        seen: dict[str, dict[Any, str]] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> Any:
        """Read one table: its keys in order, then its check; return what it builds.

        @param seen: in an array of tables, the values of its L{Key.unique} keys so far,
            with the keys that gave them.
        @param defaults: values (by field) of the keys absent, instead of their defaults.
        """
        table = self.checkShape(value, at)
        fields: dict[str, Any] = {}
        below = replace(at, scope=fields) if self.scope else at
        for key in self._ordered():
            result = self._readKey(key, table, below, defaults)
            if result is MISSING:
                continue
            if isinstance(key.parse, Table) and key.parse.merge:
                fields.update(result)
                continue
            fields[key.target] = result
            if key.unique is not None and seen is not None and key.name in table:
                first = seen.setdefault(key.name, {})
                if result in first:
                    raise at.child(key.name).error(
                        f"{describeValue(table[key.name])} {key.unique} {first[result]}"
                    )
                first[result] = at.child(key.name).key
        if self.options is not None:
            fields[self.options] = {k: v for k, v in table.items() if k not in self.names}
        if self.where is not None:
            fields[self.where] = at.key
        if self.check is not None:
            self.check(Reading(fields, table, at, self))
        if self.part is not None:
            names = self.part.names
            own = {name: fields.pop(name) for name in list(fields) if name in names}
            fields[self.part.field] = _make(self.part.target, own, at)
        if self.merge:
            return fields
        if self.build is not None:
            return self.build(fields, at)
        assert self.target is not None, "a table needs a target or a build function"
        return _make(self.target, fields, at)

    def readArray(self, value: Any, at: At) -> tuple[Any, ...]:
        """Read an array of tables into a tuple."""
        if self.shape is not None:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise at.error(f"must be {self.shape}, not {describeValue(value)}")
        else:
            if not isinstance(value, list):
                raise at.error(
                    f"must be an array of tables ([[{at.key}]]), not {describeValue(value)}"
                )
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    raise at.item(index).error(
                        f"must be a table ([[{at.key}]]), not {describeValue(item)}"
                    )
        if not value and self.empty is not None:
            raise at.error(self.empty)
        seen: dict[str, dict[Any, str]] = {}
        return tuple(self.read(item, at.item(i), seen=seen) for i, item in enumerate(value))

    def _ordered(self) -> tuple[Key, ...]:
        """The keys in the order they are read."""
        if not self.order:
            return self.keys
        return tuple(self.key(name) for name in self.order)

    def _readKey(
        self, key: Key, table: dict[str, Any], at: At, defaults: Mapping[str, Any] | None
    ) -> Any:
        """The value of C{key}: from the command line, the file or the default."""
        overrides = at.source.overrides
        if key.cli is not None and given(overrides, key.cli.name):
            parse = key.cli.parse or key.parse
            return parse(overrides[key.cli.name], at.option(key.cli.option))
        here = at.child(key.name)
        if key.name in table:
            return key.parse(table[key.name], here)
        if key.required is not None:
            raise here.error(key.required)
        if defaults is not None and key.target in defaults:
            return defaults[key.target]
        return self.default(key, here)


class PluginOptionValues(SimpleNamespace):
    """A plugin's options as L{pluginOptions} reads them: one attribute per key, named as the
    key in camelCase (C{answer_codes} is C{answerCodes})."""


def pluginOptions(*keys: Key, check: Callable[[Reading], None] | None = None) -> Table:
    """The schema of a plugin's options, for L{mailrelay.interfaces.PluginContext.readOptions}:
    C{keys} (each with its parser, doc and C{default} or C{required} message), read into a
    L{PluginOptionValues}.  A key without a default and without C{required} is C{None} when
    absent.  For options that fill a dataclass of the plugin's, make a L{Table} with
    C{target=} that class instead (its fields' defaults are then the keys' defaults).

    @param check: C{check(reading)}, for checks involving several keys (see L{Reading}).
    """

    def build(fields: dict[str, Any], at: At) -> PluginOptionValues:
        values = {key.target: None for key in keys}
        values.update(fields)
        return PluginOptionValues(**values)

    return Table(keys, build=build, check=check, place="in the plugin's options")


def readPluginOptions(
    schema: Table, options: Mapping[str, Any], directory: Path, file: str | None = None
) -> Any:
    """Read a plugin's C{options} with C{schema} (see
    L{mailrelay.interfaces.PluginContext.readOptions}): relative paths against C{directory};
    an error names the option (and C{file}, when given)."""
    if not isinstance(schema, Table):
        raise TypeError(f"a plugin's option schema is a Table (pluginOptions), not {schema!r}")
    if schema.place is None:
        schema = replace(schema, place="in the plugin's options")
    cwd = Path(os.path.abspath(os.getcwd()))
    return schema.read(dict(options), At(Source(file, Path(directory), cwd)))
