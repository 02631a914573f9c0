"""FLOPs accounting: the formula against torch's FLOP counter, peaks, and the totals a run logs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from tests.test_train import shards, tiny_cfg  # noqa: F401 - the shards fixture
from vdit.model.dit import DiTConfig, VideoDiT, num_tokens
from tests.multiproc import init_rank, spawn
from vdit.train.flops import (
    ACCELERATOR_PEAK_FLOPS,
    WorkCounter,
    accelerator_key,
    cpu_peak_flops,
    peak_flops,
    training_flops,
)
from vdit.train.logging import read_metrics
from vdit.train.trainer import Trainer


def preset(name: str, **overrides) -> DiTConfig:
    d = OmegaConf.to_container(OmegaConf.load(f"conf/model/{name}.yaml"))
    return DiTConfig(**{**d, **overrides})


def counted_flops(cfg: DiTConfig, latent_shape, text_len: int, batch: int) -> float:
    """torch's FlopCounterMode over forward + backward, on the meta device (no memory, no compute;
    attention takes SDPA's math path there, whose matmuls the counter sees)."""
    with torch.device("meta"):
        model = VideoDiT(cfg)
        x = torch.randn(batch, *latent_shape)
        t, text = torch.rand(batch), torch.randn(batch, text_len, cfg.text_dim)
        mask = torch.ones(batch, text_len, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        model(x, t, text, mask).float().square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name,overrides,latent_shape,text_len,batch", [
    ("tiny", {}, (3, 16, 32, 32), 48, 2),                                   # the quickstart model
    ("s", {"text_dim": 4096}, (16, 5, 16, 16), 64, 2),
    ("b", {"text_dim": 4096}, (16, 8, 32, 32), 77, 1),
    ("b", {"text_dim": 4096, "cross_attention": False}, (16, 4, 24, 40), 0, 2),
    ("1.3b", {"text_dim": 4096}, (16, 21, 60, 104), 512, 1),                # 81 x 480 x 832 through the Wan VAE
    ("14b", {"text_dim": 4096, "depth": 2}, (16, 3, 30, 52), 512, 1),       # 14B width, 2 blocks
])
def test_training_flops_match_torch_flop_counter(name, overrides, latent_shape, text_len, batch):
    cfg = preset(name, **overrides)
    formula = training_flops(cfg, latent_shape, text_len, batch)
    counted = counted_flops(cfg, latent_shape, text_len, batch)
    assert formula == pytest.approx(counted, rel=0.02), (formula, counted)


def test_attention_term_is_quadratic_in_tokens():
    """Training FLOPs are a L^2 + b L + c in the tokens L (per-sample work is the constant): the second
    difference isolates self-attention's 3 (fwd + bwd) x 2 matmuls (QK^T, PV) x 2 L^2 d per block."""
    cfg = dataclasses.replace(preset("s"), cross_attention=False)
    f = [training_flops(cfg, (16, 4 * k, 16, 16), 0) for k in (1, 2, 3)]
    n = num_tokens(cfg, (16, 4, 16, 16))
    assert f[2] - 2 * f[1] + f[0] == pytest.approx(2 * 3 * 2 * 2 * n * n * cfg.hidden_size * cfg.depth, rel=1e-9)


def test_accelerator_names_and_peaks():
    assert accelerator_key("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert accelerator_key("NVIDIA H100 PCIe") == "h100-pcie"
    assert accelerator_key("NVIDIA H200") == "h200"
    assert accelerator_key("NVIDIA A100-SXM4-80GB") == "a100"
    assert accelerator_key("NVIDIA B200") == "b200"
    assert accelerator_key("Tesla T4") is None
    assert peak_flops("h100") == ACCELERATOR_PEAK_FLOPS["h100-sxm"] == 989.4e12
    with pytest.raises(KeyError, match="known: a100"):
        peak_flops("h900")


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VDIT_CACHE_DIR", str(tmp_path))
    first, source = cpu_peak_flops()
    assert 1e8 < first < 1e13 and "measured" in source
    assert (tmp_path / "peak_flops.json").exists()
    monkeypatch.setattr("vdit.train.flops.measure_gemm_flops", lambda *a, **k: pytest.fail("re-measured"))
    assert cpu_peak_flops()[0] == first


def test_run_logs_totals_that_survive_resume(shards, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("VDIT_CACHE_DIR", str(tmp_path / "cache"))
    full = Trainer(tiny_cfg(shards, tmp_path / "full"))
    full.fit()
    cfg = tiny_cfg(shards, tmp_path / "split")
    Trainer(cfg).fit(stop_at=3)
    Trainer(cfg).fit()
    # 6 steps x batch 2 of (3, 4, 32, 32) pixels -> 4 x 4 x 4 = 64 tokens; captions padded to 8 tokens.
    per_step = training_flops(full.cfg.model, (3, 4, 32, 32), 8, 2)
    for run in ("full", "split"):
        rows = [r for r in read_metrics(tmp_path / run) if "perf/total_flops" in r]
        last = rows[-1]
        assert last["step"] == 6
        assert last["perf/total_flops"] == pytest.approx(6 * per_step, rel=1e-12)
        assert last["perf/total_tokens"] == 6 * 2 * 64 and last["perf/total_samples"] == 12
        assert last["perf/flops_per_step"] == pytest.approx(per_step, rel=1e-12)
        assert 0 < last["perf/mfu"] < 1 and last["mem/peak_gb"] > 0.01
        assert last["perf/samples_per_s"] == pytest.approx(last["perf/tokens_per_s"] / 64, rel=1e-9)
        params = [r["model/num_params"] for r in read_metrics(tmp_path / run) if "model/num_params" in r]
        assert params and set(params) == {sum(p.numel() for p in full.model.parameters())}


def test_bucketed_run_counts_the_samples_it_trained_on(shards, tmp_path, monkeypatch):  # noqa: F811
    """Buckets change the batch size per step: samples and tokens come from the batches, not data.batch_size."""
    monkeypatch.setenv("VDIT_CACHE_DIR", str(tmp_path / "cache"))
    buckets = ("data.buckets={token_budget: 256, patch_size: [1, 8, 8], buckets: "
               "[{num_frames: 4, height: 32, width: 32}, {num_frames: 8, height: 32, width: 32}]}")
    t = Trainer(tiny_cfg(shards, tmp_path / "b", buckets, "data.frame_stride=1", "train.log_every=1"))
    t.fit()
    rows = [r for r in read_metrics(tmp_path / "b") if "perf/total_samples" in r]
    tokens = [b - a for a, b in zip([0.0] + [r["perf/total_tokens"] for r in rows], [r["perf/total_tokens"]
                                                                                    for r in rows])]
    samples = [b - a for a, b in zip([0.0] + [r["perf/total_samples"] for r in rows],
                                     [r["perf/total_samples"] for r in rows])]
    # A 4-frame bucket step holds 4 clips of 64 tokens, an 8-frame one 2 clips of 128 (budget 256).
    assert set(tokens) == {256.0} and set(samples) <= {2.0, 4.0} and len(set(samples)) == 2


def test_flops_budget_sets_the_steps_and_the_run_records_its_launch(shards, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("VDIT_CACHE_DIR", str(tmp_path / "cache"))
    per_step = training_flops(tiny_cfg(shards, tmp_path).model, (3, 4, 32, 32), 8, 2)
    t = Trainer(tiny_cfg(shards, tmp_path / "r", f"train.flops_budget={5.5 * per_step}"))
    assert t.cfg.train.steps == 5
    from vdit.train.optim import lr_lambda
    # the LR schedule spans the budget's 5 steps, not the config's train.steps
    assert t.scheduler.lr_lambdas[0](4) == lr_lambda(4, t.cfg.optim, 5) != lr_lambda(4, t.cfg.optim, 1000)
    t.fit()
    rows = [r for r in read_metrics(tmp_path / "r") if "perf/total_flops" in r]
    assert rows[-1]["step"] == 5 and rows[-1]["perf/total_flops"] == pytest.approx(5 * per_step, rel=1e-12)
    assert "steps: 5\n" in (tmp_path / "r" / "config.yaml").read_text()  # what the scaling fit reads
    launch = json.loads((tmp_path / "r" / "launches.jsonl").read_text().splitlines()[-1])
    assert launch["start_step"] == 0 and launch["world"]["world_size"] == 1 and launch["code"]["version"]
    assert launch["code"]["git_commit"] is None or len(launch["code"]["git_commit"]) == 40
    with pytest.raises(ValueError, match="less than one step"):
        Trainer(tiny_cfg(shards, tmp_path / "tiny_budget", f"train.flops_budget={0.5 * per_step}"))


def test_flops_budget_refuses_buckets(shards, tmp_path):  # noqa: F811
    buckets = ("data.buckets={token_budget: 64, patch_size: [1, 8, 8], buckets: "
               "[{num_frames: 4, height: 32, width: 32}]}")
    with pytest.raises(ValueError, match="fixed-shape data"):
        tiny_cfg(shards, tmp_path, buckets, "train.flops_budget=1e9")


def test_work_counter_without_a_group_stays_on_the_host():
    w = WorkCounter("cpu")
    assert w.add_step(10.0, 64, 2) == 64.0 and w.add_step(20.0, 128, 4) == 128.0
    assert w.exact_totals() == {"flops": 30.0, "tokens": 192.0, "samples": 6.0} and w.totals["flops"] == 0.0
    assert w.flush() == {"flops": 30.0, "tokens": 192.0, "samples": 6.0}
    w.add_step(1.0, 1, 1)
    assert w.flush() == {"flops": 1.0, "tokens": 1.0, "samples": 1.0}
    assert w.totals == {"flops": 31.0, "tokens": 193.0, "samples": 7.0} and w.flush()["tokens"] == 0.0


def _work_counter_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    init_rank(rank, world, port)
    w = WorkCounter("cpu", dist.group.WORLD)
    steps = []
    calls = {"n": 0}
    tolist = torch.Tensor.tolist

    def counting_tolist(self):
        calls["n"] += 1
        return tolist(self)

    torch.Tensor.tolist = counting_tolist  # this process only: no host sync may happen per step
    try:
        for step in range(3):
            tokens = w.add_step(1e9 * (rank + 1), 100 * (rank + 1) + step, rank + 1)  # ranks differ (buckets)
            steps.append(tokens)
        synced_per_step = calls["n"]
        exact = w.exact_totals()
        interval = w.flush()
    finally:
        torch.Tensor.tolist = tolist
    return {"tokens": [(type(t).__name__, float(t)) for t in steps], "synced_per_step": synced_per_step,
            "exact": exact, "interval": interval, "totals": w.totals}


@pytest.mark.multiproc
def test_work_counter_sums_over_ranks_and_syncs_only_on_flush(tmp_path):
    """Two data-parallel ranks with different counts: each step's global tokens come back as a device
    tensor (no host sync), the interval's sums reach the host only at flush, exactly."""
    results = spawn(_work_counter_worker, 2, tmp_path)
    for r in results:
        assert [t for t, _ in r["tokens"]] == ["Tensor"] * 3
        assert [v for _, v in r["tokens"]] == [300.0, 302.0, 304.0]  # (100 + s) + (200 + s)
        assert r["synced_per_step"] == 0
        want = {"flops": 3 * 3e9, "tokens": 906.0, "samples": 9.0}
        assert r["exact"] == r["interval"] == r["totals"] == want
