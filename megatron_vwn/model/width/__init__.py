"""The virtual-width family: one module per member (``ghc.py`` with HC and Frac, ``mhc.py``,
``altup.py``), each registered in ``registry.py`` with its plain-torch reference
(``*_reference.py``); the layer that carries the wide state (``vwn.py``), its resolved layout
(``shape.py``) and the wide-state entry and exit (``vwn_io.py``) they all share."""
