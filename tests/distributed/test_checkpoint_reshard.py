"""A checkpoint written at TP2 x PP2 (sequence parallel, 4 ranks) loads at TP1 x PP1 and gives
the same logits within 1e-5 relative (TP1 -> TP2 is in test_checkpoint_resume.py)."""

from __future__ import annotations

import torch

from megatron_vwn.checkpoint.files import iter_dir_name
from tests.distributed.checkpoint_helpers import assert_logits_close, logits_of, tracker, train


def test_tp2_pp2_checkpoint_gives_the_same_logits_at_tp1_pp1(tmp_path, data_cache):
    run = tmp_path / "run"
    train(run, 4, ["train.iters=3", "parallel.tensor=2", "parallel.pipeline=2",
                   "parallel.sequence_parallel=true"], data_cache, logits=tmp_path / "tp2pp2.pt")
    assert tracker(run) == 3
    logits_of(run / "checkpoints" / iter_dir_name(3), tmp_path / "tp1.pt", 1, [], data_cache,
              tmp_path / "work")
    expected = torch.load(tmp_path / "tp2pp2.pt")
    assert expected.shape[-1] == 4096  # the full (TP-gathered) vocabulary
    assert_logits_close(torch.load(tmp_path / "tp1.pt"), expected)
