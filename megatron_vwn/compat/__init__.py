"""The upstream fence: every use of a private or patched Megatron-Core / PyTorch symbol.

Nothing else in the package names an upstream ``_private`` member or assigns into an upstream
module; each symbol used here has a test in ``tests/unit/test_compat_*.py`` (or
``tests/unit/test_mcore_compat.py``) that fails when it moves or changes meaning (docs/compat.md).

* :mod:`.mcore`: what differs between the supported Megatron-Core releases.
* :mod:`.mcore_internals`: private Megatron-Core members we call or override.
* :mod:`.cpu`: Megatron-Core on CPU with gloo (never active when CUDA is present).
"""
