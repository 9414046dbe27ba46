"""rewriter/train_demo.py: the training demo's pieces (the command itself is tested in test_cli.py)."""
from __future__ import annotations

import torch

from rewriter import train_demo as td


def test_reverse_task_trains_in_fp32_and_reports():
    task = td.reverse_task(seed=0)
    run = td.train(task, "fp32", steps=3, seed=0)
    assert run.task == "reverse" and run.precision == "fp32" and len(run.losses) == 3
    assert all(torch.isfinite(torch.tensor(run.losses)))
    assert 0.0 <= run.accuracy <= 1.0 and run.step_ms > 0
    text = td.report([run], every=2, title=task.title)
    assert text.startswith("== reverse: 2-layer transformer")
    assert "none (fp32)" in text and "%" in text


def test_scale_over_time_in_the_curve_table():
    def run(precision, history, skipped=()):
        return td.Run("t", precision, [1.0] * 8, 0.5, 1.0, history, list(skipped), "LossScaler(x; why)", 0.0)

    fp16 = run("fp16", [(0, 65536.0), (3, 131072.0), (6, 65536.0)], skipped=[5])
    assert [td.scale_at(fp16, s) for s in range(8)] == [65536.0] * 3 + [131072.0] * 3 + [65536.0] * 2
    text = td.report([run("fp32", [(0, 1.0)]), fp16], every=4)
    assert "fp16 loss scale" in text.splitlines()[2]
    assert "65536 -> 131072 (step 3) -> 65536 (step 6)" in text and "[5]" in text


def test_default_run_is_short():
    # the CLI's default run must stay about a minute on a 2-core CPU: both tasks, a few hundred steps
    assert set(td.TASKS) == {"digits", "reverse"}
    assert sum(steps for _, steps in td.TASKS.values()) <= 400
