"""The neural-interaction metrics against their definitions (docs/methods.md §4).

The AGOP the schedule-driven backward passes produce equals ``E_x[J_P J_P^T]`` from a brute-force
Jacobian of the last position's projected logits w.r.t. the token-table output, on a tiny model
in float64; AOFE and W^T W match hand computations; the projection is reproducible.
"""

from __future__ import annotations

import pytest
import torch

from megatron_vwn.config import load_config
from megatron_vwn.training.interaction import agop_sum, aofe, projection, wtw
from megatron_vwn.training.interaction_probe import gathered_table, layout_agop, local_projection
from megatron_vwn.training.step import ForwardStep, Schedule

SHAPE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
         "model.ffn_hidden_size=64", "model.seq_length=8", "model.vocab_size=100"]
PADDED, TRUE_VOCAB, PROBES, MBS = 128, 100, 12, 2


def test_aofe_of_known_matrices():
    assert aofe(torch.eye(5) * 3).aofe == 0.0 and aofe(torch.eye(5)).ratio == 0.0
    m = torch.tensor([[1.0, 2.0], [2.0, 3.0]])
    result = aofe(m)
    assert result.aofe == pytest.approx(8.0)  # 2 * 2^2
    assert result.ratio == pytest.approx(8.0 / 18.0)
    assert aofe(torch.tensor([[1.0, 4.0], [0.0, 3.0]])).aofe == pytest.approx(8.0)  # symmetrised
    assert aofe(torch.zeros(3, 3)).ratio == 0.0


def test_wtw_and_agop_sum():
    table = torch.randn(50, 6, dtype=torch.float64)
    torch.testing.assert_close(wtw(table), sum(torch.outer(r, r) for r in table) / 50)
    rows = torch.randn(4, 3, 10, dtype=torch.float64)
    expect = sum(rows[:, b] @ rows[:, b].T for b in range(3))
    torch.testing.assert_close(agop_sum(rows), expect)


def test_projection_is_seeded_and_scaled():
    p = projection(4000, 64, seed=7)
    assert p.shape == (64, 4000) and p.dtype == torch.float64
    torch.testing.assert_close(p, projection(4000, 64, seed=7))
    assert not torch.equal(p, projection(4000, 64, seed=8))
    assert p.var().item() == pytest.approx(1 / 64, rel=0.05)


def _brute_force_agop(model, batches, p_full) -> torch.Tensor:
    """``mean_x J_P J_P^T`` with ``J`` from ``torch.autograd.functional.jacobian``: the table
    lookup's output is replaced by the variable the Jacobian is taken against."""
    lookup = model.embedding.word_embeddings
    total, count = 0.0, 0
    for batch in batches:
        for b in range(batch["tokens"].shape[0]):
            tokens = batch["tokens"][b:b + 1]
            positions = batch["position_ids"][b:b + 1]
            embedded = lookup(tokens).detach()  # [1, s, d]

            def logits_last(x, tokens=tokens, positions=positions):
                original = lookup.forward
                lookup.forward = lambda ids: x
                try:
                    logits = model(tokens, positions, None)  # [1, s, V_padded]
                finally:
                    lookup.forward = original
                return p_full @ logits[0, -1, :TRUE_VOCAB]  # [probes]

            jac = torch.autograd.functional.jacobian(logits_last, embedded)  # [probes, 1, s, d]
            jac = jac.reshape(PROBES, -1)
            total = total + jac @ jac.T
            count += 1
    return total / count


@pytest.mark.parametrize("extra", [[], ["model.vwn.m=2", "model.vwn.n=4",
                                        "model.vwn.embedding=factorized"],
                                   ["model.vwn.m=2", "model.vwn.n=4"]],
                         ids=["backbone", "vwn_factorized", "vwn_wide"])
def test_agop_matches_brute_force_jacobian(single_process, extra):
    from megatron_vwn.model.builder import build_model

    cfg = load_config(None, [*SHAPE, *extra])
    (model,) = build_model(cfg, vocab_size=PADDED)
    model.double()
    with torch.no_grad():  # a non-trivial model: the initial output layer is tiny
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    generator = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, TRUE_VOCAB, (MBS, 8), generator=generator),
                "position_ids": torch.arange(8).repeat(MBS, 1)} for _ in range(2)]
    p_full = projection(TRUE_VOCAB, PROBES, seed=3)
    schedule = Schedule(num_microbatches=1, seq_length=8, micro_batch_size=MBS,
                        forward_step=ForwardStep())
    result = layout_agop([model], [True], batches, local_projection(p_full, PADDED), schedule)
    assert result.sequences == 2 * MBS
    expect = _brute_force_agop(model, batches, p_full)
    assert expect.abs().max() > 1e-6  # a real Jacobian
    torch.testing.assert_close(result.matrix, expect, rtol=1e-9, atol=1e-12)
    assert 0.0 < aofe(result.matrix).ratio < 1.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    table = gathered_table([model], TRUE_VOCAB)
    torch.testing.assert_close(table, model.embedding.word_embeddings.weight[:TRUE_VOCAB].double())
