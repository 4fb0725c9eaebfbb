"""Method plugins, installed as ``sslbench.methods``. Importing this package registers the
built-in methods; third-party methods arrive through the ``sslbench.methods`` entry-point group."""

from . import (
    byol,  # noqa: F401  (registers "byol")
    mae,  # noqa: F401  (registers "mae")
    moco,  # noqa: F401  (registers "moco")
    mocov3,  # noqa: F401  (registers "mocov3")
    simclr,  # noqa: F401  (registers "simclr")
    simsiam,  # noqa: F401  (registers "simsiam")
)
