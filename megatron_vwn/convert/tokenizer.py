"""SentencePiece ``.model`` -> Hugging Face tokenizer files whose ids equal SentencePiece's (a
Hugging Face ``tokenizer.json`` is carried over as it is: :func:`write_hf_tokenizer_json`).

transformers converts a SentencePiece BPE model to a ``tokenizers`` BPE (vocabulary, merges,
byte fallback). Its Llama pipeline then differs from SentencePiece on two points that matter for
our models (data/tokenizer.py: ``add_dummy_prefix``, whitespace kept, ``"\\n"`` a user-defined
piece): the Metaspace pre-tokenizer does not add the dummy ``▁`` to text that already starts
with whitespace, and the newline, made an added token, splits the text so the pieces after it
are handled apart. We keep the converted vocabulary and merges and give the pipeline
SentencePiece's own behaviour: a normalizer that prepends ``▁`` once and maps spaces to ``▁``,
no pre-tokenizer, ``"\\n"`` an ordinary vocabulary entry; the decoder undoes it. Written files:

* ``tokenizer.json`` (the fast tokenizer), ``tokenizer_config.json``
  (``PreTrainedTokenizerFast``; no BOS/EOS added: ids equal ``SentencePieceProcessor.encode``),
  ``special_tokens_map.json``;
* ``tokenizer.model``: the SentencePiece model itself (for ``megatron-vwn`` data preprocessing
  and ``convert from-hf``).

Known difference: text containing the literal special strings (``<s>``, ``</s>``, ``<pad>``,
``<unk>``) gets their ids here, while SentencePiece spells them out as ordinary pieces.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

_SPACE = "\u2581"


def _special_pieces(processor) -> dict[str, str | None]:
    def piece(index: int) -> str | None:
        return processor.id_to_piece(index) if index >= 0 else None

    return {"pad_token": piece(processor.pad_id()), "unk_token": piece(processor.unk_id()),
            "bos_token": piece(processor.bos_id()), "eos_token": piece(processor.eos_id())}


def sentencepiece_tokenizer_json(model_path: str | Path) -> dict:
    """The ``tokenizer.json`` content for a SentencePiece BPE model (see module docstring)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_path, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False,
             "add_eos_token": False}))
        converted = AutoTokenizer.from_pretrained(tmp)
        spec = json.loads(converted.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"{model_path}: only SentencePiece BPE models are supported, got "
                         f"{spec['model']['type']}")
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": _SPACE},
        {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE},
    ]}
    spec["pre_tokenizer"] = None
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}
    spec["post_processor"] = None
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["special"]]
    return spec


def write_hf_tokenizer(model_path: str | Path, out_dir: Path, model_max_length: int) -> dict:
    """Write the tokenizer files into ``out_dir``; returns the special token ids."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    spec = sentencepiece_tokenizer_json(model_path)
    spec["model"]["unk_token"] = _special_pieces(processor)["unk_token"]
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1))
    specials = {k: v for k, v in _special_pieces(processor).items() if v is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    ids = {"pad_token_id": processor.pad_id(), "bos_token_id": processor.bos_id(),
           "eos_token_id": processor.eos_id()}
    return {key: (value if value >= 0 else None) for key, value in ids.items()}


def tokenizer_vocab_size(path: str | Path, eod_token: str | None = None) -> int:
    """Vocabulary of a SentencePiece model or a Hugging Face tokenizer."""
    from megatron_vwn.data.tokenizer import open_tokenizer

    return open_tokenizer(str(path), eod_token).vocab_size


def write_hf_tokenizer_json(path: str | Path, out_dir: Path, eod_token: str | None,
                            model_max_length: int) -> dict:
    """Carry a Hugging Face ``tokenizer.json`` into the export unchanged, with a
    ``tokenizer_config.json`` whose ``eos_token`` is the EOD training used and that adds no
    special tokens, so ``AutoTokenizer`` gives the ids training saw; returns the token ids."""
    from megatron_vwn.data.hf_tokenizer import HFTokenizer, stay_offline

    stay_offline()
    tokenizer = HFTokenizer(path, eod_token)
    shutil.copyfile(tokenizer.path, out_dir / "tokenizer.json")
    specials = {"eos_token": tokenizer.eod_token}
    if tokenizer.pad >= 0:
        specials["pad_token"] = "<pad>"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return {"pad_token_id": tokenizer.pad if tokenizer.pad >= 0 else None, "bos_token_id": None,
            "eos_token_id": tokenizer.eod}
