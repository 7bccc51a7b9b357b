import pytest
import yaml

from pipeline.config import ConfigError, Params, TrainConfig, flatten, from_dict
from tests.conftest import REPO


def test_params_yaml_loads_into_typed_config():
    params = from_dict(Params, yaml.safe_load((REPO / "params.yaml").read_text()))
    assert params.train.model == "efficientnet_lite0"
    assert params.train.num_workers == 2
    assert params.register.alias == "champion"


def test_unknown_key_is_an_error_that_names_it():
    with pytest.raises(ConfigError, match="epoch_count"):
        from_dict(TrainConfig, {"epoch_count": 3})


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.epochs"):
        from_dict(Params, {"train": {"epochs": "three"}})


def test_int_promotes_to_float_and_flatten():
    cfg = from_dict(TrainConfig, {"lr": 1})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}


def test_params_yaml_lists_every_knob():
    import dataclasses

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, cls in [(f.name, f.default_factory().__class__) for f in dataclasses.fields(Params)
                         if f.default_factory is not dataclasses.MISSING]:
        fields = {x.name for x in dataclasses.fields(cls)}
        assert set(raw[section]) == fields, (section, fields ^ set(raw[section]))
