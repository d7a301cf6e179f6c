"""Megatron side of conversion: a checkpoint at any layout <-> one single-process model.

Loading (:func:`load_checkpoint`): the checkpoint's saved config is rebuilt at TP = PP = 1 (no
sequence or virtual pipeline parallelism, the local spec, fp32) in a one-rank gloo world, and
Megatron-Core ``dist_checkpointing`` fills the model, resharding whatever TP/PP/VPP layout the
checkpoint was written at (its tensors are keyed by global names and offsets). The checkpoint is
located with :func:`megatron_vwn.checkpoint.inspect.resolve_checkpoint_dir` and checked against
its manifest (sizes, CRC-32s) before any tensor is read, as a training run does.

Saving (:func:`save_weights_checkpoint`): a model-only checkpoint in the run format of
docs/checkpoints.md (``checkpoints/iter_0000000`` with ``config.yaml``, manifest and tracker),
which a run starts from with ``checkpoint.load=DIR checkpoint.weights_only=true``.
"""

from __future__ import annotations

import copy
import datetime
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_vwn.checkpoint.errors import CheckpointError
from megatron_vwn.config import Config, to_dict
from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.loader import from_dict

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A single-process Megatron model and where it came from."""

    cfg: Config
    """The run's config, with the parallel layout reset to one process."""
    model: torch.nn.Module
    """The ``GPTModel`` (eval mode, fp32, on the CPU)."""
    padded_vocab_size: int
    """Rows of the embedding / output layer (the vocabulary padded for the saved layout)."""
    vocab_size: int
    """The real vocabulary: ``model.vocab_size`` or the tokenizer's (what HF files get)."""
    path: Path | None = None
    iteration: int | None = None
    saved_layout: str | None = None


def single_process_config(raw: dict | Config, precision: str = "fp32") -> Config:
    """``raw`` (a saved ``config.yaml`` mapping or a Config) at TP = PP = EP = 1 on the local
    spec."""
    cfg = copy.deepcopy(raw) if isinstance(raw, Config) else from_dict(copy.deepcopy(raw))
    cfg.parallel.tensor = 1
    cfg.parallel.pipeline = 1
    cfg.parallel.virtual_pipeline = None
    cfg.parallel.sequence_parallel = False
    cfg.parallel.distributed_optimizer = False
    cfg.parallel.expert = 1
    cfg.parallel.expert_tensor = None
    cfg.model.transformer_impl = "local"
    cfg.model.hidden_dropout = 0.0
    cfg.model.attention_dropout = 0.0
    cfg.model.vwn.recompute_coefficients = False
    cfg.train.precision = precision
    cfg.checkpoint.load = None
    cfg.checkpoint.weights_only = False
    cfg.model.validate()
    return cfg


def ensure_single_process_world(seed: int = 1234) -> None:
    """A one-rank gloo world with Megatron's TP = PP = 1 groups (CPU support on), kept for the
    life of the process. Reuses an existing one-rank world; refuses a larger one."""
    from megatron.core import parallel_state

    from megatron_vwn.compat.cpu import enable_cpu_support
    from megatron_vwn.parallel.distributed import set_seed
    from megatron_vwn.parallel.env import free_port

    if torch.cuda.is_available():
        raise ConfigError(
            "conversion runs on the CPU: hide the GPUs (CUDA_VISIBLE_DEVICES= ; the "
            "megatron-vwn convert command does this itself)")
    enable_cpu_support()
    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise RuntimeError("conversion runs in one process; start it without torchrun")
    else:
        torch.distributed.init_process_group(
            backend="gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0, world_size=1, timeout=datetime.timedelta(minutes=30),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    set_seed(seed)


def build_single_model(cfg: Config, padded_vocab_size: int) -> torch.nn.Module:
    """The whole model in this process, eval mode, on the CPU (fp32 unless ``cfg`` says): the
    build path of every command (:func:`megatron_vwn.training.build.build_model_parts`), bare
    (no DDP wrapper, no optimizer)."""
    from megatron_vwn.training.build import build_model_parts

    ensure_single_process_world(cfg.train.seed)
    (model,) = build_model_parts(cfg, padded_vocab_size, ddp=False, optimizer=False).modules
    return model.eval()


def true_vocab_size(cfg: Config, padded_vocab_size: int, tokenizer_vocab: int | None) -> int:
    """The vocabulary without padding rows: ``model.vocab_size``, else the tokenizer's."""
    vocab = cfg.model.vocab_size or tokenizer_vocab or padded_vocab_size
    return min(vocab, padded_vocab_size)


def load_checkpoint(path: str | Path, tokenizer_vocab: int | None = None,
                    verify_files: bool = True) -> LoadedModel:
    """Load a checkpoint (``iter_*`` dir, ``checkpoints`` dir or run dir) at TP = PP = 1.

    Starts a one-rank process group (:func:`ensure_single_process_world`) if there is none.
    """
    from megatron_vwn.checkpoint.files import check_files, read_manifest
    from megatron_vwn.checkpoint.state import SavedRun
    from megatron_vwn.checkpoint.weights import load_weights

    directory, saved = read_saved_run(path)
    if verify_files:
        manifest = read_manifest(directory)
        problems = check_files(directory, manifest)
        if problems:
            raise CheckpointError(f"checkpoint {directory} is corrupted: " + "; ".join(problems))
    assert isinstance(saved, SavedRun)
    cfg = single_process_config(saved.config)
    model = build_single_model(cfg, saved.padded_vocab_size)
    load_weights([model], directory, cfg.model, saved.padded_vocab_size, verify=False)
    return LoadedModel(
        cfg=cfg, model=model, padded_vocab_size=saved.padded_vocab_size,
        vocab_size=true_vocab_size(cfg, saved.padded_vocab_size, tokenizer_vocab),
        path=directory, iteration=saved.state.iteration,
        saved_layout=saved.layout.describe(),
    )


def read_saved_run(path: str | Path):
    """``(checkpoint directory, SavedRun)`` without building anything (no process group)."""
    from megatron_vwn.checkpoint.inspect import resolve_checkpoint_dir
    from megatron_vwn.checkpoint.state import SavedRun, load_common_state_dict

    directory = resolve_checkpoint_dir(Path(path))
    try:
        common = load_common_state_dict(directory)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{directory} is not a megatron-vwn checkpoint: {exc}") from exc
    if "run" not in common:
        raise CheckpointError(f"{directory} holds no run state (not written by megatron-vwn)")
    return directory, SavedRun.from_dict(common["run"])


def save_weights_checkpoint(model: torch.nn.Module, cfg: Config, padded_vocab_size: int,
                            out_dir: str | Path, iteration: int = 0) -> Path:
    """Write ``model`` as ``out_dir/checkpoints/iter_NNNNNNN`` (model weights only).

    Same files as a training run's checkpoint (torch_dist tensors, ``common.pt`` with the run
    state, ``config.yaml``, the manifest, the tracker), without optimizer state: start a run from
    it with ``checkpoint.load=OUT_DIR checkpoint.weights_only=true``.
    """
    from megatron_vwn import __version__
    from megatron_vwn.checkpoint.files import (
        CONFIG_FILE,
        data_files,
        describe_files,
        iter_dir_name,
        write_manifest,
        write_tracker,
    )
    from megatron_vwn.checkpoint.saver import Saver
    from megatron_vwn.checkpoint.state import (
        Layout,
        RunState,
        SavedRun,
        model_sharded_state_dict,
        sharding_metadata,
    )
    from megatron_vwn.config import dump_config

    checkpoints = Path(out_dir) / "checkpoints"
    path = checkpoints / iter_dir_name(iteration)
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path} already exists; choose an empty output directory")
    path.mkdir(parents=True, exist_ok=True)
    layout = Layout.current()
    state_dict = model_sharded_state_dict([model], sharding_metadata(False))
    state_dict["run"] = SavedRun(
        state=RunState(iteration=iteration), layout=layout, padded_vocab_size=padded_vocab_size,
        config=to_dict(cfg), version=__version__, sharding={},
    ).to_dict()

    def complete() -> None:
        dump_config(cfg, path / CONFIG_FILE)
        write_manifest(path, {
            "iteration": iteration, "version": __version__, "layout": layout.__dict__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": describe_files(path, data_files(path)), "weights_only": True,
        })
        write_tracker(checkpoints, iteration)

    saver = Saver(async_save=False)
    saver.save(state_dict, path, content_metadata=dict(sharding_metadata(False)),
               on_complete=complete)
    complete()  # a synchronous save leaves completion to its caller (one process: no agreement)
    saver.close()
    logger.info("wrote a weights-only checkpoint %s", path)
    return path
