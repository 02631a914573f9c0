"""DeepSpeed ZeRO-2 / ZeRO-3 (2 gloo ranks, CPU accelerator) against one plain-torch process, and checkpoints.

Same tiny VideoDiT, data and AdamW schedule as ``tests/test_fsdp.py``: 5 optimizer steps on a fixed
global batch of 4. The reference accumulates 2 micro-batches of 2 samples (each loss / 2, as the
Trainer does); ZeRO-2 runs micro-batch 1 x 2 accumulation steps counted by DeepSpeed with the loss
pre-divided (``backward(loss / 2, scale_wrt_gas=False)``, the Trainer's form), ZeRO-3 micro-batch
2 without accumulation.

Checkpoints go through the DCP flow (``CheckpointManager`` + :class:`DeepSpeedState`): the ZeRO-2
run saves at step 3; a fresh ZeRO-3 engine and a plain single-process model + AdamW each resume
from it and must reproduce steps 4-5; the ZeRO-3 engine also resumes the plain loop's own step-3
checkpoint. A 4-rank ZeRO-2 run with dp=2 x sp=2 checks the SP gradient rule (SUM over SP, MEAN over
data streams) with ``engine.backward(loss * sp_size)``.

Tolerances (as in test_fsdp): losses and pre-clip gradient norms rtol 1e-5; parameters atol 5e-5
(fp32, reduction order only; the norms catch a mis-scaled gradient that Adam + clipping hide).

DeepSpeed's CPU accelerator builds its shared-memory comm op on first use; the session fixture
builds it once in this process before any rank is spawned (ranks only load the cached build).

Run: ``.venv/bin/python -m pytest tests/test_deepspeed.py -v``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from vdit.train.checkpoint import CheckpointManager, ModelOptimizerState
from vdit.train.config import LoopConfig
from vdit.train.optim import build_optimizer, build_scheduler
from vdit.train.parallel.deepspeed import (
    BUCKET_CAP_CPU,
    BUCKET_CAP_CUDA,
    DeepSpeedState,
    bucket_elements,
    build_deepspeed,
    deep_merge,
    deepspeed_config,
    deepspeed_state_dict,
    gather_full_state_dict_deepspeed,
    load_deepspeed_state_dict,
    require_deepspeed,
)
from vdit.train.parallel.dims import ParallelConfig, ParallelDims

# the model, data and loss of the FSDP tests (one definition of the experiment)
from tests.multiproc import init_rank, spawn
from tests.test_fsdp import GLOBAL_BATCH, OPTIM, STEPS, global_batch, loss_fn, plain_model

LOSS_RTOL = 1e-5
PARAM_ATOL = 5e-5
SAVE_AT = 3
FP32 = LoopConfig(precision="fp32", device="cpu")


# ------------------------------------------------------------------------------------------ config
def test_config_batch_math_and_fields():
    cfg = deepspeed_config(FP32, ParallelConfig(backend="deepspeed", zero_stage=3), OPTIM, 2, 4, 8)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == \
        (2, 4, 64)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"] == {"enabled": False}
    assert cfg["gradient_clipping"] == OPTIM.grad_clip
    assert "sequence_parallel_size" not in cfg
    bf16 = deepspeed_config(LoopConfig(precision="bf16"), ParallelConfig(sp_size=2), OPTIM, 1, 1, 2)
    assert bf16["bf16"] == {"enabled": True}
    assert bf16["train_batch_size"] == 4 and "sequence_parallel_size" not in bf16  # DeepSpeed's dp group: all ranks


def test_config_user_json_deep_merges(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "stage": 1}, "train_batch_size": 16}))
    cfg = deepspeed_config(FP32, ParallelConfig(zero_stage=2, deepspeed_config=str(path)), OPTIM, 2, 2, 4)
    assert cfg["zero_optimization"]["overlap_comm"] is True and cfg["zero_optimization"]["stage"] == 1
    assert cfg["zero_optimization"]["contiguous_gradients"] is True  # generated field kept
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


@pytest.mark.parametrize("user, match", [
    ({"train_batch_size": 12}, r"train_batch_size=12 != .* = 2 \* 2 \* 4 = 16"),
    ({"train_micro_batch_size_per_gpu": 4}, "differ from data.batch_size=2"),
    ({"gradient_accumulation_steps": 8}, "train.grad_accum_steps=2"),
    ({"optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
])
def test_config_inconsistent_user_json_is_an_error(tmp_path, user, match):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ValueError, match=match):
        deepspeed_config(FP32, ParallelConfig(deepspeed_config=str(path)), OPTIM, 2, 2, 4)


def test_config_errors():
    with pytest.raises(ValueError, match="supports ZeRO stages 1-3"):
        deepspeed_config(FP32, ParallelConfig(zero_stage=0), OPTIM, 1, 1, 1)
    with pytest.raises(FileNotFoundError):
        deepspeed_config(FP32, ParallelConfig(deepspeed_config="/nonexistent.json"), OPTIM, 1, 1, 1)


def test_config_buckets_follow_the_model_and_user_json_wins(tmp_path):
    """ZeRO buckets are sized to the model (DeepSpeed's 5e8-element default is a 1.9 GiB fp32 buffer
    per rank); without a size, the device's cap; the user JSON's sizes win."""
    z3 = deepspeed_config(FP32, ParallelConfig(zero_stage=3), OPTIM, 1, 1, 2, num_params=123_456)["zero_optimization"]
    assert z3["reduce_bucket_size"] == z3["allgather_bucket_size"] == z3["stage3_prefetch_bucket_size"] == 123_456
    big = deepspeed_config(FP32, ParallelConfig(zero_stage=2), OPTIM, 1, 1, 2, num_params=10 ** 10)
    assert big["zero_optimization"]["reduce_bucket_size"] == BUCKET_CAP_CPU == bucket_elements(None, on_cuda=False)
    assert "stage3_prefetch_bucket_size" not in big["zero_optimization"]
    assert bucket_elements(10 ** 10, on_cuda=True) == BUCKET_CAP_CUDA and bucket_elements(7, on_cuda=True) == 7
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 999, "stage3_prefetch_bucket_size": 5}}))
    user = deepspeed_config(FP32, ParallelConfig(zero_stage=3, deepspeed_config=str(path)), OPTIM, 1, 1, 2,
                            num_params=123_456)["zero_optimization"]
    assert (user["reduce_bucket_size"], user["allgather_bucket_size"], user["stage3_prefetch_bucket_size"]) == \
        (999, 123_456, 5)


def test_deepspeed_is_an_optional_extra(monkeypatch):
    """Importing the Trainer never imports deepspeed; selecting it without the package names the extra."""
    code = ("import sys; import vdit.train.trainer, vdit.train.main, vdit.train.parallel.deepspeed; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported at import time'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError, as when absent
    with pytest.raises(ImportError, match=r"pip install -e '\.\[deepspeed\]'"):
        require_deepspeed()


# -------------------------------------------------------------------------------------- reference
def _plain_steps(model, opt, sched, steps, micro: int = 2, norms: list | None = None) -> list[float]:
    """The Trainer's loop: ``micro`` micro-batches per step, each loss / micro, clip, step."""
    losses = []
    per = GLOBAL_BATCH // micro
    for step in steps:
        batch, total = global_batch(step), 0.0
        for j in range(micro):
            loss = loss_fn(model, batch, slice(j * per, (j + 1) * per))
            (loss / micro).backward()
            total += loss.item() / micro
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        if norms is not None:
            norms.append(norm.item())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


@pytest.fixture(scope="module")
def reference():
    model = plain_model()
    opt = build_optimizer(model, OPTIM)
    sched = build_scheduler(opt, OPTIM, STEPS)
    norms: list[float] = []
    losses = _plain_steps(model, opt, sched, range(STEPS), norms=norms)
    return {"losses": losses, "norms": norms, "params": model.state_dict()}


# ---------------------------------------------------------------------------------------- workers
@pytest.fixture(scope="session")
def ds_ops():
    """Build DeepSpeed's CPU comm op once, here, before ranks are spawned (they load the cached build)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
    return deepspeed.__version__


def _init(rank: int, world: int, port: int) -> None:
    init_rank(rank, world, port, DS_ACCELERATOR="cpu")


def _engine(stage: int, micro: int, accum: int, world: int):
    model = plain_model()
    opt = build_optimizer(model, OPTIM)
    sched = build_scheduler(opt, OPTIM, STEPS)
    cfg = deepspeed_config(FP32, ParallelConfig(backend="deepspeed", zero_stage=stage), OPTIM, micro, accum, world)
    return build_deepspeed(model, opt, sched, cfg), sched


def _ds_steps(engine, steps, rank: int, world: int, micro: int, accum: int, norms: list | None = None,
              prescaled: bool = False) -> list[float]:
    """DeepSpeed's loop: per micro-batch engine(...), backward(loss), step(). DeepSpeed divides the loss
    by the accumulation steps, or with ``prescaled`` the loop does (``backward(loss / accum,
    scale_wrt_gas=False)``, the Trainer's form: its loss is already normalised over the step)."""
    losses = []
    for step in steps:
        batch, total = global_batch(step), torch.zeros(())
        for j in range(accum):
            start = rank * micro * accum + j * micro
            loss = loss_fn(engine, batch, slice(start, start + micro))
            if prescaled:
                engine.backward(loss / accum, scale_wrt_gas=False)
            else:
                engine.backward(loss)
            engine.step()
            total += loss.detach() / accum
        dist.all_reduce(total)
        losses.append(total.item() / world)
        if norms is not None:
            norms.append(float(engine.get_global_grad_norm()))  # pre-clip
    return losses


def _worker_zero2(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    engine, sched = _engine(stage=2, micro=1, accum=2, world=world)
    res = {"optimizer": type(engine.optimizer).__name__}
    res["norms"] = []
    res["losses"] = _ds_steps(engine, range(SAVE_AT), rank, world, micro=1, accum=2, norms=res["norms"],
                              prescaled=True)
    ckpt = CheckpointManager(os.path.join(out, "checkpoints"))
    ckpt.save(SAVE_AT, {"app": DeepSpeedState(engine), "scheduler": sched})
    # same-engine round trip: state -> load -> state is the identity
    sd = deepspeed_state_dict(engine, rank0_only=False)
    load_deepspeed_state_dict(engine, sd, from_rank0=True)
    again = deepspeed_state_dict(engine, rank0_only=False)
    res["roundtrip_equal"] = all(torch.equal(sd["model"][k], again["model"][k]) for k in sd["model"]) and all(
        torch.equal(v, again["optimizer"]["state"][n][k]) for n, e in sd["optimizer"]["state"].items()
        for k, v in e.items())
    res["state_keys"] = sorted(next(iter(sd["optimizer"]["state"].values())))
    res["losses"] += _ds_steps(engine, range(SAVE_AT, STEPS), rank, world, micro=1, accum=2, norms=res["norms"],
                               prescaled=True)
    res["params"] = gather_full_state_dict_deepspeed(engine)
    return res


def _worker_zero3(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    res = {}
    engine, _ = _engine(stage=3, micro=2, accum=1, world=world)
    res["optimizer"] = type(engine.optimizer).__name__
    res["partitioned"] = all(p.numel() == 0 for p in engine.module.parameters())
    res["norms"] = []
    res["losses"] = _ds_steps(engine, range(STEPS), rank, world, micro=2, accum=1, norms=res["norms"])
    res["params"] = gather_full_state_dict_deepspeed(engine)
    # resume the ZeRO-2 checkpoint (other stage, other micro-batch split) in a fresh ZeRO-3 engine
    engine, sched = _engine(stage=3, micro=2, accum=1, world=world)
    ckpt = CheckpointManager(os.path.join(out, "checkpoints"))
    res["resumed_step"] = ckpt.load(ckpt.latest(), {"app": DeepSpeedState(engine), "scheduler": sched})
    res["resumed_lr"] = engine.optimizer.param_groups[0]["lr"]
    res["resumed_losses"] = _ds_steps(engine, range(SAVE_AT, STEPS), rank, world, micro=2, accum=1)
    res["resumed_params"] = gather_full_state_dict_deepspeed(engine)
    # and a checkpoint of the plain single-process path (ModelOptimizerState, get_state_dict layout)
    engine, sched = _engine(stage=3, micro=2, accum=1, world=world)
    ckpt = CheckpointManager(os.path.join(out, "plain_checkpoints"))
    ckpt.load(ckpt.latest(), {"app": DeepSpeedState(engine), "scheduler": sched})
    res["from_plain_losses"] = _ds_steps(engine, range(SAVE_AT, STEPS), rank, world, micro=2, accum=1)
    res["from_plain_params"] = gather_full_state_dict_deepspeed(engine)
    return res


def _worker_zero2_sp(rank: int, world: int, port: int, out: str) -> None:
    """dp=2 x sp=2: the ranks of an SP group read the same 2 samples and hold 0.25 / 0.75 of the
    gradient (as SP ranks hold parts of the full-sequence gradient); backward(loss * sp_size)."""
    _init(rank, world, port)
    pc = ParallelConfig(backend="deepspeed", zero_stage=2, sp_size=2)
    dims = ParallelDims(pc, world, num_heads=2)
    model = plain_model()
    opt = build_optimizer(model, OPTIM)
    sched = build_scheduler(opt, OPTIM, STEPS)
    engine = build_deepspeed(model, opt, sched, deepspeed_config(FP32, pc, OPTIM, 2, 1, dims.dp_size))
    share = (0.25, 0.75)[dims.sp_rank]
    losses, norms = [], []
    for step in range(STEPS):
        loss = loss_fn(engine, global_batch(step), slice(dims.dp_rank * 2, dims.dp_rank * 2 + 2))
        engine.backward(loss * share * dims.sp_size)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        norms.append(float(engine.get_global_grad_norm()))
    res = {"losses": losses, "norms": norms, "params": gather_full_state_dict_deepspeed(engine)}
    return res


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("deepspeed")


def _spawn(worker, run_dir, world: int = 2) -> list[dict]:
    return spawn(worker, world, run_dir)


@pytest.fixture(scope="module")
def zero2(ds_ops, run_dir):
    return _spawn(_worker_zero2, run_dir)


@pytest.fixture(scope="module")
def plain_checkpoint(run_dir):
    """The plain loop's checkpoint at step 3 (what a single-process or FSDP run writes)."""
    model = plain_model()
    opt = build_optimizer(model, OPTIM)
    sched = build_scheduler(opt, OPTIM, STEPS)
    _plain_steps(model, opt, sched, range(SAVE_AT))
    return CheckpointManager(str(run_dir / "plain_checkpoints")).save(SAVE_AT, {
        "app": ModelOptimizerState(model, opt), "scheduler": sched})


@pytest.fixture(scope="module")
def zero3(ds_ops, run_dir, zero2, plain_checkpoint):  # reads both checkpoints
    return _spawn(_worker_zero3, run_dir)


def _assert_params(params, expected):
    assert params.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=PARAM_ATOL, msg=k)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.multiproc
def test_zero2_two_ranks_matches_plain_torch(zero2, reference):
    assert zero2[0]["optimizer"] == "DeepSpeedZeroOptimizer"
    for res in zero2:
        torch.testing.assert_close(res["losses"], reference["losses"], rtol=LOSS_RTOL, atol=0)
        torch.testing.assert_close(res["norms"], reference["norms"], rtol=LOSS_RTOL, atol=0)
    assert zero2[1]["params"] == {}  # rank0_only
    _assert_params(zero2[0]["params"], reference["params"])


@pytest.mark.multiproc
def test_zero3_two_ranks_matches_plain_torch(zero3, reference):
    assert zero3[0]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and zero3[0]["partitioned"]
    for res in zero3:
        torch.testing.assert_close(res["losses"], reference["losses"], rtol=LOSS_RTOL, atol=0)
        torch.testing.assert_close(res["norms"], reference["norms"], rtol=LOSS_RTOL, atol=0)
    _assert_params(zero3[0]["params"], reference["params"])


@pytest.mark.multiproc
def test_state_dict_round_trip_on_the_same_engine(zero2):
    assert all(r["roundtrip_equal"] for r in zero2)
    assert zero2[0]["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]


@pytest.mark.multiproc
def test_zero2_checkpoint_resumes_in_zero3(zero3, reference):
    for res in zero3:
        assert res["resumed_step"] == SAVE_AT
        torch.testing.assert_close(res["resumed_losses"], reference["losses"][SAVE_AT:], rtol=LOSS_RTOL, atol=0)
    _assert_params(zero3[0]["resumed_params"], reference["params"])


@pytest.mark.multiproc
def test_plain_checkpoint_resumes_in_zero3(zero3, reference):
    for res in zero3:
        torch.testing.assert_close(res["from_plain_losses"], reference["losses"][SAVE_AT:], rtol=LOSS_RTOL, atol=0)
    _assert_params(zero3[0]["from_plain_params"], reference["params"])


@pytest.mark.multiproc
def test_deepspeed_checkpoint_resumes_in_plain_torch(zero2, run_dir, reference):
    """The DCP files a DeepSpeed run writes load into the plain model + AdamW (the FSDP/1-process format)."""
    model = plain_model(seed=123)  # different weights: everything must come from the checkpoint
    opt = build_optimizer(model, OPTIM)
    sched = build_scheduler(opt, OPTIM, STEPS)
    ckpt = CheckpointManager(str(run_dir / "checkpoints"))
    step = ckpt.load(ckpt.latest(), {"app": ModelOptimizerState(model, opt), "scheduler": sched})
    assert step == SAVE_AT
    losses = _plain_steps(model, opt, sched, range(SAVE_AT, STEPS))
    torch.testing.assert_close(losses, reference["losses"][SAVE_AT:], rtol=LOSS_RTOL, atol=0)
    _assert_params(model.state_dict(), reference["params"])


@pytest.mark.multiproc
def test_zero2_sequence_parallel_gradients_are_summed(ds_ops, tmp_path, reference):
    results = _spawn(_worker_zero2_sp, tmp_path, world=4)
    for res in results:
        torch.testing.assert_close(res["losses"], reference["losses"], rtol=LOSS_RTOL, atol=0)
        torch.testing.assert_close(res["norms"], reference["norms"], rtol=LOSS_RTOL, atol=0)  # gradient scale
    _assert_params(results[0]["params"], reference["params"])
