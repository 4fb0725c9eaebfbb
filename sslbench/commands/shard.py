"""``sslbench shard SRC DST --shard-size N``: write a data set as tar shards for ``--data shards:DST``.

SRC is any data spec (``imagefolder:PATH``, ``hf:NAME``, ``digits``, ...) or a folder (read as
``imagefolder:FOLDER``). Image folders and Hugging Face data sets are copied byte for byte; a
source that exists only decoded is stored as lossless PNGs at ``store_size(--image-size)``. See
:mod:`sslbench.data.shards` for the layout and the index.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sslbench.core.errors import UserError
from sslbench.core.registry import register_command


def cmd_shard(args: argparse.Namespace) -> int:
    from sslbench.core.rundir import default_cache_dir
    from sslbench.data import default_image_size
    from sslbench.data.shards import INDEX, write_shards

    spec = args.src
    if ":" not in spec and not spec.isalnum():  # a path (a bare name is a named source: digits, cifar10)
        if not Path(spec).expanduser().is_dir():
            raise UserError(
                f"SRC folder {spec} does not exist; give an image folder (PATH/train/<class>/..., PATH/test/...) or a data spec such as hf:NAME"
            )
        spec = f"imagefolder:{spec}"
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {args.image_size}")
    image_size = args.image_size or default_image_size(spec)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    index = write_shards(spec, args.dst, args.shard_size, image_size=image_size, cache_root=cache)
    for split, part in index["splits"].items():
        skipped = f", {part['skipped']} unreadable skipped" if part["skipped"] else ""
        print(f"{split}: {part['count']} images in {len(part['shards'])} shards{skipped}", file=sys.stderr)
    print(f"wrote {Path(args.dst) / INDEX}; train with --data shards:{args.dst}", file=sys.stderr)
    return 0


@register_command("shard")
def register_shard(sub: Any) -> None:
    p = sub.add_parser("shard", help="write a data set as tar shards (WebDataset layout + index) for --data shards:DST")
    p.add_argument("src", metavar="SRC", help="an image folder, or a data spec: imagefolder:PATH, hf:NAME, digits, ...")
    p.add_argument("dst", metavar="DST", help="the new shard folder (must not exist, or be empty)")
    p.add_argument("--shard-size", type=int, required=True, help="images per shard, e.g. 10000")
    p.add_argument("--image-size", type=int, help="for sources without image files (digits, cifar10): the size the PNGs are stored at")
    p.add_argument("--cache-dir", help="where downloads and decoded splits are kept (default $SSLBENCH_CACHE)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_shard)
