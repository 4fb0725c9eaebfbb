"""sslbench.core.rundir: the names of a run directory's files and the one atomic writer."""

import ast
import errno
import os
from pathlib import Path

import pytest

from sslbench.core.errors import UserError
from sslbench.core.rundir import RunDir, write_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_run_dir_names_every_file(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    assert run.path == tmp_path / "run" and os.fspath(run) == str(tmp_path / "run") == str(run)
    names = {
        run.config: "config.yaml",
        run.metrics: "metrics.jsonl",
        run.checkpoints: "checkpoints",
        run.encoder: "encoder.safetensors",
        run.method: "method.safetensors",
        run.results: "results.json",
        run.budget: "budget.json",
    }
    assert all(p == tmp_path / "run" / name for p, name in names.items())
    assert run.results_store == tmp_path / "results.jsonl"  # next to the run, where `eval` appends by default
    assert RunDir(tmp_path / "run") == run and hash(RunDir(tmp_path / "run")) == hash(run)
    assert not run.is_finished()
    run.path.mkdir()
    run.results.write_text("{}")
    assert not run.is_finished()
    run.encoder.write_bytes(b"")
    assert run.is_finished()


def test_write_text_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    write_text_atomic(path, "new\n", "unused")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_failed_write_keeps_the_old_file_removes_the_temporary_and_says_how_to_recover(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    seen = []

    def disk_full(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("half")  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(UserError) as err:
        write_atomic(path, disk_full, "free some space and resume")
    msg = str(err.value)
    assert msg == f"cannot write {path} (No space left on device); free some space and resume"
    assert "\n" not in msg
    assert seen[0].parent == tmp_path and seen[0] != path  # the temporary file sits next to the target
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_only_the_named_errors_become_user_errors_and_nothing_is_left_behind(tmp_path):
    path = tmp_path / "table.md"

    def bug(tmp: Path) -> None:
        tmp.write_text("x")
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        write_atomic(path, bug, "unused")
    assert list(tmp_path.iterdir()) == []

    class LibraryError(Exception):
        pass

    def library_error(tmp: Path) -> None:
        tmp.write_text("x")
        raise LibraryError("header too large\n  (details)")

    with pytest.raises(UserError, match=r"cannot write .*table\.md \(header too large \(details\)\); retry"):
        write_atomic(path, library_error, "retry", errors=(OSError, LibraryError))
    assert list(tmp_path.iterdir()) == []


def test_save_encoder_failure_keeps_the_previous_encoder(tmp_path, monkeypatch):
    import safetensors.torch

    from sslbench.backbones import create_backbone, save_encoder

    model = create_backbone("resnet18", 16, channels=(8, 16, 32, 64))
    run = RunDir(tmp_path)
    save_encoder(model, run.encoder, meta={"step": 1})
    before = run.encoder.read_bytes()

    def full(state, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match="No space left on device.*resume"):
        save_encoder(model, run.encoder, meta={"step": 2}, what="resume")
    assert run.encoder.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.safetensors"]


def _imports(path: Path) -> set[str]:
    """Every module an sslbench source file imports (relative imports resolved within sslbench)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "sslbench." * bool(node.level) + (node.module or "")
            out |= {base} | {f"{base}.{a.name}".replace("..", ".") for a in node.names}
    return out


def test_evals_do_not_import_the_trainer():
    evals = sorted((ROOT / "evals").glob("*.py"))
    assert evals
    for path in evals:
        assert not {m for m in _imports(path) if m.startswith("sslbench.train.trainer")}, path


def test_only_rundir_replaces_files():
    """One atomic writer: no other module renames a temporary file over a file (checkpoint.py
    renames whole checkpoint directories, data/shards.py a whole folder of finished shards)."""
    sources = [*(ROOT / "sslbench").rglob("*.py"), *(ROOT / "evals").glob("*.py"), *(ROOT / "backbones").glob("*.py")]
    replacing = sorted(
        p.name for p in sources if "os.replace(" in p.read_text() or ".replace(path)" in p.read_text() or "tmp.replace(" in p.read_text()
    )
    assert replacing == ["checkpoint.py", "rundir.py", "shards.py"]


def test_write_failures_are_told_from_bugs(tmp_path):
    from safetensors import SafetensorError

    from sslbench.core.rundir import write_failure

    assert write_failure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == "No space left on device"
    # safetensors' and torch.save's own errors on a full disk (their texts as they raise them)
    assert write_failure(SafetensorError("Error while serializing: I/O error: File too large (os error 27)")) == "File too large"
    cause = write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), tmp_path / "x.pt")
    assert cause is not None and cause.startswith("torch.save failed") and "MB free on its disk" in cause
    assert write_failure(RuntimeError("shape mismatch")) is None  # a bug keeps its traceback
    assert write_failure(KeyError("x")) is None


def test_check_writable_names_the_output_and_the_cause_and_leaves_nothing(tmp_path):
    from sslbench.core.rundir import check_writable

    a_file = tmp_path / "file"
    a_file.write_text("x")
    check_writable(tmp_path / "new" / "deeper" / "r.jsonl", "--results")  # missing folders are fine: created later
    check_writable(a_file, "--output")  # an existing file is opened for appending, unchanged
    assert a_file.read_text() == "x"
    check_writable(tmp_path / "run", "--output", directory=True)
    with pytest.raises(UserError, match=rf"^cannot write --results {a_file}/r\.jsonl: {a_file} is a file, not a directory; fix it$"):
        check_writable(a_file / "r.jsonl", "--results", fix="fix it")
    with pytest.raises(UserError, match="it is a directory, not a file"):
        check_writable(tmp_path, "--output")
    with pytest.raises(UserError, match="it is a file, not a directory"):
        check_writable(a_file, "--output", directory=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
