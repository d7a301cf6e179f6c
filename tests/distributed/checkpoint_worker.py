"""One rank of a checkpoint test run.

    python tests/distributed/checkpoint_worker.py train [--logits FILE] key=value ...
    python tests/distributed/checkpoint_worker.py logits FILE key=value ...
    python tests/distributed/checkpoint_worker.py save key=value ...

``train`` is ``megatron-vwn train`` (the Trainer's loop with its checkpoint hooks); with
``--logits`` it then writes the logits of a fixed batch. ``logits`` builds the model, loads
``checkpoint.load`` (weights only) and writes the logits of the same batch. ``save`` resumes
(or loads ``checkpoint.load``) and saves again at once, training nothing. The environment
variable ``CKPT_TEST_STEP_SLEEP`` (seconds) slows every step so a test can signal mid-run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vwn.config import load_config, validate
from megatron_vwn.parallel.distributed import destroy_distributed
from megatron_vwn.parallel.env import resolve_dist_env
from megatron_vwn.training.trainer import Trainer


def fixed_batch(vocab: int, micro_batch: int, seq_length: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(4321)
    tokens = torch.randint(0, vocab, (micro_batch, seq_length), generator=generator)
    positions = torch.arange(seq_length).unsqueeze(0).expand(micro_batch, -1).contiguous()
    return {"tokens": tokens, "position_ids": positions}


def compute_logits(trainer: Trainer) -> torch.Tensor | None:
    """Full-vocabulary logits ``[b, s, v]`` of the fixed batch on the last stage, else None."""
    cfg = trainer.cfg
    batch = fixed_batch(trainer.tokenizer.vocab_size, cfg.train.micro_batch_size,
                        cfg.model.seq_length)

    def forward_step(data_iterator, model):
        if data_iterator is None:
            return model(None, None, None), None
        item = next(data_iterator)
        output = model(item["tokens"], item["position_ids"], None)

        def collect(output_tensor, non_loss_data=False):
            return output_tensor.detach().clone()

        return output, collect

    for chunk in trainer.model:
        chunk.eval()
    iterators = [iter([batch]) if feeds else None for feeds in trainer.feeds_data]
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=trainer.model if len(trainer.model) > 1 else trainer.model[0],
            num_microbatches=1,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
            adjust_tensor_shapes_fn=trainer.schedule.adjust_tensor_shapes_fn,  # wide states
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = outputs[0]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(
            parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
        )
        logits = torch.cat(parts, dim=-1)
    return logits


def write_logits(trainer: Trainer, path: Path) -> None:
    logits = compute_logits(trainer)
    if (logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0):
        torch.save(logits, path)


def main() -> None:
    mode = sys.argv[1]
    args = sys.argv[2:]
    logits_path = None
    if mode == "logits" or (args and args[0] == "--logits"):
        if args[0] == "--logits":
            args = args[1:]
        logits_path, args = Path(args[0]), args[1:]
    cfg = load_config("tiny", args)
    dist = resolve_dist_env()
    validate(cfg, dist.world_size)
    trainer = Trainer(cfg, dist)
    delay = float(os.environ.get("CKPT_TEST_STEP_SLEEP", "0"))
    if delay:
        step = trainer.step

        def slow_step():
            time.sleep(delay)
            return step()

        trainer.step = slow_step
    try:
        if mode == "train":
            trainer.train()
        if mode == "save":
            trainer.checkpoints.save(trainer.state.run_state(), trainer.model, trainer.optimizer,
                                     trainer.scheduler, final=True)
        if logits_path is not None:
            write_logits(trainer, logits_path)
    finally:
        trainer.close()
        destroy_distributed()


if __name__ == "__main__":
    main()
