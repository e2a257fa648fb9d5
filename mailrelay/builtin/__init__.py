"""The built-in plugins that are not part of the relay's own stages (DKIM, SPF/DMARC, DNSBL,
greylisting): each written on the public plugin API (L{mailrelay.interfaces}, the values)
exactly as a site's plugin would be, exposed by the dropin and chosen by name in
C{[[plugins]]}.  tests/test_layering.py keeps them to the values."""
