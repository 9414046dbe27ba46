"""`rewrite demo --generate`: a tiny language model learns to reverse digit strings in seconds on the CPU,
then generates side by side in fp32, under torch.autocast and converted to bf16 and fp16.

    python -m rewriter.generation_demo            # or main(["--steps", "300", "--precisions", "bf16"])

The model is a Hugging Face LlamaForCausalLM (2 layers, 64 wide, random init, trained here), so the
converted models generate through transformers' generate() exactly as the user's would. Sequences are

    <bos> d1 d2 ... dn <sep> dn ... d2 d1 <eos>        (digits 0-9, n = 3..8)

A row per precision: exact-match accuracy of the greedy answers on held-out prompts, agreement with the
fp32 tokens, and generated tokens per second (batch of all prompts, left-padded).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

__all__ = ["main", "TOKENS", "make_batch", "train_reverser", "prompts"]

TOKENS = {"pad": 0, "bos": 1, "sep": 2, "eos": 3}
DIGITS = 10
VOCAB = 4 + DIGITS
MIN_LEN, MAX_LEN = 3, 8


def _sequence(digits: list[int]) -> list[int]:
    body = [4 + d for d in digits]
    return [TOKENS["bos"], *body, TOKENS["sep"], *reversed(body), TOKENS["eos"]]


def make_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n right-padded training sequences and their loss mask (the answer and <eos> only)."""
    width = 2 * MAX_LEN + 3
    ids = torch.zeros(n, width, dtype=torch.long)
    loss_mask = torch.zeros(n, width, dtype=torch.bool)
    lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (n,), generator=generator)
    for i, length in enumerate(lengths.tolist()):
        digits = torch.randint(0, DIGITS, (length,), generator=generator).tolist()
        seq = _sequence(digits)
        ids[i, :len(seq)] = torch.tensor(seq)
        loss_mask[i, length + 2:len(seq)] = True  # predict the tokens after <sep>
    return ids, loss_mask


def prompts(n: int, seed: int = 1234) -> tuple[list[list[int]], list[list[int]]]:
    """n held-out prompts (<bos> digits <sep>) and their answers (reversed digits <eos>)."""
    g = torch.Generator().manual_seed(seed)
    asked, answers = [], []
    for _ in range(n):
        length = int(torch.randint(MIN_LEN, MAX_LEN + 1, (1,), generator=g))
        seq = _sequence(torch.randint(0, DIGITS, (length,), generator=g).tolist())
        asked.append(seq[:length + 2])
        answers.append(seq[length + 2:])
    return asked, answers


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), TOKENS["pad"], dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=TOKENS["bos"], eos_token_id=TOKENS["eos"], pad_token_id=TOKENS["pad"],
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def train_reverser(steps: int = 400, seed: int = 0, batch: int = 64, lr: float = 3e-3):
    """A tiny Llama trained to reverse digit strings (about 400 steps reach exact answers).

    Returns:
        the model in eval mode.
    """
    model = tiny_llama(seed)
    model.train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        ids, loss_mask = make_batch(batch, g)
        logits = model(input_ids=ids).logits[:, :-1]
        target = ids[:, 1:].masked_fill(~loss_mask[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _answers(out: torch.Tensor, width: int) -> list[list[int]]:
    rows = []
    for row in out[:, width:].tolist():
        if TOKENS["eos"] in row:
            row = row[:row.index(TOKENS["eos"]) + 1]
        rows.append(row)
    return rows


def _text(row: list[int]) -> str:
    return "".join(str(t - 4) if t >= 4 else {1: "^", 2: "|", 3: "$", 0: "."}[t] for t in row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rewrite demo --generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts (default 32)")
    parser.add_argument("--precisions", default="bf16,fp16", help="converted precisions (default bf16,fp16)")
    parser.add_argument("--show", type=int, default=4, help="prompts printed side by side (default 4)")
    parser.add_argument("--kv8", action="store_true", help="also bf16 with an FP8 KV cache (kv_cache='fp8')")
    args = parser.parse_args(argv)
    import rewriter
    from rewriter.errors import RewriterError

    start = time.perf_counter()
    model = train_reverser(args.steps)
    print(f"trained a {sum(p.numel() for p in model.parameters()):,}-parameter Llama to reverse digits "
          f"in {time.perf_counter() - start:.1f}s ({args.steps} steps)")
    asked, answers = prompts(args.prompts)
    ids, mask = left_pad(asked)
    new = MAX_LEN + 1
    runs = {"fp32": lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)}

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    runs["autocast bf16"] = autocast
    wanted = [(p.strip(), None) for p in args.precisions.split(",") if p.strip()]
    for precision, kv_cache in wanted + ([("bf16", "fp8")] if args.kv8 else []):
        try:
            fast = rewriter.convert(model, {"input_ids": ids}, precision=precision, generate=True,
                                    max_cache_len=2 * MAX_LEN + 4, kv_cache=kv_cache)
        except RewriterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        runs[f"converted {precision}{' kv8' if kv_cache else ''}"] = (lambda f: lambda: f.generate(ids, attention_mask=mask, max_new_tokens=new,
                                                                       do_sample=False))(fast)
    results = {}
    for name, run in runs.items():
        run()  # warm-up
        t0 = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - t0
        results[name] = (_answers(out, ids.shape[1]), out.shape[0] * (out.shape[1] - ids.shape[1]) / seconds)
    reference = results["fp32"][0]
    print(f"\n{'':20s} {'exact answers':>14s} {'same as fp32':>13s} {'tokens/s':>10s}")
    for name, (got, rate) in results.items():
        exact = sum(g == a for g, a in zip(got, answers))
        same = sum(g == r for g, r in zip(got, reference))
        print(f"{name:20s} {exact:>8d} / {len(answers):<4d} {same:>7d} / {len(answers):<4d} {rate:>10.0f}")
    print("\nprompt        " + "  ".join(f"{n:>14s}" for n in results))
    for i in range(min(args.show, len(asked))):
        print(f"{_text(asked[i]):13s} " + "  ".join(f"{_text(results[n][0][i]):>14s}" for n in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
