import pytest

from pipeline.config import ConfigError, TrainConfig, flatten, from_dict
from pipeline.params import Params
from tests.conftest import repo_params


def test_params_yaml_loads_into_typed_config():
    params = from_dict(Params, repo_params())
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

    raw = repo_params()
    for section, cls in [(f.name, f.default_factory().__class__) for f in dataclasses.fields(Params)
                         if f.default_factory is not dataclasses.MISSING]:
        fields = {x.name for x in dataclasses.fields(cls)}
        assert set(raw[section]) == fields, (section, fields ^ set(raw[section]))


@pytest.mark.parametrize("change, message", [
    ({"train": {"regime": "finetune"}}, r"train.regime: 'finetune' is not one of scratch, feature_extract"),
    ({"train": {"optimizer": "adam"}}, r"train.optimizer: 'adam' is not one of adamw, sgd"),
    ({"train": {"scheduler": "linear"}}, r"train.scheduler: 'linear' is not one of cosine"),
    ({"train": {"model": "resnet9000"}}, r"train.model: 'resnet9000' is not one of baseline_cnn"),
    ({"augment": {"preset": "heavy"}}, r"augment.preset: 'heavy' is not one of custom, none"),
    ({"dataset": "mnist"}, r"dataset: no download.sources.mnist in params.yaml; datasets with a source: "
                           r"bloodmnist"),
    ({"augment": {"hflip": 1.5}}, r"augment.hflip: 1.5 is outside \[0.0, 1.0\]"),
    ({"evaluate": {"patient_threshold": -0.1}}, r"evaluate.patient_threshold"),
    ({"prepare": {"val_ratio": 0.5, "test_ratio": 0.5}}, r"val_ratio \+ prepare.test_ratio must be < 1"),
    ({"train": {"lr": 0.0}}, r"train.lr: 0.0 is outside"),
    ({"train": {"epochs": 0}}, r"train.epochs: 0 is outside \[1, inf\]"),
    ({"train": {"num_workers": 0}}, r"train.num_workers"),
    ({"score": {"concurrency": -1}}, r"score.concurrency"),
    ({"evaluate": {"ci_level": 95}}, r"evaluate.ci_level"),
])
def test_bad_params_fail_at_load_naming_the_key_and_allowed_values(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Params, repo_params(**change))


def test_a_dataset_without_a_source_fails_at_load():
    raw = repo_params(dataset="imagefolder")
    del raw["download"]["sources"]["imagefolder"]
    with pytest.raises(ConfigError, match="dataset: no download.sources.imagefolder"):
        from_dict(Params, raw)


def test_enum_values_are_the_ones_the_code_implements():
    from pipeline.config import AUGMENT_PRESETS, CUSTOM_MODELS
    from pipeline.data.augment import PRESETS
    from pipeline.data.datasets import DATASETS
    from pipeline.models import MODELS

    assert set(AUGMENT_PRESETS) == {"custom", *PRESETS}
    assert set(CUSTOM_MODELS) == set(MODELS)
    sources = repo_params()["download"]["sources"]
    assert set(sources) <= set(DATASETS)  # a dataset with a source is a known one
