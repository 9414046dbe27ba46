"""Budget lowering: run in low precision the fp32 nodes of the default policy that the error budget affords.

The default policy keeps numerically sensitive ops in fp32 as autocast does: norms and their pieces
(pow, mean, rsqrt), softmax, reductions, and the promote ops (residual adds, rotary muls) that read an
fp32 value. That is what makes the converted model as accurate as autocast, and also what makes it slower
than `compile(model.to(bf16))` on decoders: the residual stream and every norm read and write fp32. With
`tolerance=` the user states how much error is acceptable; `sensitivity` (which runs first) spends it on
keeping the fewest nodes fp32, and this pass spends what is left on lowering the policy's fp32 nodes.

Lower candidates are the nodes whose decision (after `sensitivity`'s keeps) is fp32 by the op table, by
promotion or by following an fp32 input, and that compute a value. Never candidates: nodes inside the
model's own autocast-disabled regions, nodes an override, a range measurement or `sensitivity` decided,
module calls that hold their own fp32 weights, ops with an explicit dtype= (the model asked for fp32),
running products and sums along an axis (cumsum, cumprod, prod: their error grows with the length),
losses, and nodes whose measured range (or an input's) is within a factor 2 of the low format's max.

Search, for n lower candidates and the budget B = tolerance * margin on the calibration batches (the
trial runs, estimate and bisection are `sensitivity`'s, with "kept" meaning "left to the policy"):
  1. reference (fp32) and the current state (nothing lowered); if that is not within B, nothing is
     lowered.                                                                                 2 runs
  2. everything lowered, and each candidate's first-order contribution in low precision
     (`Sensitivity._estimate`, which also gives each lowered node's share in its reason); if all
     lowered is within B, everything is lowered.                                              2 runs
  3. otherwise `sensitivity._search` over the candidates, least harmful first: bisection for the longest
     prefix that can be lowered, then the next node that cannot by galloping.
  Forward runs <= 2 + run_bound(n, k) = 8 + 2 k ceil(log2 n) for k nodes found harmful, capped by
  default at 1 + run_bound(n, 2) (+1 for step 4); the search also stops after ceil(log2 n) + 2 trials in a row over
  the aim (the budget left is smaller than what the next candidates cost: a tight budget costs about
  5 + 2 ceil(log2 n) runs, not the cap). What is left untested stays fp32. Every state the search moves
  to was measured within B, so lowering can only spend budget, never break it.
  4. after a partial search, lowered nodes left between fp32 values only (a cast in, a cast out, no
     bytes saved) are given back to the policy, kept if that state measures within B.         1 run

Lowering one residual add makes the next ones low by promotion (their inputs are then all low), so the
residual stream becomes low precision from there; insert_casts and fold_casts then drop the casts
around the norms that sat between two low-precision ops.

Before: o_proj(bf16) -> add(fp32, promote) -> pow/mean/rsqrt(fp32) -> mul(fp32) -> [cast] -> q_proj(bf16)
After:  o_proj(bf16) -> add(bf16, "budget allows: adds 2.1e-03") -> pow/... -> q_proj(bf16)

Writes node.meta[SENSITIVITY]["lower"] = dtype name and "reason" on the lowered nodes (assign's rule
"budget-lowered"), {"lower_tried": True, "reason"} on candidates the search measured as too costly,
and a summary in gm.meta[CALIBRATION]["lowering"]. DECISION is left to `assign`.

Example:
    >>> BudgetLowering(as_batches(batches), ConvertConfig(precision="bf16", tolerance=2e-2))(gm)
"""
from __future__ import annotations

import math
import time

import torch
import torch.fx as fx

from rewriter.passes.analysis._calibration import as_batches, flat_inputs, graph_device
from rewriter.passes.analysis.assign import Assign
from rewriter.passes.analysis.sensitivity import Sensitivity, _search, decided_dtypes, run_bound
from rewriter.passes.graph_utils import explicit_dtype, float_inputs
from rewriter.passes.infra import PassResult
from rewriter import meta

__all__ = ["BudgetLowering", "LOWERABLE_RULES", "NEVER_LOWER"]

_F32 = torch.float32
_COMPUTE = ("call_function", "call_method")

# the rules of `assign` that come from the default policy (and only those): a node decided fp32 by one
# of them is what autocast would do, not what an override, region or measurement asked for
LOWERABLE_RULES = frozenset({"op-table", "promote", "follow"})

# ops whose low-precision error grows with the length of what they accumulate, and losses (a scalar at
# the end: nothing to gain)
NEVER_LOWER = frozenset("""
cumsum cumprod prod logsumexp nll_loss nll_loss2d nll_loss_nd cross_entropy cross_entropy_loss
binary_cross_entropy binary_cross_entropy_with_logits kl_div mse_loss l1_loss smooth_l1_loss huber_loss
poisson_nll_loss cosine_embedding_loss hinge_embedding_loss margin_ranking_loss multilabel_margin_loss
soft_margin_loss triplet_margin_loss multi_margin_loss
""".split())


class BudgetLowering(Sensitivity):
    """Lower the policy's fp32 nodes while the measured error stays within the budget (module docstring).

    Takes `Sensitivity`'s arguments (calibration, config, held_out, margin, max_runs, projections,
    estimate_batches, native, progress). After the pass, `self.summary` (also
    gm.meta[CALIBRATION]["lowering"]) holds "runs", "bound", "cap", "candidates", "lowered",
    "stayed_fp32", "start_error", "all_lowered_error", "error", "held_out_error" and "seconds".
    """

    name = "budget_lowering"

    # ------------------------------------------------------------------ states
    def _state(self, gm: fx.GraphModule, candidates: list, kept: frozenset) -> dict:
        """The dtypes `assign` decides with every candidate not in `kept` forced to low precision."""
        low = meta.dtype_name(self.config.island_dtype)
        for node in candidates:
            record = dict(meta.get(node, meta.SENSITIVITY) or {})
            record.pop("lower", None)
            if node not in kept:
                record.update(lower=low, reason="trial")
            if record:
                meta.put(node, meta.SENSITIVITY, record)
            else:
                node.meta.pop(meta.SENSITIVITY, None)
        return decided_dtypes(gm, self.config)

    def _lowerable(self, node: fx.Node) -> bool:
        decision = node.meta.get(meta.DECISION) or {}
        info = meta.get(node, meta.OP_CLASS) or {}
        if node.op not in _COMPUTE or decision.get("dtype") != "float32":
            return False
        if decision.get("rule") not in LOWERABLE_RULES or info.get("exact"):
            return False
        region = meta.get(node, meta.AUTOCAST)
        if region and not region.get("enabled"):
            return False  # the model protects this region (assign also gives it rule autocast-region)
        if info.get("op") in NEVER_LOWER or explicit_dtype(node) is not None:
            return False
        record = meta.get(node, meta.SENSITIVITY) or {}
        if record.get("keep") or (meta.get(node, meta.RANGE) or {}).get("keep"):
            return False
        limit = float(torch.finfo(self.config.island_dtype).max) / 2
        for value in [node, *float_inputs(node)]:
            amax = (meta.get(value, meta.RANGE) or {}).get("amax")
            if amax is not None and amax > limit:
                return False
        return True

    def _prune(self, gm: fx.GraphModule, candidates: list, kept: frozenset) -> frozenset:
        """`kept` plus the lowered nodes that sit between fp32 values only (every float input that is
        not a weight and every consumer fp32): lowering them costs a cast in and a cast out and saves
        no bytes. Repeated until none is left, since undoing one can isolate its neighbour."""
        kept = frozenset(kept)
        for _ in range(len(candidates)):
            dtypes = self._state(gm, candidates, kept)

            def fp32(node) -> bool:
                return node.op == "output" or dtypes.get(node, meta.value_dtype(node)) == _F32

            isolated = {n for n in candidates if n not in kept
                        and all(fp32(i) for i in float_inputs(n) if i.op != "get_attr")
                        and all(fp32(u) for u in n.users)}
            if not isolated:
                return kept
            kept |= isolated
        return kept

    # ------------------------------------------------------------------ the pass
    def call(self, gm: fx.GraphModule) -> PassResult:
        start = time.perf_counter()
        data = as_batches(self.calibration)
        held = as_batches(self.held_out, what="held-out batches") if self.held_out is not None else None
        self._native = self.native if self.native is not None else graph_device(gm).type == "cuda"
        low = self.config.island_dtype
        budget = float(self.config.tolerance)
        target = budget * self.margin
        flats = [flat_inputs(gm, a, k, index=i) for i, (a, k) in enumerate(data.batches)]
        runs = 0
        tried: dict[frozenset, float] = {}

        refs = self._run(gm, flats, None)
        runs += 1
        Assign(self.config).call(gm)  # the state sensitivity left: its keeps, nothing lowered
        candidates = [n for n in gm.graph.nodes if self._lowerable(n)]
        n_cand = len(candidates)
        cap = self.max_runs if self.max_runs is not None else 1 + run_bound(n_cand, 2)

        failed = [0]  # trials over the aim in a row
        stall = math.ceil(math.log2(max(2, n_cand))) + 2

        def trial(kept: frozenset, what: str) -> float:
            nonlocal runs
            if kept in tried:
                return tried[kept]
            err = self._error(gm, refs, self._run(gm, flats, self._state(gm, candidates, kept)))
            runs += 1
            tried[kept] = err
            failed[0] = failed[0] + 1 if err > target else 0
            self.progress("budget_lowering", f"run {runs}: {what}: {n_cand - len(kept)} of {n_cand} "
                          f"lowered, error {err:.2e} (aim {target:.2e}, budget {budget:.2e})")
            return err

        everything = frozenset(candidates)
        start_err = trial(everything, "nothing lowered") if candidates else None
        all_lowered = None
        stayed: dict[fx.Node, float] = {}  # measured too costly: node -> its error step
        isolated: frozenset = frozenset()  # lowered by the search, given back (step 4)
        estimates: dict[fx.Node, float] = {}
        kept = everything
        final_err = start_err
        if candidates and start_err <= target:
            all_lowered = trial(frozenset(), "all lowered")
            # the estimates order the search and give each lowered node's share in its reason
            estimates = self._estimate(gm, flats, self._state(gm, candidates, frozenset()), candidates)
            runs += 1
            self.progress("budget_lowering", f"run {runs}: contributions estimated for {n_cand} "
                          "lower candidates")
            if all_lowered <= target:
                kept, final_err = frozenset(), all_lowered
            else:
                topo = {n: i for i, n in enumerate(gm.graph.nodes)}
                order = sorted(candidates, key=lambda n: (estimates.get(n, 0.0), topo[n]))
                tried[frozenset(order)] = start_err
                stayed, rest, final_err, _ = _search(
                    order, trial, target, all_lowered, lambda: runs >= cap or failed[0] >= stall,
                    estimates if self.config.metric is None else None)
                kept = frozenset(stayed) | frozenset(rest)
                pruned = self._prune(gm, candidates, kept)
                if pruned != kept:
                    err = trial(pruned, "isolated lowerings undone")
                    if err <= target:
                        isolated, kept, final_err = pruned - kept, pruned, err
        lowered = [n for n in candidates if n not in kept]

        held_err = None
        if held is not None and lowered:
            hflats = [flat_inputs(gm, a, k, index=i, what="held-out batch")
                      for i, (a, k) in enumerate(held.batches)]
            held_err = self._error(gm, self._run(gm, hflats, None),
                                   self._run(gm, hflats, self._state(gm, candidates, kept)))
            self.progress("budget_lowering", f"held-out: error {held_err:.2e} (budget {budget:.2e})"
                          + ("" if held_err <= budget else " -- OVER BUDGET"))
        self._record(gm, candidates, kept, stayed, isolated, estimates, final_err, target)
        seconds = time.perf_counter() - start
        self.summary = {
            "runs": runs, "bound": 2 + run_bound(n_cand, max(1, len(stayed))), "cap": cap,
            "batches": len(flats), "candidates": n_cand, "lowered": [n.name for n in lowered],
            "lowered_paths": {n.name: meta.module_path(n) for n in lowered},
            "stayed_fp32": [n.name for n in stayed], "start_error": start_err,
            "all_lowered_error": all_lowered, "error": final_err, "held_out_error": held_err,
            "budget": budget, "target": target, "dtype": meta.dtype_name(low),
            "seconds": round(seconds, 3),
        }
        gm.meta.setdefault(meta.CALIBRATION, {})["lowering"] = self.summary
        self.progress("budget_lowering", f"{runs} forward runs over {n_cand} lower candidates in "
                      f"{seconds:.1f}s: {len(lowered)} lowered to {meta.dtype_name(low)}, error "
                      f"{final_err if final_err is not None else 0.0:.2e} (budget {budget:.2e})")
        return PassResult(gm, False)

    def _record(self, gm, candidates, kept, stayed, isolated, estimates, final_err, target) -> None:
        """Final SENSITIVITY records of the candidates; DECISION is removed again (assign's to write)."""
        low = meta.dtype_name(self.config.island_dtype)
        metric = "metric" if self.config.metric is not None else "relative L2"
        for node in gm.graph.nodes:
            node.meta.pop(meta.DECISION, None)
        for node in candidates:
            record = dict(meta.get(node, meta.SENSITIVITY) or {})
            record.pop("lower", None)
            record.pop("reason", None)
            where = (f"{(meta.get(node, meta.OP_CLASS) or {}).get('op', node.name)} in "
                     f"'{meta.module_path(node) or '<top level>'}'")
            if node not in kept:
                est = estimates.get(node)
                adds = ("" if est is None else f": adds about {est:.1e} to the output error ({metric}, "
                        "first-order estimate)")
                record.update(lower=low, reason=f"budget allows: {where} runs in {low}{adds}; measured "
                                                f"error with every lowering {final_err:.2e} <= aim "
                                                f"{target:.2e} (tolerance x margin)")
            elif node in stayed:
                record.update(lower_tried=True,
                              reason=f"{where} stays fp32: in {low} it adds {stayed[node]:.2e} to the "
                                     f"output error ({metric}), more than the budget has left")
            elif node in isolated:
                record.update(lower_tried=True,
                              reason=f"{where} stays fp32: the budget allowed {low}, but between fp32 "
                                     "values it would only add a cast in and a cast out")
            if record:
                meta.put(node, meta.SENSITIVITY, record)
            else:
                node.meta.pop(meta.SENSITIVITY, None)
