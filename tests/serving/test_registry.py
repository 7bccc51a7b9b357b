"""registry: the champion rule, rollback and provenance tags."""

from __future__ import annotations

import mlflow
import pytest

from pipeline.config import RegisterConfig
from pipeline.serving.registry import promote
from pipeline.serving.registry_lock import LOCK_SUFFIX

CFG = RegisterConfig(metric="roc_auc", alias="champion")


def _metrics(auc: float) -> dict:
    return {"roc_auc": auc, "accuracy": 0.9}


def test_worse_model_does_not_take_the_alias(model_uris):
    name = "rule-test"
    first = promote(CFG, name, model_uris(), _metrics(0.90), "split-a", lambda c: pytest.fail())
    assert first.promoted and first.champion_before is None
    worse = promote(CFG, name, model_uris(), _metrics(0.85), "split-a", lambda c: pytest.fail())
    assert not worse.promoted and "stays without the alias" in worse.summary()
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.version
    tie = promote(CFG, name, model_uris(), _metrics(0.90), "split-a", lambda c: pytest.fail())
    assert not tie.promoted  # only a strictly better model moves the alias
    better = promote(CFG, name, model_uris(), _metrics(0.95), "split-a", lambda c: pytest.fail())
    assert better.promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == better.version
    tags = client.get_model_version(name, better.version).tags
    assert tags["split_id"] == "split-a" and float(tags["test_roc_auc"]) == pytest.approx(0.95)


def test_champion_from_another_split_is_compared_on_patients_neither_trained_on(model_uris):
    name = "rescore-test"
    promote(CFG, name, model_uris(), _metrics(0.99), "old-split", lambda c: pytest.fail())
    seen = []

    def compare(champion) -> tuple[float, float, str]:
        seen.append(str(champion.version))
        return 0.88, 0.80, "3 test patients neither model trained on"

    result = promote(CFG, name, model_uris(), _metrics(0.90), "new-split", compare)
    assert seen == ["1"]
    assert result.promoted and result.champion_value == pytest.approx(0.80)
    assert result.value == pytest.approx(0.88)  # both figures on the same unseen patients
    assert "on 3 test patients neither model trained on" in result.summary()


def test_no_fair_comparison_is_refused_with_why_and_what_to_do(model_uris):
    from pipeline.serving.registry import ComparisonRefused

    name = "refuse-test"
    promote(CFG, name, model_uris(), _metrics(0.70), "old-split", lambda c: pytest.fail())

    def compare(champion):
        raise ComparisonRefused("it trained on all 4 patients of this test split")

    result = promote(CFG, name, model_uris(), _metrics(0.99), "new-split", compare)
    assert not result.promoted and result.refused
    assert "no fair comparison with champion v1" in result.summary()
    assert str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version) == "1"


def test_lower_is_better_metric_and_unknown_metric(model_uris):
    cfg = RegisterConfig(metric="log_loss")
    promote(cfg, "loss-test", model_uris(), {"log_loss": 0.30}, "s", lambda u: pytest.fail())
    assert promote(cfg, "loss-test", model_uris(), {"log_loss": 0.20}, "s", lambda u: pytest.fail()).promoted
    with pytest.raises(ValueError, match="not among the test metrics"):
        promote(RegisterConfig(metric="auroc"), "x", model_uris(), _metrics(0.9), "s", None)


def test_margin_and_rollback_restore_the_previous_champion(model_uris):
    from pipeline.serving.registry import rollback

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
    from pipeline.serving.registry import register

    result = register(RegisterConfig(), "provenance-test", model_uris(), _metrics(0.9),
                      prepared_synthetic, "Parasitized")
    tags = mlflow.MlflowClient().get_model_version("provenance-test", result.version).tags
    assert len(tags["dataset_id"].split("-")) == 3 and tags["git_commit"]
    assert tags["test_accuracy"] == "0.900000" and tags["run_id"]
    from pipeline.data.prepared import PreparedData
    from pipeline.serving.registry import (
        TRAIN_GROUPS_ARTIFACT,
        groups_digest,
        training_groups,
    )

    groups = training_groups(PreparedData(prepared_synthetic))
    recorded = mlflow.artifacts.load_dict(f"runs:/{tags['run_id']}/{TRAIN_GROUPS_ARTIFACT}")["groups"]
    description = mlflow.MlflowClient().get_registered_model("provenance-test").description
    assert "| entry point | accepts |" in description and "predict_arrays" in description
    assert recorded == groups and tags["train_groups_sha256"] == groups_digest(groups)


def test_a_moved_split_never_scores_the_champion_on_patients_it_trained_on(model_uris, synthetic_zip,
                                                                          prepared_synthetic, tmp_path):
    """The leak reproduction: champion on one split, prepare.seed changes, register again."""
    from pipeline.config import PrepareConfig
    from pipeline.data.prepare import prepare
    from pipeline.data.prepared import PreparedData
    from pipeline.serving.registry import register, training_groups

    name = "leak-test"
    first = register(RegisterConfig(), name, model_uris(), _metrics(0.99), prepared_synthetic, "Parasitized")
    assert first.promoted
    champion_saw = set(training_groups(PreparedData(prepared_synthetic)))
    for seed in range(1, 40):  # a split whose test patients the champion partly trained on
        moved = prepare(synthetic_zip, tmp_path / f"moved{seed}", PrepareConfig(image_size=32, seed=seed),
                        "malaria").out_dir
        test = set(PreparedData(moved).split("test").groups)
        if test & champion_saw and test - champion_saw:
            break
    else:
        pytest.fail("no seed moved the split the way this test needs")
    new_uri = model_uris()
    second = register(RegisterConfig(), name, new_uri, _metrics(0.5), moved, "Parasitized")
    unseen = sorted(test - champion_saw)
    assert second.refused is None and second.basis == f"{len(unseen)} test patients neither model trained on"
    assert second.champion_before == first.version
    # Both figures come from the unseen patients only, not from the 0.5 on the whole split.
    from pipeline.serving.registry import metrics_on_split

    data = PreparedData(moved)
    assert second.value == pytest.approx(metrics_on_split(new_uri, data, "test", "Parasitized", unseen)["roc_auc"])
    champion_uri = f"models:/{name}/{first.version}"
    assert second.champion_value == pytest.approx(
        metrics_on_split(champion_uri, data, "test", "Parasitized", unseen)["roc_auc"])


def test_a_split_made_only_of_the_champions_training_patients_is_refused(model_uris, prepared_synthetic,
                                                                        monkeypatch):
    from pipeline.serving import registry

    name = "all-seen-test"
    registry.register(RegisterConfig(), name, model_uris(), _metrics(0.8), prepared_synthetic, "Parasitized")
    champion = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
    test = set(registry.PreparedData(prepared_synthetic).split("test").groups)
    monkeypatch.setattr(registry, "champion_training_groups", lambda c: test | {"other"})
    monkeypatch.setattr(registry.PreparedData, "split_id", lambda self, s: f"moved-{s}")
    result = registry.register(RegisterConfig(), name, model_uris(), _metrics(0.99), prepared_synthetic,
                               "Parasitized")
    assert not result.promoted and "trained on all" in result.refused
    assert "pipeline rollback" in result.refused and str(champion.version) == result.champion_before


@pytest.mark.parametrize("slow_writer", ["better", "worse"])
def test_two_registers_racing_record_both_and_crown_the_better(model_uris, slow_writer, monkeypatch):
    """The dangerous interleaving, forced by events, not sleeps: the slow writer reads the
    champion first and holds on until the other racer has either read the same champion
    (no lock) or been turned away by the lock; it sets the alias only once the other can no
    longer overtake it. Without the registry lock the late writer wins even when it is worse."""
    import threading

    from pipeline.serving import registry

    name = f"race-{slow_writer}"
    promote(CFG, name, model_uris(), _metrics(0.50), "s", lambda c: pytest.fail())
    other = {"better": "worse", "worse": "better"}[slow_writer]
    uris = {"better": model_uris(), "worse": model_uris()}
    read_champion, set_alias = registry._current, mlflow.MlflowClient.set_registered_model_alias
    slow_has_read = threading.Event()  # the slow writer read the champion (inside the lock)
    other_is_in = threading.Event()  # the other read the champion too, or the lock turned it away
    other_is_past = threading.Event()  # the other cannot set the alias after the slow writer
    turned_away = []
    waits = []

    def wait(event: threading.Event) -> None:  # a guard against a hang: nothing here is timed
        waits.append(event.wait(timeout=120))

    def read(*args):
        champion = read_champion(*args)
        if threading.current_thread().name == slow_writer:
            slow_has_read.set()
            wait(other_is_in)
        else:
            other_is_in.set()
        return champion

    def set_late(self, *args):
        if threading.current_thread().name == slow_writer:
            wait(other_is_past)  # unlocked, the other has set the alias by now: this write is last
        try:
            return set_alias(self, *args)
        finally:
            if threading.current_thread().name == other:
                other_is_past.set()

    def lock_busy() -> None:  # the other racer found the lock held by the slow writer
        turned_away.append(threading.current_thread().name)
        other_is_in.set()
        other_is_past.set()  # it waits for the lock: it cannot write before the slow writer

    monkeypatch.setattr(registry, "_current", read)
    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", set_late)
    results, errors = {}, []

    def racer(which: str, value: float) -> None:
        try:
            if which == other:
                wait(slow_has_read)
            results[which] = promote(CFG, name, uris[which], _metrics(value), "s", lambda c: pytest.fail(),
                                     on_lock_busy=lock_busy if which == other else None)
        except BaseException as exc:  # pytest.fail too: reported below, in the test's thread
            errors.append(exc)
        finally:
            if which == other:
                other_is_past.set()  # done (promoted or not): it writes nothing more

    threads = [threading.Thread(target=racer, args=("better", 0.90), name="better"),
               threading.Thread(target=racer, args=("worse", 0.70), name="worse")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and all(waits) and not any(t.is_alive() for t in threads), (errors, waits)
    assert slow_has_read.is_set() and other_is_in.is_set()  # the interleaving happened
    assert turned_away and set(turned_away) == {other}  # the lock, not luck, kept them apart
    client = mlflow.MlflowClient()
    assert len(client.search_model_versions(f"name='{name}'")) == 3  # both recorded
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == results["better"].version
    assert not client.search_registered_models(f"name='{name}{LOCK_SUFFIX}'")  # released


def test_a_lock_released_while_mlflow_reads_the_conflict_back_is_taken_at_once(tracking_uri, monkeypatch):
    """MLflow's create_registered_model reads the existing model back after a name conflict;
    if the holder deleted it in between, MLflow says RESOURCE_DOES_NOT_EXIST. The lock is free
    then: the waiter takes it, without an error and without counting it as busy."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from pipeline.serving.registry_lock import registry_lock

    create, calls = mlflow.MlflowClient.create_registered_model, []

    def released_in_between(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 1:
            raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)
        return create(self, name, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "create_registered_model", released_in_between)
    busy = []
    with registry_lock("released-race", on_busy=lambda: busy.append(1)):
        assert mlflow.MlflowClient().get_registered_model(f"released-race{LOCK_SUFFIX}")
    assert calls == [f"released-race{LOCK_SUFFIX}"] * 2 and not busy
    assert not mlflow.MlflowClient().search_registered_models(f"name='released-race{LOCK_SUFFIX}'")
