"""Issue 12, point 6: one atomic write (temp file beside the target, fsync of the file,
os.replace, fsync of the directory), used by every site that replaces a file whole."""

from __future__ import annotations

import ast
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchflux import fileutil
from batchflux.fileutil import copy_atomic, replace_atomic, write_atomic, write_json_atomic

PACKAGE = Path(__file__).resolve().parent.parent / "batchflux"


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_bytes(b"old")
    write_atomic(path, b"new content")
    assert path.read_bytes() == b"new content"
    write_atomic(path, iter([b"in ", b"chunks"]))
    assert path.read_bytes() == b"in chunks"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_write_that_fails_midway_keeps_the_old_file_and_removes_its_temporary(
        tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(b"the old, whole file\n")

    def chunks() -> Iterator[bytes]:
        yield b"half of the new"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, chunks())
    assert path.read_bytes() == b"the old, whole file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_a_new_file_gets_the_mode_the_umask_gives_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``os.fsync`` is called on, in order (the real fsync still runs)."""
    paths: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return paths


def test_the_file_is_synced_before_the_rename_and_the_directory_after(
        tmp_path: Path, synced: list[str]) -> None:
    """The order that makes the write survive a power loss: the bytes reach the disk under
    the temporary name, then the rename, then the directory entry."""
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"ok": 1})
    assert len(synced) == 2, synced
    assert Path(synced[0]).parent == tmp_path and Path(synced[0]).name.endswith(".tmp")
    assert Path(synced[1]) == tmp_path
    synced.clear()
    write_atomic(tmp_path / "thumb.jpg", b"cache", durable=False)
    assert synced == []


def test_replace_atomic_moves_a_finished_directory_in_and_syncs_both(
        tmp_path: Path, synced: list[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "metadata.jsonl").write_text("{}\n")
    replace_atomic(work, tmp_path / "export")
    assert (tmp_path / "export" / "metadata.jsonl").read_text() == "{}\n"
    assert synced == [str(work), str(tmp_path)]


def test_json_and_copies_are_written_whole(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "s.json", {"prompt": "café", "n": [1, 2]})
    text = (tmp_path / "s.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"prompt": "café", "n": [1, 2]}
    assert "café" in text and text.endswith("}\n") and "\n  " in text
    big = tmp_path / "manifest.jsonl"
    big.write_bytes(b"x" * (3 * (1 << 20) + 17))
    copy_atomic(big, tmp_path / "copy.jsonl")
    assert (tmp_path / "copy.jsonl").read_bytes() == big.read_bytes()


# Every module that replaces a file whole goes through fileutil; the only other renames are
# moves, not writes: verify --fix moving a bad file into the quarantine.
OWN_RENAMES = {"fileutil.py", "verify.py"}


def _renames(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename")
            and isinstance(node.value, ast.Name) and node.value.id in ("os", "shutil")]


def test_no_module_but_fileutil_renames_files_into_place_on_its_own() -> None:
    found = {str(p.relative_to(PACKAGE)): _renames(p) for p in PACKAGE.rglob("*.py")}
    offenders = {rel: lines for rel, lines in found.items() if lines and rel not in OWN_RENAMES}
    assert offenders == {}, offenders
    assert found["fileutil.py"], "the check would prove nothing"


def _bodies(rel: str) -> dict[str, str]:
    source = (PACKAGE / rel).read_text(encoding="utf-8")
    return {node.name: ast.get_source_segment(source, node) or ""
            for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}


def test_the_store_writes_its_summary_item_keys_and_frozen_manifest_through_fileutil() -> None:
    bodies = _bodies("store.py")
    assert "fileutil.write_json_atomic" in bodies["write_json_atomic"]
    assert "copy_atomic" in bodies["freeze_manifest"]
    assert "save_item_keys(" in bodies["write_item_keys"]
    assert "fileutil.write_atomic(path, keys.tobytes())" in bodies["save_item_keys"]
    assert fileutil.write_json_atomic is write_json_atomic


def test_the_simulator_state_writes_whole_files_through_fileutil_without_fsync() -> None:
    """The simulator's state survives the death of its process, not a power cut (sim/persist.py):
    atomic, not durable."""
    bodies = _bodies("sim/persist.py")
    assert "write_atomic(self.uploads_dir / file_name, data, durable=False)" in (
        bodies["store_upload"])
    assert "write_atomic(path, _header(now), durable=False)" in bodies["_write_fresh"]
