"""The faults every rank agrees on before raising, and the one collective that agrees on them.

They end a run with their own exit status and one line (the table and the NaN policy are in
:mod:`megatron_vwn.training.faults`, docs/reliability.md). They sit in the parallel layer
because the checkpoint layer raises :class:`SaveFailed` too, below training.
"""

from __future__ import annotations

import torch

from megatron_vwn.parallel.watchdog import EXIT_LOST_RANK


class TrainingFault(RuntimeError):
    """A fault that stops training with ``exit_code`` and one line (see the module docstring).

    ``report`` is True on the rank that prints the line (the others exit silently).
    """

    exit_code = 1

    def __init__(self, message: str, report: bool = True):
        super().__init__(message)
        self.report = report


class NonFiniteLoss(TrainingFault):
    exit_code = 3


class LostRank(TrainingFault):
    exit_code = EXIT_LOST_RANK


class SaveFailed(TrainingFault):
    exit_code = 5


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (one all-reduce)."""
    if not torch.distributed.is_initialized():
        return flag
    device = "cuda" if torch.cuda.is_available() else "cpu"
    box = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
    return bool(box.item())
