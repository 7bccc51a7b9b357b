"""console: what reaches the terminal, and what only the stage's log file."""

from __future__ import annotations

import logging

from pipeline import console


def test_the_console_gets_our_warnings_and_every_error_the_file_gets_everything(tmp_path, capsys):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        path = console.stage_logging("train", tmp_path / "logs")
        logging.getLogger("pipeline.training.driver").info("best epoch 3")
        logging.getLogger("pipeline.data.prepare").warning("quarantined 1 unreadable images")
        logging.getLogger("mlflow.tracking").info("Creating initial MLflow database tables")
        logging.getLogger("ray.data").warning("a notice nobody can act on")
        logging.getLogger("ray.train").error("worker died")
        with console.into_log("pipeline.serving.registry"):
            print("Successfully registered model 'm'.")
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging.captureWarnings(False)
    shown = capsys.readouterr()
    assert shown.out == ""
    assert shown.err.splitlines() == ["WARNING: quarantined 1 unreadable images", "ERROR: worker died"]
    logged = path.read_text()
    for line in ("best epoch 3", "quarantined 1", "Creating initial MLflow", "a notice nobody",
                 "worker died", "Successfully registered model"):
        assert line in logged, line
    assert path == tmp_path / "logs" / "train.log"


def test_header_names_the_stage_what_it_does_and_its_log(capsys, tmp_path):
    console.header("train", "DVC stage `train`: fine-tune with Ray Train.\n\nMore.", tmp_path / "t.log")
    assert capsys.readouterr().out == f"\n== train: fine-tune with Ray Train (details: {tmp_path / 't.log'})\n"
