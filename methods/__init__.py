"""Method plugins, installed as ``sslbench.methods``. Importing this package registers the
built-in methods; third-party methods arrive through the ``sslbench.methods`` entry-point group."""

from . import simclr  # noqa: F401  (registers "simclr")
from . import moco  # noqa: F401  (registers "moco")
from . import mocov3  # noqa: F401  (registers "mocov3")
from . import byol  # noqa: F401  (registers "byol")
from . import simsiam  # noqa: F401  (registers "simsiam")
