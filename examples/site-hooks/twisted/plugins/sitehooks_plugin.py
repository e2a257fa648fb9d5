# The site's dropin: names only (cheap to scan).  NO __init__.py beside it.
from mailrelay.interfaces import (
    IConnectionPolicy,
    IDataPolicy,
    IDeliveryObserver,
    IESMTPExtension,
    IHeaderStamper,
    IMessageFilter,
    IQueueObserver,
    ISenderValidator,
    MailRelayPlugin,
)

siteGate = MailRelayPlugin("site-gate", IConnectionPolicy, "Connect and HELO checks",
                           "sitehooks:buildGate")
siteSenders = MailRelayPlugin("site-senders", ISenderValidator, "Senders refused",
                              "sitehooks:buildSenders")
siteGrey = MailRelayPlugin("site-grey", (IDataPolicy, IDeliveryObserver), "Greylisting",
                           "sitehooks:buildGrey")
siteFilter = MailRelayPlugin("site-filter", IMessageFilter, "A content filter",
                             "sitehooks:buildFilter")
siteObserver = MailRelayPlugin("site-observer", (IQueueObserver, IDeliveryObserver),
                               "Logs what is queued and delivered", "sitehooks:buildObserver")
siteExtension = MailRelayPlugin("site-ext", IESMTPExtension, "The XSITE extension",
                                "sitehooks:buildExtension")
siteStamp = MailRelayPlugin("site-stamp", IHeaderStamper, "The client in X-Site-Client:",
                            "sitehooks:buildStamp")
siteBroken = MailRelayPlugin("site-broken", IDataPolicy, "Fails to build",
                             "sitehooks:buildBroken")
