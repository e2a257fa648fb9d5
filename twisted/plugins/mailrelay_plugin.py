"""The mailrelay dropin: the C{twistd mailrelay} command and the built-in plugins.

Everything here is cheap to import: C{ServiceMaker} imports L{mailrelay.app.tap} only when the
command runs, and the built-in plugins import their implementations only when built (their
factories are C{"module:function"} strings).  The built-in delivery backends are plugins like
a site's: the relay builds them from C{[delivery]} and C{[dns]} (L{mailrelay.app.backends}).
"""

from twisted.application.service import ServiceMaker

from mailrelay.interfaces import (
    IConnectionPolicy,
    IDataPolicy,
    IDeliveryBackend,
    IHeaderStamper,
    IMessageFilter,
    IRecipientValidator,
    ISenderValidator,
    MailRelayPlugin,
)

mailrelay = ServiceMaker(
    "mailrelay",
    "mailrelay.app.tap",
    "A durable, pluggable SMTP relay (smarthost).",
    "mailrelay",
)

defaultStamper = MailRelayPlugin(
    name="default",
    provides=IHeaderStamper,
    description="Received:, and Message-Id:/Date: when missing",
    factory="mailrelay.cleanup.stamping:buildDefaultStamper",
)


acceptedDomainsPlugin = MailRelayPlugin(
    name="accepted-domains",
    provides=IRecipientValidator,
    description="Accept recipients in listed domains (.example.com: its subdomains)",
    factory="mailrelay.policy.validators:buildAcceptedDomains",
)

recipientMapPlugin = MailRelayPlugin(
    name="recipient-map",
    provides=IRecipientValidator,
    description="Accept, reject or defer recipients listed in a Postfix-style table file",
    factory="mailrelay.policy.validators:buildRecipientMap",
)

regexPlugin = MailRelayPlugin(
    name="regex",
    provides=IRecipientValidator,
    description="Accept, reject or defer recipients matching regular expressions",
    factory="mailrelay.policy.validators:buildRegex",
)

dkimSignPlugin = MailRelayPlugin(
    name="dkim-sign",
    provides=IMessageFilter,
    description="DKIM-sign our mail (dkimpy): per-domain selectors and keys, RSA or Ed25519",
    factory="mailrelay.builtin.dkim:build",
)

senderCanonicalPlugin = MailRelayPlugin(
    name="sender-canonical",
    provides=IMessageFilter,
    description="Rewrite senders (envelope, From:/Sender:/Reply-To:) by a Postfix canonical table",
    factory="mailrelay.builtin.canonical:build",
)

authresPlugin = MailRelayPlugin(
    name="authres",
    provides=IMessageFilter,
    description="SPF, DKIM and DMARC of mail from outside, as Authentication-Results:",
    factory="mailrelay.builtin.authres:build",
)

dnsblPlugin = MailRelayPlugin(
    name="dnsbl",
    provides=(IConnectionPolicy, ISenderValidator, IMessageFilter),
    description="Refuse or tag clients listed in DNS blocklists (at connect, or at MAIL)",
    factory="mailrelay.builtin.dnsbl:build",
)

greylistPlugin = MailRelayPlugin(
    name="greylist",
    provides=IDataPolicy,
    description="Greylisting at DATA (client network, sender, recipient); memory or Redis",
    factory="mailrelay.builtin.greylist:build",
)


def _builtinBackend(name: str, description: str) -> MailRelayPlugin:
    """The plugin of the built-in backend C{name}, made by C{mailrelay.delivery.<name>.build}."""
    return MailRelayPlugin(
        name=name,
        provides=IDeliveryBackend,
        description=f"Built in: {description}",
        factory=f"mailrelay.delivery.{name}:build",
    )


smtpBackend = _builtinBackend("smtp", "delivers over SMTP to a domain's MX hosts or a next hop")
lmtpBackend = _builtinBackend("lmtp", "hands messages to a mail store over LMTP (TCP or UNIX)")
maildirBackend = _builtinBackend("maildir", "writes each recipient's copy into a Maildir")
discardBackend = _builtinBackend("discard", "counts every recipient as delivered, sends nothing")
# Not built from [delivery]: a [[backends]] table names it, with the command to run.
pipeBackend = _builtinBackend("pipe", "runs a command with the message on its standard input")

__all__ = [
    "mailrelay",
    "defaultStamper",
    "acceptedDomainsPlugin",
    "recipientMapPlugin",
    "regexPlugin",
    "dkimSignPlugin",
    "senderCanonicalPlugin",
    "authresPlugin",
    "dnsblPlugin",
    "greylistPlugin",
    "smtpBackend",
    "lmtpBackend",
    "maildirBackend",
    "discardBackend",
    "pipeBackend",
]
