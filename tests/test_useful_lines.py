"""tools/useful_lines.py: the rule that counts the console lines a person needs."""

from __future__ import annotations

from tests.test_demo import useful_lines


def test_redraws_collapse_to_the_last_state_and_interleaved_text_is_kept():
    counter = useful_lines()
    text = ("== score: Ray Data batch scoring (details: logs/score.log)\n"
            "\rscore:   0%|          | 0/160 [00:00<?, ?img/s]"
            "[2026 E 1 1] core_worker.cc:2465: Actor with class name ...\n"
            "\rscore: 100%|##########| 160/160 [00:09<00:00, 16.50img/s]\n"
            "\x1b[36m(RayTrainWorker pid=5)\x1b[0m epoch 1/3: train loss 0.29\n\n"
            "160 images scored with models:/m/1 (0 errors, 18 img/s) -> p.parquet\n")
    seen = counter.lines(text)
    assert seen == ["== score: Ray Data batch scoring (details: logs/score.log)",
                    "[2026 E 1 1] core_worker.cc:2465: Actor with class name ...",
                    "score: 100%|##########| 160/160 [00:09<00:00, 16.50img/s]",
                    "(RayTrainWorker pid=5) epoch 1/3: train loss 0.29",
                    "160 images scored with models:/m/1 (0 errors, 18 img/s) -> p.parquet"]
    assert [counter.kind(line) for line in seen] == ["header", "noise", "progress", "summary", "summary"]
