"""The `rewrite` command line: round trips, fresh-process loading, diff JSON, bad inputs, exit codes.

Most tests call `rewriter.cli.main(argv)` in-process (fast); a few run the real command in a
subprocess, where exit codes, stderr and a fresh interpreter are what is tested. Subprocesses run
in the repository root (from tests/, the folder tests/passes would shadow the `passes` package),
so factory specs there read 'tests.fixtures_models:...'.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import fixtures_models as fm
import rewriter
from rewriter import meta
from rewriter.cli import main
from helpers import rel_l2

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
MLP = "fixtures_models:tiny_mlp"
FP16_FLOOR = 1e-2   # relative L2 error of a converted fp16 model vs fp32 on these tiny models
BF16_FLOOR = 3e-2


def _run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "rewriter.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _leftovers(folder: Path) -> list[str]:
    """Temporary files an interrupted write would leave (atomic writes stage as hidden files)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def fp32_pt2(work) -> Path:
    """The tiny MLP exported by the user with torch.export.save, batch dimension dynamic."""
    path = work / "mlp.pt2"
    ep = torch.export.export(fm.tiny_mlp(), (torch.randn(*fm.MLP_SHAPE),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    torch.export.save(ep, str(path))
    return path


@pytest.fixture(scope="module")
def converted(work, fp32_pt2):
    """`rewrite convert mlp.pt2 --precision fp16 -o mlp-fp16.pt2 --report mlp.html`, in-process."""
    out, report = work / "mlp-fp16.pt2", work / "mlp.html"
    before = _digest(fp32_pt2)
    code = main(["convert", str(fp32_pt2), "--precision", "fp16", "-o", str(out), "--report", str(report)])
    assert code == 0
    assert _digest(fp32_pt2) == before, "the input model file was modified"
    return out, report


# ---------------------------------------------------------------------- round trips


def test_convert_pt2_writes_program_and_report(converted, work):
    out, report = converted
    assert out.stat().st_size > 0 and report.stat().st_size > 0
    assert _leftovers(work) == []
    html = report.read_text(encoding="utf-8")
    assert '<svg id="graph"' in html and '<table id="nodes"' in html


def test_converted_pt2_loads_in_fresh_process_and_matches_fp32(converted, fp32_pt2):
    out, _ = converted
    script = textwrap.dedent(f"""
        import json, torch, rewriter
        from rewriter import meta
        from rewriter.measure import rel_l2 as rel  # (reference, candidate)
        torch.manual_seed(1)
        x = torch.randn(9, 16)                      # another batch size: the batch stayed dynamic
        ref = torch.export.load({str(fp32_pt2)!r}).module()(x)
        plain = torch.export.load({str(out)!r}).module()(x)     # no rewriter needed to run it
        gm = rewriter.load({str(out)!r})
        got = gm(x)
        nodes = list(gm.graph.nodes)
        print(json.dumps({{
            "rel_plain": rel(ref, plain), "rel_loaded": rel(ref, got), "dtype": str(got.dtype),
            "precision": gm.meta["rewriter"]["config"]["precision"],
            "decisions": sum(meta.DECISION in n.meta for n in nodes),
            "casts": sum(meta.CREATED in n.meta for n in nodes),
            "weights_fp16": sum(meta.get(n, meta.DTYPE) == "float16" for n in nodes if n.op == "get_attr"),
            "origins": sum(meta.ORIGIN in n.meta for n in nodes),
        }}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rel_plain"] < FP16_FLOOR and result["rel_loaded"] < FP16_FLOOR
    assert result["dtype"] == "torch.float32"  # output dtype kept
    assert result["precision"] == "fp16"
    assert result["decisions"] >= 5 and result["casts"] >= 2
    assert result["weights_fp16"] == 4            # fc1/fc2 weight and bias stored in fp16
    assert result["origins"] > 0


def test_factory_spec_round_trip_in_subprocess(tmp_path):
    out = tmp_path / "tt-bf16.pt2"
    proc = _run_cli("convert", "tests.fixtures_models:tiny_transformer", "--input-shape", "2,8,32",
                    "--precision", "bf16", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TinyTransformer -> bf16" in proc.stdout
    assert "\u2713 converting to bf16" in proc.stderr      # the progress display
    gm = rewriter.load(out)
    x = torch.randn(3, 8, 32)
    assert rel_l2(fm.tiny_transformer()(x), gm(x)) < BF16_FLOOR
    lowp = [n for n in gm.graph.nodes if (meta.get(n, meta.DECISION) or {}).get("dtype") == "bfloat16"]
    assert lowp, "no node was converted to bf16"
    assert _leftovers(tmp_path) == []


def test_pickle_converts_with_trust_pickle(tmp_path, capsys):
    pickled = tmp_path / "mlp.pt"
    torch.save(fm.tiny_mlp(), pickled)
    out = tmp_path / "out.pt2"
    assert main(["convert", str(pickled), "--input-shape", "4,16", "--trust-pickle", "-o", str(out)]) == 0
    x = torch.randn(5, 16)
    assert rel_l2(fm.tiny_mlp()(x), rewriter.load(out)(x)) < FP16_FLOOR


def test_overrides_reach_the_decisions(tmp_path, capsys):
    out = tmp_path / "out.pt2"
    assert main(["convert", MLP, "--input-shape", "4,16", "--override", "fc2=fp32", "-o", str(out)]) == 0
    gm = rewriter.load(out)
    fc2 = [n for n in gm.graph.nodes if meta.module_path(n) == "fc2" and meta.DECISION in n.meta]
    assert fc2 and all(meta.get(n, meta.DECISION)["dtype"] == "float32" for n in fc2)
    assert all(meta.get(n, meta.DECISION)["rule"] == "override:module" for n in fc2)


def test_calibration_is_passed_through_and_measurements_survive(tmp_path, capsys):
    calib, out = tmp_path / "calib.pt", tmp_path / "out.pt2"
    torch.save([(torch.randn(*fm.MLP_SHAPE),) for _ in range(3)], calib)
    assert main(["convert", MLP, "--input-shape", "4,16", "--calibration", str(calib),
                 "--tolerance", "0.05", "-o", str(out)]) == 0
    gm = rewriter.load(out)
    measured = [n for n in gm.graph.nodes if meta.RANGE in n.meta]
    assert measured, "no range annotation survived the round trip"
    every = rewriter.diff(fm.tiny_mlp(), gm, capture_before=False).to_dict(all_nodes=True)["nodes"]
    assert any("range" in n for n in every)


def test_no_budget_lowering_flag_keeps_the_policy_fp32_nodes(tmp_path, capsys):
    calib = tmp_path / "calib.pt"
    torch.save([(torch.randn(*fm.MLP_SHAPE),) for _ in range(3)], calib)
    lowered = {}
    for flag in ([], ["--no-budget-lowering"]):
        out = tmp_path / f"out{len(flag)}.pt2"
        assert main(["convert", MLP, "--input-shape", "4,16", "--precision", "bf16", "--calibration",
                     str(calib), "--tolerance", "0.05", "-o", str(out), *flag]) == 0
        gm = rewriter.load(out)
        assert gm.meta[meta.INFO]["config"]["budget_lowering"] is not bool(flag)
        lowered[bool(flag)] = [n.name for n in gm.graph.nodes
                               if (meta.get(n, meta.DECISION) or {}).get("rule") == "budget-lowered"]
    assert lowered[False] and lowered[True] == []  # the layer norm / softmax of the MLP: lowered by default


def test_input_shape_overrides_recorded_shape(tmp_path, fp32_pt2, capsys):
    out = tmp_path / "out.pt2"
    assert main(["convert", str(fp32_pt2), "--input-shape", "6,16", "-o", str(out)]) == 0
    args, _ = rewriter.load(out).meta["rewriter.example_inputs"]
    assert tuple(args[0].shape) == (6, 16)


def test_onnx_output_goes_through_the_backend(tmp_path, capsys):
    out = tmp_path / "mlp.onnx"
    code = main(["convert", MLP, "--input-shape", "4,16", "-o", str(out)])
    try:
        import rewriter.backends.onnx  # noqa: F401
    except ImportError:
        assert code == 2 and not out.exists()
        assert "ONNX backend" in capsys.readouterr().err
        return
    assert code == 0 and out.stat().st_size > 0
    assert _leftovers(tmp_path) == []


def test_force_overwrites_and_nothing_else_does(tmp_path, capsys):
    out = tmp_path / "out.pt2"
    out.write_bytes(b"precious")
    assert main(["convert", MLP, "--input-shape", "4,16", "-o", str(out)]) == 2
    assert out.read_bytes() == b"precious"
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", MLP, "--input-shape", "4,16", "-o", str(out), "--force"]) == 0
    assert rewriter.load(out).meta["rewriter"]["config"]["precision"] == "fp16"


# ---------------------------------------------------------------------- diff


def test_diff_json_one_entry_per_changed_node_with_reason(converted, fp32_pt2, tmp_path, capsys):
    out, _ = converted
    js, page = tmp_path / "d.json", tmp_path / "d.html"
    assert main(["diff", str(fp32_pt2), str(out), "--json", str(js), "--html", str(page)]) == 0
    text = capsys.readouterr().out
    assert "rewriter diff: TinyMLP -> fp16" in text and "kept in fp32 on purpose" in text
    data = json.loads(js.read_text())
    nodes = data["nodes"]
    names = [n["name"] for n in nodes]
    assert len(names) == len(set(names)), "a node appears twice"
    assert all(n["change"] != "none" for n in nodes), "unchanged nodes in the changed list"
    assert all(n["reason"] for n in nodes), [n for n in nodes if not n["reason"]]
    expected = rewriter.diff(fm.tiny_mlp(), rewriter.load(out))
    assert len(nodes) == len(expected.changed) == data["summary"]["changed_nodes"]
    casts = [n for n in nodes if n["kind"] == "cast" and n["change"] == "added"]
    assert len(casts) == data["summary"]["casts_added"] >= 2
    assert all(n["rule"] == "insert_casts" for n in casts)
    linear = [n for n in nodes if n["op"] == "linear"]
    assert linear and all((n["old_dtype"], n["new_dtype"]) == ("float32", "float16") for n in linear)
    assert data["summary"]["param_bytes_saved"] > 0
    assert '<svg id="graph"' in page.read_text(encoding="utf-8")


def test_diff_refuses_an_unconverted_after(fp32_pt2, capsys):
    assert main(["diff", str(fp32_pt2), str(fp32_pt2)]) == 2
    assert "not a converted model" in capsys.readouterr().err


# ---------------------------------------------------------------------- bad inputs


def _bad_cases(work: Path, fp32_pt2: Path) -> dict:
    corrupt = work / "corrupt.pt2"
    corrupt.write_bytes(b"this is not a zip archive")
    truncated = work / "truncated.pt2"
    truncated.write_bytes(fp32_pt2.read_bytes()[: fp32_pt2.stat().st_size // 2])
    pickled = work / "model.pth"
    torch.save(fm.tiny_mlp(), pickled)
    calib_bad = work / "calib.pt"
    torch.save({"not": "a list"}, calib_bad)
    base = ["--input-shape", "4,16"]
    return {
        "missing file": (["convert", str(work / "nope.pt2")], "does not exist"),
        "corrupt file": (["convert", str(corrupt)], "could not read"),
        "truncated file": (["convert", str(truncated)], "could not read"),
        "unknown precision": (["convert", MLP, *base, "--precision", "fp4"], "invalid choice: 'fp4'"),
        "shape that does not fit the program": (["convert", str(fp32_pt2), "--input-shape", "4,17"],
                                                "dimension 1 is fixed to 16"),
        "wrong rank for the program": (["convert", str(fp32_pt2), "--input-shape", "4,16,1"],
                                       "does not fit input 'x'"),
        "shape the model rejects": (["convert", MLP, "--input-shape", "4,15"],
                                    "failed on the example inputs"),
        "not a shape": (["convert", MLP, "--input-shape", "4,a"], "is not a shape"),
        "factory module missing": (["convert", "no_such_pkg.models:build", *base], "cannot import module"),
        "factory attribute missing": (["convert", "fixtures_models:nope", *base], "has no attribute"),
        "factory returns no module": (["convert", "fixtures_models:not_a_module", *base],
                                      "not a torch.nn.Module"),
        "factory without shape": (["convert", MLP], "--input-shape"),
        "pickle without trust": (["convert", str(pickled), *base], "--trust-pickle"),
        "unknown output type": (["convert", MLP, *base, "-o", str(work / "out.bin")], "unknown file type"),
        "output is the input": (["convert", str(fp32_pt2), "-o", str(fp32_pt2), "--force"],
                                "is the input model"),
        "output folder missing": (["convert", MLP, *base, "-o", str(work / "no" / "out.pt2")],
                                  "does not exist"),
        "bad override": (["convert", MLP, *base, "--override", "softmax"], "KEY=PRECISION"),
        "bad override precision": (["convert", MLP, *base, "--override", "softmax=fp12"],
                                   "unknown precision"),
        "calibration missing": (["convert", MLP, *base, "--calibration", str(work / "none.pt")],
                                "calibration file"),
        "calibration not a list": (["convert", MLP, *base, "--calibration", str(calib_bad)],
                                   "list of input tuples"),
        "tolerance without calibration": (["convert", MLP, *base, "--tolerance", "0.01"], "calibration"),
        "already converted": (["convert", str(work / "mlp-fp16.pt2")], "already converted"),
        "dtype per input count": (["convert", MLP, *base, "--input-shape", "4,16", "--input-dtype", "float32",
                                   "--input-dtype", "int64", "--input-dtype", "bool"],
                                  "--input-dtype was given 3 times"),
        "unknown dtype": (["convert", MLP, *base, "--input-dtype", "float13"], "unknown dtype"),
        "no command": ([], ""),
    }


_CASES = ["missing file", "corrupt file", "truncated file", "unknown precision",
          "shape that does not fit the program", "wrong rank for the program", "shape the model rejects",
          "not a shape", "factory module missing", "factory attribute missing", "factory returns no module",
          "factory without shape", "pickle without trust", "unknown output type", "output is the input",
          "output folder missing", "bad override", "bad override precision", "calibration missing",
          "calibration not a list", "tolerance without calibration", "already converted",
          "dtype per input count", "unknown dtype", "no command"]


@pytest.mark.parametrize("case", _CASES)
def test_bad_input_exits_2_names_the_problem_and_writes_nothing(case, work, fp32_pt2, converted, capsys):
    argv, expected = _bad_cases(work, fp32_pt2)[case]
    if argv and "-o" not in argv:
        argv = argv + ["-o", str(work / "bad-out.pt2")]
    inputs = {p: _digest(p) for p in work.iterdir() if p.is_file()}
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    if expected:
        message = [line for line in err.splitlines() if "error" in line]
        assert message, err
    assert not (work / "bad-out.pt2").exists()
    assert _leftovers(work) == []
    assert {p: _digest(p) for p in inputs} == inputs, "an input file changed"


def test_bad_input_in_a_real_process(tmp_path):
    out = tmp_path / "out.pt2"
    proc = _run_cli("convert", str(tmp_path / "missing.pt2"), "-o", str(out))
    assert proc.returncode == 2
    assert "missing.pt2" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run_cli("convert", "tests." + MLP, "--precision", "int3", "-o", str(out))
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert not out.exists() and _leftovers(tmp_path) == []


def test_internal_failure_exits_1_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(rewriter, "convert", broken)
    out = tmp_path / "out.pt2"
    assert main(["convert", MLP, "--input-shape", "4,16", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "simulated bug" in err and "--debug" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_failure_while_writing_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    from rewriter import io as rio

    def write_half(self, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(rio.Prepared, "write", write_half)
    out, report = tmp_path / "out.pt2", tmp_path / "r.html"
    assert main(["convert", MLP, "--input-shape", "4,16", "-o", str(out), "--report", str(report)]) == 1
    assert not out.exists() and not report.exists()
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------- bench, demo, wiring


def test_bench_reports_error_on_cpu(converted, fp32_pt2, capsys):
    out, _ = converted
    code = main(["bench", str(out), "--reference", str(fp32_pt2), "--repeat", "2", "--warmup", "0",
                 "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert code == 0
    for variant in ("fp32", "autocast fp16", "converted fp16"):
        assert variant in stdout
    assert "no GPU here" in stdout and "rel L2" in stdout


def test_bench_converts_a_factory_model(capsys):
    code = main(["bench", MLP, "--input-shape", "4,16", "--precision", "bf16", "--repeat", "1",
                 "--warmup", "0", "--device", "cpu"])
    assert code == 0
    assert "converted bf16" in capsys.readouterr().out


def test_demo_is_wired_to_run_demo(monkeypatch):
    calls = []
    fake = types.ModuleType("rewriter.demo")
    fake.run_demo = lambda precision="fp16", device=None: calls.append((precision, device)) or 0
    monkeypatch.setitem(sys.modules, "rewriter.demo", fake)
    assert main(["demo", "--precision", "bf16", "--device", "cpu"]) == 0
    assert calls == [("bf16", "cpu")]


def test_console_script_points_at_main():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("rewrite") == "rewriter.cli:main"


def test_help_and_usage_exit_codes(capsys):
    assert main(["--help"]) == 0
    assert main(["convert"]) == 2          # MODEL and -o missing
    assert main(["frobnicate"]) == 2


# ---------------------------------------------------------------------- demo --train


def test_demo_train_smallest_run_reports_each_precision(tmp_path, capsys):
    """`rewrite demo --train` from the package (no tools/ on sys.path): the smallest digits run."""
    js = tmp_path / "train.json"
    threads = torch.get_num_threads()
    code = main(["demo", "--train", "--task", "digits", "--steps", "2", "--log-every", "1",
                 "--device", "cpu", "--json", str(js)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert torch.get_num_threads() == threads, "the demo left torch's thread count changed"
    out = captured.out
    assert "== digits" in out and "accuracy" in out and "loss scale" in out
    for precision in ("fp32", "fp16", "bf16"):
        assert any(line.strip().startswith(precision) and "%" in line for line in out.splitlines()), \
            f"no accuracy row for {precision}:\n{out}"
    assert "dynamic: 65536" in out          # fp16 scales the loss, bf16 says why it does not
    assert "exponent range" in out
    assert "digits: training in fp16" in captured.err     # progress lines on stderr
    data = json.loads(js.read_text())
    assert [r["precision"] for r in data["runs"]] == ["fp32", "fp16", "bf16"]
    assert all(len(r["losses"]) == 2 and 0 <= r["accuracy"] <= 1 for r in data["runs"])
    assert data["runs"][1]["scale_history"][0] == [0, 65536.0]
    assert _leftovers(tmp_path) == []


def test_demo_train_fp8_is_opt_in_forced_and_says_so(tmp_path, capsys):
    """--precisions bf16,fp8: every eligible linear in FP8 (Fp8Options.always()), emulated on the CPU,
    said under the table and in a note, not as a Python warning in the middle of the progress lines."""
    import math

    from rewriter.runtime.fp8_ops import reset_emulation_notice

    reset_emulation_notice()  # the first emulated GEMM of this process warns: this run catches it
    js = tmp_path / "train.json"
    code = main(["demo", "--train", "--task", "reverse", "--precisions", "bf16,fp8", "--steps", "2",
                 "--log-every", "1", "--device", "cpu", "--json", str(js)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out
    assert any(line.strip().startswith("fp8") and "%" in line for line in out.splitlines()), out
    assert "fp8 GEMMs: 9 of 9 linears in FP8 (e4m3 forward, e5m2 gradients" in out  # 2 blocks x 4 + head
    assert "forced by Fp8Options.always()" in out and "emulated: cpu has no FP8 GEMMs" in out
    assert "note: fp8 forces every eligible linear into FP8 GEMMs" in out and "python -m tools.bench_train" in out
    assert "note: on the CPU the FP8 GEMMs are emulated" in out
    assert "note: fp8: " not in out  # the caught warning says what that note says: not repeated
    assert "Fp8EmulationWarning" not in captured.err and "reverse: training in fp8" in captured.err
    data = json.loads(js.read_text())
    assert data["precisions"] == ["bf16", "fp8"] and [r["precision"] for r in data["runs"]] == ["bf16", "fp8"]
    assert data["runs"][0]["fp8_gemms"] == "" and data["runs"][1]["fp8_gemms"].startswith("9 of 9 linears")
    assert all(len(r["losses"]) == 2 and all(map(math.isfinite, r["losses"])) for r in data["runs"])


def test_demo_train_without_scikit_learn_exits_2_naming_the_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
    assert main(["demo", "--train", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "scikit-learn" in err and "pip install scikit-learn" in err and "--task reverse" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, expected", [
    (["demo", "--steps", "3"], "add --train"),
    (["demo", "--json", "x.json"], "add --train"),
    (["demo", "--train", "--precision", "bf16"], "--precisions"),
    (["demo", "--train", "--precisions", "int8"], "cannot train in 'int8'"),
    (["demo", "--train", "--precisions", "int8"], "fp32, fp16, bf16, fp8"),
    (["demo", "--train", "--steps", "0"], "not a whole number"),
    (["demo", "--train", "--task", "imagenet"], "invalid choice"),
])
def test_demo_train_bad_usage_exits_2(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_demo_train_json_is_not_overwritten_without_force(tmp_path, capsys):
    js = tmp_path / "train.json"
    js.write_text("precious")
    assert main(["demo", "--train", "--task", "reverse", "--steps", "1", "--json", str(js)]) == 2
    assert "already exists" in capsys.readouterr().err and js.read_text() == "precious"


def test_tools_train_demo_is_a_thin_wrapper_of_the_command(monkeypatch):
    import rewriter.cli
    import rewriter.train_demo as package
    import tools.train_demo as tool

    assert tool.train is package.train and tool.digits_task is package.digits_task  # no copy
    calls = []
    monkeypatch.setattr(rewriter.cli, "main", lambda argv: calls.append(argv) or 0)
    assert tool.main(["--steps", "5"]) == 0
    assert calls == [["demo", "--train", "--steps", "5"]]


# ---------------------------------------------------------------------- --backend / --compile-mode


def test_backend_flags_parse_with_aliases():
    from rewriter.backends.torch_backend import MODES
    from rewriter.cli import BACKENDS, build_parser

    assert BACKENDS == MODES
    parser = build_parser()
    args = parser.parse_args(["bench", "m.pt2", "--backend", "cuda-graphs"])
    assert args.backend == "cuda_graphs" and args.compile_mode is None
    args = parser.parse_args(["convert", "m.pt2", "-o", "o.pt2", "--compile-mode", "max-autotune"])
    assert args.backend is None and args.compile_mode == "max-autotune"  # implies compile, see below
    for mode in MODES:
        assert parser.parse_args(["bench", "m.pt2", "--backend", mode]).backend == mode


@pytest.mark.parametrize("argv, expected", [
    (["bench", MLP, "--input-shape", "4,16", "--backend", "tensorrt"], "unknown backend 'tensorrt'"),
    (["bench", MLP, "--input-shape", "4,16", "--compile-mode", "turbo"], "unknown compile_mode 'turbo'"),
    (["bench", MLP, "--input-shape", "4,16", "--backend", "eager", "--compile-mode", "max-autotune"],
     "is an option of --backend compile"),
    (["convert", MLP, "--input-shape", "4,16", "--backend", "compile", "-o", "{tmp}/m.onnx"],
     "ONNX Runtime"),
])
def test_bad_backend_flags_exit_2(argv, expected, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_cuda_graphs_without_a_gpu_is_refused_clearly(tmp_path, capsys):
    out = tmp_path / "m.pt2"
    if torch.cuda.is_available():  # a GPU machine: the CPU device is what cannot replay CUDA graphs
        argv, expected = ["bench", MLP, "--input-shape", "4,16", "--backend", "cuda_graphs",
                          "--device", "cpu"], "--device cpu"
    else:
        argv, expected = ["convert", MLP, "--input-shape", "4,16", "--backend", "cuda_graphs",
                          "-o", str(out)], "needs a CUDA GPU"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "--backend" in err, err
    assert not out.exists()


def _have_cxx() -> bool:
    import shutil

    return any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))


@pytest.mark.skipif(not _have_cxx(), reason="torch.compile on the CPU needs a C++ compiler")
def test_convert_records_the_backend_and_bench_applies_it(tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert main(["convert", MLP, "--input-shape", "4,16", "--compile-mode", "default", "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "recorded in m.pt2" in stdout and "optimize(rewriter.load(" in stdout
    gm = rewriter.load(out)                         # load still gives the converted GraphModule
    assert isinstance(gm, torch.fx.GraphModule)
    config = gm.meta["rewriter"]["config"]
    assert config["backend"] == "compile" and config["backend_options"] == {"compile_mode": "default"}

    # bench applies the recorded backend: an extra row, timed through torch.compile (tiny model: seconds)
    assert main(["bench", str(out), "--repeat", "2", "--warmup", "1", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    row = [line for line in stdout.splitlines() if "converted fp16 + compile" in line]  # rich may cut the rest
    assert row and "failed" not in row[0], stdout
    assert "recorded by `rewrite convert --backend`" in stdout

    # --backend eager times the converted GraphModule only
    assert main(["bench", str(out), "--repeat", "1", "--warmup", "0", "--device", "cpu",
                 "--backend", "eager"]) == 0
    assert "+ compile" not in capsys.readouterr().out


def test_onnx_optimize_flags(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "mlp.onnx"
    assert main(["convert", MLP, "--input-shape", "4,16", "--optimize", "-o", str(out)]) == 0
    assert "onnx fusions" in capsys.readouterr().out and out.stat().st_size > 0
    for argv, expected in (
            (["--assume-right-padding", "-o", str(tmp_path / "a.onnx")], "add --optimize"),
            (["--optimize", "-o", str(tmp_path / "b.pt2")], "shape an ONNX export")):
        assert main(["convert", MLP, "--input-shape", "4,16", *argv]) == 2
        assert expected in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]
