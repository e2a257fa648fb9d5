"""SMTP replies: basic code, RFC 3463 enhanced status code and text, in one place.

Every reply the server sends is a L{Reply} (a value, defined in L{mailrelay.interfaces} and
importable from here too).  Per RFC 2034 the enhanced code is carried on every 2xx/4xx/5xx
reply except the greeting and the replies to HELO/EHLO; 3xx replies (354) carry none.
"""

from __future__ import annotations

from mailrelay.interfaces import Reply

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
#: A header section longer than C{[limits] header_size} (Sendmail's "552 5.6.0 Headers too
#: large"; Postfix's "5.6.0 message header length exceeds safety limit").
HEADER_TOO_LONG = Reply(552, "5.6.0", "Error: message header size exceeds fixed limit")
NO_SPACE = Reply(452, "4.3.1", "Error: insufficient system storage")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
BARE_NEWLINE = Reply(550, "5.6.0", "Error: message contains a bare LF; use CRLF line endings")
NUL_IN_DATA = Reply(550, "5.6.0", "Error: message contains NUL characters")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops (mail forwarding loop)")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
#: Mail to postmaster at the relay's host name when it has nowhere to go (no C{[queue]
#: postmaster}, and that name routed only by its MX lookup, normally the relay itself).
NO_POSTMASTER = Reply(
    550, "5.1.1", "Recipient address rejected: this relay has no mailbox for its postmaster")
VALIDATOR_FAILED = Reply(
    451, "4.3.0", "Error: temporary failure checking recipient, try again later")
