"""``hf:`` data specs: Hugging Face datasets from the hub, from disk, from data files and image folders.

Accepted forms (:data:`HF_FORMS`; every loading error names them):

- ``hf:NAME``: a hub data set (``?config=CONFIG`` names one of its configurations);
- ``hf:DIR`` written by ``save_to_disk`` (a ``DatasetDict`` or a single ``Dataset``);
- ``hf:FILE`` ending in ``.parquet``, ``.csv``, ``.tsv``, ``.json``, ``.jsonl`` or ``.arrow``: read
  by the datasets library's own builder of that format;
- ``hf:DIR`` holding such files: splits from the file and folder names as the datasets library
  assigns them (``train*``, ``test*``, ...; anything else is one ``train`` split); the most common
  format is read, other files are ignored;
- ``hf:DIR`` holding images (and no data files): datasets' ``imagefolder`` builder (labels from
  the class folder names; ``train/`` and ``test/`` folders become the splits).

Options: ``?image=COL&label=COL&train=SPLIT&test=SPLIT&config=NAME&heldout=FRACTION&split_seed=N``.
The image column is found by type (the one ``Image`` column) or by name (``image``, ``img``,
``path``, ``file_name``, ...). It may hold encoded bytes, ``{'bytes', 'path'}`` records, or file
paths (relative paths are taken from the data file's folder, else the current directory). Labels
are a ``ClassLabel`` or plain values (classes: their sorted distinct values).

Held-out split. A data set with one split (one data file, one ``train`` folder, a single saved
``Dataset``) is split into a class-balanced held-out ``test`` part, ``heldout`` of each class
(default 0.2, at least one image of a class with two or more, never all of it), drawn with
``split_seed`` (default 0) and independent of the run's seed, so that every run on the same data
is scored on the same images. The rest is ``train``. :func:`heldout_record` describes the split
made for a spec; :func:`sslbench.results.make_row` adds it to every result row as ``heldout``.
"""

from __future__ import annotations

import hashlib
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sslbench.core.errors import UserError
from sslbench.data.cache import _cached, _decode_split, _fingerprint
from sslbench.data.decode import _did_you_mean, _one_line
from sslbench.data.splits import ImageSplit, _check_memory

__all__ = ["HF_FORMS", "HF_OPTIONS", "heldout_indices", "heldout_record", "load_hf"]

HF_FORMS = (
    "accepted: hf:NAME[?config=CONFIG] (hub), hf:DIR (save_to_disk folder, folder of data files, or image folder), "
    "hf:FILE.parquet|.csv|.tsv|.json|.jsonl|.arrow"
)
HF_OPTIONS = ("image", "label", "train", "test", "config", "heldout", "split_seed")
DEFAULT_HELDOUT = 0.2

#: Data-file endings -> (datasets builder, builder keyword arguments).
FILE_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
}
_IMAGE_COLUMN_NAMES = ("image", "img", "picture", "image_path", "path", "file_name", "filename", "file", "image_file")
_LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target")

#: Held-out splits made in this process: spec -> record (see :func:`heldout_record`).
_HELDOUT: dict[str, dict[str, Any]] = {}


def heldout_record(spec: str) -> dict[str, Any] | None:
    """How the held-out split of ``spec`` was made in this process (``None`` when the data set has
    its own test split or was not loaded): ``from_split``, ``fraction``, ``seed``, ``train_size``,
    ``test_size`` and ``test_indices_sha256`` (of the sorted held-out row indices)."""
    record = _HELDOUT.get(spec.strip())
    return dict(record) if record is not None else None


def heldout_indices(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted int64 indices of a class-balanced held-out part of ``labels``, fixed by ``seed``:
    ``round(fraction * n)`` of each class of ``n`` images, at least 1 when ``n >= 2`` and at most
    ``n - 1`` (a class of one image stays in training)."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.to(torch.int64).cpu()
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        n = members.numel()
        take = 0 if n < 2 else min(n - 1, max(1, int(fraction * n + 0.5)))
        chosen.append(members[torch.randperm(n, generator=gen)[:take]])
    return torch.sort(torch.cat(chosen)).values if chosen else torch.empty(0, dtype=torch.int64)


class _HFImages(Sequence[Any]):
    """One image column of a Hugging Face dataset as a sequence of undecoded sources for
    :func:`sslbench.data._open_rgb` (bytes, ``{'bytes', 'path'}`` dicts or paths), so bad images
    are skipped like bad files. Relative paths are resolved against ``base`` when they exist there."""

    def __init__(self, ds: Any, column: str, base: Path | None) -> None:
        self.ds, self.column, self.base = ds, column, base

    def __len__(self) -> int:
        return len(self.ds)

    def _source(self, value: Any) -> Any:
        if isinstance(value, str) and self.base is not None and not Path(value).is_absolute():
            candidate = self.base / value
            return str(candidate) if candidate.exists() else value
        return value

    def __getitem__(self, index: Any) -> Any:  # int -> one item, slice -> list (read as one batch)
        if isinstance(index, slice):
            return [self._source(v) for v in self.ds[index][self.column]]
        return self._source(self.ds[index][self.column])


def _parse_options(arg: str) -> tuple[str, dict[str, str]]:
    """``'NAME?k=v&...'`` -> ``(NAME, {k: v})``, unknown keys rejected."""
    name, _, query = arg.partition("?")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as err:
        raise UserError(f"bad options {query!r} in hf:{arg}; write hf:NAME?{'=..&'.join(HF_OPTIONS)}=..") from err
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in HF_OPTIONS:
            raise UserError(f"unknown option {key!r} in hf:{arg}{_did_you_mean(key, HF_OPTIONS)}; valid: {', '.join(HF_OPTIONS)}")
        options[key] = value
    return name.strip(), options


def _heldout_options(arg: str, options: dict[str, str]) -> tuple[float, int]:
    try:
        fraction = float(options.get("heldout", DEFAULT_HELDOUT))
        seed = int(options.get("split_seed", 0))
    except ValueError:
        raise UserError(f"hf:{arg}: heldout must be a fraction in (0, 1) and split_seed an int, e.g. ?heldout=0.2&split_seed=0") from None
    if not 0.0 < fraction < 1.0 or not 0 <= seed < 2**63:
        raise UserError(f"hf:{arg}: heldout must be a fraction in (0, 1) and split_seed an int >= 0, got {fraction} and {seed}")
    return fraction, seed


def _looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path (so a missing one is an error, not a hub name)."""
    return name.startswith(("/", "./", "../", "~", "\\")) or Path(name).suffix.lower() in FILE_BUILDERS or name in (".", "..")


def _is_builder_name(name: str) -> bool:
    """Whether ``name`` is one of the datasets library's own builders (``parquet``, ``csv``,
    ``imagefolder``, ...), which ``load_dataset`` runs on the current directory when given no files."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as builders
    except ImportError:
        builders = {b for b, _ in FILE_BUILDERS.values()} | {"imagefolder", "audiofolder", "text", "webdataset", "pandas"}
    return name.strip().lower() in builders


def _data_files(folder: Path) -> tuple[str, dict[str, Any], dict[str, list[str]]] | None:
    """The datasets builder and split -> files for a folder of data files (the most common
    format; splits by the datasets library's own name patterns), or ``None`` when it has none."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    counts: dict[str, int] = {}
    for path in folder.rglob("*"):
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts):
            ext = path.suffix.lower()
            if ext in FILE_BUILDERS:
                counts[ext] = counts.get(ext, 0) + 1
    if not counts:
        return None
    ext = max(counts, key=lambda e: (counts[e], e))
    builder, kwargs = FILE_BUILDERS[ext]
    patterns = get_data_patterns(str(folder))
    files = DataFilesDict.from_patterns(patterns, base_path=str(folder), allowed_extensions=[ext])
    split_files = {str(split): [str(f) for f in found] for split, found in files.items() if len(found)}
    return (builder, kwargs, split_files) if split_files else None


def _open(name: str, options: dict[str, str], cache_root: Path) -> tuple[Any, Path | None, str]:
    """Load ``name`` as a datasets ``DatasetDict`` (or ``Dataset``); returns it, the folder that
    relative image paths are taken from, and a stable description of the source for the cache."""
    import datasets

    local = Path(name).expanduser()
    config = options.get("config") or None
    hf_cache = str(cache_root / "hf-datasets")
    if config and (local.exists() or _looks_local(name)):
        raise UserError(f"hf:{name}: ?config= names a configuration of a hub data set, not of a local path; {HF_FORMS}")
    try:
        if local.is_file():
            builder_kwargs = FILE_BUILDERS.get(local.suffix.lower())
            if builder_kwargs is None:
                raise UserError(f"hf:{name}: {local.suffix or 'files without an ending'} not read; {HF_FORMS}")
            builder, kwargs = builder_kwargs
            dsd = datasets.load_dataset(builder, data_files=str(local.resolve()), cache_dir=hf_cache, **kwargs)
            return dsd, local.resolve().parent, str(local.resolve())
        if local.is_dir():
            root = local.resolve()
            if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
                return datasets.load_from_disk(str(root)), root, str(root)
            found = _data_files(root)
            if found is not None:
                builder, kwargs, split_files = found
                return datasets.load_dataset(builder, data_files=split_files, cache_dir=hf_cache, **kwargs), root, f"{builder}:{root}"
            from sslbench.data.decode import IMAGE_EXTENSIONS

            if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*") if p.is_file()):
                raise UserError(f"hf:{name}: folder {root} holds no data files or images; {HF_FORMS}")
            return datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=hf_cache), root, f"imagefolder:{root}"
        if _looks_local(name):
            raise UserError(f"hf:{name}: no such file or folder; {HF_FORMS}")
        if _is_builder_name(name):  # datasets would read every file under the current directory as that format
            raise UserError(
                f"hf:{name} names the datasets library's {name!r} format, not a data set (and there is no file or folder {name!r} here); "
                f"pass the data itself: hf:FILE (e.g. hf:data/train.parquet) or hf:DIR of data files; {HF_FORMS}"
            )
        from sslbench.core.hub import hub_access, offline_reason

        with hub_access() as offline:
            try:
                return datasets.load_dataset(name, config), None, f"{name}/{config or ''}"
            except Exception as err:
                reason = offline_reason(err, offline)
                if reason is None:
                    raise
                raise UserError(
                    f"cannot load Hugging Face dataset {name!r} ({reason}); where there is a network run "
                    f"python -c \"import datasets; datasets.load_dataset('{name}').save_to_disk('DIR')\", copy DIR here "
                    "and pass --data hf:DIR (or use imagefolder:PATH)"
                ) from err
    except UserError:
        raise
    except Exception as err:  # hub, network, file format: all mean "cannot load this"
        cause = f"{_one_line(err)}" + (f" <- {_one_line(err.__cause__)}" if err.__cause__ is not None else "")
        raise UserError(f"could not load hf:{name}{f' (config {config})' if config else ''} ({cause[:400]}); {HF_FORMS}") from err


def _column(ds: Any, name: str, role: str, is_kind: Callable[[Any], bool], names: tuple[str, ...]) -> str:
    """Pick the ``role`` column: the single one of the right feature type, else a conventional name."""
    typed = [str(c) for c, f in ds.features.items() if is_kind(f)]
    if len(typed) == 1:
        return typed[0]
    lower = {str(c).lower(): str(c) for c in (typed or ds.column_names)}
    named = [lower[c] for c in names if c in lower]
    if named:
        return named[0]
    raise UserError(f"hf:{name}: cannot tell which column holds the {role} (columns: {', '.join(ds.column_names)}); name it with ?{role}=COLUMN")


def load_hf(arg: str, split: str, size: int, cache_root: Path, max_memory_gb: float) -> ImageSplit:
    """The ``split`` ('train' or 'test') of the ``hf:`` spec ``hf:{arg}`` (see the module docstring)."""
    sources, labels, classes, where, key, cache_files = hf_sources(arg, split, cache_root)
    _check_memory(len(sources), size, max_memory_gb, where)

    def build() -> ImageSplit:
        return _decode_split(sources, labels, classes, size, lambda i: f"row {i}", where)

    if not cache_files:  # an in-memory dataset has no files to key a cache on
        return build()
    return _cached(cache_root, key, split, size, _fingerprint(cache_files), build)


def hf_sources(arg: str, split: str, cache_root: Path) -> tuple[Sequence[Any], Tensor, list[str], str, str, list[str]]:
    """The ``split`` of ``hf:{arg}`` undecoded: (image sources for :func:`sslbench.data.decode._open_rgb`,
    int64 labels, classes, where (for messages), the decode-cache key, the dataset's cache files)."""
    import datasets

    name, options = _parse_options(arg)
    if not name:
        raise UserError(f"data spec hf:{arg} needs a name: write hf:NAME; {HF_FORMS}")
    dsd, base, source = _open(name, options, cache_root)
    if isinstance(dsd, datasets.Dataset):
        dsd = datasets.DatasetDict({"train": dsd})
    if not isinstance(dsd, datasets.DatasetDict) or not dsd:
        raise UserError(f"hf:{name} is not a data set with named splits ({type(dsd).__name__}); {HF_FORMS}")

    heldout = len(dsd) == 1 and not options.get("test")
    if not heldout and ("heldout" in options or "split_seed" in options):
        raise UserError(f"hf:{name} has a test split of its own (splits: {', '.join(dsd)}); ?heldout= and ?split_seed= apply to data with one split")
    if heldout:
        wanted = options.get("train") or next(iter(dsd))
    else:
        wanted = options.get(split) or ("train" if split == "train" else next((s for s in ("test", "validation") if s in dsd), "test"))
    if wanted not in dsd:
        raise UserError(f"hf:{name} has no split {wanted!r}{_did_you_mean(wanted, list(dsd))}; splits: {', '.join(dsd)}; choose with ?{split}=SPLIT")
    ds = dsd[wanted]
    if source.startswith("imagefolder:") and not options.get("label") and not any(isinstance(f, datasets.ClassLabel) for f in ds.features.values()):
        raise UserError(
            f"hf:{name}: the image folder's images are all in one class folder (or in none), so the datasets library gives them no label "
            "column; put each class in a folder of its own (two or more classes), or pass --data imagefolder:PATH, which trains on a single class"
        )
    image_col = options.get("image") or _column(ds, name, "image", lambda f: isinstance(f, datasets.Image), _IMAGE_COLUMN_NAMES)
    label_col = options.get("label") or _column(ds, name, "label", lambda f: isinstance(f, datasets.ClassLabel), _LABEL_COLUMN_NAMES)
    for role, col in (("image", image_col), ("label", label_col)):
        if col not in ds.column_names:
            raise UserError(
                f"hf:{name} split {wanted!r} has no column {col!r}{_did_you_mean(col, ds.column_names)}; columns: {', '.join(ds.column_names)}; choose with ?{role}=COLUMN"
            )
    ds = ds.select_columns([image_col, label_col])
    _check_image_paths(ds, image_col, base, name)
    if isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    classes, labels = _labels(dsd, ds, name, wanted, split, label_col)

    rows: Tensor | None = None
    key = f"hf:{source}?image={image_col}&label={label_col}&split={wanted}"
    if heldout:
        fraction, seed = _heldout_options(arg, options)
        test_rows = heldout_indices(labels, fraction, seed)
        if len(test_rows) == 0:
            raise UserError(f"hf:{name} has one split and no class with two or more images: nothing to hold out for evaluation; add a test split")
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[test_rows] = False
        train_rows = torch.nonzero(keep).flatten()
        _HELDOUT[f"hf:{arg}"] = {
            "from_split": wanted,
            "fraction": fraction,
            "seed": seed,
            "train_size": len(train_rows),
            "test_size": len(test_rows),
            "test_indices_sha256": hashlib.sha256(test_rows.numpy().tobytes()).hexdigest()[:16],
        }
        rows = test_rows if split == "test" else train_rows
        ds, labels = ds.select(rows.tolist()), labels[rows]
        key += f"&heldout={fraction}&split_seed={seed}&part={split}"
    if len(ds) == 0:
        raise UserError(f"hf:{name} split {wanted!r} is empty; choose another with ?{split}=SPLIT")
    where = f"hf:{name} split {wanted!r}" + (f" ({split} part of the held-out split)" if rows is not None else "")
    cache_files = [str(Path(f["filename"]).resolve()) for f in dsd[wanted].cache_files]
    return _HFImages(ds, image_col, base), labels, classes, where, key, cache_files


def _check_image_paths(ds: Any, column: str, base: Path | None, name: str) -> None:
    """An image column of file paths (a CSV's) of which not one exists is the cause of whatever
    would fail next (no readable image, no class to hold out): say so, with the first path."""
    if len(ds) == 0 or not isinstance(ds[0][column], str):
        return
    images = _HFImages(ds, column, base)
    if any(Path(images[i]).exists() for i in range(len(ds))):  # (stops at the first that exists)
        return
    where = f"{base} (the data file's folder) and " if base is not None else ""
    raise UserError(
        f"hf:{name}: none of the {len(ds)} image files in column {column!r} exists (first: {ds[0][column]!r}, looked for in {where}"
        f"the current directory {Path.cwd()}); correct the paths in the data file, or run from the folder they are relative to"
    )


def _labels(dsd: Any, ds: Any, name: str, wanted: str, split: str, label_col: str) -> tuple[list[str], Tensor]:
    """Class names and int64 labels of ``ds``: a ``ClassLabel``'s names, or the sorted distinct
    values of the label column over all splits."""
    import datasets

    feature = ds.features[label_col]
    raw = list(ds[label_col])
    if isinstance(feature, datasets.ClassLabel):
        labels = torch.tensor(raw, dtype=torch.int64)
        if labels.numel() and int(labels.min()) < 0:
            raise UserError(f"hf:{name} split {wanted!r} has unlabelled rows (label -1); choose a labelled split with ?{split}=SPLIT")
        return [str(c) for c in feature.names], labels
    values_seen = [v for s in dsd.values() if label_col in s.column_names for v in list(s[label_col])]
    if any(v is None for v in values_seen):
        raise UserError(f"hf:{name} has rows without a label in column {label_col!r}; fill them or choose another with ?label=COLUMN")
    try:
        distinct = set(values_seen)
    except TypeError:  # lists or dicts
        raise UserError(f"hf:{name}: column {label_col!r} does not hold class labels (unhashable values); choose one with ?label=COLUMN") from None
    try:
        values = sorted(distinct)
    except TypeError:  # mixed types (e.g. 3 and 'cat'): order by their text
        values = sorted(distinct, key=str)
    position = {v: i for i, v in enumerate(values)}
    return [str(v) for v in values], torch.tensor([position[v] for v in raw], dtype=torch.int64)
