"""Method plugins, installed as ``sslbench.methods``. Importing this package registers the
built-in methods; third-party methods arrive through the ``sslbench.methods`` entry-point group."""

from sslbench.methods import (
    all4one,  # noqa: F401  (registers "all4one")
    barlow_twins,  # noqa: F401  (registers "barlow_twins")
    byol,  # noqa: F401  (registers "byol")
    deepclusterv2,  # noqa: F401  (registers "deepclusterv2")
    dino,  # noqa: F401  (registers "dino")
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
