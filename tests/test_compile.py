"""``torch.compile`` of the DiT blocks (``apply_compile``): graph breaks and recompilations (issue 14
finding 4, issue 11's bounded compiles for bucketed training).

On CPU with ``backend="aot_eager"`` (Dynamo + AOT autograd, no C++ build), which is where breaks and
recompiles are decided; the GPU's inductor check is ``bench/gpu_check.py``'s ``compile`` section.

- one block forward + backward on the SDPA path: 0 graph breaks, one graph shared by every block;
- the same under Ulysses sequence parallelism on 2 gloo ranks (the all-to-alls are functional
  collectives inside the graph), with compiled outputs and gradients equal to the eager ones;
- a bucket schedule of (batch, frames, height, width) shapes compiles a bounded number of times and
  never falls back to eager (``fail_on_recompile_limit_hit``).

Run::

    .venv/bin/python -m pytest tests/test_compile.py -q
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from tests.multiproc import init_rank, spawn
from vdit.model.dit import DiTConfig, VideoDiT
from vdit.train.parallel.fsdp import apply_compile

TEXT_DIM = 16
# latent (B, T, H, W) with patch (1, 2, 2): 18, 8, 12, 20, 24 tokens; batch 1 is its own graph
# (Dynamo specializes sizes 0 and 1), so the bound below is 3 graphs: static, dynamic, batch 1.
BUCKETS = [(2, 3, 4, 6), (4, 2, 4, 4), (3, 1, 6, 8), (2, 5, 4, 4), (4, 3, 8, 4), (1, 3, 4, 6), (1, 2, 4, 4)]
MAX_GRAPHS = 3


def _cfg(**kw) -> DiTConfig:
    base = dict(in_channels=4, patch_size=[1, 2, 2], hidden_size=32, depth=2, num_heads=4, text_dim=TEXT_DIM)
    base.update(kw)
    return DiTConfig(**base)


def _inputs(b: int, thw, seed: int = 0, lc: int = 5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, lc, dtype=torch.bool)
    mask[0, 3:] = False
    return (torch.randn(b, 4, *thw, generator=g), torch.rand(b, generator=g),
            torch.randn(b, lc, TEXT_DIM, generator=g), mask)


def _model(seed: int = 0, **kw) -> VideoDiT:
    model = VideoDiT(_cfg(**kw))
    model.init_weights(seed=seed)
    with torch.no_grad():  # adaLN-Zero makes every block the identity at init: perturb so grads flow
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _step(model, inputs) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(*inputs)  # (B, C, T, H, W)
    out.square().mean().backward()
    return out.detach()


class _Recompiles(logging.Handler):
    """Dynamo's ``recompiles`` log: one record per recompilation, naming the failed guard."""

    def __init__(self):
        super().__init__()
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.reasons.append(record.getMessage().strip().splitlines()[-1].strip())

    def __enter__(self):
        torch._logging.set_logs(recompiles=True)
        logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("torch._dynamo.guards.__recompiles").removeHandler(self)
        torch._logging.set_logs()


def _fresh_dynamo():
    """Empty caches and counters; no profile from earlier runs (local PGO would make the first
    compilation dynamic and hide the count), and a recompile limit hit is an error, not eager."""
    torch._dynamo.reset()
    counters.clear()
    return torch._dynamo.config.patch(automatic_dynamic_local_pgo=False, fail_on_recompile_limit_hit=True)


def _summary(rec: _Recompiles) -> dict:
    return {"breaks": dict(counters["graph_break"]), "graphs": counters["stats"]["unique_graphs"],
            "recompiles": list(rec.reasons)}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    yield
    torch._dynamo.reset()
    counters.clear()


def test_block_sdpa_has_no_graph_breaks_and_matches_eager():
    model = _model()
    inputs = _inputs(2, (3, 4, 6))
    ref = _step(model, inputs)
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    apply_compile(model, backend="aot_eager")
    with _fresh_dynamo(), _Recompiles() as rec:
        out = _step(model, inputs)
        s = _summary(rec)
    assert s["breaks"] == {}, s
    assert s["graphs"] == 1 and s["recompiles"] == [], s  # the 2 blocks share one graph
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bucket_schedule_compiles_a_bounded_number_of_times():
    model = _model()
    apply_compile(model, backend="aot_eager")
    with _fresh_dynamo(), _Recompiles() as rec:
        for i, (b, *thw) in enumerate(BUCKETS + BUCKETS[:2]):  # revisiting buckets compiles nothing
            _step(model, _inputs(b, thw, seed=i))
        s = _summary(rec)
    assert s["breaks"] == {}, s
    assert s["graphs"] <= MAX_GRAPHS and len(s["recompiles"]) <= MAX_GRAPHS - 1, s


# ------------------------------------------------------------------------------- Ulysses, 2 ranks
# 18, 8, 9 (padded to 10), 15 (padded to 16), 20 tokens. A padded L is a graph of its own: Ulysses
# slices the padded keys off, and a slice of the whole key sequence (no padding) is specialized.
SP_BUCKETS = [(2, 3, 4, 6), (4, 2, 4, 4), (2, 3, 2, 6), (2, 3, 2, 10), (3, 5, 4, 4)]


def _ulysses_worker(rank: int, world: int, port: int, out_dir: str) -> dict:
    init_rank(rank, world, port)
    from vdit.train.parallel.sequence import COMM_STATS, apply_sequence_parallel, build_sp_groups

    groups = build_sp_groups(world, world, "ulysses")
    model = _model(cross_attention=False)  # cross-attention is covered above; a smaller graph compiles faster
    apply_sequence_parallel(model, groups.sp, "ulysses")

    def run():  # outputs and this rank's gradients (the SP share) of every bucket
        return [(_step(model, _inputs(b, thw, seed=i)), [p.grad.clone() for p in model.parameters()])
                for i, (b, *thw) in enumerate(SP_BUCKETS)]

    refs = run()
    eager_calls = COMM_STATS.calls[("all_to_all", "fwd")]
    COMM_STATS.reset()
    apply_compile(model, backend="aot_eager")
    with _fresh_dynamo(), _Recompiles() as rec:
        outs = run()
        s = _summary(rec)
    s["max_diff"] = max((o - r).abs().max().item() for (o, _), (r, _) in zip(outs, refs))
    s["max_grad_diff"] = max((g - h).abs().max().item() for (_, gs), (_, hs) in zip(outs, refs) for g, h in zip(gs, hs))
    s["eager_all_to_all_calls"] = eager_calls
    s["compiled_all_to_all_calls"] = COMM_STATS.calls.get(("all_to_all", "fwd"), 0)
    return s


@pytest.mark.multiproc
def test_ulysses_block_has_no_graph_breaks(tmp_path):
    for s in spawn(_ulysses_worker, 2, tmp_path):
        assert s["breaks"] == {}, s
        assert s["graphs"] <= 3 and len(s["recompiles"]) <= 2, s  # static, dynamic, dynamic padded
        assert s["max_diff"] <= 1e-5 and s["max_grad_diff"] <= 1e-5, s
        # statistics are eager-only: 2 all-to-alls per self-attention, 2 blocks, 4 buckets
        assert s["eager_all_to_all_calls"] == 2 * 2 * len(SP_BUCKETS) and s["compiled_all_to_all_calls"] == 0, s
