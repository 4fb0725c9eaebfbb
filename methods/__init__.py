"""Method plugins, installed as ``sslbench.methods``. Importing this package registers the
built-in methods; third-party methods arrive through the ``sslbench.methods`` entry-point group."""

from sslbench.methods import (
    barlow_twins,  # noqa: F401  (registers "barlow_twins")
    byol,  # noqa: F401  (registers "byol")
    dino,  # noqa: F401  (registers "dino")
    dinov2,  # noqa: F401  (registers "dinov2")
    ibot,  # noqa: F401  (registers "ibot")
    lejepa,  # noqa: F401  (registers "lejepa")
    mae,  # noqa: F401  (registers "mae")
    moco,  # noqa: F401  (registers "moco")
    mocov3,  # noqa: F401  (registers "mocov3")
    nnclr,  # noqa: F401  (registers "nnclr")
    ressl,  # noqa: F401  (registers "ressl")
    simclr,  # noqa: F401  (registers "simclr")
    simsiam,  # noqa: F401  (registers "simsiam")
    swav,  # noqa: F401  (registers "swav")
    vicreg,  # noqa: F401  (registers "vicreg")
    wmse,  # noqa: F401  (registers "wmse")
)
