"""Hugging Face conversion (docs/convert.md): checkpoints trained at TP=2 and at PP=2 export to
transformers models that reproduce the Megatron model (logits within 1e-4, the same greedy
tokens), the VWN export runs where megatron_vwn cannot be imported, the Llama import round-trips
exactly and a run starts from it, and nothing but safetensors is written."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from tests.integration.convert_helpers import (
    LAYOUTS,
    VWN,
    assert_loaded_as_trained,
    export_perturbed,
    pickles_in,
    run_isolated,
    train_run,
)

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

PROMPT = "Call me Ishmael. Some years ago"
NEW_TOKENS = 8
# The rest of the width family (docs/width_family.md), each with the MTP head BASE trains.
FAMILY = {
    "mhc": ["model.vwn.connection=mhc", "model.vwn.n=4"],
    "altup": ["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=false"],
    "recycled": ["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=false",
                 "model.vwn.embedding=replicated"],
    "altup_dynamic": ["model.vwn.connection=altup", "model.vwn.n=3", "model.vwn.dynamic=true"],
}
# A plain Mixtral-shaped MoE backbone (docs/moe.md): every layer 4 experts, top-2 softmax.
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=64"]
# DeepSeek-style MoE (first layer dense, shared expert, sigmoid router, expert bias) at 2x VWN.
MOE_VWN = [*MOE, "model.moe.dense_layers=1", "model.moe.shared_expert_ffn_hidden_size=64",
           "model.moe.router_score=sigmoid", "model.moe.expert_bias=true",
           "model.moe.expert_bias_update_rate=1e-2", "model.vwn.m=2", "model.vwn.n=4"]
MODELS = {"vwn": VWN, **FAMILY, "moe": MOE, "moe_vwn": MOE_VWN}


@pytest.fixture(scope="module")
def world():
    """The one-rank process group conversion builds models in, removed after this module."""
    yield
    from megatron_vwn.parallel.distributed import destroy_distributed

    destroy_distributed()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """Trained runs by name (``backbone-tp2``, ``vwn-pp2``, ...), each trained on first use."""
    root = tmp_path_factory.mktemp("convert-runs")
    cache: dict = {}

    def get(model: str, layout: str):
        key = f"{model}-{layout}"
        if key not in cache:
            overrides = [*LAYOUTS[layout], *MODELS.get(model, [])]
            cache[key] = train_run(root / key, overrides, data_cache)
        return cache[key]

    return get


def _prompt_ids(tokenizer_model: str) -> list[int]:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer_model).encode(PROMPT)


def _hf_greedy(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0].tolist()


def _assert_exported(out_dir, architecture: str) -> dict:
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == [architecture]
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) <= {p.name for p in out_dir.glob("*.safetensors")}
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out_dir / name).is_file(), name
    assert pickles_in(out_dir) == [], "only safetensors may be written"
    return config


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_backbone_exports_as_llama(layout, runs, world, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megatron_vwn.convert.export import MTP_SIDECAR, export_checkpoint, export_loaded
    from megatron_vwn.convert.verify import check_parity, greedy_megatron, load_hf_model

    run = runs("backbone", layout)
    result = export_checkpoint(run, tmp_path / "hf", max_shard_bytes=200_000)  # several shards
    assert_loaded_as_trained(result.loaded.model, run)
    assert result.format == "llama" and len(result.files) > 2
    config = _assert_exported(result.out_dir, "LlamaForCausalLM")
    assert config["vocab_size"] == 4096 and config["num_key_value_heads"] == 2

    report = check_parity(result)
    print(f"backbone {layout}: {report.describe()}")
    assert report.max_abs_diff <= 1e-4 and report.tokenizer_matches

    hf = load_hf_model(result.out_dir, "llama")
    assert isinstance(hf, LlamaForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(str(result.out_dir))
    ids = _prompt_ids(result.tokenizer_model)
    assert tokenizer(PROMPT)["input_ids"] == ids
    expected = greedy_megatron(result.loaded.model, ids, NEW_TOKENS, result.vocab_size)
    assert _hf_greedy(hf, ids) == expected

    # The MTP head, beside the Llama files, is the one VWNForCausalLM runs (format vwn).
    as_vwn = export_loaded(result.loaded, tmp_path / "as-vwn", fmt="vwn",
                           tokenizer_model=result.tokenizer_model)
    vwn_report = check_parity(as_vwn)
    assert len(vwn_report.mtp_max_abs_diff) == 1 and vwn_report.mtp_max_abs_diff[0] <= 1e-4
    sidecar = load_file(str(result.out_dir / MTP_SIDECAR))
    vwn_tensors = {}
    for file in as_vwn.files:
        vwn_tensors.update(load_file(str(as_vwn.out_dir / file)))
    assert sidecar.keys() == {k for k in vwn_tensors if k.startswith("mtp.")}
    for name, tensor in sidecar.items():
        assert torch.equal(tensor, vwn_tensors[name]), name


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_vwn_exports_with_mtp(layout, runs, world, tmp_path):
    from megatron_vwn.convert.export import export_checkpoint
    from megatron_vwn.convert.verify import check_parity, greedy_megatron, load_hf_model

    run = runs("vwn", layout)
    result = export_checkpoint(run, tmp_path / "hf")
    assert_loaded_as_trained(result.loaded.model, run)
    assert result.format == "vwn"
    config = _assert_exported(result.out_dir, "VWNForCausalLM")
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_vwn.VWNForCausalLM"
    assert (config["vwn_m"], config["vwn_n"], config["num_mtp_layers"]) == (2, 8, 1)
    assert config["vwn_group_norm"] is True
    # The trained GHC dynamic weights are not at their (zero) initialisation.
    assert result.loaded.model.decoder.layers[0].attention_connection.proj.abs().max() > 1e-3

    report = check_parity(result)
    print(f"vwn {layout}: {report.describe()}")
    assert report.max_abs_diff <= 1e-4 and report.mtp_max_abs_diff[0] <= 1e-4

    hf = load_hf_model(result.out_dir, "vwn")
    assert type(hf).__name__ == "VWNForCausalLM"
    ids = _prompt_ids(result.tokenizer_model)
    expected = greedy_megatron(result.loaded.model, ids, NEW_TOKENS, result.vocab_size)
    assert _hf_greedy(hf, ids) == expected


def test_vwn_export_runs_without_megatron_vwn(runs, world, tmp_path):
    from megatron_vwn.convert.export import export_checkpoint
    from megatron_vwn.convert.verify import greedy_megatron

    result = export_checkpoint(runs("vwn", "pp2"), tmp_path / "hf")
    work = tmp_path / "isolated"
    work.mkdir()
    out = run_isolated(result.out_dir, PROMPT, NEW_TOKENS, work)
    assert out["class"] == "VWNForCausalLM" and out["module"].startswith("transformers_modules")
    assert out["prompt"] == _prompt_ids(result.tokenizer_model)
    assert out["mtp_depths"] == 1
    assert out["generated"] == greedy_megatron(result.loaded.model, out["prompt"], NEW_TOKENS,
                                               result.vocab_size)


@pytest.mark.parametrize("model,layout", [("mhc", "pp2"), ("altup", "pp2"), ("recycled", "tp2"),
                                          ("altup_dynamic", "tp2")])
def test_family_member_exports_and_runs_without_megatron_vwn(model, layout, runs, world,
                                                             tmp_path):
    """mHC, AltUp, Recycled-AltUp and Gemma 3n's AltUp (MTP K = 1 in every one; dynamic AltUp
    at TP, as MTP with PP is refused for it): logits and MTP logits within 1e-4, the same greedy
    tokens in transformers, and the same again where megatron_vwn cannot be imported."""
    from megatron_vwn.convert.export import export_checkpoint
    from megatron_vwn.convert.verify import check_parity, greedy_megatron, load_hf_model

    run = runs(model, layout)
    result = export_checkpoint(run, tmp_path / "hf")
    assert_loaded_as_trained(result.loaded.model, run)
    config = _assert_exported(result.out_dir, "VWNForCausalLM")
    assert config["vwn_connection"] == FAMILY[model][0].split("=")[1]
    report = check_parity(result)
    print(f"{model} {layout}: {report.describe()}")
    assert report.max_abs_diff <= 1e-4 and report.mtp_max_abs_diff[0] <= 1e-4

    hf = load_hf_model(result.out_dir, "vwn")
    ids = _prompt_ids(result.tokenizer_model)
    expected = greedy_megatron(result.loaded.model, ids, NEW_TOKENS, result.vocab_size)
    assert _hf_greedy(hf, ids) == expected
    work = tmp_path / "isolated"
    work.mkdir()
    out = run_isolated(result.out_dir, PROMPT, NEW_TOKENS, work)
    assert out["class"] == "VWNForCausalLM" and out["mtp_depths"] == 1
    assert out["generated"] == expected


def test_cli_convert_bf16_with_verify(runs, tmp_path):
    from safetensors import safe_open

    run = runs("vwn", "tp2")
    out_dir = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_vwn", "convert", "hf", str(run), str(out_dir),
         "--dtype", "bf16", "--verify"],
        capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verify: max |logit difference|" in proc.stdout and "OK" in proc.stdout
    print(proc.stdout.strip().splitlines()[-1])
    shard = next(out_dir.glob("model-*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert pickles_in(out_dir) == []


def test_verify_fails_when_a_weight_is_wrong(runs, world, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_vwn.config.errors import ConfigError
    from megatron_vwn.convert.export import export_checkpoint
    from megatron_vwn.convert.verify import ParityError, check_parity

    result = export_checkpoint(runs("vwn", "tp2"), tmp_path / "hf")
    shard = result.out_dir / result.files[0]
    tensors = load_file(str(shard))
    name = next(k for k in tensors if k.endswith("attn_ghc.proj"))
    tensors[name] = tensors[name] + 0.05
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ParityError, match="parity check failed"):
        check_parity(result)
    with pytest.raises(ConfigError, match="is not empty"):
        export_checkpoint(runs("vwn", "tp2"), tmp_path / "hf")


def _random_llama(path, tie: bool, vocab: int = 4096):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)  # norms too: every tensor distinct
    model.save_pretrained(path)
    return model


def _hf_tensors(directory) -> dict:
    from megatron_vwn.convert.safetensors_io import load_safetensors_dir

    return load_safetensors_dir(directory)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_roundtrip_is_identical(tie, world, tmp_path, data_cache):
    from megatron_vwn.convert.export import export_checkpoint
    from megatron_vwn.convert.importer import import_hf_llama

    _random_llama(tmp_path / "llama", tie)
    original = _hf_tensors(tmp_path / "llama")
    path, report = import_hf_llama(tmp_path / "llama", tmp_path / "megatron",
                                   [f"data.tokenizer_model={_bundled_tokenizer(data_cache)}"])
    assert set(report.values()) == {"all"}
    result = export_checkpoint(tmp_path / "megatron", tmp_path / "back", with_tokenizer=False)
    back = _hf_tensors(result.out_dir)
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    before = json.loads((tmp_path / "llama" / "config.json").read_text())
    after = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "tie_word_embeddings", "rope_parameters"):
        assert after[key] == before[key], key
    assert pickles_in(result.out_dir) == []
    if tie:
        return
    # A run starts from the imported weights (the HF shape: vocabulary 4096 = the tokenizer's).
    from tests.distributed.launcher import run_ranks

    logs = run_ranks(1, ["-m", "megatron_vwn", "train", str(path / "config.yaml"),
                         f"run.dir={tmp_path / 'run'}", f"checkpoint.load={tmp_path / 'megatron'}",
                         "checkpoint.weights_only=true", "train.iters=1",
                         "train.micro_batch_size=2", "train.global_batch_size=2",
                         "model.seq_length=32", "train.eval_interval=0", "logging.wandb=off",
                         f"data.cache_dir={data_cache}", "data.split=90,10,0"],
                     timeout=300, log_dir=tmp_path)
    assert "loaded model weights from" in logs[0]

    # Without checkpoint.weights_only the run is refused in one line, read from the manifest;
    # a load that fails inside torch.distributed.checkpoint (its CheckpointException is a
    # BaseException) is one line too.
    train = [sys.executable, "-m", "megatron_vwn", "train", str(path / "config.yaml"),
             f"checkpoint.load={tmp_path / 'megatron'}", "train.iters=1",
             "train.eval_interval=0", "logging.wandb=off", f"data.cache_dir={data_cache}"]
    proc = subprocess.run([*train, f"run.dir={tmp_path / 'refused'}"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("megatron-vwn:")] == [
        f"megatron-vwn: error: checkpoint {path} holds weights only (written by convert "
        f"from-hf): add checkpoint.weights_only=true to start a run from them"], proc.stderr
    manifest = path / "checkpoint.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "weights_only": False}))
    proc = subprocess.run([*train, f"run.dir={tmp_path / 'failed-load'}"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("megatron-vwn:")]
    assert line.startswith(f"megatron-vwn: error: checkpoint {path} could not be loaded: "
                           f"KeyError: \"optimizer.state.exp_avg."), line


def _bundled_tokenizer(data_cache: str) -> str:
    from megatron_vwn.config.schema import DataConfig
    from megatron_vwn.data.datasets import prepare_data

    return prepare_data(DataConfig(cache_dir=data_cache, split="90,10,0")).tokenizer_model


def test_from_hf_uses_a_tokenizer_json_folder_and_refuses_one_without_a_tokenizer(
        world, tmp_path, capsys):
    """A Llama 3 style folder (tokenizer.json and tokenizer_config.json, no tokenizer.model)
    imports with that tokenizer, its eos the end-of-document token; a folder without a usable
    tokenizer is refused in one line before anything is written."""
    from megatron_vwn.cli import main
    from megatron_vwn.config.loader import load_config
    from megatron_vwn.data.tokenizer import load_tokenizer
    from tests.unit.test_hf_tokenizer import train_byte_level_bpe

    hf = tmp_path / "llama"
    _random_llama(hf, tie=False, vocab=512)
    for content, found in ((None, "has no tokenizer file (no tokenizer.model, no tokenizer.json)"),
                           ("{}", "holds no Hugging Face tokenizer.json")):
        if content is not None:
            (hf / "tokenizer.json").write_text(content)
        capsys.readouterr()
        assert main(["convert", "from-hf", str(hf), str(tmp_path / "out")]) == 2
        (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower()]
        assert line.startswith("megatron-vwn: error: ") and found in line, line
        assert not (tmp_path / "out").exists()

    train_byte_level_bpe(hf, special=("<|begin_of_text|>", "<|end_of_text|>"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert main(["convert", "from-hf", str(hf), str(tmp_path / "out")]) == 0
    finally:  # the CLI points logging at the captured stdout: put pytest's handlers back
        root.handlers[:] = handlers
        root.setLevel(level)
    (config,) = (tmp_path / "out").rglob("config.yaml")
    cfg = load_config(str(config))
    assert cfg.data.tokenizer_model == str(hf.resolve())
    assert load_tokenizer(cfg.data.tokenizer_model).eod == 1  # <|end_of_text|>


def test_import_into_virtual_width_takes_the_backbone(world, tmp_path, capsys, data_cache):
    from megatron_vwn.cli import main
    from megatron_vwn.convert.megatron_io import load_checkpoint

    hf = _random_llama(tmp_path / "llama", tie=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        status = main(["convert", "from-hf", str(tmp_path / "llama"), str(tmp_path / "megatron"),
                       "model.vwn.m=2", "model.vwn.n=8", "model.mtp.num_layers=1",
                       f"data.tokenizer_model={_bundled_tokenizer(data_cache)}"])
    finally:  # the CLI points logging at the captured stdout: put pytest's handlers back
        root.handlers[:] = handlers
        root.setLevel(level)
    assert status == 0
    out = capsys.readouterr().out
    assert "embedding.word_embeddings.weight: first 64 of 256 columns" in out
    assert "initialised as in training" in out and "checkpoint.weights_only=true" in out
    loaded = load_checkpoint(tmp_path / "megatron")
    model, state = loaded.model, hf.state_dict()
    table = model.embedding.word_embeddings.weight
    assert torch.equal(table[:4096, :64], state["model.embed_tokens.weight"])
    layer = model.decoder.layers[1]
    assert torch.equal(layer.mlp.linear_fc2.weight, state["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(model.decoder.final_layernorm.norm.weight, state["model.norm.weight"])
    assert torch.equal(model.output_layer.weight[:4096], state["lm_head.weight"])
    eye = torch.zeros(8, 2)
    eye[:2] = torch.eye(2)
    assert torch.equal(layer.attention_connection.static_read, eye)  # VWN init: read the backbone
    assert not layer.attention_connection.proj.any()  # dynamic weights at their zero init
    assert loaded.cfg.model.vwn.n == 8 and loaded.cfg.model.mtp.num_layers == 1


def test_tokenizer_ids_match_sentencepiece(data_cache, tmp_path):
    """Whitespace at the start, newlines (a user-defined piece), digits, byte fallback and whole
    chapters: the HF tokenizer gives SentencePiece's ids and decodes back to the text."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from megatron_vwn.config.schema import DataConfig
    from megatron_vwn.convert.tokenizer import write_hf_tokenizer
    from megatron_vwn.data.bundled import iter_bundled_documents
    from megatron_vwn.data.datasets import prepare_data

    model = prepare_data(DataConfig(cache_dir=data_cache, split="90,10,0")).tokenizer_model
    ids = write_hf_tokenizer(model, tmp_path, model_max_length=128)
    assert ids == {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    processor = spm.SentencePieceProcessor(model_file=model)
    texts = ["Call me Ishmael.", "  two  spaces\n\nand 1234 digits 3.14", " ", "   x", "\n",
             "\nleading newline", "trailing space ", "tab\there", "Ünïcödé ✓ 漢字 😀", "",
             *[doc[:2000] for doc in list(iter_bundled_documents())[:5]]]
    for text in texts:
        expected = processor.encode(text)
        assert tokenizer(text, verbose=False)["input_ids"] == expected, repr(text[:40])
        assert tokenizer.decode(expected) == processor.decode(expected), repr(text[:40])


@pytest.mark.parametrize("overrides", [
    ["model.vwn.m=1", "model.vwn.n=4", "model.vwn.connection=hc", "model.mtp.num_layers=1"],
    ["model.vwn.m=4", "model.vwn.n=4", "model.vwn.connection=frac"],
    ["model.vwn.m=2", "model.vwn.n=8", "model.vwn.embedding=factorized",
     "model.tie_embeddings=true", "model.mtp.num_layers=2"],
    ["model.vwn.m=2", "model.vwn.n=3", "model.vwn.dynamic=false"],
], ids=["hc", "frac", "factorized-tied-mtp2", "static-1.5x"])
def test_every_connection_exports_exactly(overrides, world, tmp_path):
    """HC (replicated embedding, sum of streams, scalar scales), Frac, a tied factorized
    embedding with two MTP depths and static GHC at 1.5x (no GroupNorm), all weights perturbed
    away from their initialisation."""
    from megatron_vwn.config import load_config
    from megatron_vwn.convert.megatron_io import single_process_config
    from megatron_vwn.convert.verify import check_parity, greedy_megatron, load_hf_model

    cfg = single_process_config(load_config("tiny", [
        "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.seq_length=32", *overrides]))
    model, result = export_perturbed(cfg, tmp_path / "hf")
    report = check_parity(result)
    assert report.max_abs_diff <= 1e-4
    assert len(report.mtp_max_abs_diff) == cfg.model.mtp.num_layers
    assert all(diff <= 1e-4 for diff in report.mtp_max_abs_diff)
    hf = load_hf_model(result.out_dir, "vwn")
    prompt = [5, 100, 200, 300, 17]
    assert _hf_greedy(hf, prompt) == greedy_megatron(model, prompt, NEW_TOKENS, 4096)


def test_plain_moe_exports_as_mixtral(runs, world, tmp_path):
    """An MoE trained with experts over two ranks exports to the stock MixtralForCausalLM:
    logits within 1e-4, the same greedy tokens (its MTP head beside it, as for Llama)."""
    from transformers import MixtralForCausalLM

    from megatron_vwn.convert.export import MTP_SIDECAR, export_checkpoint
    from megatron_vwn.convert.verify import check_parity, greedy_megatron, load_hf_model

    run = runs("moe", "ep2")
    result = export_checkpoint(run, tmp_path / "hf")
    assert_loaded_as_trained(result.loaded.model, run)
    assert result.format == "mixtral" and (result.out_dir / MTP_SIDECAR).is_file()
    config = _assert_exported(result.out_dir, "MixtralForCausalLM")
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    report = check_parity(result)
    print(f"moe ep2: {report.describe()}")
    assert report.max_abs_diff <= 1e-4 and report.tokenizer_matches
    hf = load_hf_model(result.out_dir, "mixtral")
    assert isinstance(hf, MixtralForCausalLM)
    ids = _prompt_ids(result.tokenizer_model)
    assert _hf_greedy(hf, ids) == greedy_megatron(result.loaded.model, ids, NEW_TOKENS,
                                                  result.vocab_size)


def test_only_a_plain_moe_is_a_mixtral():
    from megatron_vwn.config import ConfigError, load_config
    from megatron_vwn.convert.export import choose_format

    assert choose_format(load_config("moe/tiny"), "auto") == "mixtral"
    assert choose_format(load_config("moe/tiny"), "vwn") == "vwn"
    assert choose_format(load_config("moe/tiny_deepseek"), "auto") == "vwn"
    with pytest.raises(ConfigError, match="this model has model.moe.dense_layers=1, "
                                          "model.moe.shared_expert_ffn_hidden_size=192, "
                                          "model.moe.router_score=sigmoid, "
                                          "model.moe.expert_bias=True: use --format vwn"):
        choose_format(load_config("moe/tiny_deepseek"), "mixtral")
    with pytest.raises(ConfigError, match="model.vwn.connection=ghc"):
        choose_format(load_config("moe/tiny_2x"), "mixtral")
    with pytest.raises(ConfigError, match="--format llama cannot hold a mixture-of-experts"):
        choose_format(load_config("moe/tiny"), "llama")
    with pytest.raises(ConfigError, match="--format mixtral needs a mixture-of-experts model"):
        choose_format(load_config("tiny"), "mixtral")


def test_moe_with_virtual_width_exports_to_the_remote_code_class(runs, world, tmp_path):
    """DeepSeek-style MoE (dense first layer, shared expert, sigmoid router with a trained
    expert bias) under 2x VWN, experts over two ranks, with its MoE MTP head: VWNForCausalLM
    reproduces logits and MTP logits within 1e-4 and the greedy tokens, also where megatron_vwn
    cannot be imported."""
    from megatron_vwn.convert.export import export_checkpoint
    from megatron_vwn.convert.verify import check_parity, greedy_megatron

    run = runs("moe_vwn", "ep2")
    result = export_checkpoint(run, tmp_path / "hf")
    assert_loaded_as_trained(result.loaded.model, run)
    assert result.format == "vwn"
    config = _assert_exported(result.out_dir, "VWNForCausalLM")
    assert (config["moe_num_experts"], config["moe_dense_layers"]) == (4, 1)
    bias = result.loaded.model.decoder.layers[1].mlp.router.expert_bias
    assert bias.abs().sum() > 0  # trained: the routing the export must reproduce uses it
    report = check_parity(result)
    print(f"moe_vwn ep2: {report.describe()}")
    assert report.max_abs_diff <= 1e-4 and report.mtp_max_abs_diff[0] <= 1e-4
    work = tmp_path / "isolated"
    work.mkdir()
    out = run_isolated(result.out_dir, PROMPT, NEW_TOKENS, work)
    assert out["class"] == "VWNForCausalLM" and out["mtp_depths"] == 1
    assert out["generated"] == greedy_megatron(result.loaded.model, out["prompt"], NEW_TOKENS,
                                               result.vocab_size)


def test_mixtral_roundtrip_is_identical(world, tmp_path, data_cache):
    """A MixtralForCausalLM (as transformers saves it) imports into an MoE model and exports
    back to the same tensors, in Mixtral's published names."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from megatron_vwn.convert.export import export_checkpoint
    from megatron_vwn.convert.importer import import_hf_llama, mixtral_published_names

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=4096, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, rms_norm_eps=1e-6, num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=None,
                           rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path / "mixtral")
    original = mixtral_published_names(_hf_tensors(tmp_path / "mixtral"))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in original
    path, report = import_hf_llama(tmp_path / "mixtral", tmp_path / "megatron",
                                   [f"data.tokenizer_model={_bundled_tokenizer(data_cache)}"])
    assert set(report.values()) == {"all"}
    result = export_checkpoint(tmp_path / "megatron", tmp_path / "back", with_tokenizer=False)
    assert result.format == "mixtral"
    back = _hf_tensors(result.out_dir)
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
