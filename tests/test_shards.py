"""Tar shards (``sslbench shard``, ``--data shards:DIR``; issue 32): the writer's index, its bad
inputs, and training from shards, which must be training from the same images in memory.

The data: an image folder written here (4 classes; PNGs and JPEGs of several sizes, one corrupt
file that every reader skips), trained on at 16 px with a narrow ResNet-18 (tests/_reliability.py's
TINY); digits as shards for the two-process check. The training runs are forked children of this
process (tests/_reliability.py), started together by one module fixture.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _backbones import tiny
from _reliability import TINY, assert_same_weights, child_env, lines, run_forked, run_many
from PIL import Image

from sslbench.commands.cli import main
from sslbench.config import TrainConfig
from sslbench.core.method import default_views
from sslbench.core.registry import get_method
from sslbench.data import ImageSplit, load_split
from sslbench.data.shards import ShardSplit, write_shards
from sslbench.testing import check_two_processes_equal_one, tiny_backbone
from sslbench.train.batches import stream_batches
from sslbench.train.run_setup import make_plan

CLASSES = ("ant", "bee", "cat", "dog")
PER_CLASS = 16  # train images per class, 64 in all (and one corrupt file in "bee", skipped)
SHARD_SIZE = 5
STEPS = 7  # batch 16 over 64 images: 4 steps an epoch, so the runs cross an epoch boundary


def _write_folder(root: Path) -> Path:
    """``root/{train,test}/<class>/`` with PNGs and JPEGs of sides 12..23 (not square), plus a
    corrupt ``train/bee/zz_broken.jpg``."""
    rng = np.random.default_rng(5)
    for split, n in (("train", PER_CLASS), ("test", 4)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(12, 24)), int(rng.integers(12, 24))
                a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                a[..., c % 3] = a[..., c % 3] // 2 + 120
                fmt = "JPEG" if i % 2 else "PNG"
                Image.fromarray(a).save(d / f"{i:02d}.{fmt.lower()[:3].replace('jpe', 'jpg')}", format=fmt)
    (root / "train" / "bee" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def _train(data: str, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--method",
        "simclr",
        "--data",
        data,
        "--steps",
        str(STEPS),
        *TINY,
        "--seed",
        "3",
        "--set",
        "deterministic=true",
        "--set",
        "checkpoint_every=2",
        "--set",
        "log_every=1",
        "--set",
        "quick_knn=false",
        "--output",
        str(out),
        *extra,
    ]


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("shards") / "images")


@pytest.fixture(scope="module")
def shards(folder: Path) -> Path:
    """The folder's shards, written through the CLI."""
    dst = folder.parent / "shards"
    assert main(["shard", str(folder), str(dst), "--shard-size", str(SHARD_SIZE), "--cache-dir", str(folder.parent / "cache")]) == 0
    return dst


@pytest.fixture(scope="module")
def runs(folder: Path, shards: Path) -> dict[str, Any]:
    """Every training run of this file, the first ones at once: the image folder in memory; its
    shards unbroken (2 DataLoader workers); its shards killed (SIGKILL) after step 4, whose last
    checkpoint is step 2 (mid-epoch), then resumed in a new process."""
    root = folder.parent / "runs"
    env = child_env(folder.parent / "cache")
    out = {name: root / name for name in ("memory", "shards", "killed")}
    first = run_many(
        {
            "memory": (_train(f"imagefolder:{folder}", out["memory"]), env, None),
            "shards": (_train(f"shards:{shards}", out["shards"], "--set", "num_workers=2"), env, None),
            "killed": (_train(f"shards:{shards}", out["killed"]), {**env, "SSLBENCH_TEST_KILL_AT": "step:4"}, None),
        },
        max_running=3,
    )
    resumed = run_forked(["train", "--output", str(out["killed"]), "--resume", "--quiet"], env)
    return {"dirs": out, "first": first, "resumed": resumed}


# --------------------------------------------------------------------------------------------
# The writer


def test_the_index_describes_the_shards(folder: Path, shards: Path) -> None:
    """index.json against the source read here independently: the readable images of each split in
    class-then-name order, SHARD_SIZE per shard, each tar member's bytes the source file's bytes and
    its .cls the class number, the shards' sizes and SHA-256, the classes and the median side."""
    index = json.loads((shards / "index.json").read_text())
    assert index["classes"] == list(CLASSES) and index["shard_size"] == SHARD_SIZE
    for split in ("train", "test"):
        expected = []
        for c, name in enumerate(CLASSES):
            for f in sorted(os.listdir(folder / split / name)):
                if f != "zz_broken.jpg":
                    expected.append((folder / split / name / f, c))
        part = index["splits"][split]
        assert part["count"] == len(expected) == sum(s["count"] for s in part["shards"])
        assert part["skipped"] == (1 if split == "train" else 0)
        counts = [s["count"] for s in part["shards"]]
        assert counts == [SHARD_SIZE] * (len(expected) // SHARD_SIZE) + ([len(expected) % SHARD_SIZE] if len(expected) % SHARD_SIZE else [])
        sides = sorted(min(Image.open(p).size) for p, _ in expected)
        assert part["image_size"] == sides[(len(sides) - 1) // 2]
        got = []
        for shard in part["shards"]:
            path = shards / shard["file"]
            assert shard["bytes"] == path.stat().st_size
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            with tarfile.open(path) as tar:
                names = tar.getnames()
                for key, label, offset, length, _ in shard["samples"]:
                    image = next(n for n in names if n.startswith(key + ".") and not n.endswith(".cls"))
                    member = tar.getmember(image)
                    assert (member.offset_data, member.size) == (offset, length)
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    assert int(tar.extractfile(f"{key}.cls").read()) == label  # type: ignore[union-attr]
                    got.append((data, label))
        assert [(p.read_bytes(), c) for p, c in expected] == got


def test_digits_shards_hold_the_digits_pixels(tmp_path: Path) -> None:
    """A source without image files (digits) is stored as lossless PNGs at the storage size: the
    shards' pixels and labels are the in-memory split's."""
    write_shards("digits", tmp_path / "d", 400, image_size=16, cache_root=tmp_path / "cache")
    for split in ("train", "test"):
        memory = load_split("digits", split, 16, cache_dir=tmp_path / "cache")
        sharded = load_split(f"shards:{tmp_path / 'd'}", split, 16)
        assert isinstance(memory, ImageSplit) and isinstance(sharded, ShardSplit)
        assert torch.equal(sharded.labels, memory.labels)
        assert torch.equal(torch.from_numpy(np.stack([sharded.pixels(i) for i in range(len(sharded))])), memory.images)


def test_hf_shards_hold_the_hf_pixels(tmp_path: Path) -> None:
    """An hf: source (a save_to_disk folder of PNGs of several sizes): the shards hold its image
    bytes, and decode to the in-memory split's pixels, labels and classes."""
    from datasets import ClassLabel, Dataset, DatasetDict
    from datasets import Image as HFImage

    rng = np.random.default_rng(0)

    def part(n: int) -> Dataset:
        images = [Image.fromarray(rng.integers(0, 256, (int(rng.integers(10, 20)), 18, 3), dtype=np.uint8)) for _ in range(n)]
        ds = Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]})
        return ds.cast_column("image", HFImage()).cast_column("label", ClassLabel(names=["a", "b", "c"]))

    DatasetDict({"train": part(20), "test": part(9)}).save_to_disk(str(tmp_path / "hf"))
    write_shards(f"hf:{tmp_path / 'hf'}", tmp_path / "s", 7, image_size=16, cache_root=tmp_path / "cache")
    for split in ("train", "test"):
        memory = load_split(f"hf:{tmp_path / 'hf'}", split, 16, cache_dir=tmp_path / "cache")
        sharded = load_split(f"shards:{tmp_path / 's'}", split, 16)
        assert isinstance(memory, ImageSplit) and isinstance(sharded, ShardSplit)
        assert sharded.classes == memory.classes == ["a", "b", "c"] and torch.equal(sharded.labels, memory.labels)
        assert torch.equal(torch.from_numpy(np.stack([sharded.pixels(i) for i in range(len(sharded))])), memory.images)


def _flip_image_byte(shards: Path, copy: Path) -> Path:
    """A copy of the shards with one byte of every image of train shard 2 inverted (the size stays)."""
    shutil.copytree(shards, copy)
    with open(copy / "train" / "shard-000002.tar", "r+b") as f:
        for _, _, offset, length, _ in json.loads((copy / "index.json").read_text())["splits"]["train"]["shards"][2]["samples"]:
            f.seek(offset + length // 2)
            b = f.read(1)
            f.seek(-1, io.SEEK_CUR)
            f.write(bytes([b[0] ^ 0xFF]))
    return copy


def _truncate_shard(shards: Path, copy: Path) -> Path:
    shutil.copytree(shards, copy)
    path = copy / "train" / "shard-000001.tar"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 512)
    return copy


BAD = {
    "missing SRC": (lambda f, s, t: ["shard", str(t / "nope"), str(t / "out"), "--shard-size", "5"], "SRC folder"),
    "shard size 0": (lambda f, s, t: ["shard", str(f), str(t / "out"), "--shard-size", "0"], "--shard-size must be a positive"),
    "DST not empty": (lambda f, s, t: ["shard", str(f), str(s), "--shard-size", "5"], "exists and is not an empty folder"),
    "missing DIR": (lambda f, s, t: _train(f"shards:{t / 'nope'}", t / "run"), "shard folder"),
    "corrupt sample": (lambda f, s, t: _train(f"shards:{_flip_image_byte(s, t / 'c')}", t / "run"), "does not match its checksum"),
    "truncated shard": (lambda f, s, t: _train(f"shards:{_truncate_shard(s, t / 'c')}", t / "run"), "shard-000001.tar is corrupt"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_are_one_line_and_exit_2(case: str, folder: Path, shards: Path, tmp_path: Path) -> None:
    argv, text = BAD[case]
    result = run_forked(argv(folder, shards, tmp_path), child_env(tmp_path / "cache"))
    err = lines(result.stderr)
    assert result.returncode == 2 and len(err) == 1 and text in err[0], result.describe()
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Training from shards


def test_training_from_shards_equals_training_in_memory_bitwise(runs: dict[str, Any]) -> None:
    """Same images, seed and order: every logged loss and every final tensor bit for bit."""
    memory, sharded = runs["dirs"]["memory"], runs["dirs"]["shards"]
    for name in ("memory", "shards"):
        assert runs["first"][name].returncode == 0, runs["first"][name].describe()
    m1, m2 = _metrics(memory), _metrics(sharded)
    assert [r["step"] for r in m1] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["lr"]) for r in m1] == [(r["loss"], r["lr"]) for r in m2]
    assert_same_weights(sharded, memory)
    assert json.loads((sharded / "results.json").read_text())["train_images"] == 64


def test_a_killed_run_on_shards_resumes_to_the_unbroken_result(runs: dict[str, Any]) -> None:
    """SIGKILL after step 4 (checkpoint of step 2, mid-epoch), resumed: the steps and final tensors
    of the unbroken run on the shards, bit for bit."""
    killed = runs["dirs"]["killed"]
    assert runs["first"]["killed"].returncode == -9, runs["first"]["killed"].describe()
    assert runs["resumed"].returncode == 0, runs["resumed"].describe()
    assert "resuming" in runs["resumed"].stderr and "from step 2" in runs["resumed"].stderr
    m1, m2 = _metrics(runs["dirs"]["shards"]), _metrics(killed)
    assert [r["step"] for r in m2] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["lr"]) for r in m1] == [(r["loss"], r["lr"]) for r in m2]
    assert_same_weights(killed, runs["dirs"]["shards"])


def test_each_process_reads_its_share_and_a_resumed_stream_only_what_is_left(shards: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stream_batches on shards, 2 processes, from step 2 (mid-epoch): rank r reads exactly the
    samples of its share of steps 2.., in order, once each; and its views are the in-memory
    stream's, bit for bit."""
    memory = load_split(f"imagefolder:{folder}", "train", 16, cache_dir=folder.parent / "cache")
    sharded = load_split(f"shards:{shards}", "train", 16)
    assert isinstance(memory, ImageSplit) and isinstance(sharded, ShardSplit)
    reads: list[int] = []
    original = ShardSplit.read

    def read(self: ShardSplit, i: int) -> bytes:
        reads.append(i)
        return original(self, i)

    monkeypatch.setattr(ShardSplit, "read", read)
    cfg = TrainConfig(batch_size=16, steps=STEPS, seed=3)
    method = get_method("simclr")(tiny_backbone(tiny("simclr"), 16))
    specs = default_views(method, cfg.aug, 16)
    plan = make_plan(cfg, len(sharded), 2, 2)
    cpu = torch.device("cpu")
    for rank in range(2):
        reads.clear()
        common: dict[str, Any] = dict(seed=3, start_step=2, rank=rank, device=cpu)
        from_shards = list(stream_batches(sharded, specs, plan, num_workers=0, **common))
        in_memory = list(stream_batches(memory, specs, plan, **common))
        assert [b[0] for b in from_shards] == [b[0] for b in in_memory] == list(range(2, STEPS))
        wanted = torch.cat([b[2] for b in in_memory]).tolist()
        assert reads == wanted and len(wanted) == (STEPS - 2) * 8
        for (_, views_s, idx_s, boxes_s), (_, views_m, idx_m, boxes_m) in zip(from_shards, in_memory):
            assert torch.equal(idx_s, idx_m)
            assert all(torch.equal(a, b) for a, b in zip(views_s, views_m))
            assert all(torch.equal(a, b) for a, b in zip(boxes_s, boxes_m))


@pytest.mark.slow
def test_two_processes_on_shards_equal_one(tmp_path: Path) -> None:
    """MoCo (queue, momentum encoder) on digits shards: 2 processes (torchrun) compute what 1
    does (sslbench.testing.check_two_processes_equal_one, each process reading its half)."""
    dst = tmp_path / "digits-shards"
    write_shards("digits", dst, 256, image_size=32, cache_root=tmp_path / "cache")
    check_two_processes_equal_one("moco", args=["--data", f"shards:{dst}"], backbone=tiny("moco"), workdir=tmp_path / "runs")
