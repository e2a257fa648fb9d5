"""SMTP replies: basic code, RFC 3463 enhanced status code and text, in one place.

Every reply the server sends is a :class:`Reply`.  Per RFC 2034 the enhanced code is carried
on every 2xx/4xx/5xx reply except the greeting and the replies to HELO/EHLO; 3xx replies
(354) carry none.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply, possibly multi-line.

    @ivar code: the three-digit basic code.
    @ivar enhanced: the RFC 3463 enhanced status code (C{"2.0.0"}) or C{""} when the reply
        must not carry one (greeting, EHLO/HELO, 354).
    @ivar text: the text; several lines are separated by C{"\\n"}.
    """

    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"bad SMTP reply code {self.code}")
        if "\r" in self.text:
            raise ValueError("reply text must not contain CR")

    @property
    def isPositive(self) -> bool:
        return self.code < 400

    @property
    def isTransient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def isPermanent(self) -> bool:
        return self.code >= 500

    def toBytes(self) -> bytes:
        lines = self.text.split("\n") or [""]
        out = []
        prefix = f"{self.enhanced} " if self.enhanced else ""
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return self.toBytes().decode("utf-8").rstrip("\r\n").replace("\r\n", " / ")


# Fixed replies used in several places.
OK = Reply(250, "2.0.0", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
VRFY_CANNOT = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321 (mailrelay)")

SYNTAX_ERROR = Reply(500, "5.5.2", "Error: bad syntax")
UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "Error: message line longer than 998 octets")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RCPT = Reply(554, "5.5.1", "Error: no valid recipients")
TOO_MANY_RCPT = Reply(452, "4.5.3", "Error: too many recipients")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
NO_SPACE = Reply(452, "4.3.1", "Error: insufficient system storage")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
BARE_NEWLINE = Reply(550, "5.6.0", "Error: message contains a bare CR or LF; use CRLF line endings")
NUL_IN_DATA = Reply(550, "5.6.0", "Error: message contains NUL characters")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops (mail forwarding loop)")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
VALIDATOR_FAILED = Reply(451, "4.3.0", "Error: temporary failure checking recipient, try again later")
