"""Exceptions shared across mailrelay."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, reported to the operator and stopping start-up.

    The message names what is wrong: the file, the key (as a dotted path such as
    C{listeners[0].endpoint}) and the offending value.  Plugins raise it from
    L{IMailRelayPlugin.build} with a message naming their own key; the loader adds the file and
    the table the plugin was configured in.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        self.message = message
        self.file = file
        self.key = key
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.key:
            where.append(self.key)
        return ": ".join(where + [self.message])

    def within(self, *, file: str | None = None, key: str | None = None) -> "ConfigError":
        """Return a copy located in C{file} and under C{key} (prefixed to any existing key)."""
        newKey = key
        if key and self.key:
            newKey = f"{key}.{self.key}"
        elif self.key:
            newKey = self.key
        return ConfigError(self.message, file=file or self.file, key=newKey)
