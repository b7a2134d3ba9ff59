"""Built-in federated distillation algorithms, one module each.

Every module here uses only fedkd's public plug-in API (:mod:`fedkd.strategy`),
exactly as a user's own strategy would. Importing this package registers them.
"""

from strategies import (  # noqa: F401
    cfd,
    cronus,
    dml,
    dsfl,
    fd,
    fedavg,
    feddf,
    fedgkt,
    fedmd,
    fedproto,
    kd,
    local,
    pate,
    transfer,
)
