"""Config dataclasses: every model builds from its config, and a checkpoint round trip keeps
every field; validation names the field; the command-line options are the fields."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from lorank.cli.options import add_config_options, build, cli_fields, describe_error, flag_of
from lorank.config import Config, ConfigError
from lorank.nn import (
    LHSMM,
    HMMConfig,
    HMMLanguageModel,
    HMMLMConfig,
    HSMMConfig,
    MusicHMM,
    MusicHMMConfig,
    NeuralPCFG,
    PCFGConfig,
)
from lorank.tasks import TASKS, MusicDataConfig, PCFGDataConfig, SeriesDataConfig, TextDataConfig
from lorank.train import TrainConfig, load_checkpoint, save_checkpoint
from lorank.train.checkpoint import model_state

ALL_CONFIGS = (HMMConfig, HMMLMConfig, MusicHMMConfig, PCFGConfig, HSMMConfig, TextDataConfig,
               PCFGDataConfig, MusicDataConfig, SeriesDataConfig, TrainConfig)


#: per config class, instances that together change every field from its default (a dropped
#: field then shows up in a round trip); ``series`` has a single legal value
VARIANTS = {
    HMMLMConfig: [dict(model="lhmm_band", num_states=12, rank=3, band=2, hidden=8, mlp_layers=1,
                       state_dropout=0.25, feature_dropout=0.5, init_scale=1.5, vocab_size=17,
                       transition="embedding"),
                  dict(model="lhmm", num_states=8, rank=2, memory_light=True, vocab_size=5,
                       low_rank_form="kernel")],
    MusicHMMConfig: [dict(model="lhmm", num_states=6, rank=2, hidden=8, mlp_layers=0,
                          state_dropout=0.1, feature_dropout=0.1, init_scale=2.0,
                          memory_light=True, emission_layers=2),
                     dict(model="lhmm_band", num_states=6, band=1, transition="embedding",
                          low_rank_form="kernel")],
    HMMConfig: [dict(model="rank_space", num_states=10, rank=5, hidden=4, init_scale=0.5,
                     mlp_layers=1, state_dropout=0.5, feature_dropout=0.5,
                     transition="embedding"),
                dict(model="lhmm_band", band=3), dict(memory_light=True, low_rank_form="kernel")],
    PCFGConfig: [dict(rule_type="cp", num_nonterminals=3, num_preterminals=4, rank=5,
                      hidden=8, vocab_size=9, max_length=7)],
    HSMMConfig: [dict(num_states=6, rank=3, max_duration=5, emb_dim=4, obs_dim=2),
                 dict(model="hsmm", obs_dim=3)],
    TextDataConfig: [dict(corpus="ptb", vocab_size=500, max_length=30)],
    PCFGDataConfig: [dict(corpus="ptb", vocab_size=500, max_length=12, eval_max_length=20)],
    MusicDataConfig: [dict(corpus="folk", grid=0.5, max_pieces=9, transpose=False)],
    SeriesDataConfig: [dict(csv="x.csv", window=52, train_stride=13, valid_fraction=0.2,
                            test_fraction=0.1)],
    TrainConfig: [dict(out="o", epochs=3, max_steps=9, max_seconds=60.0, batch_size=7,
                       max_tokens=99,
                       eval_batch_size=5, eval_max_tokens=50, accumulate=2, lr=0.5,
                       weight_decay=0.1, clip=2.0, lr_factor=0.25, patience=4, min_lr=1e-4,
                       eval_per_epoch=2, eval_every=3, eval_test=False, checkpoint_every=5,
                       seed=7, resume=True, overwrite=True, device="cpu", progress=False,
                       threads=1, log_every=5.0, schedule="linear")],
}


def _variants(cls: type[Config]) -> list[Config]:
    configs = [cls(**changes) for changes in VARIANTS[cls]]
    default = cls()
    untouched = {f.name for f in dataclasses.fields(cls)} - {"series"}
    for c in configs:
        untouched -= {n for n in untouched if getattr(c, n) != getattr(default, n)}
    assert not untouched, f"{cls.__name__}: extend VARIANTS to change {sorted(untouched)}"
    return configs


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_every_field_survives_a_json_round_trip(cls):
    for config in _variants(cls):
        again = cls.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config
        for f in dataclasses.fields(cls):
            assert getattr(again, f.name) == getattr(config, f.name), f.name


MODELS = [
    (HMMLMConfig, lambda c: HMMLanguageModel(c)),
    (MusicHMMConfig, lambda c: MusicHMM(c)),
    (PCFGConfig, lambda c: NeuralPCFG(c)),
    (HSMMConfig, lambda c: LHSMM(c)),
]


@pytest.mark.parametrize("cls,make", MODELS, ids=lambda x: getattr(x, "__name__", ""))
def test_every_model_rebuilds_from_its_saved_config(cls, make, tmp_path):
    """Build from the config, save weights and config in a checkpoint, rebuild from the stored
    config alone: same config field by field, same parameters, same outputs."""
    for config in _variants(cls):
        _rebuild(config, cls, make, tmp_path)


def _rebuild(config, cls, make, tmp_path):
    torch.manual_seed(0)
    model = make(config)
    assert model.config == config
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, {"model_config": config.to_dict()}, rng=False)
    tensors, meta = load_checkpoint(path)
    stored = cls.from_dict(meta["model_config"])
    for f in dataclasses.fields(cls):
        assert getattr(stored, f.name) == getattr(config, f.name), f.name
    torch.manual_seed(1)  # a different initialization, overwritten by the weights
    clone = make(stored)
    clone.load_state_dict(model_state(tensors))
    for (k, a), (k2, b) in zip(model.state_dict().items(), clone.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_validation_names_the_field():
    with pytest.raises(ConfigError) as e:
        HMMConfig(num_states=0)
    assert (e.value.owner, e.value.field) == ("HMMConfig", "num_states")
    assert "num_states must be a positive integer, got 0" in str(e.value)
    with pytest.raises(ConfigError, match="no such field"):
        HMMConfig.from_dict({"num_states": 4, "colour": "red"})
    with pytest.raises(TypeError, match="must be a HMMLMConfig"):
        HMMLMConfig.resolve(PCFGConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        HMMConfig().rank = 3  # frozen: defaults and validation happen once


def test_legacy_fields_read_from_old_dicts():
    class Old(HMMConfig):
        LEGACY = {"init_scale": 1.0}

    old = dataclasses.dataclass(frozen=True)(Old)
    assert old.from_dict({"num_states": 8}).init_scale == 1.0  # written before the field
    assert old.from_dict({"num_states": 8, "init_scale": 2.0}).init_scale == 2.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_command_line_options_are_the_config_fields(name):
    """Each task's options are generated from its configs: one flag per field, the dataclass
    default when not given, the typed value when given; 0 is kept (and then rejected), never
    replaced by a default."""
    task = TASKS[name]
    for cls in (TrainConfig, task.data_config_class, task.model_config_class):
        parser = argparse.ArgumentParser()
        add_config_options(parser, cls)
        flags = {flag_of(f) for f in cli_fields(cls)}
        option_flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
        assert flags <= option_flags
        assert build(cls, parser.parse_args([])) == cls()
        int_fields = [f for f in cli_fields(cls) if f.type in ("int", "int | None")]
        for f in int_fields:
            args = parser.parse_args([flag_of(f), "0"])
            assert getattr(args, f.name) == 0
            try:
                value = build(cls, args)
            except ConfigError as e:
                assert e.field == f.name
                assert describe_error(e, (cls,)).startswith(f"argument {flag_of(f)}: ")
            else:
                assert getattr(value, f.name) == 0
