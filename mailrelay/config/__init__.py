"""The relay's configuration: a TOML file, command-line overrides and the defaults.

L{loadConfig} reads the file (or nothing, for the built-in defaults), applies the options
given on the command line, checks every value and returns a frozen L{Config}.  Every problem
raises L{ConfigError} naming the file, the key as a dotted path (C{listeners[0].endpoint},
C{limits.recipients}, C{relay.networks[2]}) and the offending value, for example::

    /etc/mailrelay.toml: limits.recipients: must be a positive integer, not "ten"

Problems in command-line options name the option instead (C{--listen}) and no file.

Files the configuration names (C{ca_file}, C{password_file}) are read or checked while
loading, relative to the file's directory; passwords never appear in messages nor in the
C{repr} of the result.

See C{etc/mailrelay.toml} for a commented sample of every key.

The package (this module, until it is split into schema, loader and types) may import the
values (L{mailrelay.interfaces}, L{mailrelay.envelope}, L{mailrelay.errors},
L{mailrelay.address}), L{mailrelay.smtp} and the stages, to check their values; never
L{mailrelay.app}.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mailrelay.address import hostnameProblem, normaliseHostname
from mailrelay.errors import ConfigError, describeValue, joinKey

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ENDPOINT = "tcp:2525:interface=127.0.0.1"
DEFAULT_SPOOL_DIRECTORY = "./mailrelay-spool"
DEFAULT_MIN_FREE_SPACE = 100 * 1024 * 1024
DEFAULT_RELAY_NETWORKS = ("127.0.0.0/8", "::1/128")
DEFAULT_MESSAGE_SIZE = 10240000
DEFAULT_MAX_RECIPIENTS = 100
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_DATA_TIMEOUT = 300.0
DEFAULT_MAX_ERRORS = 20
DEFAULT_MAX_HOPS = 50
#: Seconds a stopping relay gives sessions in DATA, and deliveries in flight, to finish.
DEFAULT_DRAIN_TIME = 30.0
DEFAULT_PLUGIN_TIMEOUT = 30.0
DEFAULT_HEADER_STAMPER = "default"
DEFAULT_SMTP_PORT = 25
BARE_NEWLINE_CHOICES = ("reject", "normalize")
#: The largest value of each integer setting (keyed without list indexes), so that a typo or
#: an overflow is refused at start-up rather than believed.
INTEGER_MAXIMA: dict[str, int] = {
    # RFC 1870: the SIZE value of EHLO and MAIL is at most 20 digits.
    "limits.message_size": 10**20 - 1,
    "limits.recipients": 100_000,
    "limits.errors": 10_000,
    "limits.hops": 1_000,
    "spool.min_free_space": 10**18,
    "queue.active_limit": 1_000_000,
    "delivery.destination_concurrency": 10_000,
    "auth.throttle_after": 1_000_000,
    "auth.max_failures": 1_000_000,
    "listeners.max_connections": 1_000_000,
    "listeners.max_connections_per_client": 1_000_000,
    "listeners.connection_rate_limit": 1_000_000_000,
    "listeners.message_rate_limit": 1_000_000_000,
    "listeners.user_message_rate_limit": 1_000_000_000,
    "listeners.min_data_rate": 1_000_000_000,
}
_INTEGER_REASONS = {"limits.message_size": " (20 digits, RFC 1870)"}
#: The largest setting in seconds: beyond any sane one, and small enough that a time that far
#: ahead (a message's arrival plus queue.max_lifetime) is still a date.
SECONDS_MAXIMUM = 10**9
#: A listener's role (C{mode}): C{"relay"} (MX or relay for the relay networks and accepted
#: domains), C{"submission"} (RFC 6409, port 587: AUTH required before MAIL) and
#: C{"submissions"} (RFC 8314, port 465: the same over implicit TLS).
LISTENER_MODES = ("relay", "submission", "submissions")
#: A listener's TLS (C{tls_mode}): none, STARTTLS (RFC 3207), or TLS from the first byte.
LISTENER_TLS_MODES = ("none", "starttls", "implicit")
#: The values of a listener's C{tls_min_version}.
TLS_MIN_VERSIONS = ("TLSv1.2", "TLSv1.3")

#: A listener's abuse limits (Postfix's defaults; see L{mailrelay.receive.limits}), protocol checks
#: and deadlines.
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 50
DEFAULT_RATE_WINDOW = 60.0
DEFAULT_IPV6_PREFIX_LENGTH = 84
DEFAULT_MAX_SESSION_TIME = 1800.0
DEFAULT_MIN_DATA_RATE = 500
#: Postfix >= 3.9 refuses unauthorised pipelining by default, and so does mailrelay.
DEFAULT_REJECT_UNAUTH_PIPELINING = True

#: The TLS policies of C{delivery.tls}, C{smarthost.tls} and a route's C{tls}: C{"none"} (never
#: use TLS), C{"may"} (STARTTLS when offered, without verifying the certificate),
#: C{"required"} (STARTTLS with a verified certificate, or no delivery) and C{"implicit"}
#: (TLS from the first byte, as on port 465, verified).
TLS_CHOICES = ("none", "may", "required", "implicit")
#: The delivery backends every relay has; C{[[backends]]} adds site backends.
BUILTIN_BACKENDS = ("smtp", "lmtp", "maildir", "discard")
#: The fields a C{maildir} route's directory template may use.
MAILDIR_FIELDS = ("local", "domain", "address")

DEFAULT_MIN_BACKOFF = 300.0
DEFAULT_MAX_BACKOFF = 4000.0
DEFAULT_MAX_LIFETIME = 432000.0
DEFAULT_BOUNCE_LIFETIME = 432000.0
DEFAULT_DELAY_WARNING = 0.0
DEFAULT_ACTIVE_LIMIT = 1000
DEFAULT_TLS = "may"
DEFAULT_DESTINATION_CONCURRENCY = 20
DEFAULT_CONNECTION_CACHE_TIME = 2.0
DEFAULT_BACKEND_TIMEOUT = 600.0
DEFAULT_DNS_PORT = 53

#: The SMTP client's time-outs in seconds (RFC 5321 section 4.5.3.2): the key in
#: C{[delivery.timeouts]}, the name in L{DeliveryConfig.timeouts} (the fields of
#: C{mailrelay.smtp.client.ClientTimeouts}) and the default.
CLIENT_TIMEOUTS: tuple[tuple[str, str, float], ...] = (
    ("connect", "connect", 30.0),
    ("greeting", "greeting", 300.0),
    ("ehlo", "ehlo", 300.0),
    ("starttls", "starttls", 120.0),
    ("auth", "auth", 120.0),
    ("mail", "mail", 300.0),
    ("rcpt", "rcpt", 300.0),
    ("data_init", "dataInit", 120.0),
    ("data_block", "dataBlock", 180.0),
    ("data_done", "dataDone", 600.0),
    ("rset", "rset", 20.0),
    ("quit", "quit", 300.0),
)

#: The keys of C{[smarthost]} and the transport keys of an C{smtp} or C{lmtp} route.
TRANSPORT_KEYS = ("tls", "ca_file", "username", "password", "password_file", "auth_without_tls")

#: The keys each table of the file may hold; C{""} is the top level.  The tables of
#: C{recipient_validators}, C{header_stampers} and C{backends} hold C{plugin}, C{timeout}
#: (and for backends C{name}) and the plugin's own options, so they are not listed here.
ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "": (
        "hostname",
        "drain_time",
        "spool",
        "relay",
        "limits",
        "dns",
        "queue",
        "delivery",
        "smarthost",
        "listeners",
        "recipient_validators",
        "header_stampers",
        "routes",
        "backends",
        "auth",
        "rate_limiter",
    ),
    "spool": ("directory", "min_free_space", "sync"),
    "relay": ("networks", "accept_domains", "smarthost"),
    "limits": ("message_size", "recipients", "idle_timeout", "data_timeout", "errors", "hops"),
    "dns": ("reverse_lookups", "nameservers"),
    "queue": (
        "min_backoff",
        "max_backoff",
        "max_lifetime",
        "bounce_lifetime",
        "delay_warning",
        "active_limit",
        "postmaster",
        "hold",
        "process",
    ),
    "delivery": (
        "helo_name",
        "tls",
        "ca_file",
        "destination_concurrency",
        "connection_cache_time",
        "timeouts",
    ),
    "delivery.timeouts": tuple(name for name, _, _ in CLIENT_TIMEOUTS),
    "smarthost": TRANSPORT_KEYS,
    "listeners": (
        "endpoint",
        "bare_newline",
        "nul_bytes",
        "add_message_id",
        "add_date",
        "mode",
        "tls_mode",
        "tls_certificate",
        "tls_key",
        "tls_min_version",
        "tls_ciphers",
        "auth",
        "auth_without_tls",
        "tls_certificates",
        "max_connections",
        "max_connections_per_client",
        "connection_rate_limit",
        "message_rate_limit",
        "user_message_rate_limit",
        "rate_window",
        "limit_exceptions",
        "ipv6_prefix_length",
        "greet_pause",
        "reject_unauth_pipelining",
        "max_session_time",
        "min_data_rate",
        "proxy_protocol",
        "proxy_networks",
    ),
    "listeners.tls_certificates": ("server_name", "certificate", "key"),
    "auth": (
        "password_file",
        "checker",
        "mechanisms",
        "throttle_after",
        "failure_delay",
        "max_failures",
        "failure_window",
        "senders",
    ),
    "routes": ("domain", "backend", "nexthop") + TRANSPORT_KEYS,
}

#: The keys of a plugin table that the loader consumes; the others are the plugin's options.
PLUGIN_KEYS = ("plugin", "timeout")
#: The keys of a C{[[backends]]} table that the loader consumes; the others are the plugin's
#: options.
BACKEND_KEYS = ("name", "plugin", "timeout")

#: The keys L{loadConfig} accepts in C{overrides}, with the command-line option each stands for.
OVERRIDE_OPTIONS: dict[str, str] = {
    "listen": "--listen",
    "hostname": "--hostname",
    "spool": "--spool",
    "relay_network": "--relay-network",
    "accept_domain": "--accept-domain",
    "smarthost": "--smarthost",
}

_DIGITS = re.compile(r"[0-9]+\Z")
_TEMPLATE_FIELD = re.compile(r"\{([^{}/]*)\}")
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN (?:TRUSTED )?CERTIFICATE-----")


@dataclass(frozen=True)
class SNICertificate:
    """A certificate a listener presents to clients asking for C{server_name} (TLS SNI).

    @ivar server_name: a lower-case host name, or C{"*.example.org"} for the names one label
        below C{example.org}.
    @ivar certificate: the absolute path of its PEM certificate chain.
    @ivar key: the absolute path of its PEM private key (the certificate's file when it holds
        both).
    """

    server_name: str
    certificate: str
    key: str


@dataclass(frozen=True)
class ListenerConfig:
    """One SMTP listener.

    @ivar endpoint: a Twisted server endpoint string, e.g. C{"tcp:2525:interface=127.0.0.1"}.
    @ivar bare_newline: what to do with a bare LF (or CR) in message data: C{"reject"} the
        message, or C{"normalize"} it to CRLF.
    @ivar add_message_id: add a C{Message-Id:} field to messages that lack one.
    @ivar add_date: add a C{Date:} field to messages that lack one.
    @ivar mode: one of L{LISTENER_MODES}.
    @ivar tls_mode: one of L{LISTENER_TLS_MODES}.
    @ivar tls_certificate: the absolute path of the PEM certificate chain, or C{None}.
    @ivar tls_key: the absolute path of the PEM private key (the certificate's file when it
        holds both), or C{None}.
    @ivar tls_min_version: one of L{TLS_MIN_VERSIONS}.
    @ivar tls_ciphers: an OpenSSL cipher string for TLS 1.2, or C{None} for the defaults.
    @ivar auth: AUTH is offered (PLAIN and LOGIN, checked against C{[auth]}).
    @ivar auth_without_tls: AUTH is offered and accepted without TLS too.
    @ivar tls_certificates: more certificates, chosen by the name the client asks for (SNI).
    @ivar max_connections: connections open at once on the listener (0: no limit).
    @ivar max_connections_per_client: connections open at once from one address (0: none).
    @ivar connection_rate_limit: connections from one address per C{rate_window} (0: none).
    @ivar message_rate_limit: MAIL commands from one address per C{rate_window} (0: none).
    @ivar user_message_rate_limit: MAIL commands from one authenticated user per
        C{rate_window} (0: none).
    @ivar rate_window: seconds.
    @ivar limit_exceptions: client networks exempt from the per-address limits, or C{None}
        for the relay networks.
    @ivar ipv6_prefix_length: IPv6 clients are counted together by network of this length.
    @ivar greet_pause: seconds to wait before the greeting; clients talking before it are
        refused (0: greet at once).
    @ivar reject_unauth_pipelining: refuse (554, close) commands pipelined without PIPELINING
        having been advertised, or after a command that must end a group, and input before
        the greeting.
    @ivar max_session_time: seconds a session may last in all (0: no limit).
    @ivar min_data_rate: bytes per second a client must keep up in DATA (0: only the data
        timeout).
    @ivar proxy_protocol: connections start with a PROXY protocol (v1 or v2) header.
    @ivar proxy_networks: the load balancers' networks, the only peers allowed to send one.
    @ivar nul_bytes: what to do with NUL bytes in message data: C{"reject"} the message, or
        C{"normalize"} it by removing them.
    """

    endpoint: str
    bare_newline: str = "reject"
    add_message_id: bool = True
    add_date: bool = True
    mode: str = "relay"
    tls_mode: str = "none"
    tls_certificate: str | None = None
    tls_key: str | None = None
    tls_min_version: str = "TLSv1.2"
    tls_ciphers: str | None = None
    auth: bool = False
    auth_without_tls: bool = False
    tls_certificates: tuple[SNICertificate, ...] = ()
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    connection_rate_limit: int = 0
    message_rate_limit: int = 0
    user_message_rate_limit: int = 0
    rate_window: float = DEFAULT_RATE_WINDOW
    limit_exceptions: tuple[IPNetwork, ...] | None = None
    ipv6_prefix_length: int = DEFAULT_IPV6_PREFIX_LENGTH
    greet_pause: float = 0.0
    reject_unauth_pipelining: bool = DEFAULT_REJECT_UNAUTH_PIPELINING
    max_session_time: float = DEFAULT_MAX_SESSION_TIME
    min_data_rate: int = DEFAULT_MIN_DATA_RATE
    proxy_protocol: bool = False
    proxy_networks: tuple[IPNetwork, ...] = ()
    nul_bytes: str = "reject"

    def asOptions(self) -> dict[str, Any]:
        """The listener's options as a dict, as header stampers see them."""
        return {
            "bare_newline": self.bare_newline,
            "add_message_id": self.add_message_id,
            "add_date": self.add_date,
        }


@dataclass(frozen=True)
class AuthConfig:
    """SMTP AUTH on the listeners that offer it (C{[auth]}).

    @ivar passwordFile: the absolute path of the password file (C{user:argon2-hash} lines),
        or C{None} when a site checker is used instead.
    @ivar users: its users and hashes as read at start-up (not shown by C{repr}).
    @ivar mechanisms: the SASL mechanisms offered, a subset of C{("PLAIN", "LOGIN")}.
    @ivar throttleAfter: failures from one client address after which each further failure
        is answered C{failureDelay} seconds late.
    @ivar failureDelay: that delay in seconds.
    @ivar maxFailures: failures from one address after which AUTH is refused with 421 and
        the connection closed.
    @ivar failureWindow: seconds after an address's last failure when its failures are
        forgotten.
    @ivar senders: user name to the MAIL FROM addresses (C{"a@example.com"}) and domains
        (C{"@example.com"}) the user may use; users not listed may use any.
    @ivar checker: the site credentials checker (C{[auth.checker]}: a plugin providing
        C{twisted.cred.checkers.ICredentialsChecker}) used instead of the password file, or
        C{None}.  Its C{timeout} is how long one check may take.
    """

    passwordFile: str | None
    users: dict = field(default_factory=dict, repr=False, hash=False, compare=False)
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    throttleAfter: int = 3
    failureDelay: float = 5.0
    maxFailures: int = 10
    failureWindow: float = 900.0
    senders: dict = field(default_factory=dict, hash=False)
    checker: "PluginSpec | None" = None


@dataclass(frozen=True)
class PluginSpec:
    """One entry of a plugin list (C{[[recipient_validators]]}, C{[[header_stampers]]}).

    @ivar plugin: the plugin's name.
    @ivar options: the other keys of the table, passed to the plugin's C{build}.
    @ivar timeout: seconds the plugin may take to answer (key C{timeout}, consumed by the
        loader, never passed to the plugin).
    @ivar key: where the entry came from, e.g. C{"recipient_validators[1]"}, for messages:
        C{error.within(file=config.source, key=spec.key)}.
    """

    plugin: str
    options: dict = field(default_factory=dict, hash=False)
    timeout: float = DEFAULT_PLUGIN_TIMEOUT
    key: str = ""


@dataclass(frozen=True)
class Smarthost:
    """Where all outgoing mail goes instead of to the recipients' MX hosts.

    @ivar host: a lower-case host name (no trailing dot) or an IP address (IPv6 without brackets).
    @ivar port: the TCP port.
    @ivar mxLookup: C{True} when C{host} is a domain whose MX records are looked up
        (written without brackets); C{False} for C{"[host]"} (Postfix's relayhost convention:
        connect to the host's own addresses) and for IP addresses.
    """

    host: str
    port: int = DEFAULT_SMTP_PORT
    mxLookup: bool = True

    def __str__(self) -> str:
        if self.mxLookup:
            text = self.host
        else:
            text = f"[{self.host}]"
        if self.port != DEFAULT_SMTP_PORT or not self.mxLookup:
            text += f":{self.port}"
        return text


@dataclass(frozen=True)
class QueueConfig:
    """How long and how often the queue retries deliveries (C{[queue]}).

    The delay before each retry doubles from C{minBackoff} up to C{maxBackoff}
    (Postfix's C{minimal_backoff_time} and C{maximal_backoff_time}).

    @ivar minBackoff: seconds before the first retry.
    @ivar maxBackoff: the longest delay between retries, in seconds (>= C{minBackoff}).
    @ivar maxLifetime: seconds a message may stay queued before it bounces.
    @ivar bounceLifetime: the same for the relay's own bounce messages.
    @ivar delayWarning: seconds after which the sender is told that the message is delayed;
        C{0.0} for no delay warnings.
    @ivar activeLimit: the most messages in delivery at once.
    @ivar process: C{"separate"}: the queue manager and delivery run in a process of their own
        (two cores: acceptance and delivery in parallel, like Postfix's smtpd and qmgr);
        C{"inline"}: in the relay's process.
    @ivar hold: accept and spool mail but deliver none (like Postfix's hold queue) until the
        relay is restarted without it; for staged roll-outs and maintenance.
    @ivar postmaster: the canonical address (C{local@domain}) that gets bounces which cannot
        be returned to their sender, or C{None} to log and drop them.
    """

    minBackoff: float = DEFAULT_MIN_BACKOFF
    maxBackoff: float = DEFAULT_MAX_BACKOFF
    maxLifetime: float = DEFAULT_MAX_LIFETIME
    bounceLifetime: float = DEFAULT_BOUNCE_LIFETIME
    delayWarning: float = DEFAULT_DELAY_WARNING
    activeLimit: int = DEFAULT_ACTIVE_LIMIT
    postmaster: str | None = None
    hold: bool = False
    process: str = "separate"


@dataclass(frozen=True)
class TransportOptions:
    """How to talk to one SMTP or LMTP next hop (C{[smarthost]}, or an C{smtp} or C{lmtp}
    route).

    @ivar tls: one of L{TLS_CHOICES}.
    @ivar caFile: the absolute path of a PEM CA bundle to verify certificates with, or
        C{None} for the system's trust store.
    @ivar username: the AUTH (PLAIN or LOGIN) user name, or C{None} for no AUTH.
    @ivar password: the AUTH password (read from C{password_file} when that was given), or
        C{None} without a user name.  Never shown by C{repr}.
    @ivar authWithoutTLS: whether AUTH may be used on a connection without TLS.
    """

    tls: str = DEFAULT_TLS
    caFile: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    authWithoutTLS: bool = False


def _defaultClientTimeouts() -> dict[str, float]:
    """The SMTP client's default time-outs, by their L{DeliveryConfig.timeouts} names."""
    return {name: default for _, name, default in CLIENT_TIMEOUTS}


@dataclass(frozen=True)
class DeliveryConfig:
    """How outgoing mail is delivered (C{[delivery]}).

    @ivar heloName: the name this relay gives in EHLO/HELO/LHLO, or C{None} for its
        host name.
    @ivar tls: the TLS policy (one of L{TLS_CHOICES}) for delivery to MX hosts, and the
        default of C{smtp} routes.
    @ivar caFile: the absolute path of a PEM CA bundle, or C{None} for the system's trust
        store; the default of C{smtp} routes.
    @ivar destinationConcurrency: the most connections to one destination at once.
    @ivar connectionCacheTime: seconds an idle connection is kept for reuse (C{0.0}: never).
    @ivar timeouts: the SMTP client's time-outs in seconds, by the names of
        C{mailrelay.smtp.client.ClientTimeouts}' fields: C{connect}, C{greeting}, C{ehlo},
        C{starttls}, C{auth}, C{mail}, C{rcpt}, C{dataInit}, C{dataBlock}, C{dataDone},
        C{rset}, C{quit} (all of them, always).
    """

    heloName: str | None = None
    tls: str = DEFAULT_TLS
    caFile: str | None = None
    destinationConcurrency: int = DEFAULT_DESTINATION_CONCURRENCY
    connectionCacheTime: float = DEFAULT_CONNECTION_CACHE_TIME
    timeouts: dict[str, float] = field(default_factory=_defaultClientTimeouts, hash=False)


@dataclass(frozen=True)
class RouteConfig:
    """One C{[[routes]]} table: where mail for some domains goes.

    @ivar domain: the normalised domain matched: C{"example.org"} (that domain only),
        C{".example.org"} (its subdomains only) or C{"*"} (every domain: the default route).
    @ivar backend: C{"smtp"}, C{"lmtp"}, C{"maildir"}, C{"discard"} or the name of a
        L{BackendSpec}.
    @ivar nexthop: the backend's destination, normalised, or C{None}:
        - C{smtp}: a smarthost in L{parseSmarthost}'s notation, as C{str(Smarthost)} writes it
          (C{"[mx.example.org]:25"}), or C{None} to look up the recipient domain's MX hosts;
        - C{lmtp}: C{"host:port"} (C{"[2001:db8::1]:port"} for IPv6; never an MX lookup) or
          C{"unix:/absolute/path"};
        - C{maildir}: an absolute directory template that may hold C{{local}}, C{{domain}}
          and C{{address}};
        - C{discard} and site backends: C{None}.
    @ivar options: the transport options of an C{smtp} or C{lmtp} route (for C{smtp} the
        C{tls} and C{ca_file} not given default to C{[delivery]}'s); C{None} for other
        backends.
    @ivar key: where the route came from, e.g. C{"routes[2]"}.
    """

    domain: str
    backend: str
    nexthop: str | None = None
    options: TransportOptions | None = None
    key: str = ""


@dataclass(frozen=True)
class BackendSpec:
    """One C{[[backends]]} table: a site delivery backend (a plugin providing
    C{IDeliveryBackend}).

    @ivar name: the name routes use in C{backend}.
    @ivar plugin: the plugin's name (not checked here: the service builds it).
    @ivar options: the other keys of the table, passed to the plugin's C{build}.
    @ivar timeout: seconds one delivery may take (key C{timeout}, consumed by the loader).
    @ivar key: where the entry came from, e.g. C{"backends[0]"}.
    """

    name: str
    plugin: str
    options: dict = field(default_factory=dict, hash=False)
    timeout: float = DEFAULT_BACKEND_TIMEOUT
    key: str = ""


@dataclass(frozen=True)
class Config:
    """The relay's whole configuration, checked.

    @ivar source: the path of the configuration file as given, or C{None} for the defaults.
    @ivar configDir: the absolute directory of the file (the current directory without a file),
        against which the file's relative paths are resolved.
    @ivar hostname: this relay's host name (lower case, no trailing dot).
    @ivar spoolDirectory: the absolute path of the spool directory (it may not exist yet, but
        can be created).
    @ivar minFreeSpace: bytes that must stay free on the spool's file system.
    @ivar spoolSync: how the spool makes a batch durable: C{"syncfs"} or C{"fsync"}.
    @ivar relayNetworks: clients in these networks may relay to any domain.
    @ivar acceptDomains: domains (normalised) accepted from anyone.
    @ivar smarthost: where outgoing mail goes, or C{None} for direct MX delivery.
    @ivar maxMessageSize: the largest message accepted, in bytes.
    @ivar maxRecipients: the most recipients accepted for one message.
    @ivar idleTimeout: seconds a client may stay silent between commands.
    @ivar dataTimeout: seconds a client may stay silent while sending message data.
    @ivar maxErrors: errors in one session before it is closed with 421.
    @ivar maxHops: the most C{Received:} fields a message may carry (mail loops).
    @ivar reverseDNS: look up the client's name (forward-confirmed) for C{Received:}.
    @ivar listeners: where to accept SMTP connections.
    @ivar recipientValidators: the recipient validator plugins, in order.
    @ivar headerStampers: the header stamper plugins, in order.
    @ivar queue: retry and lifetime settings of the queue.
    @ivar delivery: how outgoing mail is delivered.
    @ivar smarthostOptions: the transport options for C{smarthost}.
    @ivar nameservers: C{(address, port)} of the DNS resolvers to use instead of the
        system's (C{/etc/resolv.conf}); C{()} for the system's.
    @ivar routes: the per-domain routes, in the file's order.
    @ivar backends: the site delivery backends.
    @ivar auth: SMTP AUTH settings, or C{None} without an C{[auth]} table.
    @ivar rateLimiter: the plugin (providing L{mailrelay.interfaces.IRateLimiter}) keeping the
        listeners' limit counters, shared by several relays, or C{None} for the in-memory
        default; its C{timeout} is how long one answer may take.
    @ivar drainTime: seconds a stopping relay lets sessions in DATA finish their message,
        and then deliveries in flight finish and be recorded.
    """

    source: str | None
    configDir: Path
    hostname: str
    spoolDirectory: Path
    minFreeSpace: int
    relayNetworks: tuple[IPNetwork, ...]
    acceptDomains: tuple[str, ...]
    smarthost: Smarthost | None
    maxMessageSize: int
    maxRecipients: int
    idleTimeout: float
    dataTimeout: float
    maxErrors: int
    maxHops: int
    reverseDNS: bool
    listeners: tuple[ListenerConfig, ...]
    recipientValidators: tuple[PluginSpec, ...]
    headerStampers: tuple[PluginSpec, ...]
    queue: QueueConfig = QueueConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    smarthostOptions: TransportOptions = TransportOptions()
    nameservers: tuple[tuple[str, int], ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    backends: tuple[BackendSpec, ...] = ()
    spoolSync: str = "syncfs"
    auth: AuthConfig | None = None
    rateLimiter: PluginSpec | None = None
    drainTime: float = DEFAULT_DRAIN_TIME


# ---------------------------------------------------------------------------------------------
# Parsing single values (usable on their own: they raise ValueError)


def parseNetwork(text: str) -> IPNetwork:
    """Parse an IP network: C{"192.0.2.0/24"}, C{"2001:db8::/32"}, or a bare address (C{/32},
    C{/128}).

    @raise ValueError: not a network, or host bits set (C{"10.0.0.1/8"}); the message names
        the value.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be an IP network as a string, not {describeValue(text)}")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"{describeValue(text)} is not an IP address or network "
                f'(such as "192.0.2.0/24", "2001:db8::/32" or "192.0.2.1"): {e}'
            ) from None
        raise ValueError(
            f"{describeValue(text)} has host bits set; did you mean {describeValue(str(loose))}?"
        ) from None


def _parseServer(text: str, what: str, hint: str) -> tuple[str, int | None, bool, bool]:
    """Split C{"host"}, C{"host:port"}, C{"[host]"} or C{"[host]:port"} and check the parts.

    @param what: what C{text} is, for messages (C{"smarthost"}).
    @param hint: the notations allowed, for messages.
    @return: the host (lower case, no trailing dot; an IP address in canonical form, IPv6
        without brackets), the port or C{None}, whether the host was in brackets and whether it
        is an IP address.
    @raise ValueError: C{"<text> is not a valid <what>: <reason> <hint>"}.
    """

    def bad(reason: str) -> ValueError:
        return ValueError(f"{describeValue(text)} is not a valid {what}: {reason} {hint}")

    portText: str | None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise bad('"[" without "]"')
        host = text[1:close]
        rest = text[close + 1 :]
        bracketed = True
        if not rest:
            portText = None
        elif rest.startswith(":"):
            portText = rest[1:]
        else:
            raise bad(f'unexpected {describeValue(rest)} after "]"')
    else:
        if text.count(":") > 1:
            raise bad("an IPv6 address must be written in brackets")
        host, colon, portText = text.partition(":")
        if not colon:
            portText = None
        bracketed = False

    port = None
    if portText is not None:
        if not _DIGITS.match(portText):
            raise bad(f"the port must be a number from 1 to 65535, not {describeValue(portText)}")
        port = int(portText)
        if not 1 <= port <= 65535:
            raise bad(f"the port must be from 1 to 65535, not {port}")
    if not host:
        raise bad("the host is missing")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return str(address), port, bracketed, True
    problem = hostnameProblem(host)
    if problem:
        raise bad(problem)
    return host.rstrip(".").lower() if host.endswith(".") else host.lower(), port, bracketed, False


def parseSmarthost(text: str) -> Smarthost:
    """Parse a smarthost: C{"host"}, C{"host:port"}, C{"[host]"}, C{"[host]:port"},
    C{"192.0.2.1:2525"}, C{"[2001:db8::1]:2525"}.

    Brackets mean "no MX lookup" (Postfix's relayhost convention); an IP address is never
    looked up.  The port defaults to 25.

    @raise ValueError: the message names the value and says what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a smarthost as a string, not {describeValue(text)}")
    host, port, bracketed, isAddress = _parseServer(
        text, "smarthost", '(use "host", "host:port", "[host]:port" or "[2001:db8::1]:port")'
    )
    return Smarthost(
        host,
        DEFAULT_SMTP_PORT if port is None else port,
        mxLookup=not (bracketed or isAddress),
    )


def parseNameserver(text: str) -> tuple[str, int]:
    """Parse a DNS resolver's address: C{"192.0.2.1"}, C{"127.0.0.1:5353"}, C{"::1"},
    C{"[::1]:53"}.  The port defaults to 53.

    @return: C{(address, port)}, the address in its canonical form (IPv6 without brackets).
    @raise ValueError: not an IP address with an optional port (host names are refused: a
        resolver cannot be found by name); the message names the value.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a name server address as a string, not {describeValue(text)}")
    try:
        return str(ipaddress.ip_address(text)), DEFAULT_DNS_PORT
    except ValueError:
        pass
    hint = '(use "192.0.2.1", "127.0.0.1:5353" or "[2001:db8::1]:53")'
    host, port, _, isAddress = _parseServer(text, "name server", hint)
    if not isAddress:
        raise ValueError(
            f"{describeValue(text)} is not a valid name server: {describeValue(host)} is not "
            f"an IP address (a name server is given by its address, not its name) {hint}"
        )
    return host, DEFAULT_DNS_PORT if port is None else port


def parseLMTPNexthop(text: str) -> str:
    """Parse an LMTP server: C{"host:port"}, C{"[host]:port"}, C{"[2001:db8::1]:port"} or
    C{"unix:/path/to/socket"}.

    The port is required (LMTP has no standard port).  An LMTP server's host is never looked
    up by MX, so brackets around a host name change nothing.

    @return: the canonical form: C{"host:port"} (host name in lower case, IPv4 address),
        C{"[IPv6]:port"} or C{"unix:/normalised/path"}.
    @raise ValueError: the message names the value and says what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be an LMTP server as a string, not {describeValue(text)}")
    hint = '(use "host:port", "[host]:port", "[2001:db8::1]:port" or "unix:/path/to/socket")'
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError(
                f"{describeValue(text)} is not a valid LMTP server: the socket path after "
                f'"unix:" must be absolute (start with "/") {hint}'
            )
        return "unix:" + os.path.normpath(path)
    host, port, _, _ = _parseServer(text, "LMTP server", hint)
    if port is None:
        raise ValueError(
            f"{describeValue(text)} is not a valid LMTP server: the port is missing "
            f"(LMTP has no default port) {hint}"
        )
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def checkMaildirTemplate(text: str) -> None:
    """Check a maildir directory template: a non-empty path in which C{{local}},
    C{{domain}} and C{{address}} stand for the recipient's local part, domain and address.

    The maildir backend replaces those three placeholders and leaves every other character as
    it is; any other C{{...}} (C{{user}}, C{{Local}}, C{{}}) is refused here as a likely
    mistake.

    @raise ValueError: the message names the value and says what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a directory template (a string), not {describeValue(text)}")
    if not text:
        raise ValueError("must be a directory template, not an empty string")
    for match in _TEMPLATE_FIELD.finditer(text):
        if match.group(1) not in MAILDIR_FIELDS:
            allowed = ", ".join("{" + name + "}" for name in MAILDIR_FIELDS)
            raise ValueError(
                f"{describeValue(text)} is not a valid directory template: unknown placeholder "
                f"{describeValue(match.group(0))} (the placeholders are {allowed})"
            )


def checkEndpoint(text: str) -> None:
    """Check that Twisted can parse C{text} as a server endpoint description.

    The endpoint is built without a reactor and never listens.

    @raise ValueError: the message names the value and gives Twisted's complaint.
    """
    from twisted.internet.endpoints import serverFromString

    if not isinstance(text, str):
        raise ValueError(f"must be an endpoint string, not {describeValue(text)}")
    hint = '(e.g. "tcp:2525:interface=127.0.0.1", "tcp6:25:interface=\\:\\:1", "unix:/run/x.sock")'
    try:
        endpoint = serverFromString(None, text)
    except (ValueError, TypeError, KeyError, IndexError, OSError) as e:
        raise ValueError(
            f"{describeValue(text)} is not a valid server endpoint {hint}: {e}"
        ) from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ValueError(
            f"{describeValue(text)} is not a valid server endpoint: "
            f"port {port} is not from 0 to 65535"
        )


def spoolDirectoryProblem(path: Path) -> str | None:
    """Why C{path} cannot serve as the spool directory, or C{None} if it can.

    An existing directory must be writable and searchable; a missing one must be creatable:
    its nearest existing ancestor must be a writable, searchable directory.
    """
    where = describeValue(str(path))
    try:
        if path.exists():
            if not path.is_dir():
                return f"{where} exists but is not a directory"
            if not os.access(path, os.W_OK | os.X_OK):
                return f"directory {where} is not writable (it needs write and search permission)"
            return None
        if os.path.lexists(path):
            return f"{where} is a dangling symbolic link"
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"cannot create {where}: {describeValue(str(ancestor))} is not a directory"
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return (
                f"cannot create {where}: its parent {describeValue(str(ancestor))} "
                "is not writable"
            )
    except OSError as e:
        return f"cannot use {where}: {e.strerror or e}"
    return None


# ---------------------------------------------------------------------------------------------
# The loader


class _Loader:
    """Reads one file's table and the overrides into a L{Config}; every error names C{file}."""

    def __init__(self, file: str | None, configDir: Path) -> None:
        self.file = file
        self.configDir = configDir

    # -- errors

    def error(self, key: str | None, message: str, *, cli: bool = False) -> ConfigError:
        """A ConfigError at C{key}: in the file, or (C{cli}) on the command line."""
        return ConfigError(message, file=None if cli else self.file, key=key)

    # -- shapes

    def table(self, value: Any, key: str) -> dict[str, Any]:
        """C{value}, which must be a table."""
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table ([{key}]), not {describeValue(value)}")
        return value

    def checkKeys(self, table: dict[str, Any], key: str, allowed: Iterable[str]) -> None:
        """Refuse any key of C{table} (found at C{key}) not in C{allowed}."""
        allowed = tuple(allowed)
        for name in table:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {describeValue(close[0])}?)" if close else ""
                where = f"in [{key}]" if key else "at the top level"
                raise self.error(
                    joinKey(key, name),
                    f"unknown key {describeValue(name)}{hint}; "
                    f"the keys allowed {where} are: {', '.join(allowed)}",
                )

    def arrayOfTables(self, value: Any, key: str) -> list[dict[str, Any]]:
        """C{value}, which must be an array of tables (C{[[key]]})."""
        if not isinstance(value, list):
            raise self.error(
                key, f"must be an array of tables ([[{key}]]), not {describeValue(value)}"
            )
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(
                    f"{key}[{index}]", f"must be a table ([[{key}]]), not {describeValue(item)}"
                )
        return value

    def stringList(self, value: Any, key: str, *, cli: bool = False) -> list[tuple[str, str]]:
        """C{value}, an array of strings, as C{(key, string)} pairs (C{key[i]} in a file)."""
        if isinstance(value, str) and cli:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise self.error(key, f"must be an array of strings, not {describeValue(value)}",
                             cli=cli)
        result = []
        for index, item in enumerate(value):
            itemKey = key if cli else f"{key}[{index}]"
            if not isinstance(item, str):
                raise self.error(itemKey, f"must be a string, not {describeValue(item)}", cli=cli)
            result.append((itemKey, item))
        return result

    # -- scalars

    def string(self, value: Any, key: str, *, cli: bool = False) -> str:
        """C{value}, which must be a string."""
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {describeValue(value)}", cli=cli)
        return value

    def boolean(self, value: Any, key: str) -> bool:
        """C{value}, which must be C{true} or C{false}."""
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {describeValue(value)}")
        return value

    def integer(self, value: Any, key: str, *, minimum: int) -> int:
        """C{value}, an integer (not a boolean) no smaller than C{minimum} (0 or 1) and no
        larger than the setting's L{INTEGER_MAXIMA}."""
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be {what}, not {describeValue(value)}")
        setting = re.sub(r"\[\d+\]", "", key)
        maximum = INTEGER_MAXIMA[setting]
        if value > maximum:
            raise self.error(
                key,
                f"must be {what} no larger than {maximum}{_INTEGER_REASONS.get(setting, '')}, "
                f"not {describeValue(value)}",
            )
        return value

    def seconds(self, value: Any, key: str) -> float:
        """C{value}, a finite number (integer or float, not boolean) greater than zero and no
        larger than L{SECONDS_MAXIMUM}."""
        return self._seconds(value, key, "a positive number of seconds", zero=False)

    def nonNegativeSeconds(self, value: Any, key: str) -> float:
        """C{value}, a finite number (integer or float, not boolean) no smaller than zero and
        no larger than L{SECONDS_MAXIMUM}."""
        return self._seconds(value, key, "a number of seconds >= 0", zero=True)

    def _seconds(self, value: Any, key: str, what: str, zero: bool) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
            or (value == 0 and not zero)
        ):
            raise self.error(key, f"must be {what}, not {describeValue(value)}")
        if value > SECONDS_MAXIMUM:
            raise self.error(
                key,
                f"must be {what} no larger than {SECONDS_MAXIMUM} (about 31 years), "
                f"not {describeValue(value)}",
            )
        return float(value)

    def choice(self, value: Any, key: str, choices: tuple[str, ...]) -> str:
        """C{value}, which must be one of C{choices}."""
        if not isinstance(value, str) or value not in choices:
            listed = ", ".join(describeValue(c) for c in choices[:-1])
            raise self.error(
                key, f"must be {listed} or {describeValue(choices[-1])}, not {describeValue(value)}"
            )
        return value

    def path(self, text: str) -> str:
        """C{text} (C{~} expanded) as an absolute path, relative to the file's directory."""
        return os.path.abspath(self.configDir / os.path.expanduser(text))

    # -- settings

    def hostname(self, value: Any, key: str, *, cli: bool = False) -> str:
        """A host name for this relay."""
        try:
            return normaliseHostname(value)
        except ValueError as e:
            raise self.error(key, str(e), cli=cli) from None

    def spoolDirectory(self, value: Any, key: str, base: Path, *, cli: bool = False) -> Path:
        """The spool directory, resolved against C{base}, checked usable."""
        text = self.string(value, key, cli=cli)
        if not text:
            raise self.error(key, "must be a directory path, not an empty string", cli=cli)
        path = Path(os.path.abspath(base / os.path.expanduser(text)))
        problem = spoolDirectoryProblem(path)
        if problem:
            raise self.error(key, f"unusable spool directory: {problem}", cli=cli)
        return path

    def networks(self, value: Any, key: str, *, cli: bool = False) -> tuple[IPNetwork, ...]:
        """The relay networks."""
        result = []
        for itemKey, text in self.stringList(value, key, cli=cli):
            try:
                result.append(parseNetwork(text))
            except ValueError as e:
                raise self.error(itemKey, str(e), cli=cli) from None
        return tuple(result)

    def domains(self, value: Any, key: str, *, cli: bool = False) -> tuple[str, ...]:
        """The accepted domains, normalised and without duplicates."""
        items = self.stringList(value, key, cli=cli)
        if not items:
            return ()
        from mailrelay.address import normaliseDomain

        result: list[str] = []
        for itemKey, text in items:
            try:
                domain = normaliseDomain(text)
            except ValueError as e:
                raise self.error(
                    itemKey,
                    f"{describeValue(text)} is not a valid domain: {_domainProblem(e)}",
                    cli=cli,
                ) from None
            if domain not in result:
                result.append(domain)
        return tuple(result)

    def smarthost(self, value: Any, key: str, *, cli: bool = False) -> Smarthost | None:
        """The smarthost; an empty string means none."""
        text = self.string(value, key, cli=cli)
        if text == "":
            return None
        try:
            return parseSmarthost(text)
        except ValueError as e:
            raise self.error(key, str(e), cli=cli) from None

    def endpoint(self, value: Any, key: str, *, cli: bool = False) -> str:
        """A server endpoint description Twisted can parse."""
        text = self.string(value, key, cli=cli)
        try:
            checkEndpoint(text)
        except ValueError as e:
            raise self.error(key, str(e), cli=cli) from None
        return text

    def listeners(
        self, value: Any, key: str, auth: "AuthConfig | None" = None
    ) -> tuple[ListenerConfig, ...]:
        """The C{[[listeners]]} tables; C{auth} is the C{[auth]} table (or C{None})."""
        tables = self.arrayOfTables(value, key)
        if not tables:
            raise self.error(
                key, "at least one listener is needed, not an empty array []"
            )
        result = []
        seen: dict[str, str] = {}
        for index, table in enumerate(tables):
            here = f"{key}[{index}]"
            self.checkKeys(table, here, ALLOWED_KEYS["listeners"])
            if "endpoint" not in table:
                raise self.error(
                    joinKey(here, "endpoint"),
                    f"is required in each [[{key}]] table (e.g. endpoint = "
                    f"{describeValue(DEFAULT_ENDPOINT)})",
                )
            endpointKey = joinKey(here, "endpoint")
            endpoint = self.endpoint(table["endpoint"], endpointKey)
            if endpoint in seen:
                raise self.error(
                    endpointKey,
                    f"{describeValue(endpoint)} is already listed as {seen[endpoint]}",
                )
            seen[endpoint] = endpointKey
            bareNewline = table.get("bare_newline", "reject")
            if bareNewline not in BARE_NEWLINE_CHOICES:
                raise self.error(
                    joinKey(here, "bare_newline"),
                    f'must be "reject" or "normalize", not {describeValue(bareNewline)}',
                )
            result.append(
                ListenerConfig(
                    endpoint=endpoint,
                    bare_newline=bareNewline,
                    nul_bytes=self.choice(
                        table.get("nul_bytes", "reject"),
                        joinKey(here, "nul_bytes"),
                        BARE_NEWLINE_CHOICES,
                    ),
                    add_message_id=self.boolean(
                        table.get("add_message_id", True), joinKey(here, "add_message_id")
                    ),
                    add_date=self.boolean(table.get("add_date", True), joinKey(here, "add_date")),
                    **self.listenerSecurity(table, here, endpoint, auth),
                    **self.listenerLimits(table, here),
                )
            )
        return tuple(result)

    def listenerLimits(self, table: dict[str, Any], here: str) -> dict[str, Any]:
        """A listener's abuse limits, protocol checks, deadlines and PROXY protocol keys."""

        def key(name: str) -> str:
            return joinKey(here, name)

        result: dict[str, Any] = {}
        for name, default in (
            ("max_connections", DEFAULT_MAX_CONNECTIONS),
            ("max_connections_per_client", DEFAULT_MAX_CONNECTIONS_PER_CLIENT),
            ("connection_rate_limit", 0),
            ("message_rate_limit", 0),
            ("user_message_rate_limit", 0),
            ("min_data_rate", DEFAULT_MIN_DATA_RATE),
        ):
            result[name] = self.integer(table.get(name, default), key(name), minimum=0)
        result["rate_window"] = self.seconds(
            table.get("rate_window", DEFAULT_RATE_WINDOW), key("rate_window")
        )
        if "limit_exceptions" in table:
            result["limit_exceptions"] = self.networks(
                table["limit_exceptions"], key("limit_exceptions")
            )
        prefix = table.get("ipv6_prefix_length", DEFAULT_IPV6_PREFIX_LENGTH)
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 1 <= prefix <= 128:
            raise self.error(
                key("ipv6_prefix_length"),
                f"must be an integer from 1 to 128, not {describeValue(prefix)}",
            )
        result["ipv6_prefix_length"] = prefix
        result["greet_pause"] = self.nonNegativeSeconds(
            table.get("greet_pause", 0.0), key("greet_pause")
        )
        result["reject_unauth_pipelining"] = self.boolean(
            table.get("reject_unauth_pipelining", DEFAULT_REJECT_UNAUTH_PIPELINING),
            key("reject_unauth_pipelining"),
        )
        result["max_session_time"] = self.nonNegativeSeconds(
            table.get("max_session_time", DEFAULT_MAX_SESSION_TIME), key("max_session_time")
        )
        proxy = self.boolean(table.get("proxy_protocol", False), key("proxy_protocol"))
        networks: tuple[IPNetwork, ...] = ()
        if "proxy_networks" in table:
            networks = self.networks(table["proxy_networks"], key("proxy_networks"))
            if not proxy:
                raise self.error(
                    key("proxy_networks"),
                    f"{describeValue(table['proxy_networks'])} has no effect without "
                    "proxy_protocol = true",
                )
        if proxy and not networks:
            raise self.error(
                key("proxy_networks"),
                "is required with proxy_protocol = true: the networks of the load balancers "
                'allowed to send PROXY headers (e.g. ["10.0.0.0/8"]); a PROXY header from '
                "anyone else could claim any client address",
            )
        result["proxy_protocol"] = proxy
        result["proxy_networks"] = networks
        return result

    def sniCertificates(
        self,
        value: Any,
        here: str,
        *,
        minVersion: str,
        ciphers: str | None,
    ) -> tuple[SNICertificate, ...]:
        """A listener's C{tls_certificates}: an array of C{{server_name, certificate, key}}
        tables; each certificate is loaded (and must match its key) now."""
        from mailrelay.receive.tls import TLSConfigError, loadServerTLS

        key = joinKey(here, "tls_certificates")
        example = (
            '[{server_name = "mail.example.org", certificate = "example.org.pem", '
            'key = "example.org.key"}]'
        )
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.error(
                key, f"must be an array of tables such as {example}, not {describeValue(value)}"
            )
        result: list[SNICertificate] = []
        seen: dict[str, str] = {}
        for index, item in enumerate(value):
            itemKey = f"{key}[{index}]"
            self.checkKeys(item, itemKey, ALLOWED_KEYS["listeners.tls_certificates"])
            for required in ("server_name", "certificate"):
                if required not in item:
                    raise self.error(
                        joinKey(itemKey, required), f"is required in each table, as in {example}"
                    )
            nameKey = joinKey(itemKey, "server_name")
            text = self.string(item["server_name"], nameKey)
            name = text.lower().rstrip(".")
            problem = hostnameProblem(name[2:] if name.startswith("*.") else name)
            if problem:
                raise self.error(
                    nameKey,
                    f"{describeValue(text)} is not a host name (or \"*.\" and a domain): "
                    f"{problem}",
                )
            if name in seen:
                raise self.error(nameKey, f"{describeValue(text)} is already given in {seen[name]}")
            seen[name] = nameKey
            paths = {}
            for field_ in ("certificate", "key"):
                if field_ in item:
                    fileText = self.string(item[field_], joinKey(itemKey, field_))
                    if not fileText:
                        raise self.error(
                            joinKey(itemKey, field_), "must be a file name, not an empty string"
                        )
                    paths[field_] = self.path(fileText)
            paths.setdefault("key", paths["certificate"])
            try:
                loadServerTLS(
                    paths["certificate"], paths["key"], minVersion=minVersion, ciphers=ciphers
                )
            except TLSConfigError as e:
                at = "key" if e.setting == "key" and "key" in item else "certificate"
                raise self.error(joinKey(itemKey, at), str(e)) from None
            result.append(SNICertificate(name, paths["certificate"], paths["key"]))
        return tuple(result)

    def listenerSecurity(
        self, table: dict[str, Any], here: str, endpoint: str, auth: "AuthConfig | None"
    ) -> dict[str, Any]:
        """A listener's mode, TLS and AUTH keys, checked together; the certificate and key
        are loaded (and must match) now."""

        def key(name: str) -> str:
            return joinKey(here, name)

        mode = self.choice(table.get("mode", "relay"), key("mode"), LISTENER_MODES)
        certificate = key_ = None
        if "tls_certificate" in table:
            text = self.string(table["tls_certificate"], key("tls_certificate"))
            if not text:
                raise self.error(key("tls_certificate"), "must be a file name, not an empty string")
            certificate = self.path(text)
        if "tls_key" in table:
            text = self.string(table["tls_key"], key("tls_key"))
            if not text:
                raise self.error(key("tls_key"), "must be a file name, not an empty string")
            if certificate is None:
                raise self.error(
                    key("tls_key"),
                    f"{describeValue(text)} is given without {key('tls_certificate')}",
                )
            key_ = self.path(text)
        elif certificate is not None:
            key_ = certificate  # one file holding both
        if "tls_mode" in table:
            tlsMode = self.choice(table["tls_mode"], key("tls_mode"), LISTENER_TLS_MODES)
        elif mode == "submissions":
            tlsMode = "implicit"
        else:
            tlsMode = "starttls" if certificate is not None else "none"
        if mode == "submissions" and tlsMode != "implicit":
            raise self.error(
                key("tls_mode"),
                f'must be "implicit" for a "submissions" listener (RFC 8314), not '
                f"{describeValue(tlsMode)}",
            )
        if tlsMode == "none":
            if certificate is not None:
                raise self.error(
                    key("tls_certificate"),
                    f'{describeValue(table["tls_certificate"])} is given, but tls_mode is "none": '
                    'remove the certificate or set tls_mode = "starttls" or "implicit"',
                )
            for name in ("tls_min_version", "tls_ciphers"):
                if name in table:
                    raise self.error(
                        key(name),
                        f"{describeValue(table[name])} has no effect on a listener without TLS "
                        "(set tls_certificate too)",
                    )
        elif certificate is None:
            raise self.error(
                key("tls_certificate"),
                f"is required with tls_mode = {describeValue(tlsMode)}"
                + (
                    ' (a "submissions" listener is TLS from the first byte)'
                    if mode == "submissions"
                    else ""
                )
                + ": the PEM file of the server's certificate chain",
            )
        if tlsMode == "implicit" and endpoint.startswith("ssl:"):
            raise self.error(
                key("tls_mode"),
                f'"implicit" with the TLS endpoint {describeValue(endpoint)} would be TLS twice: '
                'use a "tcp:" endpoint (the certificate comes from tls_certificate)',
            )
        minVersion = self.choice(
            table.get("tls_min_version", "TLSv1.2"), key("tls_min_version"), TLS_MIN_VERSIONS
        )
        ciphers = None
        if "tls_ciphers" in table:
            ciphers = self.string(table["tls_ciphers"], key("tls_ciphers"))
            if not ciphers:
                raise self.error(
                    key("tls_ciphers"),
                    "must be an OpenSSL cipher string, not an empty string (leave the key out "
                    "for the defaults)",
                )
        if certificate is not None:
            from mailrelay.receive.tls import TLSConfigError, loadServerTLS

            try:
                loadServerTLS(
                    certificate, key_ or certificate, minVersion=minVersion, ciphers=ciphers
                )
            except TLSConfigError as e:
                at = {
                    "certificate": "tls_certificate",
                    "key": "tls_key" if "tls_key" in table else "tls_certificate",
                    "ciphers": "tls_ciphers",
                    "version": "tls_min_version",
                }[e.setting]
                raise self.error(key(at), str(e)) from None
        sni: tuple[SNICertificate, ...] = ()
        if "tls_certificates" in table:
            if certificate is None:
                raise self.error(
                    key("tls_certificates"),
                    "needs tls_certificate too: the certificate for clients that ask for no "
                    "name, or for a name not listed",
                )
            sni = self.sniCertificates(
                table["tls_certificates"], here, minVersion=minVersion, ciphers=ciphers
            )

        offerAuth = self.boolean(table.get("auth", mode != "relay"), key("auth"))
        withoutTLS = self.boolean(table.get("auth_without_tls", False), key("auth_without_tls"))
        if offerAuth:
            if auth is None:
                raise self.error(
                    key("auth"),
                    ("a submission listener needs AUTH: " if mode != "relay" else "")
                    + "AUTH needs an [auth] table with a password_file",
                )
            if tlsMode == "none" and not withoutTLS:
                raise self.error(
                    key("auth"),
                    "no client could ever log in: the listener has no TLS and AUTH is only "
                    "accepted under TLS; set tls_certificate (STARTTLS), or auth_without_tls = "
                    "true to let passwords cross the network in clear",
                )
        else:
            if mode != "relay":
                raise self.error(
                    key("auth"),
                    f"must be true on a {describeValue(mode)} listener: submission requires "
                    "AUTH (RFC 6409)",
                )
            if "auth_without_tls" in table:
                raise self.error(
                    key("auth_without_tls"),
                    f"{describeValue(withoutTLS)} has no effect on a listener without AUTH "
                    "(auth = false)",
                )
        return {
            "mode": mode,
            "tls_mode": tlsMode,
            "tls_certificate": certificate,
            "tls_key": key_,
            "tls_min_version": minVersion,
            "tls_ciphers": ciphers,
            "auth": offerAuth,
            "auth_without_tls": withoutTLS,
            "tls_certificates": sni,
        }

    def auth(self, table: dict[str, Any]) -> AuthConfig:
        """The C{[auth]} table: the password file is read and checked now."""
        from mailrelay.receive.auth import (
            DEFAULT_CHECKER_TIMEOUT,
            MECHANISMS,
            PasswordFileError,
            readPasswordFile,
        )

        checker = None
        if "checker" in table:
            if "password_file" in table:
                raise self.error(
                    "auth.checker",
                    "cannot be used with auth.password_file: users are checked either by the "
                    "password file or by a site checker; remove one of the two",
                )
            checker = self.pluginTable(
                table["checker"], "auth.checker", DEFAULT_CHECKER_TIMEOUT,
                "a credentials checker plugin",
            )
            path = None
            users: dict[str, str] = {}
        elif "password_file" not in table:
            raise self.error(
                "auth.password_file",
                'is required in [auth]: the file of "user:hash" lines (see mailrelay-passwd), '
                "unless a site checker is configured in [auth.checker]",
            )
        else:
            text = self.string(table["password_file"], "auth.password_file")
            if not text:
                raise self.error("auth.password_file", "must be a file name, not an empty string")
            path = self.path(text)
            try:
                users = readPasswordFile(path)
            except PasswordFileError as e:
                raise self.error("auth.password_file", str(e)) from None
        mechanisms: list[str] = []
        items = self.stringList(table.get("mechanisms", list(MECHANISMS)), "auth.mechanisms")
        for itemKey, name in items:
            if name.upper() not in MECHANISMS:
                raise self.error(
                    itemKey,
                    f"unknown SASL mechanism {describeValue(name)}; the mechanisms are "
                    + ", ".join(MECHANISMS),
                )
            if name.upper() not in mechanisms:
                mechanisms.append(name.upper())
        if not mechanisms:
            raise self.error("auth.mechanisms", "must name at least one mechanism, not []")
        senders = self.senders(
            self.table(table.get("senders", {}), "auth.senders"),
            None if checker is not None else users,
        )
        return AuthConfig(
            passwordFile=path,
            users=users,
            mechanisms=tuple(mechanisms),
            throttleAfter=self.integer(
                table.get("throttle_after", 3), "auth.throttle_after", minimum=0
            ),
            failureDelay=self.nonNegativeSeconds(
                table.get("failure_delay", 5.0), "auth.failure_delay"
            ),
            maxFailures=self.integer(table.get("max_failures", 10), "auth.max_failures", minimum=1),
            failureWindow=self.seconds(table.get("failure_window", 900.0), "auth.failure_window"),
            senders=senders,
            checker=checker,
        )

    def senders(
        self, table: dict[str, Any], users: dict[str, str] | None
    ) -> dict[str, tuple[str, ...]]:
        """C{[auth.senders]}: user = ["a@example.com", "@example.org"], normalised; each user
        must be in C{users} (the password file's), unless C{None} (a site checker)."""
        from mailrelay.address import normaliseDomain, parseReversePath

        result: dict[str, tuple[str, ...]] = {}
        for user, value in table.items():
            here = joinKey("auth.senders", user)
            if users is not None and user not in users:
                raise self.error(
                    here, f"user {describeValue(user)} is not in the password file"
                )
            patterns: list[str] = []
            for itemKey, text in self.stringList(value, here):
                try:
                    if text.startswith("@"):
                        pattern = "@" + normaliseDomain(text[1:])
                    else:
                        mailbox = parseReversePath(f"<{text}>", utf8=True)
                        if mailbox is None:
                            raise ValueError("the null sender <> is always allowed")
                        pattern = str(mailbox)
                except ValueError as e:
                    raise self.error(
                        itemKey,
                        f"{describeValue(text)} is not an address or \"@domain\": "
                        f"{_domainProblem(e)}",
                    ) from None
                patterns.append(pattern)
            result[user] = tuple(patterns)
        return result

    def pluginTable(self, value: Any, key: str, defaultTimeout: float, what: str) -> PluginSpec:
        """A table naming one plugin (C{[auth.checker]}, C{[rate_limiter]}): C{plugin},
        C{timeout} and the plugin's options."""
        table = self.table(value, key)
        name, timeout, options = self._pluginEntry(
            table, key, f"is required in [{key}]: the name of {what}", defaultTimeout, PLUGIN_KEYS
        )
        return PluginSpec(plugin=name, options=options, timeout=timeout, key=key)

    def _pluginEntry(
        self,
        table: dict[str, Any],
        here: str,
        missing: str,
        defaultTimeout: float,
        consumed: tuple[str, ...],
    ) -> tuple[str, float, dict[str, Any]]:
        """The C{plugin} name, C{timeout} and options (the keys not in C{consumed}) of a
        plugin's table found at C{here}; C{missing} says what to write when there is no
        C{plugin} key."""
        pluginKey = joinKey(here, "plugin")
        if "plugin" not in table:
            raise self.error(pluginKey, missing)
        name = self.string(table["plugin"], pluginKey)
        if not name:
            raise self.error(pluginKey, "must be a plugin name, not an empty string")
        timeout = self.seconds(table.get("timeout", defaultTimeout), joinKey(here, "timeout"))
        return name, timeout, {k: v for k, v in table.items() if k not in consumed}

    def cliListeners(self, value: Any, key: str) -> tuple[ListenerConfig, ...]:
        """Listeners from C{--listen}: default options for each."""
        result: list[ListenerConfig] = []
        for itemKey, text in self.stringList(value, key, cli=True):
            endpoint = self.endpoint(text, itemKey, cli=True)
            if any(listener.endpoint == endpoint for listener in result):
                raise self.error(
                    itemKey, f"{describeValue(endpoint)} is given twice", cli=True
                )
            result.append(ListenerConfig(endpoint))
        return tuple(result)

    def plugins(self, value: Any, key: str) -> tuple[PluginSpec, ...]:
        """A plugin list (C{[[recipient_validators]]}, C{[[header_stampers]]})."""
        result = []
        for index, table in enumerate(self.arrayOfTables(value, key)):
            here = f"{key}[{index}]"
            name, timeout, options = self._pluginEntry(
                table,
                here,
                f"is required in each [[{key}]] table: the name of the plugin",
                DEFAULT_PLUGIN_TIMEOUT,
                PLUGIN_KEYS,
            )
            result.append(PluginSpec(plugin=name, options=options, timeout=timeout, key=here))
        return tuple(result)

    # -- outbound delivery

    def caFile(self, value: Any, key: str) -> str | None:
        """A PEM CA bundle: C{None} for C{""}, else the absolute path of a readable file
        holding at least one PEM certificate."""
        text = self.string(value, key)
        if text == "":
            return None
        path = self.path(text)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise self.error(
                key, f"cannot read the CA file {describeValue(path)}: {e.strerror or e}"
            ) from None
        if not _PEM_CERTIFICATE.search(data):
            raise self.error(
                key,
                f"the CA file {describeValue(path)} holds no PEM certificate "
                '(no "-----BEGIN CERTIFICATE-----" line)',
            )
        return path

    def passwordFile(self, value: Any, key: str) -> str:
        """The password in the file named by C{value}: its first line, without the line end.
        The password itself never appears in messages."""
        text = self.string(value, key)
        path = self.path(text)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise self.error(
                key, f"cannot read the password file {describeValue(path)}: {e.strerror or e}"
            ) from None
        try:
            decoded = data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(
                key, f"the password file {describeValue(path)} is not UTF-8 text"
            ) from None
        password = decoded.split("\n", 1)[0].removesuffix("\r")
        if not password:
            what = "is empty" if not decoded else "has an empty first line"
            raise self.error(
                key,
                f"the password file {describeValue(path)} {what} (its first line is the "
                "password)",
            )
        if "\0" in password:
            raise self.error(
                key, f"the password in {describeValue(path)} contains a NUL character"
            )
        return password

    def transportOptions(
        self,
        table: dict[str, Any],
        here: str,
        *,
        tls: str = DEFAULT_TLS,
        caFile: str | None = None,
    ) -> TransportOptions:
        """The L{TransportOptions} in C{table} (at C{here}: C{"smarthost"}, C{"routes[0]"});
        C{tls} and C{caFile} are the defaults of the keys not given."""

        def key(name: str) -> str:
            return joinKey(here, name)

        tls = self.choice(table.get("tls", tls), key("tls"), TLS_CHOICES)
        if "ca_file" in table:
            caFile = self.caFile(table["ca_file"], key("ca_file"))
        username = self.string(table.get("username", ""), key("username")) or None
        if username is not None and "\0" in username:
            raise self.error(
                key("username"), f"{describeValue(username)} contains a NUL character"
            )
        password = None
        if "password" in table:
            value = table["password"]
            if not isinstance(value, str):
                raise self.error(
                    key("password"), "must be a string (the value is not shown here)"
                )
            if "\0" in value:
                raise self.error(
                    key("password"), "contains a NUL character (the value is not shown here)"
                )
            password = value or None
        fileText = self.string(table.get("password_file", ""), key("password_file"))
        if fileText and password is not None:
            raise self.error(
                key("password_file"),
                f"{describeValue(fileText)} is given together with {key('password')}: "
                "give only one of them",
            )
        if fileText:
            if username is None:
                raise self.error(
                    key("password_file"),
                    f"{describeValue(fileText)} is given without {key('username')}: "
                    "set the user name too, or remove the password",
                )
            password = self.passwordFile(fileText, key("password_file"))
        elif password is not None and username is None:
            raise self.error(
                key("password"),
                f"is given without {key('username')}: set the user name too, or remove "
                "the password (the value is not shown here)",
            )
        authWithoutTLS = self.boolean(
            table.get("auth_without_tls", False), key("auth_without_tls")
        )
        if username is not None:
            if password is None:
                raise self.error(
                    key("username"),
                    f"{describeValue(username)} needs a password: set "
                    f"{key('password_file')} (or {key('password')})",
                )
            if tls == "none" and not authWithoutTLS:
                raise self.error(
                    key("username"),
                    f"{describeValue(username)} could never log in: {key('tls')} is \"none\" "
                    f"and {key('auth_without_tls')} is false (AUTH is never sent without TLS "
                    "unless auth_without_tls = true)",
                )
        return TransportOptions(
            tls=tls,
            caFile=caFile,
            username=username,
            password=password,
            authWithoutTLS=authWithoutTLS,
        )

    def queue(self, table: dict[str, Any], hostname: str) -> QueueConfig:
        """The C{[queue]} table; C{hostname} completes a bare C{postmaster}."""
        minBackoff = self.seconds(
            table.get("min_backoff", DEFAULT_MIN_BACKOFF), "queue.min_backoff"
        )
        maxBackoff = self.seconds(
            table.get("max_backoff", DEFAULT_MAX_BACKOFF), "queue.max_backoff"
        )
        if maxBackoff < minBackoff:
            if "max_backoff" in table:
                raise self.error(
                    "queue.max_backoff",
                    f"must be at least queue.min_backoff ({minBackoff:g}), not "
                    f"{describeValue(table['max_backoff'])}",
                )
            raise self.error(
                "queue.min_backoff",
                f"must be at most queue.max_backoff ({maxBackoff:g}, the default), not "
                f"{describeValue(table['min_backoff'])}",
            )
        postmaster = None
        text = self.string(table.get("postmaster", ""), "queue.postmaster")
        if text:
            from mailrelay.address import parseForwardPath

            try:
                postmaster = str(parseForwardPath(f"<{text}>", postmasterDomain=hostname))
            except ValueError as e:
                raise self.error(
                    "queue.postmaster",
                    f"{describeValue(text)} is not a valid address: {_domainProblem(e)}",
                ) from None
        return QueueConfig(
            minBackoff=minBackoff,
            maxBackoff=maxBackoff,
            maxLifetime=self.seconds(
                table.get("max_lifetime", DEFAULT_MAX_LIFETIME), "queue.max_lifetime"
            ),
            bounceLifetime=self.seconds(
                table.get("bounce_lifetime", DEFAULT_BOUNCE_LIFETIME), "queue.bounce_lifetime"
            ),
            delayWarning=self.nonNegativeSeconds(
                table.get("delay_warning", DEFAULT_DELAY_WARNING), "queue.delay_warning"
            ),
            activeLimit=self.integer(
                table.get("active_limit", DEFAULT_ACTIVE_LIMIT), "queue.active_limit", minimum=1
            ),
            postmaster=postmaster,
            hold=self.boolean(table.get("hold", False), "queue.hold"),
            process=self.choice(table.get("process", "separate"), "queue.process", ("separate", "inline")),
        )

    def delivery(self, table: dict[str, Any]) -> DeliveryConfig:
        """The C{[delivery]} table, with C{[delivery.timeouts]}."""
        heloName = None
        text = self.string(table.get("helo_name", ""), "delivery.helo_name")
        if text:
            heloName = self.hostname(text, "delivery.helo_name")
        caFile = None
        if "ca_file" in table:
            caFile = self.caFile(table["ca_file"], "delivery.ca_file")
        timeoutsTable = self.table(table.get("timeouts", {}), "delivery.timeouts")
        self.checkKeys(timeoutsTable, "delivery.timeouts", ALLOWED_KEYS["delivery.timeouts"])
        timeouts = {
            name: self.seconds(timeoutsTable.get(key, default), f"delivery.timeouts.{key}")
            for key, name, default in CLIENT_TIMEOUTS
        }
        return DeliveryConfig(
            heloName=heloName,
            tls=self.choice(table.get("tls", DEFAULT_TLS), "delivery.tls", TLS_CHOICES),
            caFile=caFile,
            destinationConcurrency=self.integer(
                table.get("destination_concurrency", DEFAULT_DESTINATION_CONCURRENCY),
                "delivery.destination_concurrency",
                minimum=1,
            ),
            connectionCacheTime=self.nonNegativeSeconds(
                table.get("connection_cache_time", DEFAULT_CONNECTION_CACHE_TIME),
                "delivery.connection_cache_time",
            ),
            timeouts=timeouts,
        )

    def nameservers(self, value: Any, key: str) -> tuple[tuple[str, int], ...]:
        """The C{dns.nameservers} array: C{(address, port)} pairs, without duplicates."""
        result: list[tuple[str, int]] = []
        seen: dict[tuple[str, int], str] = {}
        for itemKey, text in self.stringList(value, key):
            try:
                server = parseNameserver(text)
            except ValueError as e:
                raise self.error(itemKey, str(e)) from None
            if server in seen:
                raise self.error(
                    itemKey, f"{describeValue(text)} is already listed as {seen[server]}"
                )
            seen[server] = itemKey
            result.append(server)
        return tuple(result)

    def backends(self, value: Any, key: str) -> tuple[BackendSpec, ...]:
        """The C{[[backends]]} tables."""
        result: list[BackendSpec] = []
        seen: dict[str, str] = {}
        for index, table in enumerate(self.arrayOfTables(value, key)):
            here = f"{key}[{index}]"
            nameKey = joinKey(here, "name")
            if "name" not in table:
                raise self.error(
                    nameKey,
                    f"is required in each [[{key}]] table: the name routes use in their "
                    "backend key",
                )
            name = self.string(table["name"], nameKey)
            if not name:
                raise self.error(nameKey, "must be a backend name, not an empty string")
            if name.lower() in BUILTIN_BACKENDS:
                raise self.error(
                    nameKey,
                    f"{describeValue(name)} is the name of a built-in backend; choose another "
                    f"(the built-in backends are: {', '.join(BUILTIN_BACKENDS)})",
                )
            if name in seen:
                raise self.error(
                    nameKey, f"{describeValue(name)} is already the name of {seen[name]}"
                )
            seen[name] = nameKey
            plugin, timeout, options = self._pluginEntry(
                table,
                here,
                f"is required in each [[{key}]] table: the name of the plugin",
                DEFAULT_BACKEND_TIMEOUT,
                BACKEND_KEYS,
            )
            result.append(
                BackendSpec(name=name, plugin=plugin, options=options, timeout=timeout, key=here)
            )
        return tuple(result)

    def routeDomain(self, value: Any, key: str) -> str:
        """A route's C{domain}: C{"*"}, C{".example.org"} or C{"example.org"}, normalised."""
        text = self.string(value, key)
        if text == "*":
            return text
        from mailrelay.address import normaliseDomain

        hint = (
            ' (a route\'s domain is "example.org" for that domain, ".example.org" for its '
            'subdomains or "*" for every domain)'
        )
        subdomains = text.startswith(".")
        try:
            if subdomains and text[1:2] == "[":
                raise ValueError("an address literal has no subdomains")
            domain = normaliseDomain(text[1:] if subdomains else text)
        except ValueError as e:
            raise self.error(
                key, f"{describeValue(text)} is not a valid domain: {_domainProblem(e)}{hint}"
            ) from None
        return "." + domain if subdomains else domain

    def routes(
        self,
        value: Any,
        key: str,
        *,
        backends: tuple[BackendSpec, ...],
        delivery: DeliveryConfig,
    ) -> tuple[RouteConfig, ...]:
        """The C{[[routes]]} tables.

        @param backends: the site backends routes may name.
        @param delivery: the defaults of C{smtp} routes' C{tls} and C{ca_file}.
        """
        available = BUILTIN_BACKENDS + tuple(spec.name for spec in backends)
        result: list[RouteConfig] = []
        seen: dict[str, str] = {}
        for index, table in enumerate(self.arrayOfTables(value, key)):
            here = f"{key}[{index}]"
            self.checkKeys(table, here, ALLOWED_KEYS["routes"])
            domainKey = joinKey(here, "domain")
            if "domain" not in table:
                raise self.error(
                    domainKey,
                    f'is required in each [[{key}]] table: "example.org", ".example.org" or "*"',
                )
            domain = self.routeDomain(table["domain"], domainKey)
            if domain in seen:
                raise self.error(
                    domainKey,
                    f"{describeValue(table['domain'])} is already routed by {seen[domain]}",
                )
            seen[domain] = domainKey

            backendKey = joinKey(here, "backend")
            if "backend" not in table:
                raise self.error(
                    backendKey,
                    f"is required in each [[{key}]] table; the backends available are: "
                    + ", ".join(available),
                )
            backend = self.string(table["backend"], backendKey)
            if backend not in available:
                raise self.error(
                    backendKey,
                    f"unknown backend {describeValue(backend)}; the backends available are: "
                    + ", ".join(available)
                    + " (site backends are defined in [[backends]] tables)",
                )

            nexthopKey = joinKey(here, "nexthop")
            nexthop: str | None = None
            if backend == "smtp":
                text = self.string(table.get("nexthop", ""), nexthopKey)
                if text:
                    try:
                        nexthop = str(parseSmarthost(text))
                    except ValueError as e:
                        raise self.error(nexthopKey, str(e)) from None
            elif backend == "lmtp":
                if "nexthop" not in table:
                    raise self.error(
                        nexthopKey,
                        'is required for an lmtp route: "host:port", "[host]:port" or '
                        '"unix:/path/to/socket"',
                    )
                try:
                    nexthop = parseLMTPNexthop(self.string(table["nexthop"], nexthopKey))
                except ValueError as e:
                    raise self.error(nexthopKey, str(e)) from None
            elif backend == "maildir":
                if "nexthop" not in table:
                    raise self.error(
                        nexthopKey,
                        "is required for a maildir route: a directory, which may hold "
                        '{local}, {domain} and {address} (e.g. "/var/mail/{domain}/{local}")',
                    )
                text = self.string(table["nexthop"], nexthopKey)
                try:
                    checkMaildirTemplate(text)
                except ValueError as e:
                    raise self.error(nexthopKey, str(e)) from None
                nexthop = self.path(text)
            elif "nexthop" in table:
                what = (
                    'a "discard" route'
                    if backend == "discard"
                    else f"a route to site backend {describeValue(backend)} (its options are "
                    "in its [[backends]] table)"
                )
                raise self.error(
                    nexthopKey, f"{describeValue(table['nexthop'])} is not allowed: {what} "
                    "takes no nexthop"
                )

            options = None
            if backend in ("smtp", "lmtp"):
                if backend == "smtp":
                    options = self.transportOptions(
                        table, here, tls=delivery.tls, caFile=delivery.caFile
                    )
                else:
                    options = self.transportOptions(table, here)
            else:
                for name in TRANSPORT_KEYS:
                    if name in table:
                        shown = "" if name == "password" else f"{describeValue(table[name])}: "
                        raise self.error(
                            joinKey(here, name),
                            f"{shown}only smtp and lmtp routes take {name}, not a "
                            f"{describeValue(backend)} route",
                        )
            result.append(
                RouteConfig(
                    domain=domain, backend=backend, nexthop=nexthop, options=options, key=here
                )
            )
        return tuple(result)


def _domainProblem(error: ValueError) -> str:
    """The text of a domain error, without the SMTP reply code an C{AddressError} carries."""
    reply = getattr(error, "reply", None)
    text = getattr(reply, "text", None)
    if not isinstance(text, str):
        return str(error)
    return text.removeprefix("Error: ")


def readConfigFile(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the configuration file C{path}.

    @raise ConfigError: the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(
            f"cannot read the configuration file: {e.strerror or e}", file=os.fspath(path)
        ) from None


def _readFile(path: str, text: bytes | None = None) -> dict[str, Any]:
    """The TOML table in C{path}, or in C{text} (the file's bytes, already read).

    @raise ConfigError: the file cannot be read, is not UTF-8 or is not valid TOML.
    """
    if text is None:
        text = readConfigFile(path)
    try:
        return tomllib.loads(text.decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"TOML syntax error: {e}", file=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: {e}", file=path) from None


def _given(overrides: dict[str, Any], name: str) -> bool:
    """Whether the command line gave option C{name}: not absent, not C{None}, not C{[]}."""
    value = overrides.get(name)
    return value is not None and value != [] and value != ()


def loadConfig(
    path: str | os.PathLike[str] | None, overrides: dict | None = None, text: bytes | None = None
) -> Config:
    """Read, override and check the configuration.

    @param path: the TOML file, or C{None} for the built-in defaults.
    @param text: the bytes of C{path} when the caller has read them already (see
        L{readConfigFile}); the file is then not read again.
    @param overrides: command-line options, by the keys of L{OVERRIDE_OPTIONS}: C{"listen"},
        C{"relay_network"}, C{"accept_domain"} (lists of strings), C{"hostname"}, C{"spool"},
        C{"smarthost"} (strings; C{""} for no smarthost).  An option given replaces the file's
        (or default) value entirely, list and all; its listeners get default options; a
        relative C{spool} is relative to the current directory.  C{None} or an empty list
        means the option was not given.  The file's value of an overridden setting is ignored.
    @raise ConfigError: naming the file (or the option), the key and the value.
    """
    overrides = dict(overrides or {})
    for name in overrides:
        if name not in OVERRIDE_OPTIONS:
            raise ConfigError(
                f"unknown command-line override {describeValue(name)}; known: "
                + ", ".join(OVERRIDE_OPTIONS),
                key=str(name),
            )
    cwd = Path(os.path.abspath(os.getcwd()))
    if path is None:
        source = None
        configDir = cwd
        data: dict[str, Any] = {}
    else:
        source = os.fspath(path)
        configDir = Path(os.path.abspath(os.path.dirname(source) or "."))
        data = _readFile(source, text)

    load = _Loader(source, configDir)
    load.checkKeys(data, "", ALLOWED_KEYS[""])
    sections = {}
    for name in ("spool", "relay", "limits", "dns", "queue", "delivery", "smarthost", "auth"):
        sections[name] = load.table(data.get(name, {}), name)
        load.checkKeys(sections[name], name, ALLOWED_KEYS[name])
    spool, relay, limits, dns = (sections[n] for n in ("spool", "relay", "limits", "dns"))

    # hostname
    if _given(overrides, "hostname"):
        hostname = load.hostname(overrides["hostname"], "--hostname", cli=True)
    elif "hostname" in data:
        hostname = load.hostname(load.string(data["hostname"], "hostname"), "hostname")
    else:
        fqdn = socket.getfqdn()
        try:
            hostname = normaliseHostname(fqdn)
        except ValueError as e:
            raise load.error(
                "hostname",
                f"the system's name from socket.getfqdn() will not do: {e}; "
                "set hostname in the configuration file or use --hostname",
            ) from None

    drainTime = load.seconds(data.get("drain_time", DEFAULT_DRAIN_TIME), "drain_time")

    # spool
    if _given(overrides, "spool"):
        spoolDirectory = load.spoolDirectory(overrides["spool"], "--spool", cwd, cli=True)
    elif "directory" in spool:
        spoolDirectory = load.spoolDirectory(spool["directory"], "spool.directory", configDir)
    else:
        spoolDirectory = load.spoolDirectory(DEFAULT_SPOOL_DIRECTORY, "spool.directory", cwd)
    minFreeSpace = load.integer(
        spool.get("min_free_space", DEFAULT_MIN_FREE_SPACE), "spool.min_free_space", minimum=0
    )
    spoolSync = spool.get("sync", "syncfs")
    if spoolSync not in ("syncfs", "fsync"):
        raise load.error("spool.sync", f'must be "syncfs" or "fsync", not {describeValue(spoolSync)}')

    # relay
    if _given(overrides, "relay_network"):
        relayNetworks = load.networks(overrides["relay_network"], "--relay-network", cli=True)
    else:
        relayNetworks = load.networks(
            relay.get("networks", list(DEFAULT_RELAY_NETWORKS)), "relay.networks"
        )
    if _given(overrides, "accept_domain"):
        acceptDomains = load.domains(overrides["accept_domain"], "--accept-domain", cli=True)
    else:
        acceptDomains = load.domains(relay.get("accept_domains", []), "relay.accept_domains")
    if overrides.get("smarthost") is not None:
        smarthost = load.smarthost(overrides["smarthost"], "--smarthost", cli=True)
    elif "smarthost" in relay:
        smarthost = load.smarthost(relay["smarthost"], "relay.smarthost")
    else:
        smarthost = None

    # limits
    maxMessageSize = load.integer(
        limits.get("message_size", DEFAULT_MESSAGE_SIZE), "limits.message_size", minimum=1
    )
    maxRecipients = load.integer(
        limits.get("recipients", DEFAULT_MAX_RECIPIENTS), "limits.recipients", minimum=1
    )
    idleTimeout = load.seconds(
        limits.get("idle_timeout", DEFAULT_IDLE_TIMEOUT), "limits.idle_timeout"
    )
    dataTimeout = load.seconds(
        limits.get("data_timeout", DEFAULT_DATA_TIMEOUT), "limits.data_timeout"
    )
    maxErrors = load.integer(limits.get("errors", DEFAULT_MAX_ERRORS), "limits.errors", minimum=1)
    maxHops = load.integer(limits.get("hops", DEFAULT_MAX_HOPS), "limits.hops", minimum=1)

    # dns
    reverseDNS = load.boolean(dns.get("reverse_lookups", True), "dns.reverse_lookups")
    nameservers = load.nameservers(dns.get("nameservers", []), "dns.nameservers")

    # outbound delivery
    queue = load.queue(sections["queue"], hostname)
    delivery = load.delivery(sections["delivery"])
    smarthostOptions = load.transportOptions(sections["smarthost"], "smarthost")
    backends = load.backends(data.get("backends", []), "backends")
    routes = load.routes(
        data.get("routes", []),
        "routes",
        backends=backends,
        delivery=delivery,
    )

    # AUTH, listeners and plugins
    auth = load.auth(sections["auth"]) if "auth" in data else None
    if _given(overrides, "listen"):
        listeners = load.cliListeners(overrides["listen"], "--listen")
    else:
        listeners = load.listeners(
            data.get("listeners", [{"endpoint": DEFAULT_ENDPOINT}]), "listeners", auth
        )
    recipientValidators = load.plugins(
        data.get("recipient_validators", []), "recipient_validators"
    )
    headerStampers = load.plugins(
        data.get("header_stampers", [{"plugin": DEFAULT_HEADER_STAMPER}]), "header_stampers"
    )
    rateLimiter = None
    if "rate_limiter" in data:
        from mailrelay.receive.limits import LIMITER_TIMEOUT

        rateLimiter = load.pluginTable(
            data["rate_limiter"], "rate_limiter", LIMITER_TIMEOUT, "a rate limiter plugin"
        )

    return Config(
        source=source,
        configDir=configDir,
        hostname=hostname,
        spoolDirectory=spoolDirectory,
        minFreeSpace=minFreeSpace,
        relayNetworks=relayNetworks,
        acceptDomains=acceptDomains,
        smarthost=smarthost,
        maxMessageSize=maxMessageSize,
        maxRecipients=maxRecipients,
        idleTimeout=idleTimeout,
        dataTimeout=dataTimeout,
        maxErrors=maxErrors,
        maxHops=maxHops,
        reverseDNS=reverseDNS,
        listeners=listeners,
        recipientValidators=recipientValidators,
        headerStampers=headerStampers,
        queue=queue,
        delivery=delivery,
        smarthostOptions=smarthostOptions,
        nameservers=nameservers,
        routes=routes,
        backends=backends,
        spoolSync=spoolSync,
        auth=auth,
        rateLimiter=rateLimiter,
        drainTime=drainTime,
    )
