"""Tests for L{mailrelay.config}: defaults, overrides, validation messages, the sample file."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from pathlib import Path

import pytest

from mailrelay import config as configModule
from mailrelay.config import (
    ALLOWED_KEYS,
    Config,
    ListenerConfig,
    PluginSpec,
    Smarthost,
    loadConfig,
    parseNetwork,
    parseSmarthost,
)
from mailrelay.errors import ConfigError

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "mailrelay.toml"
FQDN = "relay.test.example"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test in its own directory, with a known (and fast) system host name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(configModule.socket, "getfqdn", lambda: FQDN)


def writeConfig(directory: Path, text: str, name: str = "mailrelay.toml") -> str:
    """Write C{text} as a configuration file in C{directory}; return its path."""
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return str(path)


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
    assert c.maxHops == 50
    assert c.reverseDNS is True
    assert c.listeners == (ListenerConfig("tcp:2525:interface=127.0.0.1", "reject", True, True),)
    assert c.recipientValidators == ()
    assert c.headerStampers == (PluginSpec("default", {}, 30.0, "header_stampers[0]"),)


def test_emptyFileIsDefaults(tmp_path: Path) -> None:
    """An empty file means the defaults, except that it is the source."""
    path = writeConfig(tmp_path, "")
    c = loadConfig(path)
    assert c.source == path
    assert c.configDir == tmp_path
    assert c == dataclasses.replace(loadConfig(None), source=path)


def test_hostnameWithoutDot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A system name without a dot is still used."""
    monkeypatch.setattr(configModule.socket, "getfqdn", lambda: "Localhost")
    assert loadConfig(None).hostname == "localhost"


def test_badSystemHostname(monkeypatch: pytest.MonkeyPatch) -> None:
    """A system name that is not a host name is reported, with the way out."""
    monkeypatch.setattr(configModule.socket, "getfqdn", lambda: "my_box")
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
hops = 10
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
    assert c.smarthost == Smarthost("smtp.example.net", 587, False)
    assert (c.maxMessageSize, c.maxRecipients, c.maxErrors, c.maxHops) == (1000, 5, 3, 10)
    assert c.idleTimeout == 1.5
    assert c.dataTimeout == 60.0 and isinstance(c.dataTimeout, float)
    assert c.reverseDNS is False
    assert c.listeners == (
        ListenerConfig("tcp:2525", "normalize", False, False),
        ListenerConfig("tcp6:2526:interface=\\:\\:1"),
    )
    assert c.listeners[0].asOptions() == {
        "bare_newline": "normalize",
        "add_message_id": False,
        "add_date": False,
    }
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
    assert c.listeners == (ListenerConfig("tcp:2600"),)
    c = loadConfig(path, {"listen": ["tcp:2600", "tcp:2601"]})
    assert [listener.endpoint for listener in c.listeners] == ["tcp:2600", "tcp:2601"]


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


def test_overrideSmarthost(tmp_path: Path) -> None:
    """C{--smarthost} replaces the file's; an empty one switches it off."""
    path = writeConfig(tmp_path, '[relay]\nsmarthost = "a.example"\n')
    assert loadConfig(path, {"smarthost": "[b.example]:2525"}).smarthost == Smarthost(
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
    ("[limits]\nidle_timeout = 0", "limits.idle_timeout", "positive number of seconds, not 0"),
    ('[limits]\ndata_timeout = "5m"', "limits.data_timeout", 'not "5m"'),
    ("[limits]\ndata_timeout = inf", "limits.data_timeout", "not inf"),
    ("[limits]\nrecipent = 5", "limits.recipent", 'did you mean "recipients"'),
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
    ('[[listeners]]\nendpoint = "tcp:25"\nport = 25', "listeners[0].port",
     "allowed in [listeners[0]] are: endpoint, bare_newline"),
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
]


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
    for allowed in ALLOWED_KEYS["limits"]:
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
        configModule.os, "access",
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
        configModule.os, "access",
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
    assert loadConfig(None, {"listen": "tcp:2600"}).listeners == (ListenerConfig("tcp:2600"),)


# ---------------------------------------------------------------------------------------------
# parseSmarthost


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("smtp.example.net", Smarthost("smtp.example.net", 25, True)),
        ("SMTP.Example.NET.", Smarthost("smtp.example.net", 25, True)),
        ("smtp.example.net:2525", Smarthost("smtp.example.net", 2525, True)),
        ("[smtp.example.net]", Smarthost("smtp.example.net", 25, False)),
        ("[smtp.example.net]:587", Smarthost("smtp.example.net", 587, False)),
        ("localhost", Smarthost("localhost", 25, True)),
        ("192.0.2.1", Smarthost("192.0.2.1", 25, False)),
        ("192.0.2.1:26", Smarthost("192.0.2.1", 26, False)),
        ("[192.0.2.1]:26", Smarthost("192.0.2.1", 26, False)),
        ("[::1]:2525", Smarthost("::1", 2525, False)),
        ("[2001:db8::1]", Smarthost("2001:db8::1", 25, False)),
        ("[2001:DB8:0::1]:65535", Smarthost("2001:db8::1", 65535, False)),
        ("host:1", Smarthost("host", 1, True)),
    ],
)
def test_parseSmarthost(text: str, expected: Smarthost) -> None:
    """Host names, IPv4 and bracketed IPv6 addresses, with and without port and brackets."""
    assert parseSmarthost(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "host is missing"),
        (":25", "host is missing"),
        ("[]:25", "host is missing"),
        ("host:", "port"),
        ("host:0", "from 1 to 65535, not 0"),
        ("host:65536", "not 65536"),
        ("host:x25", 'not "x25"'),
        ("host:+25", 'not "+25"'),
        ("[host", '"[" without "]"'),
        ("[host]x", 'unexpected "x"'),
        ("[host]:", "port"),
        ("2001:db8::1", "brackets"),
        ("::1", "brackets"),
        ("bad_host.example", "letters, digits and hyphens"),
        ("-host.example", "hyphen"),
        ("a..b", "empty label"),
        ("host name", "letters, digits and hyphens"),
        ("[300.1.2.3]", "all digits"),
    ],
)
def test_parseSmarthostErrors(text: str, fragment: str) -> None:
    """Bad smarthosts raise ValueError naming the value and the problem."""
    with pytest.raises(ValueError) as e:
        parseSmarthost(text)
    assert f'"{text}"' in str(e.value)
    assert fragment in str(e.value)


def test_smarthostStr() -> None:
    """A smarthost renders back in the configuration's notation."""
    for text in ["smtp.example.net", "smtp.example.net:2525", "[smtp.example.net]:587",
                 "[::1]:2525"]:
        assert str(parseSmarthost(text)) == text
    assert str(parseSmarthost("[a.example]")) == "[a.example]:25"


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
    assert c.listeners == (ListenerConfig("tcp:2525:interface=127.0.0.1"),)
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


def test_sampleEveryKeyUncommentedLoads(tmp_path: Path) -> None:
    """With every setting switched on, the sample still loads: every key in it is known."""
    text = uncommentSettings(SAMPLE.read_text(encoding="utf-8"))
    path = writeConfig(tmp_path, text, "sample.toml")
    c = loadConfig(path, {"spool": str(tmp_path / "spool")})
    assert len(c.listeners) == 2
    assert c.smarthost == Smarthost("smtp.example.net", 587, False)
    assert c.hostname == "relay.example.com"
    assert [spec.plugin for spec in c.recipientValidators] == ["accepted-domains"]


def test_sampleDocumentsEveryKey() -> None:
    """Every key the loader knows appears in the sample, switched on or off."""
    data = tomllib.loads(uncommentSettings(SAMPLE.read_text(encoding="utf-8")))
    assert set(data) == set(ALLOWED_KEYS[""])
    for section in ("spool", "relay", "limits", "dns"):
        assert set(data[section]) == set(ALLOWED_KEYS[section]), section
    assert set().union(*data["listeners"]) == set(ALLOWED_KEYS["listeners"])
    for plugins in ("recipient_validators", "header_stampers"):
        assert set().union(*data[plugins]) == {"plugin", "timeout"}, plugins
