"""FSDP2 / HSDP against one process, meta-device init, activation checkpointing, compile, SP gradient rules.

A tiny VideoDiT (hidden 32, depth 2, heads 2, patch [1, 8, 8], random text features) trains 5
AdamW steps (warmup + cosine schedule, clipping active) on a fixed global batch of 4 samples per
step; each rank takes its data-parallel slice, the single-process run takes the whole batch.

Tolerances: losses and pre-clip gradient norms rtol 1e-5 (observed ~1e-7); final parameters
atol 5e-5 (observed <= 6e-6; fp32, the only difference is the order of the gradient reductions,
which Adam's normalisation grows for near-zero gradients; one wrong update is ~lr = 1e-2). The
gradient norms are compared because Adam + clipping are blind to a uniformly mis-scaled gradient.
Meta-init weights and activation-checkpointing losses/gradients: exact.

Issue 14: the foreach EMA on local shards equals the DTensor loop exactly; deferred gradient sync
sends one reduce-scatter per FSDP group per step with the same gradients (rtol 1e-6: summation
order); under a 1-rank bf16 policy the flow time and RoPE tables reach the model in fp32.

Run: ``.venv/bin/python -m pytest tests/test_fsdp.py -v`` (spawns 2 and 4 gloo ranks).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.multiproc import init_rank, spawn
from vdit.model.dit import DiTConfig, VideoDiT
from vdit.train.config import OptimConfig
from vdit.train.optim import build_optimizer, build_scheduler
from vdit.train.parallel.dims import ParallelConfig, ParallelDims
from vdit.train.parallel.fsdp import (
    apply_activation_checkpointing,
    apply_compile,
    gather_full_state_dict,
    is_sharded,
    materialize_and_init,
    parallelize,
    set_gradient_sync,
    sync_sp_gradients,
)
from vdit.train.ema import EMA

LOSS_RTOL = 1e-5
PARAM_ATOL = 5e-5
STEPS = 5
GLOBAL_BATCH = 4
TEXT_DIM = 16
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.01, warmup_steps=2, schedule="cosine", grad_clip=0.1)


def model_cfg(depth: int = 2) -> DiTConfig:
    return DiTConfig(in_channels=3, patch_size=[1, 8, 8], hidden_size=32, depth=depth, num_heads=2, text_dim=TEXT_DIM)


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """The fixed global batch of ``step``: 4 clips of (3, 2, 16, 16) latents, 5 text tokens."""
    g = torch.Generator().manual_seed(1000 + step)
    b = GLOBAL_BATCH
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return {"x": torch.randn(b, 3, 2, 16, 16, generator=g), "t": torch.rand(b, generator=g),
            "text": torch.randn(b, 5, TEXT_DIM, generator=g), "mask": mask,
            "target": torch.randn(b, 3, 2, 16, 16, generator=g)}


def loss_fn(model, batch: dict[str, torch.Tensor], sl: slice = slice(None)) -> torch.Tensor:
    pred = model(batch["x"][sl], batch["t"][sl], batch["text"][sl], batch["mask"][sl])
    return (pred - batch["target"][sl]).square().mean()


def plain_model(seed: int = 0, depth: int = 2) -> VideoDiT:
    """The single-device reference: meta build, to_empty, init_weights(seed) on CPU."""
    with torch.device("meta"):
        model = VideoDiT(model_cfg(depth))
    return materialize_and_init(model, "cpu", seed)


def train(model, dp_rank: int = 0, dp_size: int = 1, weight: float = 1.0, dp_group=None,
          norms: list | None = None) -> list[float]:
    """5 optimizer steps; returns the global mean loss per step and appends the pre-clip gradient
    norm of each step to ``norms``. ``weight`` scales the backward loss (emulates an SP rank's
    share of the gradient)."""
    opt = build_optimizer(model, OPTIM)
    sched = build_scheduler(opt, OPTIM, STEPS)
    per = GLOBAL_BATCH // dp_size
    sl = slice(dp_rank * per, (dp_rank + 1) * per)
    losses = []
    for step in range(STEPS):
        loss = loss_fn(model, global_batch(step), sl)
        (loss * weight).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        if norms is not None:
            norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).item())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if dp_size > 1:
            dist.all_reduce(mean, group=dp_group)
            mean /= dp_size
        losses.append(mean.item())
    return losses


@pytest.fixture(scope="module")
def reference():
    model = plain_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    norms: list[float] = []
    losses = train(model, norms=norms)
    return {"init": init, "losses": losses, "norms": norms, "params": model.state_dict()}


def _sharded_model(dims: ParallelDims, cfg: ParallelConfig, apply_sp=None):
    with torch.device("meta"):
        model = VideoDiT(model_cfg())
    reference = copy.deepcopy(model)
    parallelize(model, dims, cfg, apply_sp=apply_sp)
    return materialize_and_init(model, "cpu", seed=0, reference=reference)


# --------------------------------------------------------------------------------------- 2 ranks
def _worker_fsdp2(rank: int, world: int, port: int, out: str) -> None:
    init_rank(rank, world, port)
    cfg = ParallelConfig(backend="fsdp")
    dims = ParallelDims(cfg, world, num_heads=2)
    dims.build_mesh("cpu")
    res: dict = {}
    with torch.device("meta"):
        bare = VideoDiT(model_cfg())
    parallelize(bare, dims, cfg)
    try:
        materialize_and_init(bare, "cpu", seed=0)
    except ValueError as e:
        res["no_reference_error"] = str(e)
    model = _sharded_model(dims, cfg)
    res["sharded"] = is_sharded(model)
    res["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
    res["init"] = gather_full_state_dict(model, rank0_only=False)
    res["norms"] = []
    res["losses"] = train(model, dims.dp_rank, dims.dp_size, dp_group=dims.dp_mesh.get_group(), norms=res["norms"])
    res["params"] = gather_full_state_dict(model)  # rank 0 only
    res["ema"] = _ema_check(model)
    res["accum"] = {defer: _accumulate(model, dims, defer) for defer in (True, False)}
    # backend=none + SP: every rank weights the full-batch loss by w_r (sum 1), sync_sp_gradients SUMs.
    plain = plain_model()
    w = (0.3, 0.7)[rank]
    (loss_fn(plain, global_batch(0)) * w).backward()
    plain.blocks[0].attn.q_proj.bias.grad = None  # a rank without a gradient still takes part (zeros)
    sync_sp_gradients(plain, dist.group.WORLD, bucket_bytes=4096)
    res["sp_grads"] = {n: p.grad.clone() for n, p in plain.named_parameters()}
    return res


def _ema_check(model) -> dict:
    """Issue 14 #5: the foreach EMA update on local shards equals a DTensor ``lerp_`` per parameter."""
    ema = EMA(model, 0.9)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a shadow different from the parameters (as after some steps)
        for t in ema.shadow.values():
            t.to_local().add_(torch.randn(t.to_local().shape, generator=g))
    ref = {n: t.clone() for n, t in ema.shadow.items()}
    ema.update(model)
    for n, p in model.named_parameters():
        ref[n].lerp_(p.detach().float(), 0.1)  # the update before issue 14
    return {"dtensor": all(isinstance(t, DTensor) for t in ema.shadow.values()),
            "equal": all(torch.equal(ema.shadow[n].to_local(), ref[n].to_local()) for n in ref)}


def _accumulate(model, dims: ParallelDims, defer: bool, micro: int = 2) -> tuple[int, dict]:
    """Issue 14 #6: one step of ``micro`` accumulated micro-batches on this rank's slice of the global
    batch; returns (reduce-scatters issued, full gradients)."""
    calls = []
    original = dist.reduce_scatter_single

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    batch, per = global_batch(0), GLOBAL_BATCH // dims.dp_size
    dist.reduce_scatter_single = counting  # FSDP2's DefaultReduceScatter looks it up at call time
    try:
        for i in range(micro):
            n = per // micro
            start = dims.dp_rank * per + i * n
            set_gradient_sync(model, i == micro - 1, defer)
            (loss_fn(model, batch, slice(start, start + n)) / micro).backward()
    finally:
        dist.reduce_scatter_single = original
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    set_gradient_sync(model, True)
    return len(calls), grads


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory):
    return spawn(_worker_fsdp2, 2, tmp_path_factory.mktemp("fsdp2"))


@pytest.mark.multiproc
def test_meta_init_equals_single_device_init(fsdp2_results, reference):
    for res in fsdp2_results:
        assert res["sharded"]
        assert "needs reference=" in res["no_reference_error"]
        assert res["init"].keys() == reference["init"].keys()
        for k, v in reference["init"].items():
            assert torch.equal(res["init"][k], v), k
    total = sum(v.numel() for v in reference["init"].values())
    assert all(res["local_numel"] < total for res in fsdp2_results)  # really sharded
    assert sum(res["local_numel"] for res in fsdp2_results) >= total


@pytest.mark.multiproc
def test_fsdp_two_ranks_matches_one(fsdp2_results, reference):
    for res in fsdp2_results:
        torch.testing.assert_close(res["losses"], reference["losses"], rtol=LOSS_RTOL, atol=0)
        torch.testing.assert_close(res["norms"], reference["norms"], rtol=LOSS_RTOL, atol=0)
    params = fsdp2_results[0]["params"]
    assert fsdp2_results[1]["params"] == {}  # rank0_only
    assert params.keys() == reference["params"].keys()
    for k, v in reference["params"].items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=PARAM_ATOL, msg=k)
    moved = [k for k, v in reference["params"].items() if not torch.equal(v, reference["init"][k])]
    assert len(moved) == len(reference["params"])  # every parameter trained (adaLN-Zero ones included)


@pytest.mark.multiproc
def test_ema_foreach_on_shards_equals_dtensor_loop(fsdp2_results):
    for res in fsdp2_results:
        assert res["ema"] == {"dtensor": True, "equal": True}


@pytest.mark.multiproc
def test_deferred_gradient_sync_reduces_once_per_step(fsdp2_results):
    """Accumulating 2 micro-batches: deferred sync issues one reduce-scatter per FSDP group (2 blocks +
    root = 3) per step instead of one per micro-batch, and the gradients equal the undeferred ones
    (up to summation order) and the full-batch gradient of one process."""
    model = plain_model()
    trained = fsdp2_results[0]["params"]
    model.load_state_dict(trained)  # the state both ranks accumulated from (after the 5 steps)
    loss_fn(model, global_batch(0)).backward()
    for res in fsdp2_results:
        (n_defer, deferred), (n_every, every) = res["accum"][True], res["accum"][False]
        assert (n_defer, n_every) == (3, 6)
        for n, p in model.named_parameters():
            torch.testing.assert_close(deferred[n], every[n], rtol=1e-6, atol=1e-9, msg=n)
            torch.testing.assert_close(deferred[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.multiproc
def test_sync_sp_gradients_sums_over_the_group(fsdp2_results):
    model = plain_model()
    loss_fn(model, global_batch(0)).backward()
    for res in fsdp2_results:
        for n, p in model.named_parameters():
            expected = p.grad * 0.7 if n == "blocks.0.attn.q_proj.bias" else p.grad  # rank 0 sent zeros there
            torch.testing.assert_close(res["sp_grads"][n], expected, rtol=1e-5, atol=1e-7, msg=n)


# --------------------------------------------------------------------------------------- 4 ranks
def _worker_fsdp4(rank: int, world: int, port: int, out: str) -> None:
    init_rank(rank, world, port)
    res: dict = {}
    # HSDP: 2 replicas x 2 shards, 4 data streams of 1 sample.
    cfg = ParallelConfig(backend="fsdp", dp_replicate=2, dp_shard=2)
    dims = ParallelDims(cfg, world, num_heads=2)
    dims.build_mesh("cpu")
    model = _sharded_model(dims, cfg)
    res["hsdp_placements"] = str(next(model.parameters()).placements)
    res["hsdp_norms"] = []
    res["hsdp_losses"] = train(model, dims.dp_rank, dims.dp_size, dp_group=dims.dp_group, norms=res["hsdp_norms"])
    res["hsdp_params"] = gather_full_state_dict(model)
    # FSDP over dp_shard=2 x sp=2 (SP folded into the shard dim, divide factor dp_size=2): the two
    # ranks of an SP group read the same 2 samples and backprop 0.25 / 0.75 of the loss (as SP ranks
    # hold parts of the full-sequence gradient); SUM over SP + MEAN over dp = the 1-process gradient.
    cfg = ParallelConfig(backend="fsdp", dp_shard=2, sp_size=2)
    dims = ParallelDims(cfg, world, num_heads=2)
    dims.build_mesh("cpu")
    called = []
    model = _sharded_model(dims, cfg, apply_sp=called.append)
    res["sp_callback"] = len(called)
    res["sp_mesh_size"] = model.blocks[0].attn.q_proj.weight.device_mesh.size()
    res["sp_norms"] = []
    res["sp_losses"] = train(model, dims.dp_rank, dims.dp_size, weight=(0.25, 0.75)[dims.sp_rank],
                             dp_group=dims.dp_group, norms=res["sp_norms"])
    res["sp_params"] = gather_full_state_dict(model)
    return res


@pytest.fixture(scope="module")
def fsdp4_results(tmp_path_factory):
    return spawn(_worker_fsdp4, 4, tmp_path_factory.mktemp("fsdp4"))


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["hsdp", "sp"])
def test_four_ranks_match_one(fsdp4_results, reference, layout):
    for res in fsdp4_results:
        torch.testing.assert_close(res[f"{layout}_losses"], reference["losses"], rtol=LOSS_RTOL, atol=0)
        # the gradient scale: Adam + clipping would hide a uniformly mis-scaled gradient (e.g. a
        # MEAN over SP instead of a SUM), the pre-clip norm does not
        torch.testing.assert_close(res[f"{layout}_norms"], reference["norms"], rtol=LOSS_RTOL, atol=0)
    params = fsdp4_results[0][f"{layout}_params"]
    for k, v in reference["params"].items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=PARAM_ATOL, msg=k)
    if layout == "hsdp":
        assert fsdp4_results[0]["hsdp_placements"] == "(Replicate(), Shard(dim=0))"
    else:
        assert all(r["sp_callback"] == 1 and r["sp_mesh_size"] == 4 for r in fsdp4_results)


# -------------------------------------------------------------------------------- single process
def _loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, global_batch(0))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode, every, expected", [("full", 2, [0, 1, 2]), ("selective", 2, [0, 2]),
                                                   ("selective", 3, [0]), ("none", 2, [])])
def test_activation_checkpointing_is_exact_and_keeps_names(mode, every, expected):
    base = plain_model(depth=3)
    model = plain_model(depth=3)
    assert apply_activation_checkpointing(model, mode, every) == expected
    assert list(model.state_dict()) == list(base.state_dict())  # no "_checkpoint_wrapped_module." prefix
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in base.named_parameters()]
    loss0, grads0 = _loss_and_grads(base)
    loss1, grads1 = _loss_and_grads(model)
    assert torch.equal(loss0, loss1)
    for n in grads0:
        assert torch.equal(grads0[n], grads1[n]), n
    model.load_state_dict(base.state_dict())  # a checkpoint without AC loads with AC


def test_compile_with_checkpointing_keeps_names_and_values():
    base = plain_model()
    model = plain_model()
    apply_activation_checkpointing(model, "full")
    apply_compile(model, backend="eager")
    assert list(model.state_dict()) == list(base.state_dict())
    loss0, grads0 = _loss_and_grads(base)
    loss1, grads1 = _loss_and_grads(model)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-7, msg=n)


def test_unsharded_materialize_matches_eager_init():
    eager = VideoDiT(model_cfg())
    eager.init_weights(seed=0)
    meta = plain_model(seed=0)
    for k, v in eager.state_dict().items():
        assert torch.equal(meta.state_dict()[k], v), k
    assert gather_full_state_dict(meta).keys() == eager.state_dict().keys()


def test_parallelize_requires_apply_sp_for_sequence_parallel():
    dims = ParallelDims(ParallelConfig(sp_size=2), 2, num_heads=2)
    with torch.device("meta"):
        model = VideoDiT(model_cfg())
    with pytest.raises(ValueError, match="needs apply_sp"):
        parallelize(model, dims, dims.cfg)


# ------------------------------------------------------------------------- 1 rank, bf16 parameters
def _worker_bf16_inputs(rank: int, world: int, port: int, out: str) -> dict:
    """What reaches the timestep embedding and the attention's RoPE under an FSDP2 bf16 policy, with
    vdit's policy (inputs not cast) and with FSDP's default ``cast_forward_inputs=True`` (issue 14 #2)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)  # 1 rank
    cfg = ParallelConfig(backend="fsdp", param_dtype="bf16")
    dims = ParallelDims(cfg, world, num_heads=2)
    dims.build_mesh("cpu")
    batch = global_batch(0)
    t = torch.full((1,), 0.7431)
    res = {}
    for policy in ("vdit", "fsdp_default"):
        with torch.device("meta"):
            model = VideoDiT(model_cfg(depth=1))
        reference = copy.deepcopy(model)
        if policy == "vdit":
            parallelize(model, dims, cfg)
        else:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            fully_shard(model.blocks[0], mesh=dims.fsdp_mesh, mp_policy=mp)
            fully_shard(model, mesh=dims.fsdp_mesh, mp_policy=mp)
        materialize_and_init(model, "cpu", seed=0, reference=reference)
        seen = {}
        model.t_embedder.register_forward_pre_hook(lambda m, args: seen.update(t=args[0].clone()))

        def attn_hook(m, args, kwargs):
            seen.update(rope=[r.dtype for r in kwargs["rope"]], weight=m.q_proj.weight.dtype)

        model.blocks[0].attn.register_forward_pre_hook(attn_hook, with_kwargs=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch["x"][:1], t, batch["text"][:1], batch["mask"][:1])
        out.float().square().mean().backward()
        seen["grad_dtype"] = model.blocks[0].attn.q_proj.weight.grad.dtype
        seen["param_dtype"] = model.blocks[0].attn.q_proj.weight.dtype
        res[policy] = seen
    return res


@pytest.mark.multiproc
def test_bf16_policy_keeps_time_and_rope_in_fp32(tmp_path):
    res = spawn(_worker_bf16_inputs, 1, tmp_path)[0]
    ours, default = res["vdit"], res["fsdp_default"]
    assert ours["t"].dtype == torch.float32 and ours["t"].item() == torch.tensor(0.7431).item()
    assert ours["rope"] == [torch.float32, torch.float32]
    assert ours["weight"] == torch.bfloat16  # the policy is active: the block computes on bf16 weights
    assert ours["param_dtype"] == ours["grad_dtype"] == torch.float32  # sharded params and grads stay fp32
    # FSDP's default cast_forward_inputs=True rounds both (what vdit did before issue 14)
    assert default["t"].dtype == torch.bfloat16 and default["t"].item() == 0.7421875
    assert default["rope"] == [torch.bfloat16, torch.bfloat16]


def test_deferred_sync_is_dropped_when_the_full_gradient_would_not_fit(monkeypatch):
    """14B parameters of fp32 gradients (56 GB) on an 80 GB card: every micro-batch reduce-scatters."""
    from types import SimpleNamespace

    from vdit.train.parallel.fsdp import defer_grad_sync_fits

    def cfg(params, accum=2, defer=True):
        return SimpleNamespace(parallel=SimpleNamespace(defer_grad_sync=defer),
                               train=SimpleNamespace(grad_accum_steps=accum),
                               model=SimpleNamespace(num_params=lambda: params))

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80e9))
    cuda = torch.device("cuda", 0)
    assert defer_grad_sync_fits(cfg(1.3e9), cuda) is True         # 5.2 GB <= 20 GB
    assert defer_grad_sync_fits(cfg(14e9), cuda) is False         # 56 GB > 20 GB
    assert defer_grad_sync_fits(cfg(14e9, accum=1), cuda) is True  # nothing to defer
    assert defer_grad_sync_fits(cfg(1.3e9, defer=False), cuda) is False
    assert defer_grad_sync_fits(cfg(14e9), torch.device("cpu")) is True
