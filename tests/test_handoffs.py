"""handoffs: typed stage hand-off files round-trip and refuse malformed content."""

from __future__ import annotations

import json

import pytest

from pipeline.handoffs import RegisterHandoff, TrainHandoff, read_handoff, write_handoff


def test_round_trip_and_alias_uri(tmp_path):
    write_handoff(TrainHandoff("run-1", "models:/m-1"), tmp_path / "train.json")
    assert read_handoff(TrainHandoff, tmp_path / "train.json") == TrainHandoff("run-1", "models:/m-1")
    reg = RegisterHandoff("malaria", "3", "champion", "roc_auc", 0.99, None, None, True,
                          "the test split", None, "first")
    write_handoff(reg, tmp_path / "register.json")
    back = read_handoff(RegisterHandoff, tmp_path / "register.json")
    assert back == reg and back.alias_uri() == "models:/malaria@champion"


def test_missing_unknown_or_absent_keys_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro"):
        read_handoff(TrainHandoff, tmp_path / "train.json")
    (tmp_path / "bad.json").write_text(json.dumps({"run_id": "r", "model_uri": "m", "extra": 1}))
    with pytest.raises(ValueError, match="extra"):
        read_handoff(TrainHandoff, tmp_path / "bad.json")
    (tmp_path / "short.json").write_text(json.dumps({"run_id": "r"}))
    with pytest.raises(ValueError, match="model_uri"):
        read_handoff(TrainHandoff, tmp_path / "short.json")
