"""The relay's configuration: a TOML file, command-line overrides and the defaults.

L{loadConfig} reads the file (or nothing, for the built-in defaults), applies the options
given on the command line, checks every value and returns a frozen L{Config}.  Every problem
raises L{ConfigError} naming the file, the key as a dotted path (C{listeners[0].endpoint},
C{limits.recipients}, C{relay.networks[2]}) and the offending value, for example::

    /etc/mailrelay.toml: limits.recipients: must be a positive integer, not "ten"

Problems in command-line options name the option instead (C{--listen}) and no file.

See C{etc/mailrelay.toml} for a commented sample of every key.

Each key is declared once, in L{mailrelay.config.keys}: its name, parser, default and
meaning, the field it fills; the loader, the messages listing the keys a table allows (with a
did-you-mean), the command-line options and the test that the sample documents every key are
derived from those declarations.  The package's modules:

  - L{mailrelay.config.schema}: the machinery (keys and tables), a value module the stages
    may use for their plugins' options;
  - L{mailrelay.config.values}: one parser per type of value, also a value module;
  - L{mailrelay.config.types}: the configuration's own frozen types (the stages' settings
    are the stages' own types, which the keys fill directly);
  - L{mailrelay.config.checks}: the checks across the keys of a table;
  - L{mailrelay.config.keys}: the relay's keys;
  - L{mailrelay.config.loader}: L{loadConfig}, and L{loadLocalView}, the few settings a local
    command (C{mailrelay-sendmail}) reads to reach the relay.

The package may import the values (L{mailrelay.interfaces}, L{mailrelay.envelope},
L{mailrelay.errors}, L{mailrelay.address}), L{mailrelay.smtp} and the stages, to check their
values; never L{mailrelay.app}.  This module only re-exports.
"""

from mailrelay.config.keys import OVERRIDE_OPTIONS
from mailrelay.config.loader import (
    loadConfig,
    loadLocalView,
    overriddenKeys,
    readConfigFile,
)
from mailrelay.config.types import (
    BackendSpec,
    Config,
    ListenerConfig,
    ListenerView,
    LocalView,
    PluginSpec,
    SNICertificate,
)
from mailrelay.config.values import checkEndpoint, parseNetwork, spoolDirectoryProblem
from mailrelay.errors import ConfigError, describeValue

__all__ = [
    "OVERRIDE_OPTIONS",
    "BackendSpec",
    "Config",
    "ConfigError",
    "ListenerConfig",
    "ListenerView",
    "LocalView",
    "PluginSpec",
    "SNICertificate",
    "checkEndpoint",
    "describeValue",
    "loadConfig",
    "loadLocalView",
    "overriddenKeys",
    "parseNetwork",
    "readConfigFile",
    "spoolDirectoryProblem",
]
