"""The upstream names the CPU compatibility layer (``megatron_vwn/compat/cpu.py``) replaces
still mean what it replaces them for (docs/compat.md).

Each test runs the upstream code path that reads the replaced name and checks the CPU
behaviour that results, so a rename upstream (the replacement becomes a stray attribute nobody
reads) fails here instead of as an assertion about CUDA deep inside a training run."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import random as mp_random

from megatron_vwn.compat.cpu import CPURNGStatesTracker, cpu_mode, enable_cpu_support


def setup_module():
    assert cpu_mode(), "the CPU layer is tested on CPU"
    enable_cpu_support()


def test_the_public_tracker_getter_returns_the_cpu_tracker():
    """``_CUDA_RNG_STATE_TRACKER`` is the global ``get_cuda_rng_tracker()`` returns, and the
    ``_INITIALIZED`` flag stops it from building a CUDA tracker over ours."""
    assert isinstance(mp_random.get_cuda_rng_tracker(), CPURNGStatesTracker)


def test_model_parallel_seeding_forks_per_rank_cpu_streams():
    """``model_parallel_cuda_manual_seed`` adds its named states to our tracker; forking one
    draws from it and leaves the default generator where it was."""
    tracker = mp_random.get_cuda_rng_tracker()
    saved = tracker.get_states()
    try:
        tracker.reset()
        mp_random.model_parallel_cuda_manual_seed(1234, tp_rank=0, ep_rank=0, etp_rank=0)
        assert "model-parallel-rng" in tracker.get_states()
        torch.manual_seed(0)
        outer = torch.get_rng_state()
        with tracker.fork():
            inside = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), outer)
        with tracker.fork():
            assert not torch.equal(torch.rand(4), inside)  # the stream advanced
    finally:
        tracker.set_states(saved)


def test_recompute_replays_dropout_with_the_saved_rng_states():
    """``tensor_parallel.checkpoint`` saves and restores every RNG state through
    ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` (replaced: the CPU has no CUDA stream), so
    the recomputed dropout mask is the forward's and the gradient equals the plain one."""
    def block(x):
        return torch.nn.functional.dropout(x * 2.0, p=0.5, training=True)

    x = torch.randn(64, requires_grad=True)
    torch.manual_seed(7)
    plain = block(x)
    plain.sum().backward()
    expected, x.grad = x.grad.clone(), None
    torch.manual_seed(7)
    out = mp_random.checkpoint(block, False, x)
    out.sum().backward()
    assert torch.equal(out, plain)
    assert torch.equal(x.grad, expected)


def test_the_moe_dispatcher_moves_split_sizes_through_the_replaced_helper():
    """The all-to-all dispatcher turns its split sizes into host arrays by calling the module
    global ``maybe_move_tensor_to_cpu``; on CPU ours must return numpy for ``as_numpy``."""
    import inspect

    from megatron.core.transformer.moe import token_dispatcher

    assert "maybe_move_tensor_to_cpu(" in inspect.getsource(token_dispatcher)
    sizes = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert sizes.tolist() == [3, 1] and not torch.is_tensor(sizes)


def test_cuda_device_arguments_land_on_the_cpu():
    """Megatron-Core allocates with ``device=torch.cuda.current_device()`` and ``.cuda()``; the
    optimizer checks ``tensor.type()`` against the CUDA type names."""
    t = torch.zeros(2, device=torch.cuda.current_device())
    assert t.device.type == "cpu" and t.cuda() is t
    assert t.type() == "torch.cuda.FloatTensor"
