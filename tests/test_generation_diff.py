"""rewriter.diff / `rewrite diff` and rewriter.save with a GenerativeLM (generate=True): the diff shows
both step graphs' decisions (FP8 decode GEMMs among them); save refuses with what to do instead."""
import json
import textwrap

import pytest
import torch

pytest.importorskip("transformers")

import rewriter  # noqa: E402
from rewriter import meta  # noqa: E402
from rewriter.cli import main  # noqa: E402
from rewriter.diff_generation import StepsDiff  # noqa: E402
from rewriter.errors import ConfigError, InputError  # noqa: E402
from rewriter.generation_demo import left_pad, prompts, tiny_llama  # noqa: E402

FP8 = rewriter.Fp8Options(min_speedup=0, decode_gemms="weight_only")  # toy size: see test_generation_fp8


def _ids():
    return left_pad(prompts(4)[0])[0]


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(seed=0).eval()


@pytest.fixture(scope="module")
def fast(lm):
    return rewriter.convert(lm, {"input_ids": _ids()}, precision="fp8", generate=True, max_cache_len=40, fp8=FP8)


def test_diff_shows_decode_and_prefill_decisions(lm, fast):
    d = rewriter.diff(lm, fast)
    assert isinstance(d, StepsDiff) and list(d.graphs) == ["decode", "prefill"]
    decode = [n for n in d["decode"].changed if n.op == "fp8_weight_linear"]
    assert len(decode) == 9 and all(n.fp8["rule"] == "decode" for n in decode)
    assert all(n.fp8["reason"].startswith("fp8: decode GEMM is weight-bandwidth bound") for n in decode)
    assert d["decode"].summary.fp8_gemms == 9 and d["prefill"].summary.fp8_gemms == 0
    assert d["prefill"].summary.fp8_kept["size"] >= 8  # prefill: the FLOP rules kept its GEMMs bf16
    text = d.to_text(max_rows=None)
    assert "== decode graph" in text and "== prefill graph" in text
    # kept: the two attention ops, and on transformers <= 5.17 the rotary embedding's frequency matmul
    # (5.2x computes them elementwise), which its maybe_autocast(enabled=False) region keeps in fp32.
    # The model's structure comes from the installed transformers, not from us.
    rotary = [n for n in fast.decode_graph.graph.nodes if n.target is torch.ops.aten.matmul.default
              and "rotary_emb" in str(meta.module_path(n))]
    assert all(meta.get(n, meta.DECISION)["rule"] == "autocast-region" for n in rotary)
    assert f"FP8 decode: 9 GEMMs (9 fp8_weight_linear), {2 + len(rotary)} kept" in text
    assert "fp8: decode GEMM is weight-bandwidth bound: 2x fewer weight bytes" in text
    data = json.loads(d.to_json())
    assert data["format"] == "rewriter.diff.generation/1" and set(data["graphs"]) == {"decode", "prefill"}
    assert data["generation"]["fp8_gemms"]["decode"]["kernels"] == {"fp8_weight_linear": 9}
    assert sum(1 for n in data["graphs"]["decode"]["nodes"] if (n.get("fp8") or {}).get("rule") == "decode") == 9
    page = d.to_html()
    assert page.count("<iframe") == 2 and "decode graph" in page


def test_diff_refuses_the_wrong_before(lm, fast):
    with pytest.raises(InputError, match="converted from a LlamaForCausalLM, 'before' is a Linear"):
        rewriter.diff(torch.nn.Linear(4, 4), fast)
    with pytest.raises(InputError, match="pass the Hugging Face model it was converted from"):
        rewriter.diff(fast, fast)


def test_eval_is_accepted_and_train_refused(fast):
    assert fast.eval() is fast and not fast.training
    with pytest.raises(ConfigError, match="inference only"):
        fast.train()


def test_save_refuses_a_generative_lm_and_says_what_to_do(fast, tmp_path):
    path = tmp_path / "lm.pt2"
    with pytest.raises(ConfigError, match=r"save_pretrained\(folder\).*generate=True"):
        rewriter.save(fast, path)
    assert not path.exists()


def test_cli_diff_takes_a_factory_returning_a_generative_lm(tmp_path, monkeypatch, capsys):
    (tmp_path / "genfactory.py").write_text(textwrap.dedent("""
        import rewriter
        from rewriter.generation_demo import left_pad, prompts, tiny_llama

        def lm():
            return tiny_llama(seed=0).eval()

        def fast():
            ids = left_pad(prompts(4)[0])[0]
            return rewriter.convert(lm(), {"input_ids": ids}, precision="fp8", generate=True, max_cache_len=40,
                                    fp8=rewriter.Fp8Options(min_speedup=0, decode_gemms="weight_only"))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    js = tmp_path / "d.json"
    assert main(["diff", "genfactory:lm", "genfactory:fast", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "== decode graph" in out and "fp8_weight_line" in out
    data = json.loads(js.read_text())
    assert data["graphs"]["decode"]["summary"]["fp8_gemms"] == 9


def test_step_graphs_name_modules_as_in_the_users_model(lm):
    """An override written for the user's model reaches the step graphs (their capture wraps the model in
    a step module; its attribute is not part of the module paths), and the diff names the same paths."""
    fast = rewriter.convert(lm, {"input_ids": _ids()}, precision="bf16", generate=True, max_cache_len=40,
                            overrides={"model.layers.0.mlp.down_proj": "fp32"})
    for gm in (fast.prefill_graph, fast.decode_graph):
        down = {meta.module_path(n): meta.get(n, meta.DECISION) for n in gm.graph.nodes
                if n.target is torch.ops.aten.linear.default and "down_proj" in str(meta.module_path(n))}
        assert set(down) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
        assert down["model.layers.0.mlp.down_proj"]["dtype"] == "float32"
        assert down["model.layers.1.mlp.down_proj"]["dtype"] == "bfloat16"
        paths = {meta.module_path(n) for n in gm.graph.nodes if n.op == "call_function"} - {None}
        assert "lm_head" in paths and not any(p == "lm" or p.startswith("lm.") for p in paths)
    assert "model.layers.0.mlp.down_proj" in rewriter.diff(lm, fast).to_text(max_rows=None)
