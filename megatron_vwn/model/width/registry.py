"""The width members behind one registry: ``model.vwn.connection`` names a :class:`WidthMember`.

A member is one module in this package (``ghc.py``: GHC and its presets HC and Frac; ``mhc.py``;
``altup.py``) holding its equations and a :class:`WidthMember` subclass registered with
:func:`register`. Everything outside the members (config validation, :class:`VWNShape`, the
layer spec, entry and exit, accounting, HF export) asks the member through this protocol and
never tests the connection's name; docs/width_family.md ("Adding a width member") walks through
it with the toy member of ``tests/unit/test_width_registry.py``.

The config layer sits above the members, so a member sees ``model.vwn`` (``VwnConfig``) as a
plain object and raises :class:`ConfigError` naming the key and the allowed values.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from megatron_vwn.config.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from megatron_vwn.model.width.shape import VWNShape


SUBLAYER_SLOTS: tuple[str, str] = ("attention_connection", "mlp_connection")
"""The slots of a sublayer member's two modules (around attention, around the MLP)."""
LAYER_SLOTS: tuple[str] = ("layer_connection",)
"""The slot of a layer member's one module (around the whole stock layer)."""


class WidthMember:
    """What a width member tells the rest of the package; subclass it and :func:`register` it.

    The defaults describe a sublayer member (one module around attention, one around the MLP,
    residual adds removed) that keeps the state ``D``-wide at the ends: a ``V x D'`` table and
    no reduce. ``vwn`` arguments are ``model.vwn`` (``VwnConfig``), ``shape`` a
    :class:`VWNShape`.
    """

    name: ClassVar[str]
    """The value of ``model.vwn.connection``."""
    wraps_layer: ClassVar[bool] = False
    """False: a module around each sublayer; True: one module around the whole stock layer
    (residual adds included), which runs on the ``D``-wide input the module reads."""
    slots: ClassVar[tuple[str, ...]] = SUBLAYER_SLOTS
    """Attribute names of the connection modules in the layer, frozen into checkpoint keys
    (``decoder.layers.attention_connection.proj``, and the optimizer's keys embed them).
    Member-neutral by default: :data:`SUBLAYER_SLOTS` (attention then MLP) for a sublayer
    member, :data:`LAYER_SLOTS` (one name) for one that ``wraps_layer``; a member that names its
    own keeps them."""
    legacy_slots: ClassVar[dict[str, str]] = {}
    """Slot name -> the name the slot had in checkpoints written before it was renamed. A load
    (``checkpoint/weights.py``, ``load_sharded``) asks for a key under the old name when the
    checkpoint holds only that one (model and optimizer state, at any layout)."""
    unit_width_is_backbone: ClassVar[bool] = False
    """``m = n = 1`` is the stock model (no width connection built at all)."""
    dynamic_default: ClassVar[bool] = True
    """``model.vwn.dynamic`` when the config leaves it unset (the member's paper)."""
    embeddings: ClassVar[tuple[str, ...]] = ("auto", "wide")
    """The ``model.vwn.embedding`` values this member accepts."""
    group_norm_option: ClassVar[bool] = False
    """Accepts ``model.vwn.group_norm=on`` (GHC's GroupNorm before the reduce)."""
    ghc_kernels: ClassVar[bool] = False
    """Accepts GHC's ``model.vwn.recompute`` modes and ``model.vwn.kernel=triton``."""
    swept_by_streams: ClassVar[bool] = False
    """A width sweep (``launch/sweep.py``) keeps this member and sets ``m = 1, n = r`` (D-wide
    streams or blocks); otherwise it sweeps ``connection=ghc`` over ``(m, n)``."""
    tied_embedding: ClassVar[str] = "factorized"
    """The ``model.vwn.embedding`` to suggest when ``model.tie_embeddings`` meets a wide table."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.wraps_layer and "slots" not in vars(cls) and cls.slots == SUBLAYER_SLOTS:
            cls.slots = LAYER_SLOTS  # the default of a layer member

    def validate(self, vwn: Any) -> None:
        """Member-specific checks on ``model.vwn`` (after the shared ones: positive sizes,
        ``n >= m``, ``m`` dividing the hidden size). Raise :class:`ConfigError`."""

    def embedding(self, vwn: Any) -> str:
        """The entry: wide | factorized | replicated | projected | none (``vwn_io.py``)."""
        return "wide" if vwn.embedding == "auto" else vwn.embedding

    def reduce(self, vwn: Any) -> str:
        """The exit: ghc (GroupNorm + ``W_reduce``) | sum | mean | active | none."""
        return "none"

    def group_norm(self, vwn: Any) -> bool:
        """Whether the exit's GroupNorm is on."""
        return False

    def output_init_scale(self, vwn: Any) -> float:
        """The default of ``model.vwn.output_init_scale``."""
        return 1.0

    def connection(self, shape: VWNShape, index: int, dtype: torch.dtype,
                   device=None) -> torch.nn.Module:
        """The module in slot ``index`` of the global layer or sublayer ``index`` (sublayer
        members: ``2l`` attention, ``2l + 1`` MLP), with ``read(H) -> (x, saved)`` and
        ``write(y, saved) -> H'``."""
        raise NotImplementedError

    def layer_params(self, vwn: Any, hidden_size: int) -> int:
        """Parameters of one layer's connection modules."""
        raise NotImplementedError

    def layer_flops(self, vwn: Any, hidden_size: int) -> int:
        """Forward FLOPs per token of one layer's connection modules."""
        raise NotImplementedError

    def hf_slots(self) -> dict[str, str]:
        """Our slot name -> the HF remote class's module name for it (docs/convert.md): the
        slots zipped with :attr:`hf_slot_names` (the slot names themselves when unset)."""
        names = self.hf_slot_names or self.slots
        return dict(zip(self.slots, names, strict=True))

    hf_slot_names: ClassVar[tuple[str, ...] | None] = None
    """The HF remote class's module names of the slots, in slot order (None: the slot names).
    Fixed by the exported format, independent of our slot names."""
    hf_params: ClassVar[tuple[str, ...]] = ()
    """Parameter names of the connection modules, the same in the HF remote class."""
    reference: ClassVar[ModuleType | None] = None
    """The member's plain-torch reference of its equations: a self-contained module (torch
    only) that the tests check the training module against and that the HF export copies
    beside ``modeling_vwn.py``. It defines ``hf_connection(config, active) -> module`` (the
    module around one sublayer or layer, from the exported ``VWNConfig``), and that module has
    ``read``, ``write`` and ``reset_parameters``; the exporter lists it in ``vwn_members.py``.
    None: not exportable with ``--format vwn``."""

    def hf_config(self, vwn: Any) -> dict[str, Any]:
        """Member-specific keyword arguments of the exported ``VWNConfig``."""
        return {}


MEMBERS: dict[str, WidthMember] = {}
"""``model.vwn.connection`` -> its member (one instance per registered class)."""


def register(member: type[WidthMember]) -> type[WidthMember]:
    """Class decorator: make ``member`` the meaning of ``model.vwn.connection=member.name``."""
    if member.name in MEMBERS:
        raise ValueError(f"width member {member.name!r} is registered twice")
    MEMBERS[member.name] = member()
    return member


def member_of(connection: str) -> WidthMember:
    """The member registered as ``connection``; :class:`ConfigError` naming the allowed ones."""
    try:
        return MEMBERS[connection]
    except KeyError:
        raise ConfigError(f"model.vwn.connection ({connection!r}) must be one of "
                          f"{names()}") from None


def names() -> list[str]:
    """The registered members' names, sorted."""
    return sorted(MEMBERS)


def members() -> list[WidthMember]:
    """The registered members, sorted by name."""
    return [MEMBERS[name] for name in names()]


def legacy_slot_names() -> dict[str, tuple[str, ...]]:
    """Every registered member's renamed slots: slot name -> the names it had before (sorted),
    for loading checkpoints that hold only the old keys (``WidthMember.legacy_slots``)."""
    old: dict[str, set[str]] = {}
    for member in members():
        for slot, before in member.legacy_slots.items():
            old.setdefault(slot, set()).add(before)
    return {slot: tuple(sorted(names)) for slot, names in sorted(old.items())}


def require_single_segment(vwn: Any, what: str) -> None:
    """Stream members split nothing: ``m = 1``, ``n`` counts ``what``."""
    if vwn.m != 1:
        raise ConfigError(
            f"model.vwn.connection={vwn.connection} needs model.vwn.m = 1 (got {vwn.m}); "
            f"n is {what}"
        )


# The built-in members register themselves on import (after ``register`` exists).
from megatron_vwn.model.width import altup, ghc, mhc  # noqa: E402, F401, I001
