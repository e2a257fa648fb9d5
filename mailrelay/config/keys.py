"""Every key of the relay's configuration file, declared once.

Each L{Key} gives the key's name, its parser, its default (when it is not the default of the
field it fills) and what it is for; each L{Table} the type its keys fill and its checks
(L{mailrelay.config.checks}).  Those types are the runtime's own where there is one (the
queue's L{QueuePolicy}, the client's L{ClientSettings} and L{ClientTimeouts}, the routes'
L{RouteOptions} and L{RouteRule}, L{AuthSettings}, L{ListenerSettings}): the configuration
hands them to the stages as they are, and a default lives in one place, the runtime type's
field or the key.  The loader (L{TOP}), the messages
listing the keys a table allows, the command-line options (L{OVERRIDE_OPTIONS}) and the test
that C{etc/mailrelay.toml} documents every key and nothing else all read these declarations.

Part of the config layer: it may import the values, L{mailrelay.smtp} and the stages.
"""

from __future__ import annotations

import difflib
from typing import Any

from twisted.logger import LogLevel

from mailrelay.config import checks
from mailrelay.config.schema import MISSING, At, Computed, Key, Override, Part, Table
from mailrelay.config.types import (
    BackendSpec,
    Config,
    ListenerConfig,
    PluginSpec,
    SNICertificate,
)
from mailrelay.config.values import (
    boolean,
    caFile,
    checked,
    choice,
    defaultSpoolDirectory,
    domains,
    endpoint,
    fileName,
    headerNames,
    hostname,
    integer,
    ipAddresses,
    mailqUsers,
    networks,
    nonEmpty,
    nonNegativeSeconds,
    optionalHostname,
    postmaster,
    processCount,
    raw,
    recipientDelimiter,
    routeCAFile,
    seconds,
    secret,
    secretFileName,
    serverName,
    spoolDirectory,
    string,
    stringList,
    systemHostname,
    userName,
)
from mailrelay.errors import describeValue
from mailrelay.headers import HEADER_SECTION_LIMIT
from mailrelay.interfaces import HOOKS_BY_NAME, TLS_POLICIES, RouteOptions
from mailrelay.queue.policy import QueuePolicy
from mailrelay.receive.auth import DEFAULT_CHECKER_TIMEOUT, AuthSettings
from mailrelay.receive.limits import LIMITER_TIMEOUT
from mailrelay.receive.listener import LISTENER_MODES, LISTENER_TLS_MODES, ListenerSettings
from mailrelay.receive.tls import DEFAULT_TLS_MIN_VERSION, TLS_VERSIONS
from mailrelay.route.nexthop import parseRouteDomain, parseSenderKey
from mailrelay.route.table import RouteRule, SenderRoute
from mailrelay.smtp.clientsettings import ClientSettings, ClientTimeouts
from mailrelay.smtp.data import BARE_NEWLINE_NORMALIZE, BARE_NEWLINE_REJECT

__all__ = [
    "AUTH",
    "BACKENDS",
    "DEFAULT_ENDPOINT",
    "DELIVERY",
    "DNS",
    "LIMITS",
    "LISTENERS",
    "LOG",
    "LOG_LEVELS",
    "METRICS",
    "OVERRIDE_OPTIONS",
    "PLUGINS",
    "QUEUE",
    "RELAY",
    "ROUTES",
    "SNI_CERTIFICATES",
    "SPOOL",
    "TIMEOUTS",
    "TOP",
    "TRANSPORT",
    "pluginTable",
]

#: What a listener does with a bare line feed (C{bare_newline}) or a NUL (C{nul_bytes}).
NEWLINE_CHOICES = (BARE_NEWLINE_REJECT, BARE_NEWLINE_NORMALIZE)

#: The endpoint of the listener there is when the file sets none.
DEFAULT_ENDPOINT = "tcp:2525:interface=127.0.0.1"


def pluginTable(
    missing: str, timeout: Any = MISSING, *, array: bool = False, name: Key | None = None
) -> Table:
    """A table naming a plugin: C{plugin}, C{timeout} and the plugin's own options.

    @param missing: the message refusing a table without C{plugin}.
    @param timeout: the default of C{timeout}, when not the type's.
    @param name: a key before C{plugin} (a backend's C{name}); the table is then a
        L{BackendSpec}, else a L{PluginSpec}.
    """
    keys = (
        Key("plugin", nonEmpty("a plugin name"), "The plugin's name.", required=missing),
        Key("timeout", seconds, "Seconds the plugin may take to answer.", default=timeout),
    )
    return Table(
        (name, *keys) if name is not None else keys,
        target=BackendSpec if name is not None else PluginSpec,
        options="options",
        where="key",
        array=array,
    )


def hookList(value: Any, at: At) -> tuple[str, ...]:
    """The C{hooks} of a C{[[plugins]]} entry: names of L{HOOKS}, each once, at least one."""
    result: list[str] = []
    for where, name in stringList(value, at):
        if name not in HOOKS_BY_NAME:
            close = difflib.get_close_matches(name, HOOKS_BY_NAME, n=1)
            hint = f" (did you mean {describeValue(close[0])}?)" if close else ""
            raise where.error(
                f"unknown hook {describeValue(name)}{hint}; the hooks are: "
                + ", ".join(HOOKS_BY_NAME)
            )
        if name in result:
            raise where.error(f"{describeValue(name)} is given twice")
        result.append(name)
    if not result:
        raise at.error(
            "must name at least one hook, not [] (leave the key out for every hook the "
            "plugin provides)"
        )
    return tuple(result)


#: C{[[plugins]]}: plugins serving the hooks of L{HOOKS}, in order; a plugin's own options
#: beside C{plugin}, C{hooks} and C{timeout}.
PLUGINS = Table(
    (
        Key(
            "plugin",
            nonEmpty("a plugin name"),
            "The plugin's name.",
            required="is required in each [[plugins]] table: the name of the plugin",
        ),
        Key(
            "hooks",
            hookList,
            "The hooks it serves (default: every hook the plugin provides).",
        ),
        Key("timeout", seconds, "Seconds each call of the plugin may take."),
    ),
    target=PluginSpec,
    options="options",
    where="key",
    array=True,
)


def _plugins(table: str) -> Table:
    """An array of plugin tables (C{[[recipient_validators]]}, C{[[header_stampers]]},
    C{[[routers]]})."""
    missing = f"is required in each [[{table}]] table: the name of the plugin"
    return pluginTable(missing, array=True)


#: The spool directory when the file names none (relative to the current directory).
DEFAULT_SPOOL = "./mailrelay-spool"

SPOOL = Table(
    (
        Key(
            "directory",
            spoolDirectory,
            "Where accepted messages are stored until they are delivered.",
            default=Computed(defaultSpoolDirectory(DEFAULT_SPOOL)),
            field="spoolDirectory",
            cli=Override("spool", "--spool"),
        ),
        Key(
            "min_free_space",
            integer(0, 10**18),
            "Bytes (and 16 inodes) that must stay free on the spool's file system (0: no check).",
            default=100 * 1024 * 1024,
        ),
        Key(
            "sync",
            choice("syncfs", "fsync"),
            "How the spool makes accepted mail durable: syncfs(2) per group, or fsync.",
            field="spoolSync",
        ),
        Key(
            "mailq_users",
            mailqUsers,
            "Who besides root and the relay's user may list the queue (mailq): \"anyone\" "
            "or user names.",
            default="anyone",
        ),
    ),
    target=Config,
    merge=True,
)

RELAY = Table(
    (
        Key(
            "networks",
            networks,
            "Clients in these networks may relay to any domain.",
            default=["127.0.0.0/8", "::1/128"],
            field="relayNetworks",
            cli=Override("relay_network", "--relay-network"),
        ),
        Key(
            "accept_domains",
            domains,
            "Domains accepted from anyone.",
            default=[],
            cli=Override("accept_domain", "--accept-domain"),
        ),
        Key(
            "smarthost",
            checks.smarthost,
            "Where all outgoing mail goes instead of to the MX hosts.",
            default="",
            cli=Override("smarthost", "--smarthost"),
        ),
        Key(
            "drop_headers",
            headerNames,
            "Header fields removed from every message (Postfix's message_drop_headers).",
            default=["Bcc", "Content-Length", "Resent-Bcc", "Return-Path"],
            field="dropHeaders",
        ),
        Key(
            "processes",
            processCount,
            "Processes accepting SMTP connections on the listeners (\"auto\": one per core).",
            default=1,
        ),
        Key(
            "fork_children",
            boolean,
            "Fork the child processes from a copy of the relay made at start-up (they share "
            "its memory) instead of starting them as new processes.",
            default=True,
            field="forkChildren",
        ),
    ),
    target=Config,
    merge=True,
)

LIMITS = Table(
    (
        Key(
            "message_size",
            integer(1, 10**20 - 1, " (20 digits, RFC 1870)"),
            "The largest message accepted, in bytes.",
            default=10240000,
            field="maxMessageSize",
        ),
        Key(
            "recipients",
            integer(1, 100_000),
            "The most recipients accepted for one message.",
            default=100,
            field="maxRecipients",
        ),
        Key(
            "recipient_overshoot",
            integer(0, 1_000_000),
            "Recipients refused past recipients in one message before each further one "
            "counts as an error.",
            default=1000,
            field="recipientOvershootLimit",
        ),
        Key(
            "idle_timeout",
            seconds,
            "Seconds a client may stay silent between commands.",
            default=300,
        ),
        Key(
            "data_timeout",
            seconds,
            "Seconds a client may stay silent while sending a message.",
            default=300,
        ),
        Key(
            "errors",
            integer(1, 10_000),
            "Errors in one session before it is closed with 421.",
            default=20,
            field="maxErrors",
        ),
        Key(
            "soft_errors",
            integer(1, 10_000),
            "Errors in one session after which each reply waits error_sleep_time seconds.",
            default=10,
            field="softErrorLimit",
        ),
        Key(
            "error_sleep_time",
            nonNegativeSeconds,
            "Seconds each reply waits once a session has made soft_errors errors (0: none).",
            default=1,
            field="errorSleepTime",
        ),
        Key(
            "junk_commands",
            integer(1, 1_000_000),
            "HELO, EHLO, RSET, NOOP, VRFY and HELP commands in one session after which each "
            "counts as an error (a message received forgives them).",
            default=100,
            field="junkCommandLimit",
        ),
        Key(
            "header_size",
            integer(1000, HEADER_SECTION_LIMIT, " (what the relay holds to stamp a message)",
                    span=True),
            "The largest header section of a message, in bytes; a message with a longer one "
            "is refused (552 5.6.0).",
            default=HEADER_SECTION_LIMIT,
            field="maxHeaderSize",
        ),
        Key(
            "hops",
            integer(1, 1_000),
            "The most Received: fields a message may carry (mail loops).",
            default=50,
            field="maxHops",
        ),
    ),
    target=Config,
    merge=True,
)

DNS = Table(
    (
        Key(
            "reverse_lookups",
            boolean,
            "Look up each client's name, forward-confirmed, for Received: fields.",
            default=True,
            field="reverseDNS",
        ),
        Key("nameservers", checks.nameservers, "The DNS resolvers to ask instead of the system's."),
    ),
    target=Config,
    merge=True,
)

#: The levels C{[log] level} may name, lowest first (Twisted's).
LOG_LEVELS = tuple(level.name for level in LogLevel.iterconstants())

LOG = Table(
    (
        Key(
            "level",
            choice(*LOG_LEVELS),
            "The lowest level logged; events below it are dropped before they are formatted.",
            default="info",
            field="logLevel",
        ),
    ),
    target=Config,
    merge=True,
)

METRICS = Table(
    (
        Key(
            "listen",
            endpoint,
            "Where to serve Prometheus metrics (/metrics) and the health check (/healthz).",
            field="metricsListen",
        ),
    ),
    target=Config,
    merge=True,
)

QUEUE = Table(
    (
        Key("min_backoff", seconds, "The shortest delay between two attempts."),
        Key("max_backoff", seconds, "The longest delay between two attempts."),
        Key("max_lifetime", seconds, "Seconds a message may stay queued before it bounces."),
        Key(
            "bounce_lifetime",
            seconds,
            "The same for mail from the null sender (default: 432000, or max_lifetime if "
            "smaller).",
        ),
        Key(
            "delay_warning",
            nonNegativeSeconds,
            "Seconds after which the sender is told of a delay (0: never).",
        ),
        Key("active_limit", integer(1, 1_000_000), "The most messages in delivery at once."),
        Key(
            "delivery_limit",
            integer(1, 100_000),
            "The most deliveries (connections, commands) at once over all destinations.",
        ),
        Key(
            "rescan_interval",
            seconds,
            "Seconds between two looks into the spool for messages nobody announced.",
        ),
        Key(
            "postmaster",
            postmaster,
            "Where bounces that cannot be returned go, and mail to postmaster@hostname.",
        ),
        Key("hold", boolean, "Accept and queue mail but deliver none."),
        Key(
            "process",
            choice("separate", "inline"),
            "Whether the queue manager and delivery run in a process of their own.",
            field="queueProcess",
        ),
    ),
    target=Config,
    part=Part("queue", QueuePolicy),
    check=checks.checkQueue,
    merge=True,
)

#: The SMTP client's time-outs (RFC 5321 section 4.5.3.2), the defaults of C{ClientTimeouts}.
TIMEOUTS = Table(
    tuple(
        Key(name, seconds, f"Seconds to wait for {what}.")
        for name, what in (
            ("connect", "the connection"),
            ("greeting", "the server's greeting"),
            ("ehlo", "the reply to EHLO (HELO, LHLO)"),
            ("starttls", "the reply to STARTTLS and the TLS handshake"),
            ("auth", "each reply during AUTH"),
            ("mail", "the reply to MAIL FROM"),
            ("rcpt", "the reply to each RCPT TO"),
            ("data_init", "the reply to DATA"),
            ("data_block", "each block of the message to be sent"),
            ("data_done", "the reply after the message's final dot"),
            ("rset", "the reply to RSET"),
            ("quit", "the reply to QUIT"),
        )
    ),
    target=ClientTimeouts,
)

DELIVERY = Table(
    (
        Key(
            "helo_name",
            optionalHostname,
            "The name given in EHLO when delivering (default: hostname).",
            default="",
        ),
        Key("tls", choice(*TLS_POLICIES), "When to use TLS delivering to MX hosts."),
        Key("ca_file", caFile, "The PEM CA bundle to verify servers with."),
        Key(
            "destination_concurrency",
            integer(1, 10_000),
            "The most connections to one destination at once.",
        ),
        Key(
            "connection_cache_time",
            nonNegativeSeconds,
            "Seconds an idle connection is kept for the next message.",
        ),
        Key(
            "mx_address_limit",
            integer(0, 1000),
            "The most MX host addresses one delivery tries (0: no limit).",
        ),
        Key(
            "mx_session_limit",
            integer(0, 1000),
            "The most SMTP sessions of one delivery (0: no limit).",
        ),
        Key(
            "proxy_interfaces",
            ipAddresses,
            "Addresses that receive mail for the relay on port 25 through a proxy or NAT.",
        ),
        Key(
            "create_mailboxes",
            boolean,
            "Maildir routes deliver to any user, creating its directory.",
        ),
        Key(
            "mta_sts",
            boolean,
            "Follow the MTA-STS policies (RFC 8461) of the domains mail goes to by MX lookup.",
        ),
        Key(
            "dane",
            boolean,
            "Use the DANE TLSA records (RFC 7672) of DNSSEC-validated MX hosts; needs a "
            "local validating resolver.",
        ),
        Key(
            "recipient_delimiter",
            recipientDelimiter,
            "The characters separating a user from an address extension (bob+lists@).",
        ),
        Key(
            "source_address",
            checks.sourceAddress(4),
            "The local IPv4 address SMTP connections are made from (default: the system's).",
            default="",
        ),
        Key(
            "source_address6",
            checks.sourceAddress(6),
            "The local IPv6 address SMTP connections are made from (default: the system's).",
            default="",
        ),
        Key(
            "fallback_relay",
            checks.fallbackRelay,
            "SMTP next hops tried, in order, when no MX host of the recipients' domain "
            "takes the mail for a temporary reason.",
        ),
        Key("timeouts", TIMEOUTS, "The SMTP client's time-outs.", default={}),
    ),
    target=Config,
    part=Part("delivery", ClientSettings),
    check=checks.checkDelivery,
    merge=True,
)

#: How to talk to one SMTP or LMTP next hop: C{[smarthost]}, or an smtp or lmtp route.  The
#: table sets every option of its L{RouteOptions}, so that the defaults of C{[delivery]} do
#: not apply (but those an smtp route takes from it: L{checks.checkRoute}).
TRANSPORT = Table(
    (
        Key("tls", choice(*TLS_POLICIES), "When to use TLS.", default="may"),
        Key("ca_file", routeCAFile, "The PEM CA bundle to verify the server with.", default=""),
        Key("username", userName, "The user to log in as (AUTH PLAIN or LOGIN)."),
        Key("password", secret, "The password, written here (discouraged)."),
        Key(
            "password_file",
            secretFileName,
            "A file whose first line is the password (not a user:hash table).",
            default="",
        ),
        Key(
            "auth_without_tls",
            boolean,
            "Send AUTH over a connection without TLS too.",
            default=False,
            field="authWithoutTLS",
        ),
        Key(
            "source_address",
            checks.sourceAddress(4),
            "The local IPv4 address to connect from (default: [delivery]'s).",
        ),
        Key(
            "source_address6",
            checks.sourceAddress(6),
            "The local IPv6 address to connect from (default: [delivery]'s).",
        ),
        Key(
            "fallback_relay",
            checks.fallbackRelay,
            "SMTP next hops tried, in order, when no host of the next hop takes the mail "
            "for a temporary reason (default: none).",
        ),
    ),
    target=RouteOptions,
    check=checks.checkTransport,
)

#: An array of C{{server_name, certificate, key}} tables, for the message refusing others.
SNI_EXAMPLE = (
    '[{server_name = "mail.example.org", certificate = "example.org.pem", '
    'key = "example.org.key"}]'
)

SNI_CERTIFICATES = Table(
    (
        Key(
            "server_name",
            serverName,
            "The name the client asks for (or *. and a domain).",
            required=f"is required in each table, as in {SNI_EXAMPLE}",
            unique="is already given in",
        ),
        Key(
            "certificate",
            fileName,
            "The PEM certificate chain for that name.",
            required=f"is required in each table, as in {SNI_EXAMPLE}",
        ),
        Key("key", fileName, "Its PEM private key (default: the certificate's file)."),
    ),
    target=SNICertificate,
    check=checks.checkSNICertificate,
    array=True,
    shape=f"an array of tables such as {SNI_EXAMPLE}",
)


_REQUIRED_ENDPOINT = (
    f"is required in each [[listeners]] table (e.g. endpoint = {describeValue(DEFAULT_ENDPOINT)})"
)

LISTENERS = Table(
    (
        Key(
            "endpoint",
            endpoint,
            "A Twisted server endpoint description.",
            required=_REQUIRED_ENDPOINT,
            field="name",
            unique="is already listed as",
        ),
        Key(
            "bare_newline",
            choice(*NEWLINE_CHOICES),
            "What to do with a bare LF (a bare CR is a space either way).",
        ),
        Key("nul_bytes", choice(*NEWLINE_CHOICES), "What to do with a NUL byte."),
        Key("chunking", boolean, "Offer CHUNKING: messages sent by BDAT (RFC 3030)."),
        Key(
            "binarymime",
            boolean,
            "Offer BINARYMIME: binary messages, by BDAT (RFC 3030).",
            field="binaryMIME",
        ),
        Key(
            "add_message_id",
            boolean,
            "Add a Message-Id: field when there is none.",
            field="addMessageID",
        ),
        Key("add_date", boolean, "Add a Date: field when there is none."),
        Key("mode", choice(*LISTENER_MODES), "The listener's role."),
        Key(
            "tls_mode",
            choice(*LISTENER_TLS_MODES),
            "TLS: none, STARTTLS or from the first byte (default: from mode and certificate).",
        ),
        Key("tls_certificate", fileName, "The server's PEM certificate chain."),
        Key("tls_key", fileName, "Its PEM private key (default: the certificate's file)."),
        Key(
            "tls_min_version",
            choice(*TLS_VERSIONS),
            "The oldest TLS version accepted.",
            default=DEFAULT_TLS_MIN_VERSION,
        ),
        Key(
            "tls_ciphers",
            nonEmpty(
                "an OpenSSL cipher string", " (leave the key out for the defaults)"
            ),
            "An OpenSSL cipher string choosing the TLS 1.2 ciphers.",
        ),
        Key("auth", boolean, "Offer SMTP AUTH (default: on submission listeners)."),
        Key(
            "auth_without_tls",
            boolean,
            "Offer and accept AUTH without TLS too.",
            field="authWithoutTLS",
        ),
        Key(
            "tls_certificates",
            SNI_CERTIFICATES,
            "More certificates, by the name the client asks for (SNI).",
        ),
        Key(
            "max_connections",
            integer(0, 1_000_000),
            "Connections open at once on the listener (0: no limit).",
        ),
        Key(
            "max_connections_per_client",
            integer(0, 1_000_000),
            "Connections open at once from one client address (0: no limit).",
        ),
        Key(
            "connection_rate_limit",
            integer(0, 1_000_000_000),
            "New connections from one client address per rate_window (0: no limit).",
        ),
        Key(
            "message_rate_limit",
            integer(0, 1_000_000_000),
            "Messages from one client address per rate_window (0: no limit).",
        ),
        Key(
            "user_message_rate_limit",
            integer(0, 1_000_000_000),
            "Messages from one authenticated user per rate_window (0: no limit).",
        ),
        Key("rate_window", seconds, "The length of the rate windows, in seconds."),
        Key(
            "limit_exceptions",
            networks,
            "Client networks exempt from the per-address limits (default: relay networks).",
        ),
        Key(
            "ipv6_prefix_length",
            integer(1, 128, span=True),
            "IPv6 clients are counted together by network of this many bits.",
        ),
        Key("greet_pause", nonNegativeSeconds, "Seconds to wait before the greeting."),
        Key(
            "reject_unauth_pipelining",
            boolean,
            "Refuse commands sent ahead without PIPELINING.",
            default=True,
        ),
        Key(
            "max_session_time",
            nonNegativeSeconds,
            "Seconds a session may last (0: no limit).",
            default=1800,
        ),
        Key(
            "min_data_rate",
            integer(0, 1_000_000_000),
            "Bytes per second a client must keep up while sending a message.",
            default=500,
        ),
        Key("proxy_protocol", boolean, "Connections start with a PROXY protocol header."),
        Key("proxy_networks", networks, "The load balancers allowed to send PROXY headers."),
    ),
    target=ListenerConfig,
    part=Part("settings", ListenerSettings),
    check=checks.checkListener,
    array=True,
    empty="at least one listener is needed, not an empty array []",
)


def cliListeners(value: Any, at: At) -> tuple[ListenerConfig, ...]:
    """Listeners from C{--listen}: default settings for each endpoint."""
    result: list[ListenerConfig] = []
    for where, text in stringList(value, at):
        address = endpoint(text, where)
        if any(listener.settings.name == address for listener in result):
            raise where.error(f"{describeValue(address)} is given twice")
        result.append(LISTENERS.read({"endpoint": address}, where))
    return tuple(result)


AUTH = Table(
    (
        Key(
            "password_file",
            checks.passwordTable,
            'The file of "user:hash" lines the users log in with (see mailrelay-passwd).',
        ),
        Key(
            "checker",
            pluginTable(
                "is required in [auth.checker]: the name of a credentials checker plugin",
                DEFAULT_CHECKER_TIMEOUT,
            ),
            "A site checker instead of the password file.",
        ),
        Key("mechanisms", checks.mechanisms, "The SASL mechanisms offered."),
        Key(
            "throttle_after",
            integer(0, 1_000_000),
            "Failures from one client after which each further one is answered late.",
        ),
        Key("failure_delay", nonNegativeSeconds, "How late, in seconds."),
        Key(
            "max_failures",
            integer(1, 1_000_000),
            "Failures from one client after which AUTH is refused with 421.",
        ),
        Key(
            "failure_window",
            seconds,
            "Seconds after a client's last failure when its failures are forgotten.",
        ),
        Key("senders", checks.senders, "The MAIL FROM addresses and domains each user may use."),
    ),
    target=AuthSettings,
    check=checks.checkAuth,
)

ROUTES = Table(
    (
        Key(
            "domain",
            checked(parseRouteDomain),
            'The domain routed: "example.org", ".example.org" (subdomains) or "*".',
            required='is required in each [[routes]] table: "example.org", ".example.org" or "*"',
            unique="is already routed by",
        ),
        Key("backend", string, "The backend: smtp, lmtp, maildir, discard or a site one."),
        Key("nexthop", raw, "The backend's destination (its notation is the backend's)."),
    ),
    target=RouteRule,
    check=checks.checkRoute,
    array=True,
    includes=(TRANSPORT,),
)

SENDER_ROUTES = Table(
    (
        Key(
            "sender",
            checked(parseSenderKey),
            'Whose mail: "user@example.org", "@example.org" (that domain) or "<>" (bounces).',
            required='is required in each [[sender_routes]] table: "user@example.org", '
            '"@example.org" or "<>"',
            unique="is already routed by",
        ),
        Key(
            "nexthop",
            raw,
            'Where it goes instead of the smarthost, as a smarthost ("[smtp.example.net]:587").',
        ),
    ),
    target=SenderRoute,
    check=checks.checkSenderRoute,
    array=True,
    includes=(TRANSPORT,),
)

BACKENDS = pluginTable(
    "is required in each [[backends]] table: the name of the plugin",
    array=True,
    name=Key(
        "name",
        checks.backendName,
        "The name routes use in their backend key.",
        required="is required in each [[backends]] table: the name routes use in their "
        "backend key",
        unique="is already the name of",
    ),
)

#: The whole file.
TOP = Table(
    (
        Key(
            "hostname",
            hostname,
            "The relay's fully qualified host name.",
            default=Computed(systemHostname),
            cli=Override("hostname", "--hostname"),
        ),
        Key(
            "drain_time",
            seconds,
            "Seconds a stopping relay waits for messages and deliveries in flight.",
        ),
        Key("spool", SPOOL, "The spool.", default={}),
        Key("relay", RELAY, "Who may relay, and where to.", default={}),
        Key("limits", LIMITS, "Limits of each SMTP session.", default={}),
        Key("dns", DNS, "DNS lookups.", default={}),
        Key("log", LOG, "What is logged.", default={}),
        Key("metrics", METRICS, "Prometheus metrics and the health check.", default={}),
        Key("queue", QUEUE, "Retries and lifetimes.", default={}),
        Key("delivery", DELIVERY, "How outgoing mail is delivered.", default={}),
        Key(
            "smarthost",
            TRANSPORT,
            "How to talk to the smarthost.",
            default={},
            field="smarthostOptions",
        ),
        Key(
            "listeners",
            LISTENERS,
            "Where to accept SMTP connections.",
            default=[{"endpoint": DEFAULT_ENDPOINT}],
            cli=Override("listen", "--listen", parse=cliListeners),
        ),
        Key(
            "recipient_validators",
            _plugins("recipient_validators"),
            "Plugins deciding, in order, whether each recipient is accepted.",
            default=[],
        ),
        Key(
            "plugins",
            PLUGINS,
            "Plugins serving the hooks from connect to delivery, in order.",
            default=[],
        ),
        Key(
            "header_stampers",
            _plugins("header_stampers"),
            "Plugins adding header fields to each message accepted, in order.",
            default=[{"plugin": "default"}],
        ),
        Key("routes", ROUTES, "Where mail for some domains goes.", default=[]),
        Key(
            "sender_routes",
            SENDER_ROUTES,
            "Where some senders' mail goes instead of the smarthost, with its own AUTH.",
            default=[],
        ),
        Key(
            "routers",
            _plugins("routers"),
            "Plugins routing recipients, in order, before the routes.",
            default=[],
        ),
        Key("backends", BACKENDS, "Site delivery backends (plugins).", default=[]),
        Key("auth", AUTH, "SMTP AUTH for the listeners that offer it."),
        Key(
            "rate_limiter",
            pluginTable(
                "is required in [rate_limiter]: the name of a rate limiter plugin",
                LIMITER_TIMEOUT,
            ),
            "The plugin keeping the listeners' limit counters.",
        ),
    ),
    target=Config,
    build=lambda fields, at: Config(
        source=at.source.file, configDir=at.source.directory, **fields
    ),
    check=checks.checkTop,
    scope=True,
    # Each table after those its checks read: queue after hostname and drain_time, delivery
    # after hostname, routes after backends and delivery, listeners after hostname, limits,
    # relay, auth and rate_limiter.
    order=(
        "hostname",
        "drain_time",
        "spool",
        "relay",
        "limits",
        "dns",
        "log",
        "metrics",
        "queue",
        "delivery",
        "smarthost",
        "backends",
        "routes",
        "sender_routes",
        "routers",
        "auth",
        "rate_limiter",
        "listeners",
        "recipient_validators",
        "plugins",
        "header_stampers",
    ),
)

#: The keys L{mailrelay.config.loadConfig} accepts in C{overrides}, with the command-line
#: option each stands for.
OVERRIDE_OPTIONS: dict[str, str] = {
    key.cli.name: key.cli.option for _, key, _ in TOP.walk() if key.cli is not None
}
