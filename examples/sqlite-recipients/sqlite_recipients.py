"""An example site recipient validator: recipients looked up in an SQLite database.

It shows how a validator that must block (here on SQLite) answers asynchronously: the look-up
runs in the reactor's thread pool with C{deferToThreadPool}, and C{validateRecipient} returns
a C{Deferred} firing with the L{Verdict}.  If the look-up fails (database locked, file gone,
a bad C{action} value) the Deferred fails and mailrelay defers the recipient (451 4.3.0); it
never accepts on error.

The database has two tables::

    CREATE TABLE recipients (address TEXT PRIMARY KEY, action TEXT NOT NULL DEFAULT 'OK');
    CREATE TABLE domains (domain TEXT PRIMARY KEY);

C{action} is C{'OK'} (accept), C{'REJECT'} (550 5.1.1) or C{'DEFER'} (450 4.2.0).  An address
not in C{recipients} is rejected (550 5.1.1) when its domain is in C{domains}; otherwise the
validator has no opinion (C{CONTINUE}).

Options (C{[[recipient_validators]] plugin = "sqlite-recipients"}):

    - C{database}: the database file, relative to the configuration file's directory;
      opened read-only.
    - C{query}: the SQL giving the action of an address, with one C{?} parameter (default
      C{SELECT action FROM recipients WHERE address = ?}).
    - C{case_sensitive}: when C{false} (the default), the address is looked up lower-cased,
      so store addresses in lower case.

See README.md beside this file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.errors import ConfigError
from mailrelay.interfaces import ACCEPT, CONTINUE, IRecipientValidator, PluginContext, Verdict

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.defer import Deferred

    from mailrelay.envelope import ClientInfo, Envelope, Recipient

log = Logger()

DEFAULT_QUERY = "SELECT action FROM recipients WHERE address = ?"
DOMAIN_QUERY = "SELECT 1 FROM domains WHERE domain = ?"

USER_UNKNOWN = Verdict.reject("Error: user unknown in recipient table", 550, "5.1.1")
REJECTED = Verdict.reject("Error: recipient address rejected", 550, "5.1.1")
DEFERRED = Verdict.defer("Error: recipient temporarily unavailable", 450, "4.2.0")

#: The verdict of each value of the C{action} column.
ACTIONS = {"OK": ACCEPT, "REJECT": REJECTED, "DEFER": DEFERRED, "CONTINUE": CONTINUE}


@implementer(IRecipientValidator)
class SQLiteRecipients:
    """Looks recipients up in an SQLite database, in a worker thread.

    Each look-up opens its own read-only connection in the worker thread: SQLite connections
    must not move between threads, and opening one is cheap next to an SMTP round trip.

    @ivar database: the database file.
    @ivar query: the SQL giving the action of an address.
    @ivar caseSensitive: look addresses up as given instead of lower-cased.
    """

    def __init__(
        self,
        database: Path,
        query: str = DEFAULT_QUERY,
        caseSensitive: bool = False,
        reactor: Any = None,
    ) -> None:
        self.database = database
        self.query = query
        self.caseSensitive = caseSensitive
        self._reactor = reactor

    def __repr__(self) -> str:
        return f"<SQLiteRecipients {str(self.database)!r}>"

    def _deferToThread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run C{f(*args)} in the reactor's thread pool; return a Deferred of its result.

        Tests replace this attribute with a synchronous stand-in.
        """
        reactor = self._reactor
        if reactor is None:  # made by hand, without a context's reactor
            from twisted.internet import reactor
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    def connect(self) -> sqlite3.Connection:
        """Open the database read-only (failing if it does not exist)."""
        uri = self.database.resolve().as_uri() + "?mode=ro"
        return sqlite3.connect(uri, uri=True, timeout=5.0)

    def lookup(self, address: str, domain: str) -> Verdict:
        """Find the verdict for C{address} in domain C{domain}.  Blocks: call it in a thread.

        @raise ValueError: the C{action} column holds an unknown value.
        @raise sqlite3.Error: the database failed.
        """
        if not self.caseSensitive:
            address = address.lower()
        with closing(self.connect()) as db:
            row = db.execute(self.query, (address,)).fetchone()
            if row is None:
                if domain and db.execute(DOMAIN_QUERY, (domain,)).fetchone() is not None:
                    return USER_UNKNOWN
                return CONTINUE
        action = row[0]
        verdict = ACTIONS.get(action.upper()) if isinstance(action, str) else None
        if verdict is None:
            raise ValueError(
                f"{self.database}: bad action {action!r} for {address!r}; "
                f"expected one of {', '.join(ACTIONS)}"
            )
        return verdict

    def validateRecipient(
        self, client: ClientInfo, envelope: Envelope, recipient: Recipient
    ) -> Deferred[Verdict]:
        """Look C{recipient} up off the reactor thread; return a Deferred of the verdict."""
        return self._deferToThread(self.lookup, recipient.address, recipient.domain)


def build(options: dict[str, Any], context: PluginContext) -> SQLiteRecipients:
    """Build a L{SQLiteRecipients} from its options, checking the database and query now.

    @raise ConfigError: an option is missing, unknown or wrong, the database cannot be opened,
        or the query does not run on it.
    """
    allowed = ("database", "query", "case_sensitive")
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"unknown option {key!r} = {options[key]!r}; allowed options: {', '.join(allowed)}",
                key=key,
            )
    if "database" not in options:
        raise ConfigError("missing required option 'database'", key="database")
    name = options["database"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"must be a file name (a string), not {name!r}", key="database")
    query = options.get("query", DEFAULT_QUERY)
    if not isinstance(query, str) or not query.strip():
        raise ConfigError(f"must be an SQL query (a string), not {query!r}", key="query")
    caseSensitive = options.get("case_sensitive", False)
    if not isinstance(caseSensitive, bool):
        raise ConfigError(f"must be true or false, not {caseSensitive!r}", key="case_sensitive")

    path = Path(name).expanduser()
    if not path.is_absolute():
        path = Path(context.configDir) / path
    validator = SQLiteRecipients(path, query, caseSensitive, context.reactor)

    # Start-up may block: check now that the database opens and both queries run.
    try:
        db = validator.connect()
    except sqlite3.Error as e:
        raise ConfigError(f"cannot open SQLite database {str(path)!r}: {e}", key="database") from e
    with closing(db):
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as e:
            raise ConfigError(
                f"cannot read SQLite database {str(path)!r}: {e}", key="database"
            ) from e
        try:
            db.execute(query, ("postmaster@example.invalid",)).fetchone()
        except sqlite3.Error as e:
            raise ConfigError(f"query {query!r} fails on {str(path)!r}: {e}", key="query") from e
        try:
            db.execute(DOMAIN_QUERY, ("example.invalid",))
        except sqlite3.Error as e:
            raise ConfigError(
                f"{str(path)!r} has no usable table domains(domain): {e}", key="database"
            ) from e
    log.info("Recipients from {validator!r}", validator=validator)
    return validator
