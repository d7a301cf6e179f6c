"""Checkpoint files without training: tracker, manifest checks, which checkpoint a run resumes
from, and the metrics rows a resume drops. Every refusal names the path concerned."""

from __future__ import annotations

import pytest

from megatron_vwn.checkpoint.errors import CheckpointError, CorruptCheckpointError
from megatron_vwn.checkpoint.files import (
    MANIFEST,
    TRACKER,
    check_files,
    data_files,
    describe_files,
    iter_dir_name,
    read_manifest,
    read_tracker,
    write_manifest,
    write_tracker,
)
from megatron_vwn.checkpoint.resolve import explicit_candidates, find_candidates


def make_checkpoint(root, iteration, complete=True, payload=b"x" * 1000):
    """A fake checkpoint directory with two data files and (if complete) its manifest."""
    path = root / iter_dir_name(iteration)
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(payload)
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    if complete:
        write_manifest(path, {"iteration": iteration,
                              "files": describe_files(path, data_files(path))})
    return path


def test_tracker_round_trip_and_atomic(tmp_path):
    assert read_tracker(tmp_path) is None
    write_tracker(tmp_path, 6)
    write_tracker(tmp_path, 9)
    assert read_tracker(tmp_path) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == [TRACKER]  # no temporary file left


def test_garbled_tracker_names_its_path(tmp_path):
    (tmp_path / TRACKER).write_text("nine\n")
    with pytest.raises(CorruptCheckpointError, match=f"{tmp_path / TRACKER}.*'nine'"):
        read_tracker(tmp_path)


def test_intact_checkpoint_passes(tmp_path):
    path = make_checkpoint(tmp_path, 3)
    assert check_files(path, read_manifest(path)) == []


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(f.read_bytes()[:500]), "truncated"),
    (lambda f: f.write_bytes(b"y" + f.read_bytes()[1:]), "corrupted"),
    (lambda f: f.unlink(), "missing"),
])
def test_damaged_shard_is_named(tmp_path, damage, message):
    path = make_checkpoint(tmp_path, 3)
    damage(path / "__0_0.distcp")
    problems = check_files(path, read_manifest(path))
    assert len(problems) == 1
    assert str(path / "__0_0.distcp") in problems[0] and message in problems[0]


def test_incomplete_checkpoint_has_no_manifest(tmp_path):
    path = make_checkpoint(tmp_path, 3, complete=False)
    with pytest.raises(CorruptCheckpointError, match=f"{path} is incomplete: {MANIFEST}"):
        read_manifest(path)


def test_resume_order_is_tracker_then_older_complete(tmp_path):
    for it in (3, 6, 9):
        make_checkpoint(tmp_path, it)
    make_checkpoint(tmp_path, 12)  # complete but never tracked (killed before the rename)
    make_checkpoint(tmp_path, 15, complete=False)  # killed mid-save
    write_tracker(tmp_path, 9)
    candidates, warnings = find_candidates(tmp_path)
    assert [c.iteration for c in candidates] == [9, 6, 3]
    assert warnings == []


def test_missing_tracker_warns_and_uses_newest_complete(tmp_path):
    make_checkpoint(tmp_path, 3)
    make_checkpoint(tmp_path, 6)
    make_checkpoint(tmp_path, 9, complete=False)
    candidates, warnings = find_candidates(tmp_path)
    assert [c.iteration for c in candidates] == [6, 3]
    assert len(warnings) == 1
    assert f"tracker file {tmp_path / TRACKER} is missing" in warnings[0]
    assert iter_dir_name(6) in warnings[0]


def test_only_incomplete_checkpoints_mean_a_fresh_start(tmp_path):
    make_checkpoint(tmp_path, 3, complete=False)
    assert find_candidates(tmp_path) == ([], [])
    assert find_candidates(tmp_path / "absent") == ([], [])


def test_explicit_load_path_forms(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    make_checkpoint(ckpts, 3)
    make_checkpoint(ckpts, 6)
    write_tracker(ckpts, 6)
    for given in (run, ckpts, ckpts / iter_dir_name(6)):
        (candidate,) = explicit_candidates(given)
        assert candidate.iteration == 6 and candidate.path == ckpts / iter_dir_name(6)
    with pytest.raises(CheckpointError, match=f"checkpoint.load \\({tmp_path / 'nope'}\\) does "
                                              "not exist"):
        explicit_candidates(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        explicit_candidates(tmp_path / "empty")
