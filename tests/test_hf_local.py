"""``--data hf:`` on local parquet/CSV/JSON/arrow files and folders, image folders through datasets'
``imagefolder`` builder, hub names with a config, and the seeded held-out split of one-split data.

Images are 16 px PNGs whose first pixel encodes the row (red) and class (green), so a decoded
split tells which rows it holds.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sslbench.commands.cli import main
from sslbench.core.errors import UserError
from sslbench.data import load_split
from sslbench.data.hf import HF_FORMS, heldout_indices, heldout_record
from sslbench.results import read_rows

CLASSES, PER_CLASS, SIZE = 4, 6, 16
TINY = [
    "--image-size",
    "16",
    "--batch-size",
    "8",
    "--set",
    "backbone_kwargs.channels=8,16,32,64",
    "--precision",
    "no",
    "--quiet",
    "--set",
    "quick_knn=false",
]


def _image(row: int, label: int) -> np.ndarray:
    a = np.random.default_rng(row).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    a[0, 0] = (row, 40 * label, 0)
    return a


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _rows() -> list[tuple[int, int]]:
    """(row, label) pairs, classes interleaved."""
    return [(i, i % CLASSES) for i in range(CLASSES * PER_CLASS)]


def _ids(split) -> list[int]:
    return [int(v) for v in split.images[:, 0, 0, 0].tolist()]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One data set in several forms: parquet (bytes records, int labels), CSV and JSON lines
    (relative image paths, string labels), a saved single Dataset, its arrow file, an image folder."""
    from datasets import Dataset
    from datasets import Image as HFImage

    root = tmp_path_factory.mktemp("hfdata")
    rows = _rows()
    (root / "pics").mkdir()
    paths = []
    for row, label in rows:
        d = root / "folder" / f"class{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(row, label)).save(d / f"{row}.png")
        Image.fromarray(_image(row, label)).save(root / "pics" / f"{row}.png")
        paths.append(f"pics/{row}.png")
    pd.DataFrame({"img": [{"bytes": _png(_image(r, c)), "path": None} for r, c in rows], "label": [c for _, c in rows]}).to_parquet(
        root / "set.parquet"
    )
    pd.DataFrame({"image": paths, "label": [f"class{c}" for _, c in rows]}).to_csv(root / "set.csv", index=False)
    (root / "set.jsonl").write_text("".join(json.dumps({"file_name": p, "target": c}) + "\n" for p, (_, c) in zip(paths, rows)))
    single = Dataset.from_dict({"image": [str(root / p) for p in paths], "label": [c for _, c in rows]}).cast_column("image", HFImage())
    single.save_to_disk(str(root / "saved"))
    return {
        "parquet": root / "set.parquet",
        "csv": root / "set.csv",
        "jsonl": root / "set.jsonl",
        "saved": root / "saved",
        "arrow": next((root / "saved").glob("*.arrow")),
        "folder": root / "folder",
        "root": root,
    }


@pytest.mark.parametrize("form", ["parquet", "csv", "jsonl", "saved", "arrow", "folder"])
def test_each_local_form_loads_with_a_balanced_heldout_split(files, form, tmp_path) -> None:
    spec = f"hf:{files[form]}"
    train = load_split(spec, "train", SIZE, cache_dir=tmp_path)
    test = load_split(spec, "test", SIZE, cache_dir=tmp_path)
    assert len(train.classes) == CLASSES
    assert len(train) == CLASSES * (PER_CLASS - 1) and len(test) == CLASSES  # round(0.2 * 6) = 1 per class
    assert sorted(_ids(train) + _ids(test)) == list(range(CLASSES * PER_CLASS))  # disjoint, nothing lost
    assert sorted(test.labels.tolist()) == list(range(CLASSES))
    # labels line up with the images (green channel = 40 * class, class names sorted)
    assert all(int(img[1, 0, 0]) == 40 * int(train.classes[lab].removeprefix("class")) for img, lab in zip(train.images, train.labels))
    record = heldout_record(spec)
    assert record is not None and record["fraction"] == 0.2 and record["seed"] == 0
    assert (record["train_size"], record["test_size"]) == (len(train), len(test))


def test_heldout_is_disjoint_and_fixed_by_the_split_seed(files, tmp_path) -> None:
    spec = f"hf:{files['parquet']}"
    first = _ids(load_split(spec, "test", SIZE, cache_dir=tmp_path / "a"))
    again = _ids(load_split(spec, "test", SIZE, cache_dir=tmp_path / "b"))  # decoded anew: same rows
    other = _ids(load_split(f"{spec}?split_seed=1", "test", SIZE, cache_dir=tmp_path / "a"))
    train_other = _ids(load_split(f"{spec}?split_seed=1", "train", SIZE, cache_dir=tmp_path / "a"))
    assert first == again and first != other
    assert not set(other) & set(train_other)
    labels = torch.tensor([c for _, c in _rows()])
    for seed in range(5):
        idx = heldout_indices(labels, 0.3, seed)
        assert torch.equal(idx, heldout_indices(labels, 0.3, seed)) and idx.unique().numel() == idx.numel()
        assert torch.bincount(labels[idx]).tolist() == [2] * CLASSES  # round(0.3 * 6) of each class
    assert heldout_indices(torch.tensor([0, 1, 1]), 0.5, 0).tolist() in ([1], [2])  # a lone image stays in training
    half = load_split(f"{spec}?heldout=0.5", "test", SIZE, cache_dir=tmp_path)
    assert len(half) == CLASSES * PER_CLASS // 2


def test_folders_with_their_own_splits_keep_them(files, tmp_path) -> None:
    root = files["root"]
    (root / "split").mkdir()
    df = pd.read_parquet(files["parquet"])
    df.iloc[:16].to_parquet(root / "split" / "train.parquet")
    df.iloc[16:].to_parquet(root / "split" / "test.parquet")
    (root / "split" / "notes.txt").write_text("ignored")
    train = load_split(f"hf:{root / 'split'}", "train", SIZE, cache_dir=tmp_path)
    test = load_split(f"hf:{root / 'split'}", "test", SIZE, cache_dir=tmp_path)
    assert (_ids(train), _ids(test)) == (list(range(16)), list(range(16, 24)))
    assert heldout_record(f"hf:{root / 'split'}") is None
    with pytest.raises(UserError, match="has a test split of its own .* apply to data with one split"):
        load_split(f"hf:{root / 'split'}?heldout=0.3", "test", SIZE, cache_dir=tmp_path)
    for split in ("train", "test"):  # an image folder with train/ and test/ through datasets' imagefolder builder
        for row, label in _rows()[:8]:
            d = root / "tree" / split / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image(row, label)).save(d / f"{row}.png")
    tree = load_split(f"hf:{root / 'tree'}", "test", SIZE, cache_dir=tmp_path)
    assert len(tree) == 8 and tree.classes == [f"class{c}" for c in range(CLASSES)]
    assert heldout_record(f"hf:{root / 'tree'}") is None


def test_hub_name_with_a_config(monkeypatch, tmp_path) -> None:
    import datasets

    calls = []
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": _png(_image(r, c)), "path": None} for r, c in _rows()], "label": [c for _, c in _rows()]}
    ).cast_column("img", datasets.Image())

    def fake_load(name, config=None, **kwargs):
        calls.append((name, config))
        return datasets.DatasetDict({"train": ds, "test": ds.select(range(4))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    test = load_split("hf:someone/pictures?config=small", "test", SIZE, cache_dir=tmp_path)
    assert calls == [("someone/pictures", "small")] and len(test) == 4


@pytest.mark.parametrize("form", ["parquet", "csv", "saved"])
def test_train_and_evaluate_from_the_command_line(files, form, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    spec = f"hf:{files[form]}"
    run = tmp_path / "runs" / form
    assert main(["train", "--method", "simclr", "--data", spec, "--steps", "2", "--output", str(run), *TINY]) == 0
    assert main(["eval", str(run), "--protocol", "knn", "--results", str(tmp_path / "results.jsonl")]) == 0
    (row,) = read_rows(tmp_path / "results.jsonl")
    assert row["data"] == spec and 0.0 <= row["metrics"]["knn_top1"] <= 100.0
    assert row["heldout"] == heldout_record(spec) and row["heldout"]["test_size"] == CLASSES


@pytest.mark.parametrize(
    "spec,phrase",
    [
        ("hf:{root}/missing.parquet", "no such file or folder"),
        ("hf:./no/such/folder", "no such file or folder"),
        ("hf:{root}/set.csv.bak", "not read"),
        ("hf:{root}/empty", "holds no data files or images"),
        ("hf:{root}/set.csv?config=x", "?config= names a configuration of a hub data set"),
        ("hf:{root}/bad.parquet", "could not load"),
        ("hf:{root}/set.csv?heldout=1.5", "heldout must be a fraction in (0, 1)"),
        ("hf:{root}/set.csv?colour=1", "unknown option 'colour'"),
    ],
)
def test_each_failure_is_one_line_naming_the_accepted_forms(files, spec, phrase, tmp_path, monkeypatch, capsys) -> None:
    root = files["root"]
    (root / "empty").mkdir(exist_ok=True)
    (root / "bad.parquet").write_bytes(b"not parquet")
    (root / "set.csv.bak").write_text("x")
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    spec = spec.format(root=root)
    assert main(["train", "--data", spec, "--steps", "1", "--output", str(tmp_path / "run"), *TINY]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sslbench: error:")]
    assert len(err) == 1 and phrase in err[0], err
    if "option" not in phrase and "heldout" not in phrase:  # those name the valid options instead
        assert HF_FORMS in err[0]
    with pytest.raises(UserError):
        load_split(spec, "train", SIZE, cache_dir=tmp_path)
