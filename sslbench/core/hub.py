"""The Hugging Face hub without a network is an ordinary condition, not a traceback.

Pretrained timm weights (``backbone_kwargs.pretrained=true``) and ``hf:NAME`` data sets come from
the hub. Without a network, ``huggingface_hub`` retries each request for about half a minute,
printing a line per retry, and then raises an error that says nothing about what to do.
:func:`hub_access` checks once (a DNS look-up of the hub's host, a few seconds at most) whether the
hub can be reached; when it cannot (or ``HF_HUB_OFFLINE=1`` is set) the libraries run in their
offline mode, so that what is in the local cache is used and what is not fails at once. The
callers turn that failure into one line saying what to do instead (:func:`offline_reason`).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_reachable: bool | None = None  # the probe's answer, once per process


def _env_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _endpoint_host() -> str:
    try:
        from huggingface_hub import constants

        return urlparse(str(constants.ENDPOINT)).hostname or "huggingface.co"
    except ImportError:
        return "huggingface.co"


def hub_reachable() -> bool:
    """Whether the hub's host name resolves (within :data:`PROBE_TIMEOUT_S`); asked once per process."""
    global _reachable
    if _reachable is None:
        host = _endpoint_host()
        pool = ThreadPoolExecutor(1)
        try:
            pool.submit(socket.getaddrinfo, host, 443).result(timeout=PROBE_TIMEOUT_S)
            _reachable = True
        except Exception:  # no DNS, no network, or too slow to be of use
            _reachable = False
        finally:
            pool.shutdown(wait=False)
    return _reachable


def is_offline() -> bool:
    """True when the hub is not to be asked: ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` or no network."""
    return _env_offline() or not hub_reachable()


@contextmanager
def hub_access() -> Iterator[bool]:
    """Within: ``huggingface_hub`` and ``datasets`` in offline mode when the hub cannot be reached
    (the local cache still answers), their retry messages silenced; yields whether offline."""
    offline = is_offline()
    patched: list[tuple[Any, object]] = []
    if offline:
        for module in ("huggingface_hub.constants", "datasets.config"):
            try:
                mod: Any = importlib.import_module(module)
            except ImportError:
                continue
            if hasattr(mod, "HF_HUB_OFFLINE"):
                patched.append((mod, mod.HF_HUB_OFFLINE))
                mod.HF_HUB_OFFLINE = True  # read by both libraries at each request
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield offline
    finally:
        hub_logger.setLevel(level)
        for mod, value in patched:
            mod.HF_HUB_OFFLINE = value


def offline_reason(exc: BaseException, offline: bool) -> str | None:
    """A short cause when ``exc`` (or an exception it came from) means the hub could not be
    reached or the file is not in the cache; None for other errors (a typo in a name)."""
    seen: BaseException | None = exc
    while seen is not None:
        name = type(seen).__name__
        if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or isinstance(seen, (ConnectionError, TimeoutError, socket.gaierror)):
            return "no network, and not in the local Hugging Face cache" if offline else "the Hugging Face hub cannot be reached"
        if offline and isinstance(seen, OSError) and ("offline" in str(seen).lower() or "connection" in str(seen).lower()):
            return "no network, and not in the local Hugging Face cache"
        seen = seen.__cause__ or seen.__context__
    return None


def cache_dir() -> str:
    """Where the hub's files are cached here (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"
