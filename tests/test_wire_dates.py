"""L{mailrelay.smtp.wire.formatDate}: the RFC 5322 date of C{Date:} and C{Received:}, the text
of a second kept for the next call in the same second."""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime, parsedate_to_datetime

from mailrelay.smtp.wire import formatDate


def expected(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(int(when)).astimezone())


def test_datesAsTheEmailLibraryWritesThem() -> None:
    start = 1764576000.0  # 2025-12-01T08:00:00Z
    for offset in (0.0, 0.25, 0.999, 1.0, 1.5, 59.9, 60.0, 86399.99, 86400.0, 3.0, 0.5):
        when = start + offset
        assert formatDate(when) == expected(when), offset
    assert parsedate_to_datetime(formatDate(start + 0.75)).timestamp() == start


def test_sameSecondSameText() -> None:
    first = formatDate(1764576001.1)
    assert formatDate(1764576001.9) is first
    assert formatDate(1764576002.0) != first
