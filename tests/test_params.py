"""params.yaml against the stages' typed params: the defaults agree, shared keys reach every stage."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from stages.common.params import SHARED_KEYS, load_section
from stages.ingest import IngestParams
from stages.sfm import GateParams, SfmParams
from stages.synth import SynthParams
from tests.conftest import ROOT

SECTIONS = {"synth": SynthParams, "ingest": IngestParams, "sfm": SfmParams}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_params_yaml_defaults_are_the_dataclass_defaults(section):
    # Neither may drift: a default changed in one place only would make `dvc repro` and an import disagree.
    assert load_section(ROOT / "params.yaml", section, SECTIONS[section]) == SECTIONS[section]()


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_params_yaml_lists_every_key_of_its_section(section):
    # Every tunable is visible (and diffable by `dvc params diff`) in params.yaml, nested groups included.
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    cls = SECTIONS[section]
    keys = {f.name for f in dataclasses.fields(cls)} - set(SHARED_KEYS)
    assert set(data[section]) == keys
    if section == "sfm":
        assert set(data["sfm"]["gate"]) == {f.name for f in dataclasses.fields(GateParams)}


def test_shared_seed_and_device_reach_every_stage_unless_its_section_sets_them(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"seed": 7, "device": "cpu", "sfm": {"seed": 3}, "synth": {}}))
    assert load_section(path, "synth", SynthParams).seed == 7
    assert load_section(path, "synth", SynthParams).device == "cpu"
    assert load_section(path, "sfm", SfmParams).seed == 3 and load_section(path, "sfm", SfmParams).device == "cpu"
    assert not hasattr(load_section(path, "ingest", IngestParams), "seed")  # ingest has no seed: not added


def test_a_bad_nested_gate_key_is_named(tmp_path):
    from stages.common.errors import StageError

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"sfm": {"gate": {"max_step_ration": 3.0}}}))
    with pytest.raises(StageError, match=r"params.yaml:sfm.gate: unknown key 'max_step_ration'"):
        load_section(path, "sfm", SfmParams)
