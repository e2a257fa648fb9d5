"""The old path of the built-in recipient validators, kept for good (docs/plugins.md names it).

The validators moved to L{mailrelay.policy.validators}; their plugin objects
(C{acceptedDomainsPlugin}, C{recipientMapPlugin}, C{regexPlugin}) are defined once, in the
mailrelay dropin.  This module re-exports both, the same objects, so that old imports and
C{"mailrelay.validators:build..."} factory strings keep working.  Unlike the other old paths it
is not an alias of the moved module: that module does not hold the plugin objects.  Nothing
under C{mailrelay/} imports it.
"""

from importlib import import_module

from mailrelay.policy.validators import *  # noqa: F403
from mailrelay.policy.validators import __all__ as _moved

# Imported by name: the dropin is a module of Twisted's plugin package, not of mailrelay's
# (mypy, which checks it as a file of its own, would otherwise see it twice).
_dropin = import_module("twisted.plugins.mailrelay_plugin")
acceptedDomainsPlugin = _dropin.acceptedDomainsPlugin
recipientMapPlugin = _dropin.recipientMapPlugin
regexPlugin = _dropin.regexPlugin

__all__ = [*_moved, "acceptedDomainsPlugin", "recipientMapPlugin", "regexPlugin"]
