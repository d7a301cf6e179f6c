"""Write the checkpoints of ``tests/data/checkpoints_pre_slot_rename/`` (see its README.md).

    PYTHONPATH=$PWD python tests/distributed/make_pre_rename_checkpoints.py [OUT_DIR]

For each case (GHC, mHC, AltUp), through the project's own save path (``megatron-vwn train``'s
loop, two ranks, data parallel 2, the distributed optimizer): train 2 iterations and save
(``iter_0000002``), write the logits of a fixed batch of that model, then resume the same run to
iteration 4 and keep its ``metrics.jsonl`` rows 3..4 (what a resume from the checkpoint must
reproduce). Only the checkpoint, ``logits.pt`` and ``rows.jsonl`` are kept.

The checkpoints were written before the width connections' slots were renamed
(``attention_ghc`` / ``mlp_ghc`` / ``altup``); ``tests/distributed/test_checkpoint_slot_rename.py``
loads them with the current code. Rerunning this script with the current code writes
checkpoints under the current slot names (use it to refresh the run recipe, not the fixture).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from megatron_vwn.checkpoint.files import iter_dir_name
from tests.distributed.launcher import REPO, run_ranks

WORKER = "tests/distributed/checkpoint_worker.py"
NPROC = 2
SAVED_AT = 2
RESUMED_TO = 4

# As small as the code allows: a 360-piece tokenizer for the bundled corpus (its text has 343
# distinct characters), not padded further; two layers of width 8.
TINY = [
    "model.num_layers=2", "model.hidden_size=8", "model.num_attention_heads=2",
    "model.num_query_groups=1", "model.ffn_hidden_size=16", "model.seq_length=16",
    "model.make_vocab_size_divisible_by=8",
    "train.micro_batch_size=1", "train.global_batch_size=2", "train.lr=1e-2",
    "train.warmup_iters=1", "train.lr_decay_iters=10", "train.eval_interval=100",
    "train.eval_iters=1", "logging.wandb=off", "logging.interval=1", "data.split=90,10,0",
    "data.tokenizer_vocab_size=360", "parallel.distributed_optimizer=true",
]

CASES: dict[str, list[str]] = {
    "ghc": ["model.vwn.m=2", "model.vwn.n=4"],
    "mhc": ["model.vwn.connection=mhc", "model.vwn.n=2"],
    "altup": ["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=false"],
}


def prepare_cache(cache: Path) -> str:
    from megatron_vwn.config.schema import DataConfig
    from megatron_vwn.data.datasets import prepare_data

    prepare_data(DataConfig(cache_dir=str(cache), split="90,10,0", tokenizer_vocab_size=360))
    return str(cache)


def train(run: Path, overrides: list[str], data_cache: str, iters: int,
          logits: Path | None = None) -> None:
    args = [WORKER, "train", *(["--logits", str(logits)] if logits else []), *TINY,
            *overrides, f"data.cache_dir={data_cache}", f"run.dir={run}", f"train.iters={iters}"]
    run_ranks(NPROC, args, log_dir=run.parent)


def make_case(name: str, out: Path, work: Path, data_cache: str) -> None:
    run = work / name / "run"
    run.parent.mkdir(parents=True)
    train(run, CASES[name], data_cache, SAVED_AT, logits=work / name / "logits.pt")
    target = out / name
    target.mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / iter_dir_name(SAVED_AT),
                    target / "checkpoints" / iter_dir_name(SAVED_AT))
    shutil.copy(run / "checkpoints" / "latest_checkpointed_iteration.txt",
                target / "checkpoints")
    shutil.copy(work / name / "logits.pt", target / "logits.pt")
    train(run, CASES[name], data_cache, RESUMED_TO)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["split"] == "train" and r["iteration"] > SAVED_AT]
    assert [r["iteration"] for r in kept] == list(range(SAVED_AT + 1, RESUMED_TO + 1)), kept
    (target / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else (
        REPO / "tests" / "data" / "checkpoints_pre_slot_rename")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_cache = prepare_cache(work / "cache")
        for name in CASES:
            if (out / name).exists():
                raise SystemExit(f"{out / name} exists; remove it first")
            make_case(name, out, work, data_cache)
            print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
