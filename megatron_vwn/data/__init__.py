"""Data pipeline: raw text -> SentencePiece tokenizer -> Megatron indexed files -> batches.

The modules are kept apart so that light ones (reading text, the bundled corpus, the cache) do
not import Megatron-Core or torch, which take seconds to import:

- :mod:`.readers`: documents from ``.txt`` / ``.jsonl`` (optionally ``.gz``) files.
- :mod:`.bundled`: the public-domain corpus shipped in the package (Moby-Dick, by chapter).
- :mod:`.tokenizer`: train a deterministic SentencePiece BPE model; load it as a Megatron
  tokenizer.
- :mod:`.preprocess`: tokenize documents into ``PREFIX.bin`` / ``PREFIX.idx`` (also the
  ``megatron-vwn preprocess`` subcommand).
- :mod:`.split`: how ``data.split`` divides documents (an early check without Megatron-Core).
- :mod:`.cache`: the cache directory and the lock-then-rename build used for shared caches.
- :mod:`.datasets`: ``prepare_data`` (before any process group) and ``build_datasets``
  (Megatron's blended GPT datasets).
- :mod:`.sampler`: Megatron-style pretraining batch order and the loader.
"""
