"""Megatron-Core on CPU with gloo: the whole compatibility layer, in one place.

Megatron-Core has no CPU path: it allocates with ``device="cuda"``, asks
``torch.cuda.current_device()``, keeps its RNG streams in CUDA generators and checks tensor
types against ``torch.cuda.FloatTensor``. For tests and laptops we map all of that onto the CPU.
:func:`enable_cpu_support` is called once per process and does nothing when CUDA is available,
so GPU runs never see any of it. Each workaround below says what it works around.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_enabled = False


def cpu_mode() -> bool:
    """True when this process runs Megatron-Core on the CPU (no CUDA device)."""
    return not torch.cuda.is_available()


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Turns ``device="cuda"`` arguments, ``.cuda()`` and ``.to("cuda")`` into CPU operations,
    and answers ``tensor.type()`` with the CUDA type name that Megatron's optimizer checks for."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(result, str):
            return result.replace("torch.", "torch.cuda.", 1)
        return result


class _NoopStream:
    """Stands in for ``torch.cuda.Stream``/``Event`` (DDP's communication stream, MoE dispatch).

    Every method is a no-op that returns another stand-in, so chained calls such as the MoE
    dispatcher's ``stream.record_event().synchronize()`` work too."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: _NoopStream()


class CPURNGStatesTracker:
    """Megatron's ``CudaRNGStatesTracker`` API over CPU generator states.

    Named states ("model-parallel-rng", ...) are forked exactly as the CUDA tracker forks CUDA
    states, so dropout in tensor-parallel regions draws from per-rank streams on CPU too.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """Megatron-Core's ``maybe_move_tensor_to_cpu`` for tensors already on the CPU."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _uneven_collectives() -> None:
    """gloo's ``all_gather`` needs equal shapes and it has no list ``reduce_scatter``; the MoE
    dispatcher under expert tensor parallelism gathers and reduce-scatters the routed tokens in
    uneven pieces (one per rank, as many rows as it routed). Equal pieces keep gloo's
    collectives; uneven ones go through padding (gather) and a sum of the whole (scatter)."""
    import torch.distributed as dist

    gather, reduce_scatter = dist.all_gather, dist.reduce_scatter

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if async_op or len({t.shape for t in tensor_list} | {tensor.shape}) == 1:
            return gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in tensor_list]
        gather(pieces, padded, group=group)
        for out, piece in zip(tensor_list, pieces, strict=True):
            out.copy_(piece[:out.shape[0]])
        return None

    def reduce_scatter_list(output, input_list, op=dist.ReduceOp.SUM, group=None,
                            async_op=False):
        if async_op or op != dist.ReduceOp.SUM:
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        whole = torch.cat([t.reshape(t.shape[0], -1) for t in input_list])
        dist.all_reduce(whole, group=group)
        rank = dist.get_rank(group)
        start = sum(t.shape[0] for t in input_list[:rank])
        output.copy_(whole[start:start + output.shape[0]].reshape(output.shape))
        return None

    dist.all_gather = all_gather
    dist.reduce_scatter = reduce_scatter_list


def enable_cpu_support() -> None:
    """Apply every CPU workaround once; a no-op when CUDA is available."""
    global _enabled
    if _enabled or not cpu_mode():
        return
    _enabled = True

    # Allocation sites call torch.cuda.current_device() for a device and synchronize for timing.
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda: None
    # DDP's overlap stream and the MoE dispatcher create CUDA streams and events.
    torch.cuda.Stream = _NoopStream
    torch.cuda.Event = _NoopStream
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.current_stream = lambda *args, **kwargs: _NoopStream()
    torch.cuda.default_stream = lambda *args, **kwargs: _NoopStream()

    # Literal device="cuda" tensors (schedules' token counts, clip-grad buffers, ...).
    _CudaToCpu().__enter__()

    # The model-parallel RNG tracker seeds CUDA generators; give it CPU ones.
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random.initialize_rng_tracker = lambda *args, **kwargs: None
    torch.cuda.manual_seed = lambda seed: None
    # Activation recompute (tensor_parallel.checkpoint, CheckpointWithoutOutput) saves and
    # restores the CUDA generator's state beside the CPU one and the tracker's; reading it asserts
    # without CUDA. On CPU every stream dropout draws from is the CPU generator or a tracker
    # state, which those functions already save, so the CUDA part is nothing.
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None

    # The MoE all-to-all dispatcher turns its split sizes into host (numpy) arrays only when
    # they are CUDA tensors; CPU tensors stay tensors, which all_to_all_single refuses.
    from megatron.core.transformer.moe import token_dispatcher

    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    _uneven_collectives()
    logger.debug("Megatron-Core CPU support enabled")
