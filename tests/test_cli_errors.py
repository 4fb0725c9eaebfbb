"""Every mistake a user can make: one line on stderr, exit code 2, no traceback (issue 7).

The table runs each case as a separate process: forked children running ``sslbench.cli.main``
(tests/_reliability.py; no import cost), and a few of them again through ``python -m sslbench``
(the real entry point, import-time warnings included). Cases that need data use a 64-image folder
at 16 px; the ones that need a run directory share one 2-step run.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from _reliability import TINY, child_env, lines, make_image_folder, run_forked, run_many, run_subprocess
from PIL import Image

# --------------------------------------------------------------------------------------------
# The table: id -> (argv with {placeholders}, key phrases the one stderr line must contain)

CASES: dict[str, tuple[list[str], list[str]]] = {
    # names, with suggestions
    "unknown-method": (["train", "--method", "simclrr"], ["unknown method 'simclrr'", "did you mean 'simclr'"]),
    "unknown-backbone": (["train", "--backbone", "resnet181"], ["unknown backbone 'resnet181'", "'resnet18'"]),
    "unknown-data": (["train", "--data", "cifar11"], ["unknown data set 'cifar11'", "'cifar10'"]),
    "unknown-key": (["train", "--set", "temprature=0.1"], ["unknown config key 'temprature'", "temperature"]),
    "unknown-aug-key": (["train", "--set", "aug.crop_scal=0.5,1"], ["unknown config key 'aug.crop_scal'", "aug.crop_scale"]),
    "unknown-section": (["train", "--set", "foo.bar=1"], ["unknown config section 'foo'"]),
    "unknown-flag": (["train", "--bogus"], ["unrecognized arguments: --bogus"]),
    "unknown-list": (["list", "widgets"], ["invalid choice: 'widgets'"]),
    # types
    "batch-size-abc": (["train", "--batch-size", "abc"], ["--batch-size", "invalid int value: 'abc'"]),
    "set-lr-abc": (["train", "--set", "lr=abc"], ["lr expects float, got 'abc'"]),
    "set-no-equals": (["train", "--set", "lr"], ["--set expects key=value"]),
    "epochs-and-steps": (["train", "--epochs", "1", "--steps", "2"], ["not allowed with argument"]),
    # ranges and choices
    "negative-lr": (["train", "--lr", "-0.1"], ["lr must be > 0"]),
    "temperature-zero": (["train", "--set", "temperature=0"], ["temperature must be > 0"]),
    "steps-zero": (["train", "--steps", "0"], ["steps must be > 0"]),
    "batch-size-zero": (["train", "--batch-size", "0"], ["batch_size must be > 0"]),
    "precision-fp8": (["train", "--precision", "fp8"], ["precision must be one of", "'fp8'"]),
    "optimizer-adam": (["train", "--optimizer", "adam"], ["optimizer must be one of", "adamw", "'adam'"]),
    "crop-scale-reversed": (["train", "--set", "aug.crop_scale=0.5,0.1"], ["aug.crop_scale must satisfy"]),
    "flip-probability": (["train", "--set", "aug.flip_p=1.5"], ["aug.flip_p is a probability"]),
    "nonfinite-choice": (["train", "--set", "nonfinite=ignore"], ["nonfinite must be one of"]),
    "keep-zero": (["train", "--set", "keep_checkpoints=0"], ["keep_checkpoints must be >= 1"]),
    "vit-image-size-4": (["train", "--backbone", "vit_tiny_patch16_224", "--image-size", "4"], ["image_size 4 is too small"]),
    "resnet-1px": (["train", "--image-size", "1"], ["image_size 1 is too small"]),
    "batch-size-1-simclr": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--batch-size", "1", "--output", "{tmp}/b1"],
        ["batch size 1 is too small for simclr"],
    ),
    "image-below-stride": (
        [
            "train",
            "--data",
            "imagefolder:{data}",
            "--backbone",
            "efficientnet_b0",
            "--image-size",
            "16",
            "--batch-size",
            "16",
            "--output",
            "{tmp}/eff",
        ],
        ["too small for efficientnet_b0", "downsamples by 32"],
    ),
    "backbone-bad-kwarg": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--set", "backbone_kwargs.bogus_kw=1", "--output", "{tmp}/kw"],
        ["rejected backbone_kwargs", "bogus_kw"],
    ),
    "backbone-kwarg-breaks-forward": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--set", "backbone_kwargs.in_chans=1", "--output", "{tmp}/kw1"],
        ["forward pass fails", "check backbone_kwargs"],
    ),
    "backbone-kwarg-bad-value": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--set", "backbone_kwargs.drop_rate=abc", "--output", "{tmp}/kw2"],
        ["forward pass fails", "'abc'"],
    ),
    # found by an audit (2026-11-23): each was a traceback, a wrong message or a silent change
    "set-a-whole-section": (["train", "--set", "aug=1"], ["aug is a section", "--set aug.KEY=VALUE"]),
    "set-infinite-int": (["train", "--set", "batch_size=1e400"], ["batch_size expects a finite int"]),
    "seed-negative": (["train", "--seed", "-1"], ["seed must be in 0..4294967295"]),
    "seed-too-large": (["train", "--set", "seed=4294967296"], ["seed must be in 0..4294967295"]),
    "sgd-momentum-negative": (["train", "--set", "sgd_momentum=-1"], ["sgd_momentum must be in [0, 1)"]),
    "num-workers-negative": (["train", "--set", "num_workers=-1"], ["num_workers and max_skipped_steps must be >= 0"]),
    "config-section-not-mapping": (["train", "--config", "{section_yaml}"], ["method_cfg in the config file must be a mapping", "5"]),
    "config-number-key": (["train", "--config", "{intkey_yaml}"], ["unknown config key '1'"]),
    "config-not-utf8": (["train", "--config", "{binary_yaml}"], ["is not UTF-8 text"]),
    "config-a-directory": (["train", "--config", "{tmp}"], ["is a directory"]),
    "resume-other-method": (["train", "--resume", "--output", "{run}", "--method", "byol"], ["was trained with simclr", "cannot change method"]),
    "resume-before-the-checkpoint": (
        ["train", "--resume", "--output", "{run}", "--steps", "1"],
        ["newest checkpoint is at step 2, beyond this run's 1 steps", "--steps 2"],
    ),
    "compare-owns-seed": (
        ["compare", "--methods", "simclr", "--steps", "1", "--set", "seed=5", "--output", "{tmp}/cmp"],
        ["--set seed=... is set by compare itself", "--seeds"],
    ),
    "eval-device-bogus": (["eval", "{run}", "--device", "foo"], ["--device 'foo' is not a device"]),
    "eval-a-file": (["eval", "{file}"], ["is a file; pass a run directory"]),
    "eval-results-into-config": (["eval", "{run}", "--results", "{run}/config.yaml"], ["must be a .jsonl file"]),
    "leaderboard-over-its-input": (["leaderboard", "{results}", "--output", "{results}"], ["would overwrite a results store"]),
    "leaderboard-no-rows": (["leaderboard", "{garbage_jsonl}"], ["holds no result rows"]),
    "leaderboard-plot-suffix": (["leaderboard", "{results}", "--plot", "{tmp}/board.txt"], ["name the image with one of the suffixes", "png"]),
    # data
    "data-missing": (["train", "--data", "imagefolder:/nonexistent/images", "--output", "{tmp}/nodata"], ["/nonexistent/images does not exist"]),
    "data-no-images": (["train", "--data", "imagefolder:{empty}", "--output", "{tmp}/empty"], ["has no images"]),
    "data-no-test-split": (["train", "--data", "imagefolder:{trainonly}", "--output", "{tmp}/trainonly"], ["has no test (or val) folder"]),
    "data-all-corrupt": (["train", "--data", "imagefolder:{corrupt}", *TINY, "--output", "{tmp}/corrupt"], ["no readable image in"]),
    "data-spec-no-path": (["train", "--data", "imagefolder:"], ["needs a path"]),
    # files and directories
    "output-under-a-file": (
        ["train", "--data", "imagefolder:{data}", "--output", "{file}/run"],
        ["cannot write to output directory", "Not a directory"],
    ),
    "output-holds-a-run": (["train", "--data", "imagefolder:{data}", *TINY, "--output", "{run}"], ["already holds a run", "--resume"]),
    "resume-without-output": (["train", "--resume"], ["--resume needs --output"]),
    "resume-not-a-run": (["train", "--resume", "--output", "{tmp}"], ["has no config.yaml"]),
    "resume-other-backbone": (
        ["train", "--resume", "--output", "{run_other_backbone}", "--quiet"],
        ["was made for a different model", "shape mismatches"],
    ),
    "config-missing": (["train", "--config", "{tmp}/missing.yaml"], ["missing.yaml not found"]),
    "config-malformed": (["train", "--config", "{bad_yaml}"], ["is not valid YAML"]),
    "config-not-a-mapping": (["train", "--config", "{list_yaml}"], ["must hold a mapping"]),
    "config-unknown-key": (["train", "--config", "{typo_yaml}"], ["unknown config key 'lrr'", "lr"]),
    # eval
    "eval-label-fraction": (["eval", "{run}", "--protocol", "finetune", "--label-fractions", "1.5"], ["label fraction", "1.5"]),
    "eval-unknown-protocol": (["eval", "{run}", "--protocol", "knnn"], ["unknown protocol 'knnn'", "'knn'"]),
    "eval-not-a-run": (["eval", "{tmp}/nothing-here"], ["nothing-here"]),
    "eval-encoder-mismatch": (["eval", "{eval_other_backbone}", "--protocol", "knn"], ["does not match the backbone"]),
}

# also run through `python -m sslbench` (the real entry point and its imports)
SUBPROCESS_CASES = ("unknown-method", "batch-size-abc", "resume-other-backbone")


def _train_run(data: Path, out: Path, env: dict[str, str]) -> None:
    r = run_forked(
        ["train", "--method", "simclr", "--data", f"imagefolder:{data}", "--steps", "2", *TINY, "--set", "quick_knn=false", "--output", str(out)], env
    )
    assert r.returncode == 0, r.describe()


def _with_other_backbone(run: Path, copy: Path) -> Path:
    """A copy of ``run`` whose config.yaml asks for other widths than its checkpoints and encoder hold."""
    shutil.copytree(run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["backbone_kwargs"]["channels"] = [16, 32, 64, 128]
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    return copy


def _write_odd_images(folder: Path, rng: np.random.Generator) -> int:
    """RGB, grayscale, grayscale+alpha, RGBA, palette with transparency, 16-bit grayscale and CMYK
    images (all must be converted to RGB) plus two unreadable files; returns the readable count."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(rgb[..., :2], "LA").save(folder / "gray_alpha.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA").save(folder / "rgba.png")
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 200).save(folder / "gray16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    good = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    return 7


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Run the whole table (and the subprocess subset) once; tests look up their case."""
    root = tmp_path_factory.mktemp("cli")
    env = child_env(root / "cache")
    data = make_image_folder(root / "data")
    run = root / "run"
    _train_run(data, run, env)

    empty = root / "empty"
    for split in ("train", "test"):
        (empty / split / "c0").mkdir(parents=True)
    trainonly = root / "trainonly"
    make_image_folder(trainonly, classes=2, train=2, test=0)
    shutil.rmtree(trainonly / "test")
    corrupt = root / "corrupt"
    for split in ("train", "test"):
        (corrupt / split / "c0").mkdir(parents=True)
        (corrupt / split / "c0" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    a_file = root / "a-regular-file"
    a_file.write_text("not a directory")
    (root / "bad.yaml").write_text("lr: [0.1\nsteps: 3\n")
    (root / "list.yaml").write_text("- lr\n- 0.1\n")
    (root / "typo.yaml").write_text("lrr: 0.1\n")
    (root / "section.yaml").write_text("method_cfg: 5\n")
    (root / "intkey.yaml").write_text("1: 2\n")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    results = root / "results.jsonl"
    results.write_text('{"method": "simclr", "backbone": "resnet18", "data": "digits", "metrics": {"knn_top1": 50.0}}\n')
    (root / "garbage.jsonl").write_text("garbage\n")
    tmp = root / "scratch"
    tmp.mkdir()
    fill = {
        "data": data,
        "empty": empty,
        "trainonly": trainonly,
        "corrupt": corrupt,
        "file": a_file,
        "run": run,
        "tmp": tmp,
        "bad_yaml": root / "bad.yaml",
        "list_yaml": root / "list.yaml",
        "typo_yaml": root / "typo.yaml",
        "section_yaml": root / "section.yaml",
        "intkey_yaml": root / "intkey.yaml",
        "binary_yaml": root / "binary.yaml",
        "results": results,
        "garbage_jsonl": root / "garbage.jsonl",
        "run_other_backbone": _with_other_backbone(run, root / "run-other-backbone"),
        "eval_other_backbone": _with_other_backbone(run, root / "eval-other-backbone"),
    }
    argv = {case: [a.format(**fill) for a in args] for case, (args, _) in CASES.items()}
    with ThreadPoolExecutor(2) as pool:
        real = {case: pool.submit(run_subprocess, argv[case], env) for case in SUBPROCESS_CASES}
        results = run_many({case: (args, env, None) for case, args in argv.items()})
        subprocess_results = {case: f.result() for case, f in real.items()}
    return {"results": results, "subprocess": subprocess_results, "fill": fill, "env": env}


def _assert_one_line_error(r, phrases) -> None:
    assert r.returncode == 2, r.describe()
    assert "Traceback" not in r.stderr, r.describe()
    err = lines(r.stderr)
    assert len(err) == 1, r.describe()
    assert err[0].startswith("sslbench: error: "), r.describe()
    for phrase in phrases:
        assert phrase in err[0], f"{phrase!r} not in: {err[0]}"


def test_table_has_enough_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_and_exit_code_2(table, case):
    _assert_one_line_error(table["results"][case], CASES[case][1])


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_user_error_through_python_m_sslbench(table, case):
    _assert_one_line_error(table["subprocess"][case], CASES[case][1])


def test_nothing_half_written_by_failed_commands(table):
    fill = table["fill"]
    assert sorted(p.name for p in fill["tmp"].iterdir()) == []  # failing runs leave no directories behind
    other = fill["run_other_backbone"]
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["step-00000002"]  # untouched
    assert not any(p.name.startswith(".tmp") for p in (other / "checkpoints").iterdir())
    # the refused resume, eval --results and leaderboard --output left the files they named intact
    run = fill["run"]
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    assert fill["results"].read_text().startswith('{"method": "simclr"')


def test_debug_shows_the_traceback(table):
    r = run_forked(["--debug", "train", "--method", "simclrr"], table["env"])
    assert r.returncode == 1 and "Traceback" in r.stderr and "UserError: unknown method 'simclrr'" in r.stderr, r.describe()


def test_a_real_bug_keeps_its_traceback(table):
    def bug() -> None:
        import sslbench.cli

        def broken(args):
            raise KeyError("a bug, not a user error")

        sslbench.cli.cmd_list = broken

    r = run_forked(["list", "methods"], table["env"], before=bug)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError" in r.stderr, r.describe()


def test_disk_full_while_writing_results_keeps_the_previous_file(table, tmp_path):
    """ENOSPC while writing results.json (patched ``open`` in the child): exit 2, one error line,
    the previous results.json intact and no temporary file left."""
    run = tmp_path / "run"
    shutil.copytree(table["fill"]["run"], run)
    before = (run / "results.json").read_bytes()

    def disk_full() -> None:
        real_open = builtins.open

        class Full:
            def __init__(self, f, name):
                self.f, self.name = f, name

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)

            def __getattr__(self, attr):
                return getattr(self.f, attr)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)).startswith("results.json") and "w" in mode:
                return Full(f, os.fspath(file))
            return f

        builtins.open = fake_open

    r = run_forked(["train", "--output", str(run), "--resume", "--quiet"], table["env"], before=disk_full)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.describe()
    errors = [line for line in lines(r.stderr) if line.startswith("sslbench: error")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "results.json" in errors[0], r.describe()
    assert "--resume" in errors[0]
    assert [line for line in lines(r.stderr) if not line.startswith("sslbench: error")] == [f"resuming {run} from step 2 (step-00000002)"]
    assert (run / "results.json").read_bytes() == before
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_corrupt_grayscale_and_alpha_images_train_with_a_count(table, tmp_path):
    """Unreadable files are skipped and counted in one warning; grayscale, alpha, palette, 16-bit
    and CMYK images are converted to RGB; training works."""
    rng = np.random.default_rng(1)
    root = tmp_path / "odd"
    for split in ("train", "test"):
        for c in ("a", "b"):
            _write_odd_images(root / split / c, rng)
    r = run_forked(
        [
            "train",
            "--data",
            f"imagefolder:{root}",
            "--steps",
            "2",
            *TINY,
            "--batch-size",
            "8",
            "--set",
            "quick_knn=false",
            "--output",
            str(tmp_path / "run"),
        ],
        table["env"],
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.describe()
    warnings = [line for line in lines(r.stderr) if "unreadable" in line]
    assert len(warnings) == 1 and "skipped 4 unreadable image(s)" in warnings[0], r.describe()
    assert (tmp_path / "run" / "encoder.safetensors").is_file()


def test_environment_oserrors_are_one_line_and_bugs_are_not(table):
    from sslbench.cli import _environment_error

    assert "No space left on device" in _environment_error(OSError(errno.ENOSPC, "No space left on device"))
    assert "Permission denied: /data/x" in _environment_error(PermissionError(errno.EACCES, "Permission denied", "/data/x"))
    assert _environment_error(OSError(errno.EBADF, "Bad file descriptor")) is None  # a bug: keeps its traceback
    assert _environment_error(FileNotFoundError(errno.ENOENT, "No such file or directory")) is None  # no path: a bug
    assert _environment_error(RuntimeError("shape mismatch")) is None

    def read_only_cache() -> None:  # an OSError from deep inside, not wrapped in a UserError
        import sslbench.run_setup

        def load_split(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", "/cache/decoded/x.pt")

        sslbench.run_setup.load_split = load_split

    r = run_forked(
        ["train", "--data", "imagefolder:{}".format(table["fill"]["data"]), *TINY, "--output", str(table["fill"]["tmp"] / "rofs")],
        table["env"],
        before=read_only_cache,
    )
    _assert_one_line_error(r, ["Read-only file system: /cache/decoded/x.pt"])
