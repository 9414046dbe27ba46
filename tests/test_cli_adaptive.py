"""`rewrite demo --train --adaptive`: the planted-instability demo of rewriter.AdaptivePrecision from the command
line (rewriter/cli/cmd_demo_adaptive.py), at a tiny step count."""
from __future__ import annotations

import json

import pytest
import torch

from rewriter.cli import main


def test_demo_train_adaptive_fp16_prints_the_timeline_in_80_columns_and_writes_the_picture(tmp_path, capsys):
    pic, js = tmp_path / "precision.png", tmp_path / "adaptive.json"
    threads = torch.get_num_threads()
    code = main(["demo", "--train", "--adaptive", "fp16", "--steps", "40", "--picture", str(pic),
                 "--json", str(js)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert torch.get_num_threads() == threads
    lines = captured.out.splitlines()
    bars = [line for line in lines if line.rstrip().endswith("|")]
    assert [b.split("|")[0].strip() for b in bars] == ["fc1", "fc2", "head"]
    assert all(len(line) <= 80 for line in lines if not line.startswith("picture: ")), max(lines, key=len)
    assert set(bars[0].split("|")[1]) == {"h"} and set(bars[2].split("|")[1]) == {"h", "b"}  # only head moves
    data = json.loads(js.read_text())
    (event,) = data["timeline"]["events"]
    assert any(line.startswith(f"step {event['step']}: head fp16 -> bf16: ") for line in lines)
    assert "fp16's max 65504" in event["reason"]
    row = next(line for line in lines if line.startswith("static fp16"))
    adaptive = next(line for line in lines if line.startswith("adaptive fp16"))
    # 40 steps: the spike may jump past 65504 in one step, the step of the switch is then skipped, no other
    assert int(row.split()[-1]) > 10 and int(adaptive.split()[-1]) <= 1
    written = next(line for line in lines if line.startswith("picture: ")).removeprefix("picture: ")
    assert written in (str(pic), str(pic.with_suffix(".svg")))  # .svg without matplotlib
    text = open(written, "rb").read()
    assert text.startswith(b"\x89PNG") or (b"<svg" in text and b"head" in text and b"fp16" in text)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # atomic: no leftovers


@pytest.mark.parametrize("argv, expected", [
    (["demo", "--train", "--picture", "p.svg"], "add --adaptive"),
    (["demo", "--train", "--adaptive", "--precisions", "bf16"], "--precisions belongs to the training demo"),
    (["demo", "--train", "--adaptive", "--device", "cuda"], "trains a small model on the CPU"),
    (["demo", "--adaptive"], "add --train"),
    (["demo", "--train", "--adaptive", "int8"], "invalid choice"),
])
def test_demo_adaptive_bad_usage_exits_2(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_demo_adaptive_keeps_an_existing_picture_without_force(tmp_path, capsys):
    pic = tmp_path / "precision.svg"
    pic.write_text("mine")
    assert main(["demo", "--train", "--adaptive", "--steps", "2", "--picture", str(pic)]) == 2
    assert "already exists" in capsys.readouterr().err and pic.read_text() == "mine"
