"""The optimizer (Megatron-Core's, with our parameter groups) and the learning-rate schedule:
built by training, saved and restored by checkpoint, so they sit below both
(docs/architecture.md)."""
