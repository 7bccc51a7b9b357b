"""registry: the champion rule, rollback and provenance tags."""

from __future__ import annotations

import mlflow
import pytest

from pipeline.config import RegisterConfig
from pipeline.registry import promote

CFG = RegisterConfig(metric="roc_auc", alias="champion")


def _metrics(auc: float) -> dict:
    return {"roc_auc": auc, "accuracy": 0.9}


def test_worse_model_does_not_take_the_alias(model_uris):
    name = "rule-test"
    first = promote(CFG, name, model_uris(), _metrics(0.90), "split-a", lambda uri: pytest.fail())
    assert first.promoted and first.champion_before is None
    worse = promote(CFG, name, model_uris(), _metrics(0.85), "split-a", lambda uri: pytest.fail())
    assert not worse.promoted and "stays without the alias" in worse.summary()
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.version
    tie = promote(CFG, name, model_uris(), _metrics(0.90), "split-a", lambda uri: pytest.fail())
    assert not tie.promoted  # only a strictly better model moves the alias
    better = promote(CFG, name, model_uris(), _metrics(0.95), "split-a", lambda uri: pytest.fail())
    assert better.promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == better.version
    tags = client.get_model_version(name, better.version).tags
    assert tags["split_id"] == "split-a" and float(tags["test_roc_auc"]) == pytest.approx(0.95)


def test_champion_from_another_split_is_rescored_on_this_one(model_uris):
    name = "rescore-test"
    promote(CFG, name, model_uris(), _metrics(0.99), "old-split", lambda uri: pytest.fail())
    seen = []

    def rescore(uri: str) -> dict:
        seen.append(uri)
        return _metrics(0.80)  # the old champion is weaker on the new split

    result = promote(CFG, name, model_uris(), _metrics(0.90), "new-split", rescore)
    assert seen == [f"models:/{name}/1"]
    assert result.promoted and result.champion_value == pytest.approx(0.80)


def test_lower_is_better_metric_and_unknown_metric(model_uris):
    cfg = RegisterConfig(metric="log_loss")
    promote(cfg, "loss-test", model_uris(), {"log_loss": 0.30}, "s", lambda u: pytest.fail())
    assert promote(cfg, "loss-test", model_uris(), {"log_loss": 0.20}, "s", lambda u: pytest.fail()).promoted
    with pytest.raises(ValueError, match="not among the test metrics"):
        promote(RegisterConfig(metric="auroc"), "x", model_uris(), _metrics(0.9), "s", None)


def test_margin_and_rollback_restore_the_previous_champion(model_uris):
    from pipeline.registry import rollback

    name = "rollback-test"
    cfg = RegisterConfig(metric="roc_auc", margin=0.02)
    v1 = promote(cfg, name, model_uris(), _metrics(0.90), "s", lambda u: pytest.fail())
    small = promote(cfg, name, model_uris(), _metrics(0.91), "s", lambda u: pytest.fail())
    assert not small.promoted  # better, but not by the margin
    v3 = promote(cfg, name, model_uris(), _metrics(0.95), "s", lambda u: pytest.fail())
    assert v3.promoted
    client = mlflow.MlflowClient()
    assert client.get_model_version(name, v3.version).tags["previous_champion"] == v1.version
    left, now = rollback(name)
    assert (left, now) == (v3.version, v1.version)
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1.version
    assert "rolled_back" in client.get_model_version(name, v3.version).tags
    rollback(name, to=small.version)
    assert str(client.get_model_version_by_alias(name, "champion").version) == small.version
    with pytest.raises(ValueError, match="no alias"):
        rollback(name, alias="no-such-alias")


def test_register_tags_provenance(model_uris, prepared_synthetic):
    from pipeline.registry import register

    result = register(RegisterConfig(), "provenance-test", model_uris(), _metrics(0.9),
                      prepared_synthetic, "Parasitized")
    tags = mlflow.MlflowClient().get_model_version("provenance-test", result.version).tags
    assert len(tags["dataset_id"].split("-")) == 3 and tags["git_commit"]
    assert tags["test_accuracy"] == "0.900000" and tags["run_id"]
