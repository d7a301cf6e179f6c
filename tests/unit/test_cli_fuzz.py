"""Fuzzed input never crashes the CLI: hundreds of random override strings, YAML files and flags
thrown at ``megatron-vwn train`` / ``slurm`` / ``convert`` (in-process, with stubs that stop
where real work would begin: training, data building, sbatch, checkpoint reading). Every one is
either accepted or refused with exit status 2 and one ``megatron-vwn: error:`` line; never a
traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_vwn.cli import main
from megatron_vwn.config.schema import Config


class Stopped(Exception):
    """Raised by the stubs: the input was accepted and real work would start here."""


def _stop(*args, **kwargs):
    raise Stopped


@pytest.fixture(scope="module", autouse=True)
def stubs():
    import megatron_vwn.convert.export
    import megatron_vwn.convert.importer
    import megatron_vwn.data.datasets
    import megatron_vwn.launch.slurm
    import megatron_vwn.training.faults
    import megatron_vwn.training.trainer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(megatron_vwn.training.trainer, "run_training", _stop)
        patch.setattr(megatron_vwn.training.faults, "launch_reporting_faults", _stop)
        patch.setattr(megatron_vwn.data.datasets, "_prepare_bundled", _stop)
        patch.setattr(megatron_vwn.convert.export, "export_checkpoint", _stop)
        patch.setattr(megatron_vwn.convert.importer, "import_hf_llama", _stop)
        patch.setenv("MVWN_SLURM_SITE", "")
        yield


def _keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.append(prefix + f.name)
            keys += _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


KEYS = _keys()
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
PUNCT = st.text(alphabet="abcxyz019.-+eE_=,:[]{}'\"!&*#|>%@` \t", max_size=16)
SCALARS = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True), st.booleans(),
                    st.none(), TEXT, st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10",
                                                      "2020-01-01", "~", "[]", "{}", "auto"]))
MAP_KEYS = st.one_of(st.text(max_size=5), st.integers(-3, 3), st.booleans(), st.none(),
                     st.sampled_from(["m", "n", "lr", "tensor", "paths", "iters"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(MAP_KEYS, inner, max_size=3), max_leaves=6)
KEY = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".x"), PUNCT, TEXT)
VALUE_TEXT = st.one_of(PUNCT, TEXT, VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True,
                                                                         width=10**6).strip()))
OVERRIDE = st.one_of(st.tuples(KEY, VALUE_TEXT).map("=".join), TEXT, PUNCT)
YAML_DOC = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from([k.split(".")[0] for k in KEYS] + ["base"]),
                              MAP_KEYS),
                    st.one_of(VALUES, st.dictionaries(
                        st.one_of(st.sampled_from([k.split(".")[-1] for k in KEYS]), MAP_KEYS),
                        VALUES, max_size=4)),
                    max_size=4).map(yaml.safe_dump),
    VALUES.map(yaml.safe_dump), TEXT, PUNCT)
FLAG = st.one_of(st.sampled_from(["--nproc", "--nodes", "--time", "--chain", "--widths", "--env",
                                  "--site", "--dtype", "--format", "--max-shard-size", "-h",
                                  "--tokenizer", "--no-tokenizer", "--verify", "--sbatch-arg"]),
                 PUNCT, TEXT)
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def run_cli(argv: list[str]) -> None:
    """Run the CLI on ``argv``: accepted, or exit 2 with exactly one error line."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            status = main(argv)
        except Stopped:
            return
        except SystemExit as exc:  # argparse: usage errors, --help, --version
            status = exc.code
    text = err.getvalue()
    assert "Traceback" not in text, (argv, text)
    if status == 0:
        return
    lines = [line for line in text.splitlines() if line.startswith("megatron-vwn: error:")]
    assert status == 2 and len(lines) == 1, (argv, status, text[-2000:])
    assert all(not line.startswith("megatron-vwn") or line in lines
               for line in text.splitlines()), (argv, text)


@FUZZ
@given(st.lists(OVERRIDE, max_size=4), st.booleans())
def test_train_overrides(overrides, nproc):
    run_cli(["train", "tiny", *overrides, *(["--nproc", "2"] if nproc else [])])


@FUZZ
@given(YAML_DOC, st.lists(OVERRIDE, max_size=2), st.sampled_from(["train", "slurm"]))
def test_yaml_files(tmp_path_factory, document, overrides, command):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(document)
    head = ["train"] if command == "train" else ["slurm", "submit", "--dry-run"]
    run_cli([*head, str(path), *overrides])


@FUZZ
@given(st.sampled_from(["submit", "sweep", "status"]), st.lists(st.one_of(FLAG, OVERRIDE),
                                                               max_size=5))
def test_slurm_arguments(action, args):
    run_cli(["slurm", action, *args, *(["--dry-run"] if action != "status" else [])])


@FUZZ
@given(st.sampled_from(["hf", "from-hf"]), st.lists(st.one_of(FLAG, OVERRIDE, TEXT), max_size=5))
def test_convert_arguments(action, args):
    run_cli(["convert", action, *args])
