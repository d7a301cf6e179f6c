"""Shared pieces of the Hugging Face conversion tests: the tiny runs they train and export, and the
script that loads an export where megatron_vwn cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from tests.distributed.launcher import run_ranks

# 2 layers (PP=2 splits them), GQA over TP=2, one MTP depth, 3 steps at a high LR so every
# parameter (GHC dynamic weights included) moves away from its initialisation.
BASE = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.seq_length=32",
    "model.mtp.num_layers=1", "train.iters=3", "train.micro_batch_size=2",
    "train.global_batch_size=4", "train.warmup_iters=0", "train.lr=1e-2",
    "train.eval_interval=0", "logging.wandb=off", "logging.interval=1", "data.split=90,10,0",
]
VWN = ["model.vwn.m=2", "model.vwn.n=8"]  # r = 4: d_b = 32, D' = 256
LAYOUTS = {"tp2": ["parallel.tensor=2", "parallel.sequence_parallel=true"],
           "pp2": ["parallel.pipeline=2"], "ep2": ["parallel.expert=2"]}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


WORKER = "tests/integration/convert_worker.py"


def train_run(run_dir: Path, overrides: list[str], data_cache: str) -> Path:
    """Train at two ranks (the Trainer's loop: checkpoint at the end); the trained weights go to
    ``run_dir.parent / (run_dir.name + "-weights-pp*.pt")``. Returns the run directory."""
    prefix = run_dir.parent / f"{run_dir.name}-weights"
    run_ranks(2, [WORKER, str(prefix), *BASE, f"data.cache_dir={data_cache}",
                  f"run.dir={run_dir}", *overrides], timeout=300, log_dir=run_dir.parent)
    return run_dir


def trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights the training ranks held at the end (global names, full tensors)."""
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(run_dir.parent.glob(f"{run_dir.name}-weights-pp*.pt")):
        weights.update(torch.load(file, weights_only=True))
    assert weights, f"no trained weights beside {run_dir}"
    return weights


def assert_loaded_as_trained(model: torch.nn.Module, run_dir: Path) -> None:
    """The single-process model conversion loaded holds exactly the trained weights."""
    trained = trained_weights(run_dir)
    loaded = dict(model.named_parameters())
    assert loaded.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(loaded[name].detach().float(), tensor), name


def export_perturbed(cfg, out_dir: Path):
    """Build ``cfg`` (a single-process config) with 4096 real and 64 padding vocabulary rows,
    move every weight away from its initialisation (``+ 0.05 N(0, 1)``, seed 0) and export it to
    ``out_dir``: ``(model, ExportResult)``."""
    from megatron_vwn.convert.export import export_loaded
    from megatron_vwn.convert.megatron_io import LoadedModel, build_single_model

    model = build_single_model(cfg, 4160)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    loaded = LoadedModel(cfg=cfg, model=model, padded_vocab_size=4160, vocab_size=4096)
    return model, export_loaded(loaded, out_dir)


def pickles_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.suffix in PICKLE_SUFFIXES)


ISOLATED_SCRIPT = r"""
import json, sys
try:
    import megatron_vwn  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("megatron_vwn is importable in the isolated interpreter")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out_dir, prompt_text, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
ids = tokenizer(prompt_text)["input_ids"]
generated = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
mtp = model.mtp_logits(torch.tensor([ids]))
print(json.dumps({"class": type(model).__name__, "module": type(model).__module__,
                  "prompt": ids, "generated": generated[0].tolist(), "mtp_depths": len(mtp)}))
"""


def run_isolated(out_dir: Path, prompt: str, new_tokens: int, work: Path) -> dict:
    """Load and generate from ``out_dir`` in ``python -I -S`` with only the interpreter's library
    and site-packages on ``sys.path``: no repository, no ``.pth`` files (so no editable install of
    megatron_vwn); the script checks that ``import megatron_vwn`` fails."""
    site_packages = sysconfig.get_paths()["purelib"]
    platlib = sysconfig.get_paths()["platlib"]
    bootstrap = (f"import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p] "
                 f"+ [{site_packages!r}, {platlib!r}]; "
                 f"exec(open({str(work / 'isolated.py')!r}).read())")
    (work / "isolated.py").write_text(ISOLATED_SCRIPT)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(work), "HF_HOME": str(work / "hf"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", bootstrap, str(out_dir), prompt,
                           str(new_tokens)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
