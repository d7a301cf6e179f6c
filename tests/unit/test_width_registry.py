"""The width-member registry (docs/width_family.md, "Adding a width member"): a toy member written
here, in this one file, gets config validation, the resolved shape, the layer spec, a
forward and a training step, and the accounting, with no edit anywhere else; and the members'
paper defaults resolve ``model.vwn.dynamic`` so checkpoints written before keep fitting."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from megatron_vwn.checkpoint.compat import check_model_fits
from megatron_vwn.checkpoint.errors import CheckpointError
from megatron_vwn.config import ConfigError, load_config
from megatron_vwn.model import accounting
from megatron_vwn.model.width import registry
from megatron_vwn.model.width.registry import WidthMember, register, require_single_segment
from megatron_vwn.model.width.shape import VWNShape
from megatron_vwn.model.width.vwn import VWNTransformerLayer
from tests.unit.test_vwn import VOCAB, _batch, _cfg, _model


class ToyConnection(torch.nn.Module):
    """``n`` streams of width ``D``: the sublayer reads their mean, and its output is added to
    stream ``i`` with a learned gain ``g_i`` (1 at init): ``x'_i = x_i + g_i F(mean_j x_j)``."""

    def __init__(self, n: int, hidden: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.n, self.hidden = n, hidden
        self.gain = torch.nn.Parameter(torch.ones(n, dtype=dtype, device=device))

    def read(self, hidden: torch.Tensor):
        s, b, _ = hidden.shape
        state = hidden.reshape(s, b, self.n, self.hidden)
        return state.mean(dim=2), state

    def write(self, output: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        new = state + self.gain.view(1, 1, -1, 1) * output.unsqueeze(2)
        return new.flatten(2)


class ToyMember(WidthMember):
    """``connection=toy``: ``m = 1``, replicated streams, one :class:`ToyConnection` per
    sublayer, the streams' mean at the exit; static (no dynamic part) unless asked."""

    name = "toy"
    slots = ("attention_toy", "mlp_toy")
    dynamic_default = False
    embeddings = ("auto", "replicated")

    def validate(self, vwn) -> None:
        require_single_segment(vwn, "the number of streams")
        if vwn.dynamic:
            raise ConfigError("model.vwn.dynamic=true does not go with model.vwn.connection=toy;"
                              " allowed: false")

    def embedding(self, vwn) -> str:
        return "replicated"

    def reduce(self, vwn) -> str:
        return "mean"

    def connection(self, shape, index, dtype, device=None):
        return ToyConnection(shape.n, shape.hidden, dtype, device)

    def layer_params(self, vwn, hidden_size: int) -> int:
        return 2 * vwn.n

    def layer_flops(self, vwn, hidden_size: int) -> int:
        return 2 * (vwn.n * hidden_size + 3 * vwn.n * hidden_size)  # mean; scale, add


@pytest.fixture
def toy(monkeypatch):
    """The toy registered for one test (a copy of the registry, restored afterwards)."""
    monkeypatch.setattr(registry, "MEMBERS", dict(registry.MEMBERS))
    register(ToyMember)
    return registry.member_of("toy")


TOY2 = ["model.vwn.connection=toy", "model.vwn.n=2"]


def test_unregistered_member_is_refused_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"model.vwn.connection \('toy'\) must be one of "
                                          r"\['altup', 'frac', 'ghc', 'hc', 'mhc'\]"):
        _cfg(*TOY2).model.validate()


def test_toy_member_config_is_validated_by_the_member(toy):
    cfg = _cfg(*TOY2)
    cfg.model.validate()
    assert cfg.model.vwn.dynamic is False  # the member's default
    assert cfg.model.vwn.resolved_embedding == "replicated"
    assert cfg.model.vwn.resolved_reduce == "mean"
    for overrides, message in (
        (["model.vwn.m=2", "model.vwn.n=2"],
         "model.vwn.connection=toy needs model.vwn.m = 1 (got 2); n is the number of streams"),
        (["model.vwn.dynamic=true"], "model.vwn.dynamic=true does not go with"),
        (["model.vwn.embedding=factorized"],
         "model.vwn.embedding=factorized does not go with model.vwn.connection=toy; allowed: "
         "auto, replicated"),
        (["model.vwn.group_norm=on"], "model.vwn.group_norm=on applies to"),
        (["model.vwn.recompute=ghc"], "model.vwn.recompute=ghc applies to the GHC-style"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            _cfg(*TOY2, *overrides).model.validate()


def test_toy_member_builds_trains_and_is_counted(single_process, toy):
    cfg = _cfg(*TOY2)
    shape = VWNShape.from_config(cfg.model.vwn, cfg.model.hidden_size)
    assert (shape.member, shape.wraps_layer, shape.width) == (toy, False, 64)

    model = _model(*TOY2)
    layer = model.decoder.layers[0]
    assert isinstance(layer, VWNTransformerLayer)
    assert [type(c) for c in layer.connections()] == [ToyConnection, ToyConnection]
    assert "decoder.layers.0.attention_toy.gain" in model.state_dict()

    counts = accounting.count_params(cfg.model, VOCAB)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.other == cfg.model.num_layers * 2 * 2
    assert accounting.vwn_flops_per_token(cfg.model) == \
        3 * cfg.model.num_layers * toy.layer_flops(cfg.model.vwn, cfg.model.hidden_size)

    # At init the streams are equal and every gain is 1: the backbone's residual stream in each.
    tokens, positions = _batch()
    base = _model()
    base.load_state_dict({k.replace("final_layernorm.norm.", "final_layernorm."): v
                          for k, v in model.state_dict().items() if "toy" not in k})
    torch.testing.assert_close(model(tokens, positions, None), base(tokens, positions, None),
                               rtol=1e-5, atol=1e-5)

    # One training step moves the toy's own parameters.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.roll(tokens, -1, dims=1)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    assert torch.isfinite(loss)
    loss.backward()
    assert layer.mlp_toy.gain.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(layer.mlp_toy.gain.detach(), torch.ones(2))


TOY_REFERENCE = '''"""The toy member's equations (torch only): x'_i = x_i + g_i F(mean_j x_j)."""

import torch
from torch import nn


class ToyReference(nn.Module):
    def __init__(self, n: int, hidden: int):
        super().__init__()
        self.n, self.hidden = n, hidden
        self.gain = nn.Parameter(torch.ones(n))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.gain.fill_(1.0)

    def read(self, hidden):
        state = hidden.reshape(*hidden.shape[:-1], self.n, self.hidden)
        return state.mean(dim=-2), state

    def write(self, output, state):
        return (state + self.gain[:, None] * output.unsqueeze(-2)).flatten(-2)


def hf_connection(config, active: int = 0) -> ToyReference:
    return ToyReference(config.vwn_n, config.hidden_size)
'''


def test_toy_member_exports_to_hugging_face_from_its_one_reference_file(single_process, toy,
                                                                         tmp_path, monkeypatch):
    """With a reference module (one file defining ``hf_connection``) the toy is exported as
    ``VWNForCausalLM`` and the remote class reproduces the Megatron model's logits; without one
    the export is refused naming the key."""
    pytest.importorskip("transformers")
    import importlib.util

    from megatron_vwn.convert.export import choose_format
    from megatron_vwn.convert.megatron_io import single_process_config
    from megatron_vwn.convert.verify import check_parity
    from tests.integration.convert_helpers import export_perturbed

    cfg = single_process_config(load_config("tiny", [
        "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.seq_length=32", *TOY2]))
    with pytest.raises(ConfigError, match=r"model.vwn.connection=toy has none"):
        choose_format(cfg, "auto")

    (tmp_path / "toy_reference.py").write_text(TOY_REFERENCE)
    spec = importlib.util.spec_from_file_location("toy_reference", tmp_path / "toy_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    monkeypatch.setattr(toy, "reference", reference, raising=False)
    monkeypatch.setattr(toy, "hf_params", ("gain",), raising=False)

    # a directory name of its own: transformers caches remote modules by the directory's name
    _, result = export_perturbed(cfg, tmp_path / "toy_hf")
    assert (result.out_dir / "toy_reference.py").read_text() == TOY_REFERENCE
    members_file = (result.out_dir / "vwn_members.py").read_text()
    assert "from .toy_reference import hf_connection as toy_reference" in members_file
    assert "'toy': (toy_reference, False, ('attention_toy', 'mlp_toy'))" in members_file
    # bound: fp32 logits of the same weights through two implementations of 2 layers, as the
    # other members' export tests (docs/convert.md)
    assert check_parity(result).max_abs_diff <= 1e-4


# The members' paper defaults for model.vwn.dynamic ------------------------------------------

@pytest.mark.parametrize("connection,dynamic", [("ghc", True), ("hc", True), ("frac", True),
                                                ("mhc", True), ("altup", False)])
def test_unset_dynamic_follows_the_members_paper(connection, dynamic):
    n = "model.vwn.m=2" if connection == "frac" else "model.vwn.m=1"
    cfg = load_config(None, [f"model.vwn.connection={connection}", n, "model.vwn.n=2"])
    assert cfg.model.vwn.dynamic is dynamic
    explicit = load_config(None, [f"model.vwn.connection={connection}", n, "model.vwn.n=2",
                                  f"model.vwn.dynamic={str(not dynamic).lower()}"])
    assert explicit.model.vwn.dynamic is (not dynamic)


def _written_before(overrides: list[str]) -> dict:
    """A checkpoint's model section as 4ae8ce7 wrote it: the resolved config, with
    ``dynamic`` at that version's default (true for every member) unless set."""
    cfg = load_config(None, overrides)
    section = dataclasses.asdict(cfg.model)
    if not any(item.startswith("model.vwn.dynamic=") for item in overrides):
        section["vwn"]["dynamic"] = True
    return section


@pytest.mark.parametrize("overrides", [
    [], ["model.vwn.m=2", "model.vwn.n=4"], ["model.vwn.connection=mhc", "model.vwn.n=4"],
    ["model.vwn.connection=hc", "model.vwn.n=2"],
    ["model.vwn.connection=altup", "model.vwn.n=2", "model.vwn.dynamic=false"],
], ids=["backbone", "ghc", "mhc", "hc", "altup_static"])
def test_checkpoints_written_before_fit_the_same_config(overrides):
    cfg = load_config(None, overrides)
    check_model_fits("ckpt", _written_before(overrides), 4096, cfg.model, 4096)


def test_old_default_dynamic_altup_checkpoint_needs_dynamic_true():
    """Before, ``connection=altup`` alone was Gemma 3n's dynamic variant: its checkpoint fits a
    config that says ``dynamic=true`` and is refused, naming the key, by one that does not."""
    old = _written_before(["model.vwn.connection=altup", "model.vwn.n=2"])
    dynamic = load_config(None, ["model.vwn.connection=altup", "model.vwn.n=2",
                                 "model.vwn.dynamic=true"])
    check_model_fits("ckpt", old, 4096, dynamic.model, 4096)
    plain = load_config(None, ["model.vwn.connection=altup", "model.vwn.n=2"])
    with pytest.raises(CheckpointError, match="model.vwn.dynamic: checkpoint True, config False"):
        check_model_fits("ckpt", old, 4096, plain.model, 4096)
