"""Tests for L{mailrelay.config}: defaults, overrides, validation messages, the sample file."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mailrelay import config as configModule
from mailrelay.config import (
    BackendSpec,
    Config,
    ListenerConfig,
    PluginSpec,
    checks,
    loadConfig,
    parseNetwork,
)
from mailrelay.config import values as configValues
from mailrelay.config.keys import TIMEOUTS, TOP
from mailrelay.delivery import BUILTIN_BACKENDS
from mailrelay.errors import ConfigError
from mailrelay.interfaces import PLATFORM_TRUST_STORE, RouteOptions
from mailrelay.queue.policy import QueuePolicy
from mailrelay.receive.listener import ListenerSettings
from mailrelay.receive.tls import SNIServerOptions
from mailrelay.route.nexthop import SMTPNexthop, parseSMTPNexthop
from mailrelay.route.table import RouteRule, SenderRoute
from mailrelay.smtp.clientsettings import ClientSettings, ClientTimeouts

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "mailrelay.toml"
FQDN = "relay.test.example"


def transport(
    tls: str = "may",
    caFile: str | None = None,
    username: str | None = None,
    password: str | None = None,
    authWithoutTLS: bool = False,
) -> RouteOptions:
    """The L{RouteOptions} a transport table ([smarthost], an smtp or lmtp route) makes:
    every option set, C{caFile} C{None} being the platform's trust store."""
    caFile = PLATFORM_TRUST_STORE if caFile is None else caFile
    return RouteOptions(tls, caFile, username, password, authWithoutTLS)


def listenerSettings(config: Config, endpoint: str, **changes: Any) -> ListenerSettings:
    """The settings of a listener that gives only its C{endpoint} (and the settings
    C{changes} gives, by field) in the file C{config} was loaded from: its keys' defaults,
    and the relay's host name, session limits and relay networks."""
    return ListenerSettings(
        hostname=config.hostname,
        name=endpoint,
        maxMessageSize=config.maxMessageSize,
        maxRecipients=config.maxRecipients,
        maxErrors=config.maxErrors,
        softErrorLimit=config.softErrorLimit,
        errorSleepTime=config.errorSleepTime,
        junkCommandLimit=config.junkCommandLimit,
        recipientOvershootLimit=config.recipientOvershootLimit,
        idleTimeout=config.idleTimeout,
        dataTimeout=config.dataTimeout,
        rejectUnauthPipelining=True,
        maxSessionTime=1800.0,
        minDataRate=500,
        limitExceptions=config.relayNetworks,
        **changes,
    )


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test in its own directory, with a known (and fast) system host name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(configValues.socket, "getfqdn", lambda: FQDN)


def writeConfig(directory: Path, text: str, name: str = "mailrelay.toml") -> str:
    """Write C{text} as a configuration file in C{directory}; return its path."""
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _caPEM() -> str:
    """A real CA certificate (made with trustme): a CA file's certificates are loaded when
    the configuration is checked, as delivery loads them."""
    import trustme

    return str(trustme.CA().cert_pem.bytes().decode("ascii"))


PEM = _caPEM()


def writeCertificate(directory: Path, certName: str = "cert.pem", keyName: str = "key.pem",
                     hostname: str = "relay.example.com", **kw) -> tuple[Path, Path]:
    """A certificate chain and its key (made with trustme) in C{directory}."""
    import trustme

    leaf = trustme.CA().issue_cert(hostname, **kw)
    cert, key = directory / certName, directory / keyName
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


#: An argon2id hash (cheap parameters) of "pw", for password files.
HASH = "$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHQ$oLR5MAEGfpggpujVlakg8jrOLGnE2ouxEqlNfMbANDc"


def uncommentSettings(text: str) -> str:
    """Switch on every setting of the sample: lines where C{#} is right before a key or
    a table header (explanations have a space after the C{#})."""
    return re.sub(r"(?m)^#(?=[A-Za-z\[])", "", text)


# ---------------------------------------------------------------------------------------------
# Defaults


def test_defaults(tmp_path: Path) -> None:
    """Without a file every setting takes its documented default."""
    c = loadConfig(None)
    assert isinstance(c, Config)
    assert c.source is None
    assert c.configDir == tmp_path
    assert c.hostname == FQDN
    assert c.spoolDirectory == tmp_path / "mailrelay-spool"
    assert not c.spoolDirectory.exists()
    assert c.minFreeSpace == 100 * 1024 * 1024
    assert c.relayNetworks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert c.acceptDomains == ()
    assert c.smarthost is None
    assert c.maxMessageSize == 10240000
    assert c.maxRecipients == 100
    assert c.idleTimeout == 300.0
    assert c.dataTimeout == 300.0
    assert c.maxErrors == 20
    assert (c.softErrorLimit, c.errorSleepTime) == (10, 1.0)  # Postfix's defaults
    assert c.maxHops == 50
    assert c.maxHeaderSize == 102400
    assert c.reverseDNS is True
    assert c.listeners == (ListenerConfig(listenerSettings(c, "tcp:2525:interface=127.0.0.1")),)
    (listener,) = c.listeners
    assert (listener.settings.hostname, listener.settings.maxMessageSize) == (FQDN, 10240000)
    assert (listener.certificate, listener.sniCertificates) == (None, ())
    assert c.recipientValidators == ()
    assert c.headerStampers == (PluginSpec("default", {}, 30.0, "header_stampers[0]"),)
    assert c.queue == QueuePolicy(300.0, 4000.0, 432000.0, 432000.0, 0.0, 1000, None)
    assert (c.hold, c.queueProcess, c.queue.stopTimeout) == (False, "separate", c.drainTime)
    assert c.queue.deliveryLimit == 100
    assert c.delivery == ClientSettings(FQDN, tls="may", caFile=None, timeouts=ClientTimeouts())
    assert (c.destinationConcurrency, c.connectionCacheTime) == (20, 2.0)
    assert c.smarthostOptions == RouteOptions("may", PLATFORM_TRUST_STORE, None, None, False)
    assert c.nameservers == ()
    assert c.routes == ()
    assert c.backends == ()


def test_configDefaultsForNewFields(tmp_path: Path) -> None:
    """A Config built without the outbound fields (as before they existed) gets their
    defaults, which are those the loader gives."""
    c = loadConfig(None)
    names = [f.name for f in dataclasses.fields(Config)]
    old = names[: names.index("queue")]
    built = Config(**{name: getattr(c, name) for name in old})
    assert built == c
    assert built.delivery.timeouts == ClientTimeouts()
    hash(built.delivery)
    hash(QueuePolicy())
    hash(transport(username="u", password="x"))


def test_emptyFileIsDefaults(tmp_path: Path) -> None:
    """An empty file means the defaults, except that it is the source."""
    path = writeConfig(tmp_path, "")
    c = loadConfig(path)
    assert c.source == path
    assert c.configDir == tmp_path
    assert c == dataclasses.replace(loadConfig(None), source=path)


def test_hostnameWithoutDot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A system name without a dot is still used."""
    monkeypatch.setattr(configValues.socket, "getfqdn", lambda: "Localhost")
    assert loadConfig(None).hostname == "localhost"


def test_badSystemHostname(monkeypatch: pytest.MonkeyPatch) -> None:
    """A system name that is not a host name is reported, with the way out."""
    monkeypatch.setattr(configValues.socket, "getfqdn", lambda: "my_box")
    with pytest.raises(ConfigError) as e:
        loadConfig(None)
    assert e.value.key == "hostname"
    assert '"my_box"' in str(e.value) and "--hostname" in str(e.value)


def test_fullFile(tmp_path: Path) -> None:
    """Every key read from a file."""
    path = writeConfig(
        tmp_path,
        """
hostname = "MX1.Example.COM."
[spool]
directory = "queue"
min_free_space = 0
[relay]
networks = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]
smarthost = "[smtp.example.net]:587"
[limits]
message_size = 1000
recipients = 5
idle_timeout = 1.5
data_timeout = 60
errors = 3
soft_errors = 2
error_sleep_time = 0.5
hops = 10
header_size = 4000
[dns]
reverse_lookups = false
[[listeners]]
endpoint = "tcp:2525"
bare_newline = "normalize"
add_message_id = false
add_date = false
[[listeners]]
endpoint = 'tcp6:2526:interface=\\:\\:1'
[[recipient_validators]]
plugin = "recipient-map"
timeout = 2
file = "recipients.txt"
[[recipient_validators]]
plugin = "accepted-domains"
[[header_stampers]]
plugin = "default"
comment = "hello"
""",
    )
    c = loadConfig(path)
    assert c.hostname == "mx1.example.com"
    assert c.spoolDirectory == tmp_path / "queue"
    assert c.minFreeSpace == 0
    assert c.relayNetworks == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("198.51.100.7/32"),
    )
    assert c.smarthost == SMTPNexthop("smtp.example.net", 587, False)
    assert (c.maxMessageSize, c.maxRecipients, c.maxErrors, c.maxHops) == (1000, 5, 3, 10)
    assert c.maxHeaderSize == 4000
    assert c.idleTimeout == 1.5
    assert c.dataTimeout == 60.0 and isinstance(c.dataTimeout, float)
    assert c.reverseDNS is False
    assert c.listeners == (
        ListenerConfig(
            listenerSettings(
                c, "tcp:2525", bareNewline="normalize", addMessageID=False, addDate=False
            )
        ),
        ListenerConfig(listenerSettings(c, "tcp6:2526:interface=\\:\\:1")),
    )
    settings = c.listeners[0].settings
    assert (settings.hostname, settings.maxMessageSize, settings.maxRecipients) == (
        "mx1.example.com", 1000, 5
    )
    assert (settings.maxErrors, settings.idleTimeout, settings.dataTimeout) == (3, 1.5, 60.0)
    assert (settings.softErrorLimit, settings.errorSleepTime) == (2, 0.5)
    session = settings.sessionSettings(())
    assert (session.softErrorLimit, session.errorSleepTime) == (2, 0.5)
    assert settings.limitExceptions == c.relayNetworks
    assert c.recipientValidators == (
        PluginSpec("recipient-map", {"file": "recipients.txt"}, 2.0, "recipient_validators[0]"),
        PluginSpec("accepted-domains", {}, 30.0, "recipient_validators[1]"),
    )
    assert c.headerStampers == (
        PluginSpec("default", {"comment": "hello"}, 30.0, "header_stampers[0]"),
    )


def test_emptyPluginLists(tmp_path: Path) -> None:
    """Empty plugin lists mean no plugins at all, not the default ones."""
    path = writeConfig(tmp_path, "recipient_validators = []\nheader_stampers = []\n")
    c = loadConfig(path)
    assert c.recipientValidators == () and c.headerStampers == ()


def test_emptyRelayNetworks(tmp_path: Path) -> None:
    """An empty network list lets no one relay."""
    assert loadConfig(writeConfig(tmp_path, "[relay]\nnetworks = []\n")).relayNetworks == ()


def test_emptySmarthostIsNone(tmp_path: Path) -> None:
    """C{smarthost = ""} means no smarthost."""
    assert loadConfig(writeConfig(tmp_path, '[relay]\nsmarthost = ""\n')).smarthost is None


# ---------------------------------------------------------------------------------------------
# Relative paths


def test_relativeSpoolInFileIsRelativeToFile(tmp_path: Path) -> None:
    """A relative spool directory in a file is relative to the file's directory."""
    etc = tmp_path / "etc"
    etc.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = writeConfig(etc, '[spool]\ndirectory = "../var/spool"\n')
    os.chdir(elsewhere)
    c = loadConfig(path)
    assert c.spoolDirectory == tmp_path / "var" / "spool"
    assert c.configDir == etc


def test_relativeConfigPath(tmp_path: Path) -> None:
    """A relative path to the file works; the source keeps the path as given."""
    (tmp_path / "etc").mkdir()
    writeConfig(tmp_path / "etc", '[spool]\ndirectory = "spool"\n')
    c = loadConfig("etc/mailrelay.toml")
    assert c.source == "etc/mailrelay.toml"
    assert c.configDir == tmp_path / "etc"
    assert c.spoolDirectory == tmp_path / "etc" / "spool"


def test_defaultSpoolIsRelativeToCwd(tmp_path: Path) -> None:
    """Without a spool setting, the spool is ./mailrelay-spool of the current directory,
    even with a file elsewhere."""
    etc = tmp_path / "etc"
    etc.mkdir()
    c = loadConfig(writeConfig(etc, ""))
    assert c.spoolDirectory == tmp_path / "mailrelay-spool"


def test_cliSpoolIsRelativeToCwd(tmp_path: Path) -> None:
    """A relative C{--spool} is relative to the current directory, not the file's."""
    etc = tmp_path / "etc"
    etc.mkdir()
    path = writeConfig(etc, '[spool]\ndirectory = "filespool"\n')
    c = loadConfig(path, {"spool": "clispool"})
    assert c.spoolDirectory == tmp_path / "clispool"


def test_absoluteSpool(tmp_path: Path) -> None:
    """An absolute spool directory is taken as it is; an existing one is fine."""
    spool = tmp_path / "existing"
    spool.mkdir()
    c = loadConfig(writeConfig(tmp_path / "", f"[spool]\ndirectory = {str(spool)!r}\n"))
    assert c.spoolDirectory == spool


def test_spoolNestedMissingIsCreatable(tmp_path: Path) -> None:
    """A spool several levels below an existing writable directory is accepted."""
    c = loadConfig(None, {"spool": "a/b/c"})
    assert c.spoolDirectory == tmp_path / "a" / "b" / "c"


# ---------------------------------------------------------------------------------------------
# Overrides


def test_overrideListenReplacesAll(tmp_path: Path) -> None:
    """C{--listen} replaces every listener of the file; they get default options."""
    path = writeConfig(
        tmp_path,
        '[[listeners]]\nendpoint = "tcp:25"\nbare_newline = "normalize"\n'
        '[[listeners]]\nendpoint = "tcp:587"\n',
    )
    c = loadConfig(path, {"listen": ["tcp:2600"]})
    assert c.listeners == (ListenerConfig(listenerSettings(c, "tcp:2600")),)
    c = loadConfig(path, {"listen": ["tcp:2600", "tcp:2601"]})
    assert [listener.settings.name for listener in c.listeners] == ["tcp:2600", "tcp:2601"]


def test_listenerChunkingKeys(tmp_path: Path) -> None:
    """CHUNKING is on and BINARYMIME off unless a listener says otherwise."""
    path = writeConfig(
        tmp_path,
        '[[listeners]]\nendpoint = "tcp:25"\n'
        '[[listeners]]\nendpoint = "tcp:26"\nbinarymime = true\n'
        '[[listeners]]\nendpoint = "tcp:27"\nchunking = false\n',
    )
    settings = [listener.settings for listener in loadConfig(path, {}).listeners]
    assert [(s.chunking, s.binaryMIME) for s in settings] == [
        (True, False), (True, True), (False, False)]
    session = settings[1].sessionSettings(())
    assert (session.chunking, session.binaryMIME) == (True, True)


def test_overrideRelayNetworkReplacesLoopback() -> None:
    """C{--relay-network} replaces the default loopback networks."""
    c = loadConfig(None, {"relay_network": ["10.0.0.0/8"]})
    assert c.relayNetworks == (ipaddress.ip_network("10.0.0.0/8"),)


def test_overrideRelayNetworkReplacesFile(tmp_path: Path) -> None:
    """C{--relay-network} replaces the file's networks."""
    path = writeConfig(tmp_path, '[relay]\nnetworks = ["192.0.2.0/24"]\n')
    c = loadConfig(path, {"relay_network": ["::1", "10.1.0.0/16"]})
    assert c.relayNetworks == (
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("10.1.0.0/16"),
    )


def test_overrideHostname(tmp_path: Path) -> None:
    """C{--hostname} replaces the file's host name."""
    path = writeConfig(tmp_path, 'hostname = "file.example"\n')
    assert loadConfig(path, {"hostname": "cli.example"}).hostname == "cli.example"


def test_overrideSMTPNexthop(tmp_path: Path) -> None:
    """C{--smarthost} replaces the file's; an empty one switches it off."""
    path = writeConfig(tmp_path, '[relay]\nsmarthost = "a.example"\n')
    assert loadConfig(path, {"smarthost": "[b.example]:2525"}).smarthost == SMTPNexthop(
        "b.example", 2525, False
    )
    assert loadConfig(path, {"smarthost": ""}).smarthost is None


def test_overrideIgnoresOverriddenFileValue(tmp_path: Path) -> None:
    """The file's value of an overridden setting is not checked: the option rescues it."""
    path = writeConfig(
        tmp_path,
        '[spool]\ndirectory = "/proc/nope/spool"\n[[listeners]]\nendpoint = "bogus:1"\n',
    )
    c = loadConfig(path, {"spool": "s", "listen": ["tcp:2600"]})
    assert c.spoolDirectory == tmp_path / "s"


def test_overrideNotGiven(tmp_path: Path) -> None:
    """C{None} and empty lists mean the option was not given."""
    path = writeConfig(tmp_path, '[[listeners]]\nendpoint = "tcp:25"\n')
    c = loadConfig(
        path,
        {"listen": [], "relay_network": [], "accept_domain": [], "hostname": None,
         "spool": None, "smarthost": None},
    )
    assert c == loadConfig(path)


def test_overrideAcceptDomain(tmp_path: Path) -> None:
    """C{--accept-domain} replaces the file's domains, normalised."""
    path = writeConfig(tmp_path, '[relay]\naccept_domains = ["a.example"]\n')
    c = loadConfig(path, {"accept_domain": ["B.Example.", "b.example"]})
    assert c.acceptDomains == ("b.example",)


def test_unknownOverride() -> None:
    """An override the loader does not know is refused."""
    with pytest.raises(ConfigError, match="listen_on"):
        loadConfig(None, {"listen_on": ["tcp:25"]})


# ---------------------------------------------------------------------------------------------
# Domains (these need mailrelay.address)


def test_acceptDomainsNormalised(tmp_path: Path) -> None:
    """Accepted domains are normalised: lower case, no trailing dot, A-labels, no duplicates."""
    path = writeConfig(
        tmp_path,
        '[relay]\naccept_domains = ["Example.COM.", "example.com", "bücher.example"]\n',
    )
    assert loadConfig(path).acceptDomains == ("example.com", "xn--bcher-kva.example")


@pytest.mark.parametrize(
    "bad", ["", "exa mple.com", "-bad-.example", "a..b", "x" * 64 + ".example"]
)
def test_badAcceptDomain(tmp_path: Path, bad: str) -> None:
    """An invalid domain is reported with its index and value."""
    path = writeConfig(tmp_path, f'[relay]\naccept_domains = ["ok.example", "{bad}"]\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert str(e.value).startswith(f"{path}: relay.accept_domains[1]: ")
    assert f'"{bad}" is not a valid domain: ' in str(e.value)
    assert "501" not in str(e.value)


def test_badAcceptDomainOverride() -> None:
    """An invalid C{--accept-domain} names the option."""
    with pytest.raises(ConfigError) as e:
        loadConfig(None, {"accept_domain": ["exa mple.com"]})
    assert e.value.file is None
    assert str(e.value).startswith("--accept-domain: ")
    assert '"exa mple.com"' in str(e.value)


# ---------------------------------------------------------------------------------------------
# Errors in the file: each names the file, the key and the value

ERROR_CASES = [
    # (TOML, key, text the message must contain)
    ('[limits]\nrecipients = "ten"', "limits.recipients", 'must be a positive integer, not "ten"'),
    ("[limits]\nrecipients = 0", "limits.recipients", "not 0"),
    ("[limits]\nrecipients = true", "limits.recipients", "not true"),
    ("[limits]\nrecipients = 2.5", "limits.recipients", "not 2.5"),
    ("[limits]\nmessage_size = -1", "limits.message_size", "not -1"),
    ("[limits]\nerrors = 0", "limits.errors", "not 0"),
    ("[limits]\nhops = false", "limits.hops", "not false"),
    ("[limits]\nheader_size = 200000", "limits.header_size",
     "an integer from 1000 to 102400, not 200000"),
    ("[limits]\nheader_size = 999", "limits.header_size", "not 999"),
    ("[limits]\nidle_timeout = 0", "limits.idle_timeout", "positive number of seconds, not 0"),
    ('[limits]\ndata_timeout = "5m"', "limits.data_timeout", 'not "5m"'),
    ("[limits]\ndata_timeout = inf", "limits.data_timeout", "not inf"),
    ("[limits]\nrecipent = 5", "limits.recipent", 'did you mean "recipients"'),
    ("[limits]\nsoft_errors = 0", "limits.soft_errors", "not 0"),
    ('[limits]\nerror_sleep_time = "1s"', "limits.error_sleep_time", 'not "1s"'),
    ("[limits]\nerror_sleep_time = -1", "limits.error_sleep_time", ">= 0, not -1"),
    ("[spool]\nmin_free_space = -5", "spool.min_free_space", "integer >= 0, not -5"),
    ("[spool]\ndirectory = 5", "spool.directory", "must be a string, not 5"),
    ('[spool]\ndirectory = ""', "spool.directory", "empty string"),
    ("[dns]\nreverse_lookups = 1", "dns.reverse_lookups", "true or false, not 1"),
    ('[dns]\nreverse = true', "dns.reverse", '"reverse"'),
    ('colour = "blue"', "colour", 'unknown key "colour"'),
    ("spool = 5", "spool", "must be a table ([spool]), not 5"),
    ("hostname = 42", "hostname", "not 42"),
    ('hostname = "my_host.example"', "hostname", '"my_host.example"'),
    ('hostname = "a..b"', "hostname", '"a..b"'),
    ('hostname = "192.0.2.1"', "hostname", '"192.0.2.1" is not a valid host name'),
    (f'hostname = "{"x" * 64}.example"', "hostname", "longer than 63"),
    ('[relay]\nnetworks = "10.0.0.0/8"', "relay.networks", 'array of strings, not "10.0.0.0/8"'),
    ('[relay]\nnetworks = ["::1", "127.0.0.0/8", "10.0.0.1/8"]', "relay.networks[2]",
     '"10.0.0.1/8" has host bits set; did you mean "10.0.0.0/8"'),
    ('[relay]\nnetworks = ["bogus"]', "relay.networks[0]", '"bogus" is not an IP'),
    ('[relay]\nnetworks = ["::1", "::ffff:192.0.2.0/120"]', "relay.networks[1]",
     '"::ffff:192.0.2.0/120" is an IPv4-mapped IPv6 network; did you mean "192.0.2.0/24"?'),
    ("[relay]\nnetworks = [10]", "relay.networks[0]", "must be a string, not 10"),
    ('[relay]\nsmarthost = "host:99999"', "relay.smarthost", '"host:99999"'),
    ("[relay]\nsmarthost = 25", "relay.smarthost", "not 25"),
    ('[relay]\nsmart_host = "x"', "relay.smart_host", 'did you mean "smarthost"'),
    ("listeners = []", "listeners", "at least one listener"),
    ('listeners = "tcp:25"', "listeners", 'array of tables ([[listeners]]), not "tcp:25"'),
    ("listeners = [5]", "listeners[0]", "must be a table"),
    ('[[listeners]]\nbare_newline = "reject"', "listeners[0].endpoint", "required"),
    ('[[listeners]]\nendpoint = "tcp:25"\n[[listeners]]\nendpoint = "tcp:abc"',
     "listeners[1].endpoint", '"tcp:abc" is not a valid server endpoint'),
    ('[[listeners]]\nendpoint = "bogus:1"', "listeners[0].endpoint", "Unknown endpoint type"),
    ('[[listeners]]\nendpoint = "tcp6:25:interface=::1"', "listeners[0].endpoint",
     "escape each colon of the IPv6 address with a backslash: "
     "'tcp6:25:interface=\\:\\:1' (quoted so, in single quotes: a TOML literal string"),
    ('[[listeners]]\nendpoint = "tcp:25:colour=red"', "listeners[0].endpoint",
     '"tcp:25:colour=red"'),
    ('[[listeners]]\nendpoint = "tcp:70000"', "listeners[0].endpoint", "port 70000"),
    ("[[listeners]]\nendpoint = 25", "listeners[0].endpoint", "must be a string, not 25"),
    ('[[listeners]]\nendpoint = "tcp:25"\n[[listeners]]\nendpoint = "tcp:25"',
     "listeners[1].endpoint", 'already listed as listeners[0].endpoint'),
    ('[[listeners]]\nendpoint = "tcp:25"\nbare_newline = "fix"', "listeners[0].bare_newline",
     'must be "reject" or "normalize", not "fix"'),
    ('[[listeners]]\nendpoint = "tcp:25"\nadd_date = "yes"', "listeners[0].add_date",
     'true or false, not "yes"'),
    ('[[listeners]]\nendpoint = "tcp:25"\nchunking = false\nbinarymime = true',
     "listeners[0].binarymime", "= true needs chunking = true"),
    ('[[listeners]]\nendpoint = "tcp:25"\nbinarymime = "yes"', "listeners[0].binarymime",
     'true or false, not "yes"'),
    ('[[listeners]]\nendpoint = "tcp:25"\nport = 25', "listeners[0].port",
     "allowed in a [[listeners]] table are: endpoint, bare_newline"),
    ('[[recipient_validators]]\nplugin = "a"\n[[recipient_validators]]\nfile = "x"',
     "recipient_validators[1].plugin", "required"),
    ("[[recipient_validators]]\nplugin = 3", "recipient_validators[0].plugin", "not 3"),
    ('[[header_stampers]]\nplugin = ""', "header_stampers[0].plugin", "empty string"),
    ('[[header_stampers]]\nplugin = "default"\ntimeout = -1', "header_stampers[0].timeout",
     "not -1"),
    ('[[header_stampers]]\nplugin = "default"\ntimeout = "fast"',
     "header_stampers[0].timeout", 'not "fast"'),
    ('header_stampers = {plugin = "default"}', "header_stampers",
     'not {plugin = "default"}'),
    # [queue]
    ("[queue]\nmin_backoff = 0", "queue.min_backoff", "positive number of seconds, not 0"),
    ('[queue]\nmin_backoff = "5m"', "queue.min_backoff", 'not "5m"'),
    ("[queue]\nmin_backoff = true", "queue.min_backoff", "not true"),
    ("[queue]\nmin_backoff = 5000", "queue.min_backoff",
     "must be at most queue.max_backoff (4000, the default), not 5000"),
    ("[queue]\nmin_backoff = 600\nmax_backoff = 599.5", "queue.max_backoff",
     "must be at least queue.min_backoff (600), not 599.5"),
    ("[queue]\nmax_backoff = nan", "queue.max_backoff", "not nan"),
    ("[queue]\nmax_lifetime = 0", "queue.max_lifetime", "not 0"),
    ("[queue]\nmax_lifetime = -1", "queue.max_lifetime", "not -1"),
    ("[queue]\nbounce_lifetime = false", "queue.bounce_lifetime", "not false"),
    ("[queue]\ndelay_warning = -1", "queue.delay_warning",
     "must be a number of seconds >= 0, not -1"),
    ('[queue]\ndelay_warning = "4h"', "queue.delay_warning", 'not "4h"'),
    ("[queue]\ndelay_warning = true", "queue.delay_warning", "not true"),
    ("[queue]\ndelay_warning = inf", "queue.delay_warning", "not inf"),
    ("[queue]\nactive_limit = 0", "queue.active_limit", "positive integer, not 0"),
    ("[queue]\ndelivery_limit = 0", "queue.delivery_limit", "positive integer, not 0"),
    ("[queue]\ndelivery_limit = 2.5", "queue.delivery_limit", "not 2.5"),
    ("[queue]\nrescan_interval = 0", "queue.rescan_interval",
     "must be a positive number of seconds, not 0"),
    ('[queue]\nrescan_interval = "5m"', "queue.rescan_interval", 'not "5m"'),
    ("[queue]\nactive_limit = 10.0", "queue.active_limit", "not 10.0"),
    ("[queue]\nactive_limit = true", "queue.active_limit", "not true"),
    ("[queue]\npostmaster = 5", "queue.postmaster", "must be a string, not 5"),
    ('[queue]\npostmaster = "nobody"', "queue.postmaster",
     "\"nobody\" is not a valid address: bad recipient address syntax: missing '@'"),
    ('[queue]\npostmaster = "a@b@c.example"', "queue.postmaster", '"a@b@c.example"'),
    ('[queue]\npostmaster = "<pm@example.com>"', "queue.postmaster", '"<pm@example.com>"'),
    ('[queue]\npostmaster = "pm@exa mple.com"', "queue.postmaster", '"pm@exa mple.com"'),
    ('[queue]\npostmaster = "jörg@example.com"', "queue.postmaster", "requires SMTPUTF8"),
    ("[queue]\nretries = 5", "queue.retries", "allowed in [queue] are: min_backoff"),
    ("queue = 5", "queue", "must be a table ([queue]), not 5"),
    # fallback_relay ([delivery], [smarthost], [[routes]], [[sender_routes]])
    ("[delivery]\nfallback_relay = []", "delivery.fallback_relay",
     "must list at least one SMTP next hop"),
    ('[delivery]\nfallback_relay = "[relay.example]:587"', "delivery.fallback_relay",
     'must be an array of strings, not "[relay.example]:587"'),
    ('[delivery]\nfallback_relay = ["[relay.example]:587", "[bad"]',
     "delivery.fallback_relay[1]", '"[bad"'),
    ('[delivery]\nfallback_relay = ["relay.example:99999"]', "delivery.fallback_relay[0]",
     '"relay.example:99999"'),
    ("[smarthost]\nfallback_relay = []", "smarthost.fallback_relay",
     "must list at least one SMTP next hop"),
    (('[[routes]]\ndomain = "a.example"\nbackend = "lmtp"\nnexthop = "h:24"\n'
      'fallback_relay = ["[relay.example]"]'), "routes[0].fallback_relay",
     'only smtp routes take fallback_relay, not an "lmtp" route'),
    (('[[routes]]\ndomain = "a.example"\nbackend = "maildir"\nnexthop = "/m/{local}"\n'
      'fallback_relay = ["[relay.example]"]'), "routes[0].fallback_relay",
     'only smtp and lmtp routes take fallback_relay, not a "maildir" route'),
    ('[[routes]]\ndomain = "a.example"\nbackend = "smtp"\nfallback_relay = [5]',
     "routes[0].fallback_relay[0]", "must be a string, not 5"),
    # a route's source_address
    (('[[routes]]\ndomain = "a.example"\nbackend = "lmtp"\nnexthop = "h:24"\n'
      'source_address = "127.0.0.1"'), "routes[0].source_address",
     'only smtp routes take source_address, not an "lmtp" route'),
    ('[[routes]]\ndomain = "a.example"\nbackend = "smtp"\nsource_address6 = "127.0.0.1"',
     "routes[0].source_address6", '"127.0.0.1" is an IPv4 address: give it as source_address'),
    ('[smarthost]\nsource_address = "192.0.2.77"', "smarthost.source_address",
     '"192.0.2.77" cannot be bound'),
    # [delivery] source_address, source_address6
    ('[delivery]\nsource_address = "relay.example"', "delivery.source_address",
     '"relay.example" is not an IPv4 address'),
    ('[delivery]\nsource_address = "::1"', "delivery.source_address",
     '"::1" is an IPv6 address: give it as source_address6'),
    ('[delivery]\nsource_address6 = "127.0.0.1"', "delivery.source_address6",
     '"127.0.0.1" is an IPv4 address: give it as source_address'),
    ('[delivery]\nsource_address6 = "::ffff:127.0.0.1"', "delivery.source_address6",
     '"::ffff:127.0.0.1" is an IPv4-mapped address (connections from it reach no IPv6 '
     'address): give 127.0.0.1 as source_address'),
    ('[delivery]\nsource_address = "[::ffff:127.0.0.1]"', "delivery.source_address",
     '"[::ffff:127.0.0.1]" is an IPv4-mapped address (connections from it reach no IPv6 '
     'address): give 127.0.0.1 as source_address'),
    ('[delivery]\nsource_address = 5', "delivery.source_address", "must be a string, not 5"),
    ('[delivery]\nsource_address = "192.0.2.77"', "delivery.source_address",
     '"192.0.2.77" cannot be bound: this host has no such address ('),
    # [delivery]
    ('[delivery]\nhelo_name = "bad_name"', "delivery.helo_name",
     '"bad_name" is not a valid host name'),
    ('[delivery]\nhelo_name = "192.0.2.1"', "delivery.helo_name", "IP address"),
    ("[delivery]\nhelo_name = 1", "delivery.helo_name", "must be a string, not 1"),
    ('[delivery]\ntls = "yes"', "delivery.tls",
     'must be "none", "may", "required" or "implicit", not "yes"'),
    ('[delivery]\ntls = "May"', "delivery.tls", 'not "May"'),
    ("[delivery]\ntls = true", "delivery.tls", "not true"),
    ('[delivery]\nca_file = "missing.pem"', "delivery.ca_file",
     "cannot read the CA file"),
    ("[delivery]\nca_file = 0", "delivery.ca_file", "must be a string, not 0"),
    ("[delivery]\ndestination_concurrency = 0", "delivery.destination_concurrency",
     "positive integer, not 0"),
    ("[delivery]\ndestination_concurrency = 2.5", "delivery.destination_concurrency",
     "not 2.5"),
    ("[delivery]\ndestination_concurrency = true", "delivery.destination_concurrency",
     "not true"),
    ("[delivery]\nconnection_cache_time = -0.5", "delivery.connection_cache_time",
     "seconds >= 0, not -0.5"),
    ('[delivery]\nconnection_cache_time = "2s"', "delivery.connection_cache_time",
     'not "2s"'),
    ("[delivery]\nconnection_cache_time = false", "delivery.connection_cache_time",
     "not false"),
    ('[delivery]\ncreate_mailboxes = "yes"', "delivery.create_mailboxes", 'not "yes"'),
    ("[delivery]\nmx_address_limit = -1", "delivery.mx_address_limit",
     "an integer >= 0, not -1"),
    ('[delivery]\nmx_session_limit = "2"', "delivery.mx_session_limit",
     'an integer >= 0, not "2"'),
    ('[delivery]\nproxy_interfaces = ["mx.example"]', "delivery.proxy_interfaces[0]",
     '"mx.example" is not an IP address'),
    ("[delivery]\nconcurrency = 5", "delivery.concurrency",
     'did you mean "destination_concurrency"'),
    ("[delivery]\ntimeouts = 30", "delivery.timeouts",
     "must be a table ([delivery.timeouts]), not 30"),
    ("[delivery.timeouts]\nconnect = 0", "delivery.timeouts.connect",
     "positive number of seconds, not 0"),
    ('[delivery.timeouts]\ndata_done = "10m"', "delivery.timeouts.data_done", 'not "10m"'),
    ("[delivery.timeouts]\nrset = true", "delivery.timeouts.rset", "not true"),
    ("[delivery.timeouts]\ndataDone = 5", "delivery.timeouts.dataDone",
     'did you mean "data_done"'),
    ("[delivery.timeouts]\nhelo = 5", "delivery.timeouts.helo",
     "allowed in [delivery.timeouts] are: connect, greeting, ehlo"),
    # [smarthost]
    ('[smarthost]\ntls = "optional"', "smarthost.tls", 'not "optional"'),
    ('[smarthost]\nca_file = "nope/ca.pem"', "smarthost.ca_file", "No such file"),
    ("[smarthost]\nusername = 5", "smarthost.username", "must be a string, not 5"),
    ('[smarthost]\nusername = "bob"', "smarthost.username",
     '"bob" needs a password: set smarthost.password_file (or smarthost.password)'),
    ('[smarthost]\nusername = "bob"\npassword = ""', "smarthost.username",
     '"bob" needs a password'),
    ('[smarthost]\nusername = "bob"\npassword_file = ""', "smarthost.username",
     '"bob" needs a password'),
    ('[smarthost]\npassword_file = "pw"', "smarthost.password_file",
     '"pw" is given without smarthost.username'),
    ('[smarthost]\npassword = "hunter2"', "smarthost.password",
     "is given without smarthost.username"),
    ('[smarthost]\nusername = "bob"\npassword = "hunter2"\npassword_file = "pw"',
     "smarthost.password_file", '"pw" is given together with smarthost.password'),
    ('[smarthost]\nusername = "bob"\npassword_file = "missing.password"',
     "smarthost.password_file", "cannot read the password file"),
    ("[smarthost]\npassword_file = 3", "smarthost.password_file", "must be a string, not 3"),
    ('[smarthost]\nusername = "bob"\npassword = "hunter2"\ntls = "none"',
     "smarthost.username", '"bob" could never log in: smarthost.tls is "none"'),
    ('[smarthost]\nusername = "bob"\npassword = "hunter2"\nauth_without_tls = "yes"',
     "smarthost.auth_without_tls", 'true or false, not "yes"'),
    ('[smarthost]\nhost = "x"', "smarthost.host", "allowed in [smarthost] are: tls, ca_file"),
    ('smarthost = "[smtp.example.net]:587"', "smarthost",
     'must be a table ([smarthost]), not "[smtp.example.net]:587"'),
    # [dns]
    ('[dns]\nnameservers = "127.0.0.1"', "dns.nameservers",
     'array of strings, not "127.0.0.1"'),
    ("[dns]\nnameservers = [53]", "dns.nameservers[0]", "must be a string, not 53"),
    ('[dns]\nnameservers = ["192.0.2.1", "ns.example.com"]', "dns.nameservers[1]",
     '"ns.example.com" is not a valid name server'),
    ('[dns]\nnameservers = ["192.0.2.1:0"]', "dns.nameservers[0]", "not 0"),
    ('[dns]\nnameservers = ["[::1]x"]', "dns.nameservers[0]", 'unexpected "x" after "]"'),
    ('[dns]\nnameservers = ["2001:db8::g:53"]', "dns.nameservers[0]", "brackets"),
    ('[dns]\nnameservers = ["192.0.2.1", "192.0.2.1:53"]', "dns.nameservers[1]",
     '"192.0.2.1:53" is already listed as dns.nameservers[0]'),
    ('[dns]\nnameservers = ["10.0.0.0/8"]', "dns.nameservers[0]", '"10.0.0.0/8"'),
    # [[routes]]
    ('routes = {domain = "x.example"}', "routes", "array of tables ([[routes]])"),
    ('[[routes]]\nbackend = "smtp"', "routes[0].domain", "is required"),
    ('[[routes]]\ndomain = "exa mple.org"\nbackend = "smtp"', "routes[0].domain",
     '"exa mple.org" is not a valid domain: '),
    ('[[routes]]\ndomain = "..example.org"\nbackend = "smtp"', "routes[0].domain",
     '"..example.org" is not a valid domain'),
    ('[[routes]]\ndomain = "."\nbackend = "smtp"', "routes[0].domain", '"."'),
    ('[[routes]]\ndomain = "*.example.org"\nbackend = "smtp"', "routes[0].domain",
     '".example.org" for its subdomains'),
    ('[[routes]]\ndomain = ".[192.0.2.1]"\nbackend = "smtp"', "routes[0].domain",
     "address literal has no subdomains"),
    ('[[routes]]\ndomain = ""\nbackend = "smtp"', "routes[0].domain", '"" is not a valid'),
    ("[[routes]]\ndomain = 5\nbackend = \"smtp\"", "routes[0].domain",
     "must be a string, not 5"),
    (('[[routes]]\ndomain = "a.example"\nbackend = "smtp"\n'
      '[[routes]]\ndomain = "A.Example."\nbackend = "discard"'), "routes[1].domain",
     '"A.Example." is already routed by routes[0].domain'),
    ('[[routes]]\ndomain = "*"\nbackend = "smtp"\n[[routes]]\ndomain = "*"\nbackend = "smtp"',
     "routes[1].domain", '"*" is already routed by routes[0].domain'),
    ('[[routes]]\ndomain = "a.example"', "routes[0].backend",
     ("is required in each [[routes]] table; the backends available are: smtp, lmtp, "
      "maildir, discard")),
    ('[[routes]]\ndomain = "a.example"\nbackend = "webhook"', "routes[0].backend",
     'unknown backend "webhook"; the backends available are: smtp, lmtp, maildir, discard'),
    ('[[routes]]\ndomain = "a.example"\nbackend = "SMTP"', "routes[0].backend",
     'unknown backend "SMTP"'),
    ('[[routes]]\ndomain = "a.example"\nbackend = 1', "routes[0].backend",
     "must be a string, not 1"),
    ('[[routes]]\ndomain = "a.example"\nbackend = "smtp"\nnexthop = "mx:99999"',
     "routes[0].nexthop", '"mx:99999" is not a valid smarthost'),
    ('[[routes]]\ndomain = "a.example"\nbackend = "smtp"\nnexthop = 25',
     "routes[0].nexthop", "must be a string, not 25"),
    ('[[routes]]\ndomain = "a.example"\nbackend = "lmtp"', "routes[0].nexthop",
     "is required for an lmtp route"),
    ('[[routes]]\ndomain = "a.example"\nbackend = "lmtp"\nnexthop = "lmtp.example"',
     "routes[0].nexthop", '"lmtp.example" is not a valid LMTP server: the port is missing'),
    ('[[routes]]\ndomain = "a.example"\nbackend = "lmtp"\nnexthop = "unix:run/lmtp"',
     "routes[0].nexthop", "must be absolute"),
    ('[[routes]]\ndomain = "a.example"\nbackend = "lmtp"\nnexthop = "[::1]:24x"',
     "routes[0].nexthop", 'not "24x"'),
    ('[[routes]]\ndomain = "a.example"\nbackend = "maildir"', "routes[0].nexthop",
     "is required for a maildir route"),
    ('[[routes]]\ndomain = "a.example"\nbackend = "maildir"\nnexthop = ""',
     "routes[0].nexthop", "not an empty string"),
    ('[[routes]]\ndomain = "a.example"\nbackend = "maildir"\nnexthop = "/m/{user}"',
     "routes[0].nexthop", '"/m/{user}" is not a valid directory template: unknown placeholder '
     '"{user}" (the placeholders are {local}, {domain}, {address})'),
    ('[[routes]]\ndomain = "a.example"\nbackend = "discard"\nnexthop = "x"',
     "routes[0].nexthop", '"x" is not allowed: a "discard" route takes no nexthop'),
    (('[[backends]]\nname = "hook"\nplugin = "p"\n[[routes]]\ndomain = "a.example"\n'
      'backend = "hook"\nnexthop = "x"'), "routes[0].nexthop",
     'a route to site backend "hook"'),
    ('[[routes]]\ndomain = "a.example"\nbackend = "discard"\ntls = "none"',
     "routes[0].tls", 'only smtp and lmtp routes take tls, not a "discard" route'),
    (('[[routes]]\ndomain = "a.example"\nbackend = "maildir"\nnexthop = "/m"\n'
      'username = "u"'), "routes[0].username", "only smtp and lmtp routes take username"),
    ('[[routes]]\ndomain = "a.example"\nbackend = "smtp"\ntls = "always"',
     "routes[0].tls", 'not "always"'),
    (('[[routes]]\ndomain = "a.example"\nbackend = "lmtp"\nnexthop = "h:24"\n'
      'username = "u"'), "routes[0].username", "needs a password: set routes[0].password_file"),
    ('[[routes]]\ndomain = "a.example"\nbackend = "smtp"\nport = 25', "routes[0].port",
     "allowed in a [[routes]] table are: domain, backend, nexthop, tls"),
    # [[sender_routes]]
    ('sender_routes = {sender = "@a.example"}', "sender_routes",
     "array of tables ([[sender_routes]])"),
    ('[[sender_routes]]\nnexthop = "[h.example]"', "sender_routes[0].sender",
     'is required in each [[sender_routes]] table: "user@example.org", "@example.org" or "<>"'),
    ('[[sender_routes]]\nsender = "a.example"\nnexthop = "[h.example]"',
     "sender_routes[0].sender", '"a.example" is not an address, "@domain" or "<>"'),
    ('[[sender_routes]]\nsender = "@a .example"\nnexthop = "[h.example]"',
     "sender_routes[0].sender", '"@a .example" is not an address'),
    ('[[sender_routes]]\nsender = 5\nnexthop = "[h.example]"', "sender_routes[0].sender",
     "must be a string, not 5"),
    (('[[sender_routes]]\nsender = "@a.example"\nnexthop = "[h.example]"\n'
      '[[sender_routes]]\nsender = "@A.Example."\nnexthop = "[i.example]"'),
     "sender_routes[1].sender", "is already routed by sender_routes[0].sender"),
    ('[[sender_routes]]\nsender = "@a.example"', "sender_routes[0].nexthop",
     "is required in each [[sender_routes]] table: the SMTP server"),
    ('[[sender_routes]]\nsender = "@a.example"\nnexthop = ""', "sender_routes[0].nexthop",
     "is required in each [[sender_routes]] table"),
    ('[[sender_routes]]\nsender = "@a.example"\nnexthop = "h:0"', "sender_routes[0].nexthop",
     '"h:0" is not a valid smarthost'),
    ('[[sender_routes]]\nsender = "@a.example"\nnexthop = 25', "sender_routes[0].nexthop",
     "must be a string, not 25"),
    ('[[sender_routes]]\nsender = "@a.example"\nnexthop = "[h.example]"\nusername = "u"',
     "sender_routes[0].username", "needs a password: set sender_routes[0].password_file"),
    ('[[sender_routes]]\nsender = "@a.example"\nnexthop = "[h.example]"\ntls = "always"',
     "sender_routes[0].tls", 'not "always"'),
    ('[[sender_routes]]\nsender = "@a.example"\nnexthop = "[h.example]"\nbackend = "smtp"',
     "sender_routes[0].backend",
     "allowed in a [[sender_routes]] table are: sender, nexthop, tls"),
    # [[backends]]
    ('backends = {name = "x"}', "backends", "array of tables ([[backends]])"),
    ('[[backends]]\nplugin = "p"', "backends[0].name", "is required"),
    ('[[backends]]\nname = ""\nplugin = "p"', "backends[0].name", "empty string"),
    ('[[backends]]\nname = 7\nplugin = "p"', "backends[0].name", "must be a string, not 7"),
    ('[[backends]]\nname = "maildir"\nplugin = "p"', "backends[0].name",
     '"maildir" is the name of a built-in backend'),
    ('[[backends]]\nname = "Discard"\nplugin = "p"', "backends[0].name",
     '"Discard" is the name of a built-in backend'),
    ('[[backends]]\nname = "x"\nplugin = "p"\n[[backends]]\nname = "x"\nplugin = "q"',
     "backends[1].name", '"x" is already the name of backends[0].name'),
    ('[[backends]]\nname = "x"', "backends[0].plugin", "is required"),
    ('[[backends]]\nname = "x"\nplugin = ""', "backends[0].plugin", "empty string"),
    ('[[backends]]\nname = "x"\nplugin = "p"\ntimeout = 0', "backends[0].timeout",
     "not 0"),
    ('[[backends]]\nname = "x"\nplugin = "p"\ntimeout = true', "backends[0].timeout",
     "not true"),
    # A key file OpenSSL cannot read in an ssl: endpoint (it raised OpenSSL's own error).
    ('[[listeners]]\nendpoint = "ssl:2525:privateKey=/etc/passwd"', "listeners[0].endpoint",
     '"ssl:2525:privateKey=/etc/passwd" is not a valid server endpoint'),
    # A NUL character, in any value (file names raised ValueError: embedded null byte).
    ('[spool]\ndirectory = "a\\u0000b"', "spool.directory", "NUL character"),
    ('[delivery]\nca_file = "a\\u0000b"', "delivery.ca_file", "NUL character"),
    ('[[listeners]]\nendpoint = "tcp:25"\ntls_certificate = "c\\u0000"',
     "listeners[0].tls_certificate", '"c\\u0000" holds a NUL character'),
]


def test_fallback_relay_is_read_where_it_is_given(tmp_path: Path) -> None:
    """[delivery] fallback_relay (Postfix's smtp_fallback_relay) is a list of SMTP next
    hops, normalised; [smarthost], [[routes]] and [[sender_routes]] may set their own
    (RouteOptions.fallbackRelay), which no other table inherits."""
    path = writeConfig(tmp_path, '''
[delivery]
fallback_relay = ["[Relay.Example]:587", "backup.example"]
[smarthost]
fallback_relay = ["[192.0.2.9]"]
[[routes]]
domain = "a.example"
backend = "smtp"
nexthop = "[mx.a.example]"
fallback_relay = ["[relay-a.example]:2525"]
[[routes]]
domain = "b.example"
backend = "smtp"
[[sender_routes]]
sender = "@c.example"
nexthop = "[smtp.c.example]:587"
fallback_relay = ["[relay-c.example]"]
''')
    config = loadConfig(path)
    assert config.fallbackRelay == ("[relay.example]:587", "backup.example")
    assert config.smarthostOptions.fallbackRelay == ("[192.0.2.9]:25",)
    assert [r.options.fallbackRelay for r in config.routes] == [
        ("[relay-a.example]:2525",), None]
    assert config.senderRoutes[0].options.fallbackRelay == ("[relay-c.example]:25",)
    assert loadConfig(writeConfig(tmp_path, "")).fallbackRelay == ()


@pytest.mark.parametrize(("text", "key", "fragment"), ERROR_CASES)
def test_errorNamesFileKeyAndValue(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    """Each problem raises a ConfigError naming the file, the dotted key and the value."""
    path = writeConfig(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.file == path
    assert e.value.key == key
    assert str(e.value).startswith(f"{path}: {key}: ")
    assert fragment in str(e.value)


def test_senderRoutes(tmp_path: Path) -> None:
    """[[sender_routes]]: the sender normalised (lower case, the domain's canonical form),
    the next hop as a smarthost's, the transport keys with [smarthost]'s defaults."""
    (tmp_path / "a.password").write_text("a-secret\n")
    path = writeConfig(tmp_path, """
[[sender_routes]]
sender = "@A.Example."
nexthop = "[smtp.a.example]:587"
tls = "required"
username = "a-user"
password_file = "a.password"

[[sender_routes]]
sender = "Boss@b.example"
nexthop = "smtp.b.example:2525"

[[sender_routes]]
sender = "<>"
nexthop = "[bounces.example]"
""")
    c = loadConfig(path)
    assert c.senderRoutes == (
        SenderRoute("@a.example", "[smtp.a.example]:587",
                    transport("required", username="a-user", password="a-secret")),
        SenderRoute("boss@b.example", "smtp.b.example:2525", transport()),
        SenderRoute("<>", "[bounces.example]:25", transport()),
    )
    assert loadConfig(writeConfig(tmp_path, "")).senderRoutes == ()


def test_sourceAddresses(tmp_path: Path) -> None:
    """[delivery] source_address and source_address6 (Postfix's smtp_bind_address and
    smtp_bind_address6): addresses of this host, normalised, in the delivery settings; none
    by default."""
    assert (c := loadConfig(writeConfig(tmp_path, ""))).delivery.sourceAddress is None
    assert c.delivery.sourceAddress6 is None
    path = writeConfig(tmp_path, '[delivery]\nsource_address = "[127.0.0.2]"\n')
    assert loadConfig(path).delivery.sourceAddress == "127.0.0.2"
    # A route's, the smarthost's or a sender route's replaces [delivery]'s for its mail.
    path = writeConfig(tmp_path, (
        '[delivery]\nsource_address = "127.0.0.2"\n[smarthost]\nsource_address = "127.0.0.3"\n'
        '[[routes]]\ndomain = "a.example"\nbackend = "smtp"\nsource_address = "127.0.0.4"\n'
        '[[routes]]\ndomain = "b.example"\nbackend = "smtp"\n'
        '[[sender_routes]]\nsender = "@c.example"\nnexthop = "[h.example]"\n'
        'source_address = "127.0.0.5"\n'))
    c = loadConfig(path)
    assert c.smarthostOptions.sourceAddress == "127.0.0.3"
    assert [r.options.sourceAddress for r in c.routes] == ["127.0.0.4", None]
    assert c.senderRoutes[0].options.sourceAddress == "127.0.0.5"
    if socket.has_ipv6 and _canBind6():
        path = writeConfig(tmp_path, '[delivery]\nsource_address6 = "0:0::1"\n')
        assert loadConfig(path).delivery.sourceAddress6 == "::1"


def _canBind6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_errorExactMessage(tmp_path: Path) -> None:
    """The message reads as documented."""
    path = writeConfig(tmp_path, '[limits]\nrecipients = "ten"\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert str(e.value) == f'{path}: limits.recipients: must be a positive integer, not "ten"'


def test_unknownKeyListsAllowed(tmp_path: Path) -> None:
    """An unknown key's message lists the keys allowed there."""
    path = writeConfig(tmp_path, "[limits]\nsize = 5\n")
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    for allowed in TOP.key("limits").parse.names:
        assert allowed in str(e.value)


def test_pluginOptionsAreNotChecked(tmp_path: Path) -> None:
    """Keys in plugin tables other than plugin and timeout are the plugin's business."""
    path = writeConfig(
        tmp_path, '[[recipient_validators]]\nplugin = "x"\nanything = {nested = [1, 2]}\n'
    )
    spec = loadConfig(path).recipientValidators[0]
    assert spec.options == {"anything": {"nested": [1, 2]}}
    assert "timeout" not in spec.options and "plugin" not in spec.options


def test_tomlSyntaxError(tmp_path: Path) -> None:
    """A TOML syntax error names the file, the line and the column."""
    path = writeConfig(tmp_path, "[limits]\nrecipients = = 5\n")
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.file == path
    assert str(e.value).startswith(f"{path}: TOML syntax error: ")
    assert "line 2" in str(e.value) and "column" in str(e.value)


def test_notUtf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is reported, not a traceback."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'hostname = "caf\xe9.example"\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(str(path))
    assert str(e.value).startswith(f"{path}: ")


def test_fileNotFound(tmp_path: Path) -> None:
    """A missing file names the file and the OS's reason."""
    path = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.file == path
    assert "No such file or directory" in str(e.value)


def test_fileIsDirectory(tmp_path: Path) -> None:
    """A directory given as the file is reported with the OS's reason."""
    with pytest.raises(ConfigError) as e:
        loadConfig(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path}: cannot read")


def test_fileUnreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable file names the file and the OS's reason."""
    path = writeConfig(tmp_path, "")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert str(e.value) == f"{path}: cannot read the configuration file: Permission denied"


# ---------------------------------------------------------------------------------------------
# The spool directory


def test_spoolIsAFile(tmp_path: Path) -> None:
    """A spool path that is a file is refused, naming it."""
    (tmp_path / "spoolfile").write_text("")
    path = writeConfig(tmp_path, '[spool]\ndirectory = "spoolfile"\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert str(e.value).startswith(f"{path}: spool.directory: ")
    assert f'"{tmp_path / "spoolfile"}" exists but is not a directory' in str(e.value)


def test_spoolUnderAFile(tmp_path: Path) -> None:
    """A spool path below a file cannot be created."""
    (tmp_path / "spoolfile").write_text("")
    with pytest.raises(ConfigError) as e:
        loadConfig(None, {"spool": "spoolfile/sub/dir"})
    assert e.value.file is None and e.value.key == "--spool"
    assert f'"{tmp_path / "spoolfile"}" is not a directory' in str(e.value)


def test_spoolNotWritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing spool directory that is not writable is refused, naming it."""
    spool = tmp_path / "ro"
    spool.mkdir()
    realAccess = os.access
    monkeypatch.setattr(
        configValues.os, "access",
        lambda p, mode: False if Path(p) == spool else realAccess(p, mode),
    )
    path = writeConfig(tmp_path, '[spool]\ndirectory = "ro"\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.key == "spool.directory"
    assert f'"{spool}" is not writable' in str(e.value)


def test_spoolParentNotWritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing spool directory whose nearest existing parent is not writable is refused."""
    parent = tmp_path / "ro"
    parent.mkdir()
    realAccess = os.access
    monkeypatch.setattr(
        configValues.os, "access",
        lambda p, mode: False if Path(p) == parent else realAccess(p, mode),
    )
    with pytest.raises(ConfigError) as e:
        loadConfig(None, {"spool": str(parent / "a" / "b")})
    assert e.value.key == "--spool"
    assert f'"{parent / "a" / "b"}"' in str(e.value)
    assert f'"{parent}" is not writable' in str(e.value)


def test_defaultSpoolUnusable(tmp_path: Path) -> None:
    """Even the default spool directory is checked."""
    (tmp_path / "mailrelay-spool").write_text("")
    with pytest.raises(ConfigError) as e:
        loadConfig(None)
    assert e.value.key == "spool.directory"


# ---------------------------------------------------------------------------------------------
# Errors in overrides: each names the option, and no file


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"listen": ["tcp:abc"]}, "--listen", '"tcp:abc" is not a valid server endpoint'),
        # An IPv6 address written as is (or its backslashes eaten by the shell): the error
        # says how to write it, not Twisted's "got multiple values for argument".
        ({"listen": ["tcp6:25:interface=::"]}, "--listen",
         "escape each colon of the IPv6 address with a backslash: 'tcp6:25:interface=\\:\\:' "
         "(quoted so, in single quotes"),
        ({"listen": ["tcp:25:interface=[2001:db8::1]"]}, "--listen",
         "'tcp:25:interface=2001\\:db8\\:\\:1'"),
        ({"listen": ["tcp:25", "tcp:25"]}, "--listen", '"tcp:25" is given twice'),
        ({"listen": [25]}, "--listen", "must be a string, not 25"),
        ({"relay_network": ["10.0.0.1/8"]}, "--relay-network", 'did you mean "10.0.0.0/8"'),
        ({"relay_network": ["nonsense"]}, "--relay-network", '"nonsense"'),
        ({"hostname": "bad_name"}, "--hostname", '"bad_name"'),
        ({"hostname": ""}, "--hostname", "empty"),
        ({"smarthost": "[::1"}, "--smarthost", '"[::1"'),
        ({"spool": ""}, "--spool", "empty string"),
    ],
)
def test_overrideErrorNamesOption(
    tmp_path: Path, overrides: dict, key: str, fragment: str
) -> None:
    """An override error names the option and the value, and no file."""
    path = writeConfig(tmp_path, "")
    with pytest.raises(ConfigError) as e:
        loadConfig(path, overrides)
    assert e.value.file is None
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}: ")
    assert fragment in str(e.value)


def test_singleStringOverrideIsOneItem() -> None:
    """A list option given as one string counts as a list of one."""
    c = loadConfig(None, {"listen": "tcp:2600"})
    assert c.listeners == (ListenerConfig(listenerSettings(c, "tcp:2600")),)


# ---------------------------------------------------------------------------------------------
# parseNetwork


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("::1", "::1/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("10.0.0.0/255.0.0.0", "10.0.0.0/8"),
    ],
)
def test_parseNetwork(text: str, expected: str) -> None:
    """CIDR networks and bare addresses."""
    assert parseNetwork(text) == ipaddress.ip_network(expected)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("10.0.0.1/8", 'has host bits set; did you mean "10.0.0.0/8"?'),
        ("2001:db8::1/32", 'did you mean "2001:db8::/32"?'),
        ("10.0.0.0/33", "not an IP address or network"),
        ("example.com", "not an IP address or network"),
        ("", "not an IP address or network"),
        # IPv4-mapped: no client has such an address (an IPv4 client of an IPv6 socket is
        # known by its IPv4 address), so the entry would never match.
        ("::ffff:10.0.0.0/104", 'is an IPv4-mapped IPv6 network; did you mean "10.0.0.0/8"?'),
        ("::ffff:127.0.0.1", 'did you mean "127.0.0.1/32"?'),
    ],
)
def test_parseNetworkErrors(text: str, fragment: str) -> None:
    """Bad networks raise ValueError naming the value."""
    with pytest.raises(ValueError) as e:
        parseNetwork(text)
    assert f'"{text}"' in str(e.value)
    assert fragment in str(e.value)


def test_parseNetworkNotString() -> None:
    """Numbers are not networks, even though ipaddress would take them."""
    with pytest.raises(ValueError, match="not 167772160"):
        parseNetwork(167772160)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The sample configuration


def test_sampleLoads(tmp_path: Path) -> None:
    """The sample loads as shipped (its spool pointed at a temporary directory)."""
    c = loadConfig(str(SAMPLE), {"spool": str(tmp_path / "spool")})
    assert c.source == str(SAMPLE)
    assert c.listeners == (ListenerConfig(listenerSettings(c, "tcp:2525:interface=127.0.0.1")),)
    assert c.headerStampers == (PluginSpec("default", {}, 30.0, "header_stampers[0]"),)
    defaults = loadConfig(None, {"spool": str(tmp_path / "spool")})
    # Apart from where it came from, the sample as shipped is the defaults.
    assert {
        name: value for name, value in c.__dict__.items() if name not in ("source", "configDir")
    } == {
        name: value
        for name, value in defaults.__dict__.items()
        if name not in ("source", "configDir")
    }


def test_sampleSpool() -> None:
    """The sample's spool is the conventional system directory."""
    data = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))
    assert data["spool"]["directory"] == "/var/spool/mailrelay"


def test_sampleEveryKeyUncommentedLoads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every setting switched on, the sample still loads: every key in it is known.
    Its relative files (CA bundle, password files) are made next to it; its source addresses
    (documentation addresses, which this host has not) bind."""

    class AnyAddress(socket.socket):
        def bind(self, address: Any) -> None:
            pass

    monkeypatch.setattr(checks.socket, "socket", AnyAddress)
    text = uncommentSettings(SAMPLE.read_text(encoding="utf-8"))
    path = writeConfig(tmp_path, text, "sample.toml")
    (tmp_path / "ca.pem").write_text(PEM)
    (tmp_path / "smarthost.password").write_text("smarthost secret\n")
    (tmp_path / "example.org.password").write_text("org secret\r\nsecond line\n")
    (tmp_path / "a.example.password").write_text("a secret\n")
    writeCertificate(tmp_path, "relay.pem", "relay.key")
    (tmp_path / "users").write_text(f"alice:{HASH}\n")
    c = loadConfig(path, {"spool": str(tmp_path / "spool")})
    assert len(c.listeners) == 4
    assert [(x.settings.mode, x.settings.tlsMode, x.settings.auth) for x in c.listeners] == [
        ("relay", "starttls", True),
        ("relay", "none", False),
        ("submission", "starttls", True),
        ("submissions", "implicit", True),
    ]
    certificate = c.listeners[0].certificate
    assert certificate is not None and certificate.notAfter.year > 2000
    assert isinstance(c.listeners[0].settings.tlsOptions, SNIServerOptions)
    assert [name for name, _ in c.listeners[0].sniCertificates] == ["mail.example.org"]
    assert c.auth is not None and c.auth.passwordFile == str(tmp_path / "users")
    assert c.auth.senders == {"alice": ("alice@example.com", "@alice.example.org")}
    assert c.smarthost == SMTPNexthop("smtp.example.net", 587, False)
    assert c.hostname == "relay.example.com"
    assert [spec.plugin for spec in c.recipientValidators] == ["accepted-domains"]
    assert (c.delivery.sourceAddress, c.delivery.sourceAddress6) == ("192.0.2.25", "2001:db8::25")
    assert [(r.sender, r.options.username, r.options.password, r.options.sourceAddress,
             r.options.fallbackRelay) for r in c.senderRoutes] == [
        ("@a.example", "relay@a.example", "a secret", "192.0.2.28",
         ("[smtp.backup-provider.example]:587",)),
        ("sales@b.example", "sales@b.example", "correct horse battery staple", None, None),
    ]

    ca = str(tmp_path / "ca.pem")
    assert c.smarthostOptions == dataclasses.replace(
        transport("may", ca, "relay@example.com", "smarthost secret", False),
        sourceAddress="192.0.2.26", sourceAddress6="2001:db8::26",
        fallbackRelay=("[backup-relay.example]:587",),
    )
    assert c.fallbackRelay == ("[backup-relay.example]:587", "[192.0.2.40]:25")
    assert c.nameservers == (("127.0.0.1", 5353), ("::1", 53), ("192.0.2.53", 53))
    assert c.queue.postmaster == "postmaster@example.com"
    assert c.delivery.heloName == "relay.example.com"
    assert c.delivery.caFile == ca
    assert c.delivery.timeouts == ClientTimeouts()
    assert c.routes == (
        RouteRule(
            "example.org", "smtp", "[mx.example.org]:25",
            dataclasses.replace(transport("required", ca, "relay", "org secret", False),
                                sourceAddress="192.0.2.27", sourceAddress6="2001:db8::27",
                                fallbackRelay=("[backup-mx.example.org]:25",))),
        RouteRule(
            "example.net", "smtp", "[submit.example.net]:587",
            transport("may", ca, "relay@example.net", "correct horse battery staple")),
        RouteRule(
            ".example.org", "lmtp", "unix:/run/dovecot/lmtp", transport("none")),
        RouteRule("example.com", "maildir", "/var/mail/{domain}/{local}"),
        RouteRule("blackhole.example", "discard", None),
        RouteRule("hooks.example", "webhook", None),
    )
    assert c.backends == (
        BackendSpec(
            "webhook", "acme-webhook", {"url": "https://hooks.example.com/mail"}, 600.0,
            "backends[0]",
        ),
        BackendSpec(
            "procmail", "pipe",
            {"command": ["/usr/bin/procmail", "-a", "{domain}", "-d", "{recipient}"],
             "user": "mail", "per": "recipient", "time_limit": 300, "concurrency": 10,
             "null_sender": "MAILER-DAEMON"},
            600.0, "backends[1]",
        ),
    )
    # Nothing secret shows.
    for secret in ("smarthost secret", "org secret", "correct horse"):
        assert secret not in repr(c) and secret not in str(c)


# ---------------------------------------------------------------------------------------------
# Outbound delivery: [queue], [delivery], [smarthost], dns.nameservers, [[routes]], [[backends]]


def test_bounce_lifetime_is_at_most_max_lifetime(tmp_path: Path) -> None:
    """bounce_lifetime not given: its default, or max_lifetime if that is smaller (no
    warning then); given larger than max_lifetime, it is kept as written (the relay warns,
    see L{mailrelay.app.relay}) and the queue uses max_lifetime, as Postfix's qmgr does."""
    c = loadConfig(writeConfig(tmp_path, "[queue]\nmax_lifetime = 3600\n"))
    assert (c.queue.maxLifetime, c.queue.bounceLifetime) == (3600, 3600)
    c = loadConfig(writeConfig(tmp_path, "[queue]\nmax_lifetime = 864000\n"))
    assert (c.queue.maxLifetime, c.queue.bounceLifetime) == (864000, 432000)
    c = loadConfig(writeConfig(tmp_path, "[queue]\nmax_lifetime = 60\nbounce_lifetime = 90\n"))
    assert (c.queue.maxLifetime, c.queue.bounceLifetime, c.queue.lifetime("")) == (60, 90, 60)


def test_outboundFullFile(tmp_path: Path) -> None:
    """Every outbound key read from a file, numbers as floats."""
    (tmp_path / "ca.pem").write_text(PEM)
    (tmp_path / "pw").write_text("s3cret\n")
    path = writeConfig(
        tmp_path,
        """
hostname = "relay.example.com"
[queue]
min_backoff = 60
max_backoff = 60
max_lifetime = 86400.5
bounce_lifetime = 3600
delay_warning = 14400
active_limit = 1
postmaster = "Hostmaster@Example.COM"
rescan_interval = 30
delivery_limit = 7
[delivery]
helo_name = "Out.Example.COM."
tls = "required"
ca_file = "ca.pem"
destination_concurrency = 1
connection_cache_time = 0
create_mailboxes = true
[delivery.timeouts]
connect = 5
greeting = 1.5
data_init = 7
data_block = 8
data_done = 9
quit = 10
[smarthost]
tls = "implicit"
ca_file = "ca.pem"
username = "bob"
password_file = "pw"
auth_without_tls = true
[dns]
nameservers = ["127.0.0.1:5353", "[2001:DB8::53]", "2001:db8::54", "[192.0.2.1]:54"]
""",
    )
    c = loadConfig(path)
    ca = str(tmp_path / "ca.pem")
    assert c.queue == QueuePolicy(60.0, 60.0, 86400.5, 3600.0, 14400.0, 1, "Hostmaster@example.com",
                                  rescanInterval=30.0, deliveryLimit=7)
    assert all(
        isinstance(getattr(c.queue, name), float)
        for name in ("minBackoff", "maxBackoff", "maxLifetime", "bounceLifetime", "delayWarning",
                     "rescanInterval")
    )
    timeouts = ClientTimeouts(
        connect=5.0, greeting=1.5, dataInit=7.0, dataBlock=8.0, dataDone=9.0, quit=10.0
    )
    assert c.delivery == ClientSettings("out.example.com", tls="required", caFile=ca,
                                        timeouts=timeouts)
    assert all(isinstance(getattr(c.delivery.timeouts, name), float)
               for name in ("connect", "greeting", "dataInit", "dataBlock", "dataDone", "quit"))
    assert (c.destinationConcurrency, c.connectionCacheTime) == (1, 0.0)
    assert c.createMailboxes is True
    assert isinstance(c.connectionCacheTime, float)
    assert c.smarthostOptions == transport("implicit", ca, "bob", "s3cret", True)
    assert c.nameservers == (
        ("127.0.0.1", 5353), ("2001:db8::53", 53), ("2001:db8::54", 53), ("192.0.2.1", 54),
    )


def test_timeoutNamesMatchTheClient() -> None:
    """The timeouts' names are camelCase versions of the keys, all present by default."""
    for key in TIMEOUTS.keys:
        parts = key.name.split("_")
        assert key.target == parts[0] + "".join(p.title() for p in parts[1:])
    fields = {f.name for f in dataclasses.fields(ClientTimeouts)}
    assert fields == {key.target for key in TIMEOUTS.keys}


@pytest.mark.parametrize("tls", ["none", "may", "required", "implicit"])
def test_tlsChoices(tmp_path: Path, tls: str) -> None:
    """Each TLS policy is accepted in each place."""
    path = writeConfig(
        tmp_path,
        f'[delivery]\ntls = "{tls}"\n[smarthost]\ntls = "{tls}"\n'
        f'[[routes]]\ndomain = "a.example"\nbackend = "smtp"\ntls = "{tls}"\n',
    )
    c = loadConfig(path)
    assert c.delivery.tls == c.smarthostOptions.tls == tls
    assert c.routes[0].options is not None and c.routes[0].options.tls == tls


def test_emptyStringsMeanNone(tmp_path: Path) -> None:
    """The documented "" defaults mean None."""
    path = writeConfig(
        tmp_path,
        '[queue]\npostmaster = ""\n[delivery]\nhelo_name = ""\nca_file = ""\n'
        '[smarthost]\nca_file = ""\nusername = ""\npassword = ""\npassword_file = ""\n'
        '[dns]\nnameservers = []\n',
    )
    c = loadConfig(path)
    assert c == dataclasses.replace(loadConfig(None), source=path)


def test_postmasterBareIsHostname(tmp_path: Path) -> None:
    """A bare "postmaster" is the postmaster of this relay's (final) host name (Postfix
    appends $myorigin, by default $myhostname)."""
    path = writeConfig(tmp_path, 'hostname = "a.example"\n[queue]\npostmaster = "PostMaster"\n'
                       '[[routes]]\ndomain = ".example"\nbackend = "discard"\n')
    assert loadConfig(path).queue.postmaster == "postmaster@a.example"
    assert loadConfig(path, {"hostname": "B.example"}).queue.postmaster == "postmaster@b.example"


@pytest.mark.parametrize("routes", [
    "",
    '[[routes]]\ndomain = "*"\nbackend = "smtp"\n',
    '[[routes]]\ndomain = "a.example"\nbackend = "smtp"\nnexthop = "A.example."\n',
])
@pytest.mark.parametrize("postmaster", ["postmaster", "PostMaster@A.example"])
def test_postmasterAtHostnameNeedsARoute(tmp_path: Path, routes: str, postmaster: str) -> None:
    """The postmaster at this relay's own host name, with nothing routing that name but its
    MX lookup (no [[routes]] rule, smarthost or router), is refused, naming the key: the
    relay has no local delivery of its own (Postfix delivers postmaster@$myhostname
    locally, $myhostname being in mydestination), so postmaster mail, accepted from anyone
    (RFC 5321 4.5.1), and the notices of failed bounces would go to the host name's MX
    hosts, normally this very relay: a loop, reaching nobody."""
    path = writeConfig(
        tmp_path, f'hostname = "a.example"\n[queue]\npostmaster = "{postmaster}"\n{routes}'
    )
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.key == "queue.postmaster"
    assert str(e.value).startswith(f'{path}: queue.postmaster: "{postmaster}" is ')
    assert "@a.example, at this relay's own host name" in str(e.value)
    assert '[[routes]] rule for "a.example"' in str(e.value)
    # Anything else routing the host name makes it someone's: a rule for it (or its
    # parent domain), a smarthost, a "*" rule with a next hop, a router plugin.
    for fix in ('[[routes]]\ndomain = "a.example"\nbackend = "maildir"\n'
                'nexthop = "/var/mail/{local}"\n',
                '[[routes]]\ndomain = ".example"\nbackend = "smtp"\nnexthop = "[hub.example]"\n',
                '[[routes]]\ndomain = "*"\nbackend = "lmtp"\nnexthop = "[hub.example]:24"\n',
                '[relay]\nsmarthost = "hub.example"\n',
                '[[routers]]\nplugin = "lmtp-domains"\nfile = "x"\n'):
        if "smtp" in routes and fix.startswith('[[routes]]\ndomain = "*"'):
            continue  # (two "*" rules)
        path = writeConfig(tmp_path, f'hostname = "a.example"\n[queue]\n'
                           f'postmaster = "{postmaster}"\n{fix}')
        assert loadConfig(path).queue.postmaster.lower() == "postmaster@a.example", fix
    # With the smarthost given on the command line, too.
    path = writeConfig(tmp_path, f'hostname = "a.example"\n[queue]\npostmaster = "{postmaster}"\n')
    assert loadConfig(path, {"smarthost": "[hub.example]"}).queue.postmaster.lower() == (
        "postmaster@a.example")


def test_postmasterErrorHasNoReplyCode(tmp_path: Path) -> None:
    """A bad postmaster's message is the address problem, without the SMTP reply code."""
    path = writeConfig(tmp_path, '[queue]\npostmaster = "nobody"\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert "501" not in str(e.value) and "5.1.3" not in str(e.value)
    assert "Error:" not in str(e.value)


def test_caFileRelativeToConfigDir(tmp_path: Path) -> None:
    """A relative ca_file is relative to the file's directory, not the current one."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "ca.pem").write_text("some text\n" + PEM)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = writeConfig(etc, '[delivery]\nca_file = "ca.pem"\n')
    os.chdir(elsewhere)
    assert loadConfig(path).delivery.caFile == str(etc / "ca.pem")


def test_systemdEndpointIsCheckedOutsideSocketActivation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sample's "systemd:domain=INET:index=0" is checked for its syntax where systemd
    passed no socket (mailrelay check, mailrelay-sendmail): it was refused there with
    "list index out of range"; a mistake in it is still refused, saying what is wrong."""
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    path = writeConfig(tmp_path, '[[listeners]]\nendpoint = "systemd:domain=INET:index=0"\n'
                       '[[listeners]]\nendpoint = "systemd:domain=UNIX:name=submission"\n')
    assert [listener.settings.name for listener in loadConfig(path).listeners] == [
        "systemd:domain=INET:index=0", "systemd:domain=UNIX:name=submission"]
    for bad, fragment in [
        ("systemd:domain=IPX:index=0", 'domain "IPX" is not one of INET, INET6, UNIX'),
        ("systemd:index=0", "needs domain="),
        ("systemd:domain=INET", "needs index= or name="),
        ("systemd:domain=INET:index=x", 'index "x" is not an integer >= 0'),
        ("systemd:domain=INET:index=0:name=a", "index= or name=, not both"),
        ("systemd:domain=INET:index=0:colour=blue", 'unknown argument "colour"'),
    ]:
        path = writeConfig(tmp_path, f'[[listeners]]\nendpoint = "{bad}"\n')
        with pytest.raises(ConfigError) as e:
            loadConfig(path)
        assert e.value.key == "listeners[0].endpoint" and fragment in str(e.value), str(e.value)


def test_systemdEndpointUnderSocketActivationNeedsItsSocket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where systemd passed this process sockets (the relay started by a socket unit), an
    endpoint whose index or name is not among them is refused, saying which it passed: it
    was "list index out of range", or a bare KeyError."""
    from twisted.internet.endpoints import _SystemdParser
    from twisted.python.systemd import ListenFDs

    # (As Twisted's parser read them from LISTEN_FDS=1 and LISTEN_FDNAMES=smtp.)
    monkeypatch.setattr(_SystemdParser, "_sddaemon", ListenFDs([3], ["smtp"]))
    path = writeConfig(tmp_path, '[[listeners]]\nendpoint = "systemd:domain=INET:index=0"\n'
                       '[[listeners]]\nendpoint = "systemd:domain=INET6:name=smtp"\n')
    assert len(loadConfig(path).listeners) == 2
    for bad, message in [
        ("systemd:domain=INET:index=1",
         "systemd passed this process 1 socket (LISTEN_FDS): there is no index 1 (from 0)"),
        ("systemd:domain=INET:name=submission",
         'systemd passed this process no socket named "submission" (its FileDescriptorName=; '
         "LISTEN_FDNAMES: smtp)"),
    ]:
        path = writeConfig(tmp_path, f'[[listeners]]\nendpoint = "{bad}"\n')
        with pytest.raises(ConfigError) as e:
            loadConfig(path)
        assert str(e.value) == f'{path}: listeners[0].endpoint: "{bad}": {message}'


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[[listeners]]\nendpoint = "tcp:2525:interface=127.0.0.1"\n'
         '[[listeners]]\nendpoint = "tcp:port=2525:interface=127.0.0.1"',
         "listeners[1].endpoint",
         'listens on the same port (2525) and address as listeners[0].endpoint '
         '("tcp:2525:interface=127.0.0.1")'),
        ('[[listeners]]\nendpoint = "tcp:2525"\n'
         '[[listeners]]\nendpoint = "tcp:2525:interface=127.0.0.1"',
         "listeners[1].endpoint", "same port (2525) and address as listeners[0].endpoint"),
        ('[metrics]\nlisten = "tcp:2525:interface=127.0.0.1"\n'
         '[[listeners]]\nendpoint = "tcp:2525:interface=127.0.0.1"',
         "metrics.listen", "same port (2525) and address as listeners[0].endpoint"),
        ('[[listeners]]\nendpoint = "unix:/run/relay.sock"\n'
         '[[listeners]]\nendpoint = "unix:address=/run/relay.sock"',
         "listeners[1].endpoint", 'the same socket file as listeners[0].endpoint'),
    ],
)
def test_twoListenersOnOneSocketAreRefused(tmp_path: Path, text: str, key: str,
                                           fragment: str) -> None:
    """Two endpoints on one socket, however spelled (or the metrics server's on a
    listener's), are refused by the check, naming both; they passed it and twistd could not
    start ("Address already in use", naming neither key nor file)."""
    path = writeConfig(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.key == key and fragment in str(e.value), str(e.value)


@pytest.mark.parametrize("dualStack", [True, False])
def test_anIPv6ListenerOnEveryAddressTakesTheIPv4PortToo(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dualStack: bool) -> None:
    """On Linux's default (net.ipv6.bindv6only = 0) a socket on every IPv6 address takes
    the port on every IPv4 address too: with an IPv4 listener on that port, the check said
    ok and twistd could not start ("Address already in use")."""
    from mailrelay.config import checks

    monkeypatch.setattr(checks, "ipv6DualStack", lambda: dualStack)
    text = ('[[listeners]]\nendpoint = "tcp:2525:interface=127.0.0.1"\n'
            '[[listeners]]\nendpoint = "tcp6:2525:interface=\\\\:\\\\:"\n')
    path = writeConfig(tmp_path, text)
    if not dualStack:
        assert len(loadConfig(path).listeners) == 2
        return
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.key == "listeners[1].endpoint"
    assert ("listens on the same port (2525) as listeners[0].endpoint "
            '("tcp:2525:interface=127.0.0.1"): on every IPv6 address, it takes every IPv4 '
            "address too (net.ipv6.bindv6only = 0)") in str(e.value), str(e.value)


def test_listenersOnOnePortButDistinctAddressesAreTaken(tmp_path: Path) -> None:
    path = writeConfig(tmp_path, '[[listeners]]\nendpoint = "tcp:2525:interface=127.0.0.1"\n'
                       '[[listeners]]\nendpoint = "tcp:2525:interface=127.0.0.2"\n'
                       '[[listeners]]\nendpoint = "tcp6:2525:interface=\\\\:\\\\:1"\n'
                       '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
                       '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1:backlog=5"\n')
    assert len(loadConfig(path).listeners) == 5


def test_aConfigurationFileOfAMebibyteOrMoreIsRefused(tmp_path: Path) -> None:
    """A file that cannot be a configuration (/dev/zero, a log given by mistake) is refused
    once a mebibyte is read, not read until memory runs out."""
    path = tmp_path / "huge.toml"
    path.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(ConfigError) as e:
        loadConfig(str(path))
    assert str(e.value) == f"{path}: not a configuration file: larger than 1 MiB"


def test_caFileAbsolute(tmp_path: Path) -> None:
    """An absolute ca_file is taken as it is."""
    ca = tmp_path / "bundle.crt"
    ca.write_text(PEM)
    path = writeConfig(tmp_path, f'[smarthost]\nca_file = "{ca}"\n')
    assert loadConfig(path).smarthostOptions.caFile == str(ca)


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda d: (d / "ca.pem").write_text("not a certificate\n"), "holds no PEM certificate"),
        (lambda d: (d / "ca.pem").mkdir(), "not a regular file (a directory)"),
        (lambda d: None, "No such file or directory"),
        # OpenSSL's "TRUSTED CERTIFICATE" form only, which delivery does not read (it said
        # "no certificate in ..." at every delivery over TLS).
        (lambda d: (d / "ca.pem").write_text(PEM.replace("CERTIFICATE", "TRUSTED CERTIFICATE")),
         'holds no PEM certificate (no "-----BEGIN CERTIFICATE-----" block'),
        # A certificate cut short: every delivery over TLS failed with a traceback.
        (lambda d: (d / "ca.pem").write_text(
            "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"),
         "certificate 1 of 1 cannot be read"),
    ],
)
def test_badCaFile(tmp_path: Path, setup: Any, fragment: str) -> None:
    """A CA file that is missing, a directory or not PEM is refused, naming its path."""
    setup(tmp_path)
    path = writeConfig(tmp_path, '[delivery]\nca_file = "ca.pem"\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert str(e.value).startswith(f"{path}: delivery.ca_file: ")
    assert f'"{tmp_path / "ca.pem"}"' in str(e.value)
    assert fragment in str(e.value)


# -- passwords


def test_twoKindsOfPasswordFile(tmp_path: Path) -> None:
    """[auth]'s password_file is the table of the users who log in here; a next hop's holds
    the relay's own password on its first line: each is read as what it is."""
    (tmp_path / "users").write_text(f"alice:{HASH}\n")
    (tmp_path / "pw").write_text("s3cret\n")
    text = '[auth]\npassword_file = "{}"\n[smarthost]\nusername = "u"\npassword_file = "pw"\n'
    c = loadConfig(writeConfig(tmp_path, text.format("users")))
    assert c.auth is not None and dict(c.auth.users) == {"alice": HASH}
    assert c.smarthostOptions.password == "s3cret"
    path = writeConfig(tmp_path, text.format("pw"))
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.key == "auth.password_file"
    assert 'pw:1: expected "user:hash"' in str(e.value)


def test_passwordFileFirstLine(tmp_path: Path) -> None:
    """The password is the file's first line, without its line end; spaces are kept."""
    (tmp_path / "pw").write_bytes(b" pass word \r\nsecond line\n")
    path = writeConfig(tmp_path, '[smarthost]\nusername = "u"\npassword_file = "pw"\n')
    assert loadConfig(path).smarthostOptions.password == " pass word "


def test_passwordFileWithoutNewline(tmp_path: Path) -> None:
    """A password file without a final newline, and with non-ASCII text, will do."""
    (tmp_path / "pw").write_text("pässwörd", encoding="utf-8")
    path = writeConfig(tmp_path, '[smarthost]\nusername = "u"\npassword_file = "pw"\n')
    assert loadConfig(path).smarthostOptions.password == "pässwörd"


def test_passwordFileRelativeToConfigDir(tmp_path: Path) -> None:
    """A relative password_file is relative to the file's directory."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "secret").write_text("from etc\n")
    (tmp_path / "secret").write_text("from cwd\n")
    path = writeConfig(etc, '[smarthost]\nusername = "u"\npassword_file = "secret"\n')
    assert loadConfig(path).smarthostOptions.password == "from etc"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "is empty"),
        (b"\nsecret on the second line\n", "has an empty first line"),
        (b"\xff\xfesecret\n", "is not UTF-8 text"),
        (b"sec\x00ret\n", "contains a NUL character"),
        (b"\r\nsecret\n", "has an empty first line"),
        (None, "No such file or directory"),
    ],
)
def test_badPasswordFile(tmp_path: Path, content: bytes | None, fragment: str) -> None:
    """A password file that cannot give a password is refused, naming it but not showing
    what it holds."""
    if content is not None:
        (tmp_path / "pw").write_bytes(content)
    path = writeConfig(tmp_path, '[smarthost]\nusername = "u"\npassword_file = "pw"\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert str(e.value).startswith(f"{path}: smarthost.password_file: ")
    assert f'"{tmp_path / "pw"}"' in str(e.value)
    assert fragment in str(e.value)
    assert "secret" not in str(e.value).replace(str(tmp_path), "")


def test_passwordFileUnreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable password file gives the OS's reason."""
    (tmp_path / "pw").write_text("x\n")
    path = writeConfig(tmp_path, '[smarthost]\nusername = "u"\npassword_file = "pw"\n')
    realOpen = os.open

    def refuse(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(tmp_path / "pw"):
            raise PermissionError(13, "Permission denied", str(file))
        return realOpen(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert str(e.value) == (
        f'{path}: smarthost.password_file: cannot read the password file "{tmp_path / "pw"}": '
        "Permission denied"
    )


def test_passwordNeverShown(tmp_path: Path) -> None:
    """Neither repr nor str of the configuration shows a password, wherever it came from."""
    (tmp_path / "pw").write_text("file-secret\n")
    path = writeConfig(
        tmp_path,
        '[smarthost]\nusername = "alice"\npassword = "inline-secret"\n'
        '[[routes]]\ndomain = "a.example"\nbackend = "smtp"\nusername = "bob"\n'
        'password_file = "pw"\n'
        '[[routes]]\ndomain = "b.example"\nbackend = "lmtp"\nnexthop = "h:24"\n'
        'username = "carol"\npassword = "lmtp-secret"\n',
    )
    c = loadConfig(path)
    assert c.smarthostOptions.password == "inline-secret"
    assert c.routes[0].options is not None and c.routes[0].options.password == "file-secret"
    assert c.routes[1].options is not None and c.routes[1].options.password == "lmtp-secret"
    for text in (repr(c), str(c), repr(c.smarthostOptions), str(c.routes)):
        assert "secret" not in text
    assert "alice" in repr(c) and "bob" in repr(c)


@pytest.mark.parametrize(
    "table",
    [
        '[smarthost]\npassword = "hunter2"\n',
        '[smarthost]\nusername = "u"\npassword = "hun\\u0000ter2"\n',
        '[smarthost]\nusername = "u"\npassword = "hunter2"\ntls = "none"\n',
        '[smarthost]\nusername = "u"\npassword = "hunter2"\npassword_file = "x"\n',
        '[[routes]]\ndomain = "a.example"\nbackend = "discard"\npassword = "hunter2"\n',
    ],
)
def test_passwordNotInErrors(tmp_path: Path, table: str) -> None:
    """Errors about passwords never show them."""
    path = writeConfig(tmp_path, table)
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert "hunter" not in str(e.value)


def test_passwordNotAStringNotShown(tmp_path: Path) -> None:
    """Even a password of the wrong type is not shown."""
    path = writeConfig(tmp_path, '[smarthost]\nusername = "u"\npassword = 314159\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.key == "smarthost.password"
    assert "314159" not in str(e.value) and "must be a string" in str(e.value)


def test_authWithoutTLSAllowsPlainAuth(tmp_path: Path) -> None:
    """With auth_without_tls = true a user name goes with tls = "none"."""
    path = writeConfig(
        tmp_path,
        '[smarthost]\ntls = "none"\nusername = "u"\npassword = "p"\nauth_without_tls = true\n',
    )
    assert loadConfig(path).smarthostOptions == transport("none", None, "u", "p", True)


def test_usernameWithNul(tmp_path: Path) -> None:
    """A user name with a NUL (impossible in AUTH PLAIN) is refused."""
    path = writeConfig(tmp_path, '[smarthost]\nusername = "a\\u0000b"\npassword = "p"\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.key == "smarthost.username" and "NUL" in str(e.value)


# -- routes


def test_routes(tmp_path: Path) -> None:
    """Routes of every backend, normalised, in the file's order, with their keys."""
    (tmp_path / "ca.pem").write_text(PEM)
    path = writeConfig(
        tmp_path,
        """
[delivery]
tls = "required"
ca_file = "ca.pem"
[[backends]]
name = "hook"
plugin = "acme-webhook"
url = "https://example.com/"
[[routes]]
domain = "Example.ORG."
backend = "smtp"
[[routes]]
domain = ".Bücher.example"
backend = "smtp"
nexthop = "[MX.Example.NET]:2525"
tls = "may"
ca_file = ""
[[routes]]
domain = "c.example"
backend = "smtp"
nexthop = ""
[[routes]]
domain = "d.example"
backend = "smtp"
nexthop = "192.0.2.25"
[[routes]]
domain = "e.example"
backend = "smtp"
nexthop = "[2001:DB8::25]:26"
[[routes]]
domain = "lmtp1.example"
backend = "lmtp"
nexthop = "[LMTP.example.]:24"
[[routes]]
domain = "lmtp2.example"
backend = "lmtp"
nexthop = "[2001:db8::24]:24"
tls = "required"
[[routes]]
domain = "lmtp3.example"
backend = "lmtp"
nexthop = "unix:/run//dovecot/lmtp"
[[routes]]
domain = "mail.example"
backend = "maildir"
nexthop = "maildirs/{domain}/{local}"
[[routes]]
domain = "abs.example"
backend = "maildir"
nexthop = "/var/mail/{address}/{local"
[[routes]]
domain = "[192.0.2.1]"
backend = "discard"
[[routes]]
domain = "*"
backend = "hook"
""",
    )
    c = loadConfig(path)
    ca = str(tmp_path / "ca.pem")
    assert c.routes == (
        RouteRule("example.org", "smtp", None, transport("required", ca)),
        RouteRule(
            ".xn--bcher-kva.example", "smtp", "[mx.example.net]:2525", transport("may")),
        RouteRule("c.example", "smtp", None, transport("required", ca)),
        RouteRule(
            "d.example", "smtp", "[192.0.2.25]:25", transport("required", ca)),
        RouteRule(
            "e.example", "smtp", "[2001:db8::25]:26", transport("required", ca)),
        RouteRule("lmtp1.example", "lmtp", "lmtp.example:24", transport()),
        RouteRule(
            "lmtp2.example", "lmtp", "[2001:db8::24]:24", transport("required")),
        RouteRule(
            "lmtp3.example", "lmtp", "unix:/run/dovecot/lmtp", transport()),
        RouteRule(
            "mail.example", "maildir", str(tmp_path / "maildirs" / "{domain}" / "{local}")
        ),
        RouteRule(
            "abs.example", "maildir", "/var/mail/{address}/{local"),
        RouteRule("[192.0.2.1]", "discard", None),
        RouteRule("*", "hook", None),
    )
    # A smtp nexthop reads back as the same smarthost.
    assert parseSMTPNexthop(c.routes[1].nexthop or "") == SMTPNexthop("mx.example.net", 2525, False)
    assert c.backends == (
        BackendSpec("hook", "acme-webhook", {"url": "https://example.com/"}, 600.0, "backends[0]"),
    )


def test_routeSmtpNexthopWithMXLookup(tmp_path: Path) -> None:
    """A nexthop without brackets keeps its MX lookup."""
    path = writeConfig(
        tmp_path,
        '[[routes]]\ndomain = "a.example"\nbackend = "smtp"\nnexthop = "Relay.Example:587"\n',
    )
    nexthop = loadConfig(path).routes[0].nexthop
    assert nexthop == "relay.example:587"
    assert parseSMTPNexthop(nexthop) == SMTPNexthop("relay.example", 587, True)


def test_routeExactAndSubdomainAreDifferent(tmp_path: Path) -> None:
    """"example.org" and ".example.org" are two routes, not a duplicate."""
    path = writeConfig(
        tmp_path,
        '[[routes]]\ndomain = "example.org"\nbackend = "smtp"\n'
        '[[routes]]\ndomain = ".example.org"\nbackend = "discard"\n',
    )
    assert [r.domain for r in loadConfig(path).routes] == ["example.org", ".example.org"]


def test_routeDuplicateAfterNormalising(tmp_path: Path) -> None:
    """Duplicates are found after normalising (Unicode against A-labels), naming both keys."""
    path = writeConfig(
        tmp_path,
        '[[routes]]\ndomain = ".xn--bcher-kva.example"\nbackend = "smtp"\n'
        '[[routes]]\ndomain = "x.example"\nbackend = "smtp"\n'
        '[[routes]]\ndomain = ".BÜCHER.example."\nbackend = "discard"\n',
    )
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert str(e.value) == (
        f'{path}: routes[2].domain: ".BÜCHER.example." is already routed by routes[0].domain'
    )


def test_defaultRouteWithSMTPNexthop(tmp_path: Path) -> None:
    """A "*" route may go with a smarthost (the router gives the route precedence)."""
    path = writeConfig(
        tmp_path,
        '[relay]\nsmarthost = "a.example"\n[[routes]]\ndomain = "*"\nbackend = "smtp"\n',
    )
    c = loadConfig(path, {"smarthost": "[b.example]:2525"})
    assert c.smarthost == SMTPNexthop("b.example", 2525, False)
    assert c.routes[0].domain == "*"


def test_unknownBackendListsSiteBackends(tmp_path: Path) -> None:
    """An unknown backend's message lists the built-in and the configured ones."""
    path = writeConfig(
        tmp_path,
        '[[backends]]\nname = "hook"\nplugin = "p"\n[[backends]]\nname = "archive"\n'
        'plugin = "q"\n[[routes]]\ndomain = "a.example"\nbackend = "hok"\n',
    )
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert str(e.value).startswith(
        f'{path}: routes[0].backend: unknown backend "hok"; the backends available are: '
        "smtp, lmtp, maildir, discard, hook, archive"
    )


@pytest.mark.parametrize("backend", ["maildir", "discard", "hook"])
@pytest.mark.parametrize(
    ("name", "value"),
    [("tls", '"may"'), ("ca_file", '""'), ("username", '"u"'), ("password", '"p"'),
     ("password_file", '"pw"'), ("auth_without_tls", "false")],
)
def test_transportKeysOnlyForSmtpAndLmtp(
    tmp_path: Path, backend: str, name: str, value: str
) -> None:
    """Other backends refuse every transport key, even at its default value."""
    nexthop = 'nexthop = "/m"\n' if backend == "maildir" else ""
    path = writeConfig(
        tmp_path,
        '[[backends]]\nname = "hook"\nplugin = "p"\n'
        f'[[routes]]\ndomain = "a.example"\nbackend = "{backend}"\n{nexthop}{name} = {value}\n',
    )
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.key == f"routes[0].{name}"
    assert f'only smtp and lmtp routes take {name}, not a "{backend}" route' in str(e.value)


# -- backends


def test_backends(tmp_path: Path) -> None:
    """Backends keep their plugin's options and timeout; unused ones are fine."""
    path = writeConfig(
        tmp_path,
        '[[backends]]\nname = "a"\nplugin = "pa"\ntimeout = 5\nurl = "x"\nnested = {k = [1]}\n'
        '[[backends]]\nname = "b"\nplugin = "pb"\n',
    )
    c = loadConfig(path)
    assert c.backends == (
        BackendSpec("a", "pa", {"url": "x", "nested": {"k": [1]}}, 5.0, "backends[0]"),
        BackendSpec("b", "pb", {}, 600.0, "backends[1]"),
    )
    assert isinstance(c.backends[0].timeout, float)
    hash(c.backends[0])


def test_backendTimeoutsReachTheQueueManager(tmp_path: Path) -> None:
    """Each site backend's delivery is bounded by its own timeout (it was parsed and
    ignored: every backend got 3600 s); the built-in backends keep the queue's bound."""
    from twisted.internet.task import Clock

    from mailrelay.app.delivery import makeDelivery
    from mailrelay.delivery.discard import DiscardBackend

    path = writeConfig(
        tmp_path,
        '[dns]\nnameservers = ["127.0.0.1"]\n'
        '[[backends]]\nname = "a"\nplugin = "pa"\ntimeout = 5\n'
        '[[backends]]\nname = "b"\nplugin = "pb"\n',
    )
    built: list[str] = []

    def build(spec: Any, interface: Any) -> Any:
        if hasattr(spec, "name"):  # a backend (the default header stamper is built too)
            built.append(spec.name)
        return DiscardBackend()

    _, queue = makeDelivery(loadConfig(path), Clock(), None, build)
    assert [name for name in built if name not in BUILTIN_BACKENDS] == ["a", "b"]
    assert (queue.timeoutFor("a"), queue.timeoutFor("b")) == (5.0, 600.0)
    assert queue.timeoutFor("smtp") == queue.policy.deliveryTimeout == 3600.0


@pytest.mark.parametrize("name", BUILTIN_BACKENDS)
def test_backendNameCannotBeBuiltIn(tmp_path: Path, name: str) -> None:
    """No site backend may take a built-in backend's name."""
    path = writeConfig(tmp_path, f'[[backends]]\nname = "{name}"\nplugin = "p"\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.key == "backends[0].name"
    assert f'"{name}" is the name of a built-in backend' in str(e.value)


def test_queue_hold(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[queue]\nhold = true\n")
    assert loadConfig(str(path), {"spool": str(tmp_path / "s")}).hold is True
    assert loadConfig(None, {"spool": str(tmp_path / "s")}).hold is False
    path.write_text('[queue]\nhold = "yes"\n')
    with pytest.raises(ConfigError, match=r"queue\.hold: must be true or false"):
        loadConfig(str(path), {"spool": str(tmp_path / "s")})


def test_queuePolicyFromTheFile(tmp_path: Path) -> None:
    """[queue] makes the queue manager's own policy (its stop waits drain_time); hold and
    process are the relay's."""
    path = tmp_path / "c.toml"
    path.write_text('drain_time = 12\n[queue]\nprocess = "inline"\nmin_backoff = 60\n')
    c = loadConfig(str(path), {"spool": str(tmp_path / "s")})
    assert c.queue == QueuePolicy(minBackoff=60.0, stopTimeout=12.0)
    assert (c.queueProcess, c.hold, c.drainTime) == ("inline", False, 12.0)


def test_spool_sync(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    spool = {"spool": str(tmp_path / "s")}
    assert loadConfig(None, spool).spoolSync == "syncfs"
    path.write_text('[spool]\nsync = "fsync"\n')
    assert loadConfig(str(path), spool).spoolSync == "fsync"
    path.write_text('[spool]\nsync = "never"\n')
    with pytest.raises(ConfigError, match=r'spool\.sync: must be "syncfs" or "fsync", not "never"'):
        loadConfig(str(path), spool)


# ---------------------------------------------------------------------------------------------
# Listener TLS, AUTH and modes; [auth]

AUTH_TABLE = '[auth]\npassword_file = "users"\n'
CERT = 'tls_certificate = "cert.pem"\ntls_key = "key.pem"\n'


@pytest.fixture
def tlsDir(tmp_path: Path) -> Path:
    writeCertificate(tmp_path)
    (tmp_path / "users").write_text(f"# users\nalice:{HASH}\nbob:{HASH}\n")
    return tmp_path


def listenerConfig(tlsDir: Path, listener: str, extra: str = AUTH_TABLE) -> tuple[str, Config]:
    path = writeConfig(tlsDir, extra + '[[listeners]]\nendpoint = "tcp:2525"\n' + listener)
    return path, loadConfig(path)


def test_listenerSecurityDefaults(tlsDir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Modes and TLS modes default per RFC 6409 / RFC 8314; paths are relative to the file;
    the certificates are loaded once, by the configuration, with the listener's TLS keys."""
    loaded: list[tuple[Any, ...]] = []
    load = configModule.checks.loadServerTLS

    def recordingLoad(certificate: str, key: str, **options: Any) -> Any:
        loaded.append((certificate, key, options))
        return load(certificate, key, **options)

    monkeypatch.setattr(configModule.checks, "loadServerTLS", recordingLoad)
    cert, key = str(tlsDir / "cert.pem"), str(tlsDir / "key.pem")
    _, c = listenerConfig(tlsDir, "")
    assert c.listeners[0] == ListenerConfig(listenerSettings(c, "tcp:2525"))
    assert c.auth is not None and c.auth.users["alice"] == HASH and "argon2" not in repr(c)
    assert loaded == []
    _, c = listenerConfig(tlsDir, CERT)
    settings = c.listeners[0].settings
    assert (settings.tlsMode, settings.auth) == ("starttls", False)
    assert loaded == [(cert, key, {"minVersion": "TLSv1.2", "ciphers": None})]
    certificate = c.listeners[0].certificate
    assert certificate is not None and settings.tlsOptions is certificate.options
    _, c = listenerConfig(tlsDir, 'mode = "submission"\n' + CERT)
    assert (c.listeners[0].settings.tlsMode, c.listeners[0].settings.auth) == ("starttls", True)
    _, c = listenerConfig(tlsDir, 'mode = "submissions"\n' + CERT + 'tls_min_version = "TLSv1.3"\n')
    settings = c.listeners[0].settings
    assert (settings.tlsMode, settings.auth) == ("implicit", True)
    assert loaded[-1] == (cert, key, {"minVersion": "TLSv1.3", "ciphers": None})
    _, c = listenerConfig(tlsDir, 'mode = "submission"\nauth_without_tls = true\n')
    assert (c.listeners[0].settings.tlsMode, c.listeners[0].settings.authWithoutTLS) == ("none", True)
    # One file holding certificate and key.
    (tlsDir / "both.pem").write_bytes((tlsDir / "cert.pem").read_bytes() + (tlsDir / "key.pem").read_bytes())
    _, c = listenerConfig(tlsDir, 'tls_certificate = "both.pem"\ntls_ciphers = "HIGH"\n')
    both = str(tlsDir / "both.pem")
    assert loaded[-1] == (both, both, {"minVersion": "TLSv1.2", "ciphers": "HIGH"})
    assert c.listeners[0].certificate is not None


def test_authTable(tlsDir: Path) -> None:
    _, c = listenerConfig(
        tlsDir, "",
        AUTH_TABLE + 'mechanisms = ["login"]\nthrottle_after = 0\nfailure_delay = 1.5\n'
        'max_failures = 3\nfailure_window = 60\n[auth.senders]\n'
        'alice = ["Alice@Example.COM", "@B\u00fccher.example"]\n',
    )
    a = c.auth
    assert a is not None
    assert (a.passwordFile, a.mechanisms, a.throttleAfter, a.failureDelay, a.maxFailures, a.failureWindow) == (
        str(tlsDir / "users"), ("LOGIN",), 0, 1.5, 3, 60.0
    )
    assert a.senders == {"alice": ("Alice@example.com", "@xn--bcher-kva.example")}


@pytest.mark.parametrize(
    "listener,extra,key,fragment",
    [
        ('mode = "mx"\n', AUTH_TABLE, "listeners[0].mode", '"relay", "submission" or "submissions", not "mx"'),
        ('tls_mode = "starttls"\n', AUTH_TABLE, "listeners[0].tls_certificate", 'is required with tls_mode = "starttls"'),
        ('mode = "submissions"\n', AUTH_TABLE, "listeners[0].tls_certificate", "TLS from the first byte"),
        ('mode = "submissions"\ntls_mode = "starttls"\n' + CERT, AUTH_TABLE, "listeners[0].tls_mode", 'must be "implicit"'),
        ('tls_mode = "none"\n' + CERT, AUTH_TABLE, "listeners[0].tls_certificate", 'tls_mode is "none"'),
        ('tls_ciphers = "HIGH"\n', AUTH_TABLE, "listeners[0].tls_ciphers", "no effect on a listener without TLS"),
        ('tls_key = "key.pem"\n', AUTH_TABLE, "listeners[0].tls_key", "without listeners[0].tls_certificate"),
        ('tls_certificate = "nope.pem"\n', AUTH_TABLE, "listeners[0].tls_certificate", "cannot read the certificate file"),
        ('tls_certificate = "key.pem"\n', AUTH_TABLE, "listeners[0].tls_certificate", "holds no PEM certificate"),
        ('tls_certificate = "cert.pem"\n', AUTH_TABLE, "listeners[0].tls_certificate", "holds no usable PEM private key"),
        ('tls_certificate = "cert.pem"\ntls_key = "other.pem"\n', AUTH_TABLE, "listeners[0].tls_key", "does not belong"),
        (CERT + 'tls_ciphers = "NOPE"\n', AUTH_TABLE, "listeners[0].tls_ciphers", "selects no cipher"),
        (CERT + 'tls_min_version = "TLSv1.1"\n', AUTH_TABLE, "listeners[0].tls_min_version", 'not "TLSv1.1"'),
        ('auth = true\n', "", "listeners[0].auth", "AUTH needs an [auth] table"),
        ('mode = "submission"\n' + CERT, "", "listeners[0].auth", "a submission listener needs AUTH"),
        ('auth = true\n', AUTH_TABLE, "listeners[0].auth", "no client could ever log in"),
        ('mode = "submission"\nauth = false\n' + CERT, AUTH_TABLE, "listeners[0].auth", "submission requires AUTH"),
        ("auth_without_tls = true\n", AUTH_TABLE, "listeners[0].auth_without_tls", "no effect on a listener without AUTH"),
        ("", "[auth]\n", "auth.password_file", "is required in [auth]"),
        ("", '[auth]\npassword_file = "missing"\n', "auth.password_file", "cannot read the password file"),
        ("", '[auth]\npassword_file = "cert.pem"\n', "auth.password_file", "cert.pem:1: expected \"user:hash\""),
        ("", AUTH_TABLE + 'mechanisms = ["CRAM-MD5"]\n', "auth.mechanisms[0]", 'unknown SASL mechanism "CRAM-MD5"'),
        ("", AUTH_TABLE + "mechanisms = []\n", "auth.mechanisms", "at least one mechanism"),
        ("", AUTH_TABLE + "max_failures = 0\n", "auth.max_failures", "positive integer"),
        ("", AUTH_TABLE + "failure_delay = -1\n", "auth.failure_delay", ">= 0"),
        ("", AUTH_TABLE + "throttle = 3\n", "auth.throttle", 'did you mean "throttle_after"'),
        ("", AUTH_TABLE + '[auth.senders]\ncarol = ["@x.example"]\n', "auth.senders.carol", "not in the password file"),
        ("", AUTH_TABLE + '[auth.senders]\nalice = ["not an address"]\n', "auth.senders.alice[0]", "is not an address"),
        ("", AUTH_TABLE + '[auth.senders]\nalice = "@x.example"\n', "auth.senders.alice", "array of strings"),
    ],
)
def test_listenerSecurityErrors(tlsDir: Path, listener: str, extra: str, key: str, fragment: str) -> None:
    writeCertificate(tlsDir, "unused.pem", "other.pem")
    path = writeConfig(tlsDir, extra + '[[listeners]]\nendpoint = "tcp:2525"\n' + listener)
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert (e.value.file, e.value.key) == (path, key), str(e.value)
    assert fragment in str(e.value)
    assert HASH not in str(e.value)


def test_implicitTLSOnAnSSLEndpointIsRefused(tlsDir: Path) -> None:
    path = writeConfig(tlsDir, '[[listeners]]\nendpoint = "ssl:465:privateKey=key.pem:certKey=cert.pem"\n'
                       'tls_mode = "implicit"\n' + CERT)
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.tls_mode: .*would be TLS twice"):
        loadConfig(path)



def test_authOnAnSSLEndpointNeedsNoTLSMode(tlsDir: Path) -> None:
    """An ssl: endpoint is TLS from the first byte (the endpoint's): AUTH is allowed on it
    without tls_certificate (it was refused: "no client could ever log in")."""
    endpoint = f"ssl:465:privateKey={tlsDir / 'key.pem'}:certKey={tlsDir / 'cert.pem'}"
    path = writeConfig(tlsDir, AUTH_TABLE + f'[[listeners]]\nendpoint = "{endpoint}"\nauth = true\n')
    settings = loadConfig(path).listeners[0].settings
    assert (settings.tlsMode, settings.auth, settings.authWithoutTLS) == ("none", True, False)


def test_proxyProtocolOnAnSSLEndpointIsRefused(tlsDir: Path) -> None:
    """The PROXY header comes before TLS, but an ssl: endpoint starts TLS on the first byte:
    every connection through the load balancer failed its handshake.  A tcp: endpoint with
    tls_mode = "implicit" reads the header, then starts TLS."""
    endpoint = f"ssl:465:privateKey={tlsDir / 'key.pem'}:certKey={tlsDir / 'cert.pem'}"
    path = writeConfig(tlsDir, f'[[listeners]]\nendpoint = "{endpoint}"\nproxy_protocol = true\n'
                       'proxy_networks = ["10.0.0.0/8"]\n')
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert e.value.key == "listeners[0].proxy_protocol"
    assert 'proxy_protocol: = true with the TLS endpoint "ssl:465:' in str(e.value)
    assert str(e.value).endswith(
        ': the PROXY header comes before TLS, which that endpoint starts at the first byte; '
        'use a "tcp:" endpoint with tls_mode = "implicit"'), str(e.value)


def test_expiredCertificateLoadsWithAWarning(tlsDir: Path) -> None:
    """An expired certificate does not stop start-up (the service logs a warning)."""
    import datetime

    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    writeCertificate(tlsDir, "old.pem", "old.key", not_before=past - datetime.timedelta(days=1), not_after=past)
    _, c = listenerConfig(tlsDir, 'tls_certificate = "old.pem"\ntls_key = "old.key"\n')
    assert c.listeners[0].settings.tlsMode == "starttls"
    certificate = c.listeners[0].certificate
    assert certificate is not None and "expired on 2020-01-01" in " ".join(certificate.warnings)


# ---------------------------------------------------------------------------------------------
# Listener limits, protocol checks, deadlines, PROXY protocol, SNI; [auth.checker]


def test_listenerLimitDefaults(tlsDir: Path) -> None:
    """Postfix's defaults, but max_connections (1000: a session is not a process);
    exceptions default to the relay networks."""
    _, c = listenerConfig(tlsDir, "")
    listener = c.listeners[0].settings
    assert (listener.maxConnections, listener.maxConnectionsPerClient) == (1000, 50)
    limits = (listener.connectionRateLimit, listener.messageRateLimit, listener.userMessageRateLimit)
    assert limits == (0, 0, 0)
    assert (listener.rateWindow, listener.limitExceptions, listener.greetPause) == (
        60.0, c.relayNetworks, 0.0
    )
    assert listener.rejectUnauthPipelining is True
    assert (listener.maxSessionTime, listener.minDataRate) == (1800.0, 500)
    assert (listener.proxyProtocol, listener.proxyNetworks, c.listeners[0].sniCertificates) == (
        False, (), ()
    )
    assert (listener.limiterTimeout, listener.ipv6PrefixLength) == (5.0, 84)
    assert loadConfig(None).listeners[0].settings == dataclasses.replace(
        listener, name="tcp:2525:interface=127.0.0.1", hostname=FQDN
    )


def test_listenerLimitsFromTheFile(tlsDir: Path) -> None:
    writeCertificate(tlsDir, "a.pem", "a.key", "mail.example.org")
    writeCertificate(tlsDir, "b.pem", "b.key", "smtp.example.net")
    (tlsDir / "both.pem").write_bytes((tlsDir / "b.pem").read_bytes() + (tlsDir / "b.key").read_bytes())
    _, c = listenerConfig(
        tlsDir,
        CERT
        + "max_connections = 0\nmax_connections_per_client = 5\nconnection_rate_limit = 30\n"
        "message_rate_limit = 100\nuser_message_rate_limit = 200\nrate_window = 3600\n"
        'limit_exceptions = ["192.0.2.0/24", "2001:db8::/32"]\nipv6_prefix_length = 64\ngreet_pause = 2.5\n'
        "reject_unauth_pipelining = true\nmax_session_time = 0\nmin_data_rate = 0\n"
        'proxy_protocol = true\nproxy_networks = ["10.0.0.0/8", "fd00::/8"]\n'
        'tls_certificates = [{server_name = "Mail.Example.ORG.", certificate = "a.pem", key = "a.key"},\n'
        '  {server_name = "*.example.net", certificate = "both.pem"}]\n'
        "[rate_limiter]\nplugin = \"shared\"\ntimeout = 2\n",
    )
    listener = c.listeners[0].settings
    assert (listener.maxConnections, listener.maxConnectionsPerClient, listener.connectionRateLimit) == (0, 5, 30)
    assert (listener.messageRateLimit, listener.userMessageRateLimit, listener.rateWindow) == (100, 200, 3600.0)
    assert listener.limitExceptions == (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))
    assert (listener.greetPause, listener.rejectUnauthPipelining, listener.ipv6PrefixLength) == (2.5, True, 64)
    assert (listener.maxSessionTime, listener.minDataRate, listener.limiterTimeout) == (0.0, 0, 2.0)
    assert listener.proxyProtocol and listener.proxyNetworks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    sni = c.listeners[0].sniCertificates
    assert [name for name, _ in sni] == ["mail.example.org", "*.example.net"]
    certificate = c.listeners[0].certificate
    assert certificate is not None  # three certificates, each of its own (trustme) CA
    assert len({certificate.subject, sni[0][1].subject, sni[1][1].subject}) == 3
    assert isinstance(listener.tlsOptions, SNIServerOptions)
    _, c = listenerConfig(tlsDir, "limit_exceptions = []\n")
    assert c.listeners[0].settings.limitExceptions == ()


@pytest.mark.parametrize(
    "listener,key,fragment",
    [
        ("max_connections = -1\n", "max_connections", "an integer >= 0, not -1"),
        ('max_connections_per_client = "50"\n', "max_connections_per_client", 'not "50"'),
        ("connection_rate_limit = 1.5\n", "connection_rate_limit", "an integer >= 0"),
        ("message_rate_limit = true\n", "message_rate_limit", "an integer >= 0, not true"),
        ("user_message_rate_limit = -3\n", "user_message_rate_limit", "an integer >= 0"),
        ("min_data_rate = -1\n", "min_data_rate", "an integer >= 0"),
        ("rate_window = 0\n", "rate_window", "positive number of seconds, not 0"),
        ('limit_exceptions = ["10.0.0.1/8"]\n', "limit_exceptions[0]", 'did you mean "10.0.0.0/8"'),
        ("greet_pause = -1\n", "greet_pause", ">= 0, not -1"),
        ("ipv6_prefix_length = 0\n", "ipv6_prefix_length", "from 1 to 128, not 0"),
        ("ipv6_prefix_length = 129\n", "ipv6_prefix_length", "from 1 to 128, not 129"),
        ('reject_unauth_pipelining = "yes"\n', "reject_unauth_pipelining", 'true or false, not "yes"'),
        ("max_session_time = -5\n", "max_session_time", ">= 0, not -5"),
        ("proxy_protocol = true\n", "proxy_networks", "is required with proxy_protocol = true"),
        ('proxy_protocol = true\nproxy_networks = []\n', "proxy_networks", "is required"),
        ('proxy_networks = ["10.0.0.0/8"]\n', "proxy_networks", "no effect without proxy_protocol = true"),
        ('proxy_protocol = true\nproxy_networks = ["nowhere"]\n', "proxy_networks[0]", "not an IP address"),
        ('tls_certificates = [{server_name = "a.example", certificate = "cert.pem", key = "key.pem"}]\n',
         "tls_certificates", "needs tls_certificate too"),
        (CERT + 'tls_certificates = "a.pem"\n', "tls_certificates", "must be an array of tables"),
        (CERT + 'tls_certificates = [{certificate = "cert.pem"}]\n', "tls_certificates[0].server_name", "is required"),
        (CERT + 'tls_certificates = [{server_name = "a.example"}]\n', "tls_certificates[0].certificate", "is required"),
        (CERT + 'tls_certificates = [{server_name = "a..example", certificate = "cert.pem", key = "key.pem"}]\n',
         "tls_certificates[0].server_name", "empty label"),
        (CERT + 'tls_certificates = [{server_name = "*.*.example", certificate = "cert.pem", key = "key.pem"}]\n',
         "tls_certificates[0].server_name", "is not a host name"),
        (CERT + 'tls_certificates = [{server_name = "a.example", certificate = "cert.pem", key = "key.pem"},'
         ' {server_name = "A.example", certificate = "cert.pem", key = "key.pem"}]\n',
         "tls_certificates[1].server_name", "is already given in listeners[0].tls_certificates[0].server_name"),
        (CERT + 'tls_certificates = [{server_name = "a.example", certificate = "cert.pem", keys = "key.pem"}]\n',
         "tls_certificates[0].keys", 'did you mean "key"'),
        (CERT + 'tls_certificates = [{server_name = "a.example", certificate = "nope.pem"}]\n',
         "tls_certificates[0].certificate", "cannot read the certificate file"),
        (CERT + 'tls_certificates = [{server_name = "a.example", certificate = "cert.pem", key = "other.pem"}]\n',
         "tls_certificates[0].key", "does not belong to the certificate"),
        (CERT + 'tls_certificates = [{server_name = "a.example", certificate = "cert.pem"}]\n',
         "tls_certificates[0].certificate", "holds no usable PEM private key"),
    ],
)
def test_listenerLimitErrors(tlsDir: Path, listener: str, key: str, fragment: str) -> None:
    writeCertificate(tlsDir, "unused.pem", "other.pem")
    path = writeConfig(tlsDir, '[[listeners]]\nendpoint = "tcp:2525"\n' + listener)
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert (e.value.file, e.value.key) == (path, f"listeners[0].{key}"), str(e.value)
    assert fragment in str(e.value)


def test_authChecker(tlsDir: Path) -> None:
    """A site checker replaces the password file; its table is plugin, timeout and options;
    sender binding is not limited to the password file's users."""
    path = writeConfig(
        tlsDir,
        '[auth]\n[auth.checker]\nplugin = "acme-ldap"\ntimeout = 5\nurl = "ldaps://ldap.example"\n'
        '[auth.senders]\ncarol = ["@example.com"]\n'
        '[[listeners]]\nendpoint = "tcp:587"\nmode = "submission"\n' + CERT,
    )
    a = loadConfig(path).auth
    assert a is not None
    assert a.passwordFile is None and a.users == {}
    assert a.checker == PluginSpec("acme-ldap", {"url": "ldaps://ldap.example"}, 5.0, "auth.checker")
    assert a.senders == {"carol": ("@example.com",)}
    path = writeConfig(tlsDir, '[auth.checker]\nplugin = "x"\n')
    assert loadConfig(path).auth.checker.timeout == 30.0


@pytest.mark.parametrize(
    "auth,key,fragment",
    [
        ('[auth]\npassword_file = "users"\n[auth.checker]\nplugin = "x"\n', "auth.checker", "cannot be used with auth.password_file"),
        ("[auth.checker]\ntimeout = 5\n", "auth.checker.plugin", "is required in [auth.checker]"),
        ('[auth.checker]\nplugin = ""\n', "auth.checker.plugin", "not an empty string"),
        ('[auth.checker]\nplugin = "x"\ntimeout = 0\n', "auth.checker.timeout", "positive number of seconds"),
        ('[auth]\nchecker = "acme-ldap"\n', "auth.checker", "must be a table"),
        ("[auth]\n", "auth.password_file", "unless a site checker is configured in [auth.checker]"),
    ],
)
def test_authCheckerErrors(tlsDir: Path, auth: str, key: str, fragment: str) -> None:
    path = writeConfig(tlsDir, auth)
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert (e.value.file, e.value.key) == (path, key), str(e.value)
    assert fragment in str(e.value)


def test_rateLimiterPlugin(tmp_path: Path) -> None:
    path = writeConfig(tmp_path, '[rate_limiter]\nplugin = "acme-redis"\nurl = "redis://x"\n')
    assert loadConfig(path).rateLimiter == PluginSpec("acme-redis", {"url": "redis://x"}, 5.0, "rate_limiter")
    assert loadConfig(None).rateLimiter is None
    for text, key, fragment in [
        ("[rate_limiter]\n", "rate_limiter.plugin", "is required in [rate_limiter]: the name of a rate limiter plugin"),
        ('[rate_limiter]\nplugin = "x"\ntimeout = -1\n', "rate_limiter.timeout", "positive number of seconds"),
        ('rate_limiter = "x"\n', "rate_limiter", "must be a table"),
    ]:
        path = writeConfig(tmp_path, text)
        with pytest.raises(ConfigError) as e:
            loadConfig(path)
        assert (e.value.key, fragment in str(e.value)) == (key, True), str(e.value)


@pytest.mark.parametrize(
    "config, key",
    [
        ('[delivery]\nca_file = "{fifo}"\n', "delivery.ca_file"),
        ('[smarthost]\nusername = "u"\npassword_file = "{fifo}"\n', "smarthost.password_file"),
        ('[[listeners]]\nendpoint = "tcp:2525"\ntls_certificate = "{fifo}"\n'
         'tls_key = "{key}"\n', "listeners[0].tls_certificate"),
        ('[[listeners]]\nendpoint = "tcp:2525"\ntls_certificate = "{cert}"\n'
         'tls_key = "{fifo}"\n', "listeners[0].tls_key"),
        ('[auth]\npassword_file = "{fifo}"\n', "auth.password_file"),
    ],
)
def test_files_named_must_be_regular_files(tmp_path: Path, config: str, key: str) -> None:
    """A FIFO (or a device) named where a certificate, key, CA file or password file goes
    is refused at once, naming the key: it was opened and read, and the check (and twistd,
    and a reload) waited forever for a writer."""
    import signal

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cert, keyFile = writeCertificate(tmp_path)
    path = writeConfig(tmp_path, config.format(fifo=fifo, cert=cert, key=keyFile))
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("hung")))
    signal.alarm(10)
    try:
        with pytest.raises(ConfigError) as e:
            loadConfig(path)
    finally:
        signal.alarm(0)
    assert e.value.key == key, str(e.value)
    assert "not a regular file" in str(e.value), str(e.value)


def test_a_process_serving_no_listener_does_not_read_their_certificates(tmp_path: Path) -> None:
    """The delivery process loads the configuration without the listeners' certificates and
    keys (loadConfig(..., listenerTLS=False)): started as root with --uid, it runs as a user
    that cannot read a root-only key, and it looped on 'cannot read the certificate file'
    while the relay took mail it never delivered."""
    cert, key = writeCertificate(tmp_path)
    path = writeConfig(tmp_path, f'[[listeners]]\nendpoint = "tcp:2525"\n'
                                 f'tls_certificate = "{cert}"\ntls_key = "{key}"\n')
    key.write_text("not a key")  # (as unreadable for the test as a root-only one)
    with pytest.raises(ConfigError, match="tls_key"):
        loadConfig(path)
    config = loadConfig(path, listenerTLS=False)
    assert config.listeners[0].certificate is None
    assert config.listeners[0].settings.tlsMode == "starttls"


def test_a_process_serving_no_listener_does_not_read_an_ssl_endpoint_s_files(
        tmp_path: Path) -> None:
    """Nor an ssl: endpoint's privateKey= and certKey= (found while making an ssl: listener
    reload its certificate): the endpoint's check built Twisted's endpoint, which reads
    them, so a root-only key (certbot's privkey.pem) made the delivery process, run as the
    relay's user, refuse the configuration.  Its syntax is still checked there."""
    cert, key = writeCertificate(tmp_path)
    endpoint = f"ssl:465:privateKey={key}:certKey={cert}"
    path = writeConfig(tmp_path, f'[[listeners]]\nendpoint = "{endpoint}"\n')
    key.write_text("not a key")  # (as unreadable for the test as a root-only one)
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.endpoint"):
        loadConfig(path)
    config = loadConfig(path, listenerTLS=False)
    assert config.listeners[0].settings.name == endpoint
    for bad, said in ((f"ssl:465:privateKey={key}:colour=blue", "colour"),
                      (f"ssl:http:privateKey={key}", "http"),
                      (f"ssl:70000:privateKey={key}", "port 70000")):
        path = writeConfig(tmp_path, f'[[listeners]]\nendpoint = "{bad}"\n')
        with pytest.raises(ConfigError, match=r"listeners\[0\]\.endpoint") as e:
            loadConfig(path, listenerTLS=False)
        assert said in str(e.value), str(e.value)


def test_a_process_serving_no_listener_does_not_read_the_password_file(tmp_path: Path) -> None:
    """Nor the password file, which only the listeners' AUTH uses: a line gone bad in it,
    which the running relay tolerates (keeping the users it read), made the delivery process
    restarted meanwhile exit at start, again and again -- no mail delivered."""
    users = tmp_path / "users"
    users.write_text(f"alice:{HASH}\n")
    path = writeConfig(tmp_path, f'[auth]\npassword_file = "{users}"\n'
                                 '[auth.senders]\nalice = ["alice@example.org"]\n')
    assert loadConfig(path).auth.passwordFile == str(users)
    users.write_text(f"alice:{HASH}\nthis line is no user\n")
    with pytest.raises(ConfigError, match="password_file"):
        loadConfig(path)
    assert loadConfig(path, listenerTLS=False).auth.passwordFile == str(users)


@pytest.mark.parametrize(
    "value, error",
    [
        ('"+"', None),
        ('"+-"', None),
        ('""', None),
        ('"a"', 'must be characters out of "+-_=#~&%!$" (such as "+"), not "a"'),
        ('"@"', 'not "@"'),
        ('"/"', 'not "/"'),
        ("1", "must be a string, not 1"),
    ],
)
def test_recipient_delimiter(tmp_path: Path, value: str, error: str | None) -> None:
    path = writeConfig(tmp_path, f"[delivery]\nrecipient_delimiter = {value}\n")
    if error is None:
        assert loadConfig(path).recipientDelimiter == value.strip('"')
        return
    with pytest.raises(ConfigError) as e:
        loadConfig(path)
    assert "delivery.recipient_delimiter" in str(e.value) and error in str(e.value)


def test_mailq_users(tmp_path: Path) -> None:
    """C{[spool] mailq_users}: who besides root and the relay's user may list the queue
    (Postfix's authorized_mailq_users, default static:anyone): C{"anyone"} (C{None}), or
    local users' names (their ids); C{[]}: nobody else."""
    import pwd

    def users(value: str) -> Any:
        return loadConfig(writeConfig(tmp_path, f"[spool]\nmailq_users = {value}\n")).mailqUsers

    assert loadConfig(None).mailqUsers is None
    assert users('"anyone"') is None
    assert users("[]") == ()
    root = pwd.getpwuid(0).pw_name
    assert users(f'["{root}", "{root}"]') == (0,)
    for value, message in (
        ('"everyone"', 'must be "anyone" or an array of user names, not "everyone"'),
        ('["no-such-user-x"]', 'mailq_users[0]: no user "no-such-user-x" on this system'),
        ("[1]", "mailq_users[0]: must be a string, not 1"),
    ):
        with pytest.raises(ConfigError) as e:
            users(value)
        assert message in str(e.value), str(e.value)
