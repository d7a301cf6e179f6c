"""Checkpoints written before the width slots were renamed
(``tests/data/checkpoints_pre_slot_rename``: GHC, mHC, AltUp at DP2 with the distributed
optimizer) resume with today's code: model,
optimizer, schedule and RNG state, at the layout they were written at and resharded to PP2, and
what the run saves next holds only the new slot names.

The weights and logits alone (the ``eval`` / ``convert`` path) and the key mapping's refusals are
in ``tests/unit/test_checkpoint_legacy_keys.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_vwn.checkpoint.files import iter_dir_name
from megatron_vwn.checkpoint.legacy_keys import stored_keys
from tests.distributed.checkpoint_helpers import rows, tracker
from tests.distributed.launcher import run_ranks
from tests.distributed.make_pre_rename_checkpoints import (
    CASES,
    NPROC,
    RESUMED_TO,
    SAVED_AT,
    TINY,
    WORKER,
    prepare_cache,
)

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "checkpoints_pre_slot_rename"
OLD_SLOTS = {"attention_ghc": "attention_connection", "mlp_ghc": "mlp_connection",
             "altup": "layer_connection"}
LAYOUTS = {"dp2": [], "pp2": ["parallel.pipeline=2"]}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> str:
    """The bundled corpus with the fixtures' 360-piece tokenizer."""
    return prepare_cache(tmp_path_factory.mktemp("tiny-cache"))


def train(run: Path, case: str, cache: str, iters: int, extra: list[str],
          mode: str = "train") -> list[str]:
    args = [WORKER, mode, *TINY, *CASES[case], f"data.cache_dir={cache}", f"run.dir={run}",
            f"train.iters={iters}", *extra]
    return run_ranks(NPROC, args, log_dir=run.parent)


def read_all(checkpoint: Path, scratch: Path) -> dict:
    """Every tensor and object of a torch_dist checkpoint by its stored key (no process group)."""
    dcp_to_torch_save(checkpoint, scratch)
    return torch.load(scratch, weights_only=False)


def renamed(key: str) -> str:
    return ".".join(OLD_SLOTS.get(part, part) for part in key.split("."))


def slot_names(keys) -> set[str]:
    names = set(OLD_SLOTS) | set(OLD_SLOTS.values())
    return {part for key in keys for part in key.split(".") if part in names}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_old_checkpoint_resumes_and_continues_the_same_training(case, layout, tmp_path,
                                                                tiny_cache):
    """Resumed from the old checkpoint (``resume=auto`` in a run directory holding it), the
    next iterations are those the old code trained after it (rows 3 and 4: iteration 4 steps
    from the restored Adam moments); at PP2 the state is resharded (parity tolerance)."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / case / "checkpoints", run / "checkpoints")
    outputs = train(run, case, tiny_cache, RESUMED_TO, LAYOUTS[layout])
    log = outputs[0]
    assert f"resumed from {run / 'checkpoints' / iter_dir_name(SAVED_AT)}" in log
    assert "written with older width slot names" in log
    expected = [json.loads(line)
                for line in (FIXTURES / case / "rows.jsonl").read_text().splitlines()]
    got = [r for r in rows(run) if r["split"] == "train"]
    assert [r["iteration"] for r in got] == [r["iteration"] for r in expected]
    # The same fp32 computation up to summation order (another layout, or another CPU's GEMM
    # kernels than the machine that wrote the fixture): docs/parity_cases.md's tolerances for
    # losses and grad norms; the learning rate is the schedule's, computed in float64.
    for key, rtol in (("lm_loss", 1e-5), ("grad_norm", 1e-4), ("lr", 1e-12)):
        torch.testing.assert_close(torch.tensor([r[key] for r in got], dtype=torch.float64),
                                   torch.tensor([r[key] for r in expected],
                                                dtype=torch.float64), rtol=rtol, atol=0)
    assert tracker(run) == RESUMED_TO
    keys = stored_keys(run / "checkpoints" / iter_dir_name(RESUMED_TO))
    new = {OLD_SLOTS[old] for old in slot_names(stored_keys(FIXTURES / case / "checkpoints"
                                                            / iter_dir_name(SAVED_AT)))}
    assert slot_names(keys) == new  # saved under the new names only


@pytest.mark.parametrize("case", list(CASES))
def test_old_state_is_saved_again_unchanged_under_the_new_names(case, tmp_path, tiny_cache):
    """Loaded (``checkpoint.load``, every state) and saved again at once: every tensor of the
    new checkpoint, model and distributed-optimizer state, equals the old one's under the
    renamed key, and the two hold the same keys but for the rename."""
    old_dir = FIXTURES / case / "checkpoints" / iter_dir_name(SAVED_AT)
    run = tmp_path / "run"
    train(run, case, tiny_cache, SAVED_AT, [f"checkpoint.load={old_dir}"], mode="save")
    new_dir = run / "checkpoints" / iter_dir_name(SAVED_AT)
    assert tracker(run) == SAVED_AT
    old_keys, new_keys = stored_keys(old_dir), stored_keys(new_dir)
    assert {renamed(k) for k in old_keys} == new_keys
    assert not slot_names(new_keys) & set(OLD_SLOTS)
    old, new = read_all(old_dir, tmp_path / "old.pt"), read_all(new_dir, tmp_path / "new.pt")
    tensors = [k for k, v in old.items() if torch.is_tensor(v)]
    assert any(k.startswith("optimizer.state.exp_avg.") and slot_names([k]) for k in tensors)
    for key in tensors:
        torch.testing.assert_close(new[renamed(key)], old[key], rtol=0, atol=0, msg=key)
