"""The commented sample configuration, as shipped in the package (C{etc/mailrelay.toml} of
the source tree, which documents every key: a test checks it), for C{mailrelay check
--sample} and C{python -m mailrelay.config.sample}.

Part of the config layer.
"""

from __future__ import annotations

import sys
from importlib import resources

__all__ = ["sampleConfig", "main"]

#: The sample's resource name in this package (in the source tree, a link to
#: C{etc/mailrelay.toml}; in a wheel, a copy of it).
SAMPLE_RESOURCE = "sample.toml"


def sampleConfig() -> str:
    """The text of the commented sample configuration, every key documented and the
    settings shown at their defaults: a starting point for C{/etc/mailrelay.toml}."""
    return resources.files(__package__).joinpath(SAMPLE_RESOURCE).read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Print the sample configuration on standard output (C{python -m
    mailrelay.config.sample > /etc/mailrelay.toml}); the console entry behind C{mailrelay
    check --sample}."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m mailrelay.config.sample  (prints the sample configuration)",
              file=sys.stderr)
        return 2
    sys.stdout.write(sampleConfig())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover - the command
    sys.exit(main())
