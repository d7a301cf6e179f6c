"""keep_last / keep_every retention: what survives, and deletion that never leaves a
half-deleted directory under a checkpoint's name."""

from __future__ import annotations

from megatron_vwn.checkpoint.files import (
    data_files,
    describe_files,
    iter_dir_name,
    list_iter_dirs,
    write_manifest,
)
from megatron_vwn.checkpoint.retention import apply_retention, select_to_delete


def test_keep_everything_by_default_but_incomplete_leftovers():
    assert select_to_delete([2, 4, 6], [7], latest=6, keep_last=None, keep_every=None) == [7]


def test_keep_last():
    assert select_to_delete([2, 4, 6, 8], [], latest=8, keep_last=2, keep_every=None) == [2, 4]


def test_keep_every_adds_to_keep_last():
    kept = {2, 4, 5, 6, 8, 10, 12} - set(
        select_to_delete([2, 4, 5, 6, 8, 10, 12], [], latest=12, keep_last=1, keep_every=4))
    assert kept == {4, 8, 12}


def test_latest_is_always_kept():
    # The tracker's checkpoint survives even when newer complete ones exist (never tracked).
    assert 6 not in select_to_delete([6, 8], [], latest=6, keep_last=1, keep_every=None)


def test_apply_retention_on_disk(tmp_path):
    for it in (1, 2, 3, 4):
        path = tmp_path / iter_dir_name(it)
        path.mkdir()
        (path / "__0_0.distcp").write_bytes(b"abc")
        if it != 3:
            write_manifest(path, {"files": describe_files(path, data_files(path))})
    (tmp_path / "iter_0000000.deleting").mkdir()  # a crash while deleting, earlier
    assert apply_retention(tmp_path, latest=4, keep_last=2, keep_every=None) == [1, 3]
    assert [it for it, _ in list_iter_dirs(tmp_path)] == [2, 4]
    assert not list(tmp_path.glob("*.deleting"))
