"""The virtual-width family in one place: one module of math per connection (``ghc.py``), the
Megatron-Core layer that carries the wide state (``vwn.py``), and the wide-state entry and exit
(``vwn_io.py``: over-width embedding, GroupNorm + reduce) they all share."""
