"""Parallel layout: validation messages, dp_shard=-1, launcher environment parsing, and the 4-rank mesh.

Run: ``.venv/bin/python -m pytest tests/test_parallel_dims.py -v`` (the mesh test spawns 4 gloo ranks).
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from tests.multiproc import rank_env, spawn
from vdit.train.parallel.dims import (
    DistInfo,
    ParallelConfig,
    ParallelDims,
    first_slurm_host,
    init_distributed,
    parse_dist_env,
)


def dims(world, num_heads=None, **kw):
    return ParallelDims(ParallelConfig(**kw), world, num_heads=num_heads)


# ------------------------------------------------------------------------------------------ layout
def test_dp_shard_minus_one_takes_the_rest_of_the_world():
    d = dims(8, dp_replicate=2, sp_size=2)
    assert (d.dp_replicate, d.dp_shard, d.sp_size, d.dp_size) == (2, 2, 2, 4)
    assert dims(8).dp_shard == 8 and dims(1).dp_shard == 1
    with pytest.raises(ValueError, match=r"world_size=6 is not divisible by .* = 2 \* 2 = 4"):
        dims(6, dp_replicate=2, sp_size=2)


def test_product_mismatch_names_the_numbers():
    with pytest.raises(ValueError, match=r"2 \* 3 \* 1 = 6 but world_size=8.*dp_shard=-1"):
        dims(8, dp_replicate=2, dp_shard=3)
    with pytest.raises(ValueError, match="dp_shard=0 must be >= 1 or -1"):
        dims(8, dp_shard=0)


def test_heads_not_divisible_by_ulysses_suggests_ring_or_hybrid():
    with pytest.raises(ValueError) as e:
        dims(4, num_heads=6, sp_size=4, sp_mode="ulysses")
    msg = str(e.value)
    assert "num_heads=6" in msg and "Ulysses degree 4" in msg and "sp_mode=ring" in msg
    assert "sp_mode=hybrid with ulysses_size=2 ring_size=2" in msg
    with pytest.raises(ValueError, match="sp_mode=ring"):  # no hybrid split helps 5 heads on 4 ranks
        dims(4, num_heads=5, sp_size=4)
    d = dims(4, num_heads=6, sp_size=4, sp_mode="ring")  # ring has no head constraint
    assert (d.ulysses_size, d.ring_size) == (1, 4)
    d = dims(4, num_heads=6, sp_size=4, sp_mode="hybrid", ulysses_size=2, ring_size=2)
    assert (d.ulysses_size, d.ring_size) == (2, 2)


def test_hybrid_sizes_must_multiply_to_sp():
    with pytest.raises(ValueError, match=r"ulysses_size \* ring_size == sp_size, got 2 \* 1 = 2 != 4"):
        dims(4, sp_size=4, sp_mode="hybrid", ulysses_size=2, ring_size=1)
    with pytest.raises(ValueError, match="use sp_mode=hybrid"):
        dims(4, sp_size=4, sp_mode="ulysses", ring_size=2)
    d = dims(8, sp_size=4, sp_mode="ulysses")
    assert (d.ulysses_size, d.ring_size, d.dp_shard) == (4, 1, 2)


def test_backend_specific_checks():
    with pytest.raises(ValueError, match="dp_replicate=2 applies to backend=fsdp"):
        dims(4, backend="deepspeed", dp_replicate=2)
    with pytest.raises(ValueError, match="zero_stage=0 is plain data parallel.*dp_replicate=4 dp_shard=1"):
        dims(4, backend="deepspeed", zero_stage=0)
    with pytest.raises(ValueError, match="backend=none runs a single data stream"):
        dims(4, backend="none")
    assert dims(4, backend="none", sp_size=4).dp_size == 1
    with pytest.raises(ValueError, match="parallel.backend='ddp' is not one of"):
        dims(1, backend="ddp")
    with pytest.raises(ValueError, match="activation_checkpointing='some'"):
        dims(1, activation_checkpointing="some")


def test_ranks_without_process_group():
    d = dims(1)
    assert (d.dp_rank, d.sp_rank, d.dp_size) == (0, 0, 1)
    with pytest.raises(RuntimeError, match="build_mesh"):
        d.dp_mesh


# ------------------------------------------------------------------------------------- environment
def test_torchrun_env():
    e = parse_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == (3, 8, 1, "n1", 1234,
                                                                                             "torchrun")
    with pytest.raises(ValueError, match="MASTER_ADDR is not"):
        parse_dist_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 4 is outside world size 4"):
        parse_dist_env({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "x"})


def test_slurm_env(monkeypatch):
    monkeypatch.setattr("vdit.train.parallel.dims.shutil.which", lambda name: None)  # parse, no scontrol
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu-[007-009,012],cpu1"}
    e = parse_dist_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.source) == (5, 16, 1, "slurm")
    assert e.master_addr == "gpu-007"
    assert e.master_port == 20000 + 123456 % 10000
    # torchrun variables win over SLURM's (srun launching torchrun)
    both = dict(env, RANK="0", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="99")
    assert parse_dist_env(both).source == "torchrun"
    assert parse_dist_env({}).source == "single"
    assert parse_dist_env(dict(env, MASTER_ADDR="explicit", MASTER_PORT="7")).master_addr == "explicit"


@pytest.mark.parametrize("nodelist, first", [
    ("node01", "node01"), ("a,b,c", "a"), ("node[03-05,9]", "node03"), ("gpu-[007-009,012],cpu1", "gpu-007"),
    ("rack[2]-n", "rack2-n"), ("x[10,2-3],y[1-2]", "x10"),
])
def test_first_slurm_host_parsing(nodelist, first):
    assert first_slurm_host(nodelist, use_scontrol=False) == first


def test_first_slurm_host_errors():
    with pytest.raises(ValueError, match="empty"):
        first_slurm_host("", use_scontrol=False)
    with pytest.raises(ValueError, match="cannot parse"):
        first_slurm_host("a[1-2]b[3]", use_scontrol=False)


def test_init_distributed_single_process_does_not_initialize(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed()
    assert info == DistInfo(0, 1, 0, torch.device("cpu")) and not info.is_distributed
    assert not dist.is_initialized()


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two "visible GPUs" on a CPU machine: records set_device and the collectives' order (issue 14 #7)."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    return calls


def test_init_distributed_sets_the_device_for_a_new_group(fake_cuda, monkeypatch):
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: fake_cuda.append(("init", k["device_id"])))
    env = {**rank_env(3, 4, 29500), "LOCAL_RANK": "1"}
    info = init_distributed(environ=env)
    assert info == DistInfo(3, 4, 1, torch.device("cuda", 1))
    assert fake_cuda == [("set_device", torch.device("cuda", 1)), ("init", torch.device("cuda", 1))]


def test_init_distributed_sets_the_device_for_an_existing_group(fake_cuda, monkeypatch):
    """A reused group (tests, notebooks, a launcher that initialized it) used to skip set_device, so
    NCCL object collectives and barriers of every rank ran on cuda:0."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    info = init_distributed(environ={"LOCAL_RANK": "1"})
    assert info == DistInfo(3, 4, 1, torch.device("cuda", 1))
    assert fake_cuda == [("set_device", torch.device("cuda", 1))]
    fake_cuda.clear()
    info = init_distributed(environ={})  # no LOCAL_RANK: rank modulo the visible devices
    assert info.device == torch.device("cuda", 1) and fake_cuda == [("set_device", torch.device("cuda", 1))]


# ------------------------------------------------------------------------------------------- mesh
def _mesh_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    info = init_distributed(environ=rank_env(rank, world, port))
    assert (info.rank, info.world_size) == (rank, world) and dist.is_initialized()
    result = {}
    for name, kw in {"sp": dict(dp_shard=2, sp_size=2), "hsdp": dict(dp_replicate=2, dp_shard=-1)}.items():
        d = ParallelDims(ParallelConfig(**kw), world, num_heads=2)
        d.build_mesh("cpu")
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=d.sp_group)  # sum of the ranks of my SP group
        result[name] = {
            "dp_mesh_shape": tuple(d.dp_mesh.shape), "fsdp_mesh_shape": tuple(d.fsdp_mesh.shape),
            "sp_group_size": dist.get_world_size(d.sp_group), "dp_group_size": dist.get_world_size(d.dp_group),
            "dp_rank": d.dp_rank, "sp_rank": d.sp_rank, "sp_sum": t.item(),
            "coord": tuple(d.mesh.get_coordinate()),
        }
    return result


@pytest.mark.multiproc
def test_mesh_on_four_ranks(tmp_path):
    r = spawn(_mesh_worker, 4, tmp_path)
    for rank, res in enumerate(r):
        sp = res["sp"]  # dp_shard=2 x sp=2: SP peers are adjacent ranks
        assert sp["dp_mesh_shape"] == (2,) and sp["fsdp_mesh_shape"] == (4,)
        assert sp["sp_group_size"] == 2 and sp["dp_group_size"] == 2
        assert (sp["dp_rank"], sp["sp_rank"]) == (rank // 2, rank % 2)
        assert sp["coord"] == (0, rank // 2, rank % 2)
        assert sp["sp_sum"] == {0: 1.0, 1: 1.0, 2: 5.0, 3: 5.0}[rank]
        hsdp = res["hsdp"]  # 2 replicas x 2 shards
        assert hsdp["dp_mesh_shape"] == (2, 2) and hsdp["fsdp_mesh_shape"] == (2, 2)
        assert hsdp["sp_group_size"] == 1 and hsdp["dp_group_size"] == 4
        assert (hsdp["dp_rank"], hsdp["sp_rank"]) == (rank, 0)
        assert hsdp["coord"] == (rank // 2, rank % 2, 0)


def test_param_dtype_auto_follows_the_compute_dtype_on_cuda():
    """Issue 14 #2: bf16 FSDP parameters are the default of a bf16 GPU run; CPU runs stay fp32."""
    from vdit.train.parallel.dims import resolve_param_dtype

    assert ParallelConfig().param_dtype == "auto"
    assert resolve_param_dtype("auto", torch.bfloat16, "cuda") == "bf16"
    assert resolve_param_dtype("auto", torch.bfloat16, torch.device("cuda", 1)) == "bf16"
    assert resolve_param_dtype("auto", torch.float32, "cuda") == "fp32"
    assert resolve_param_dtype("auto", torch.bfloat16, "cpu") == "fp32"
    assert resolve_param_dtype("bf16", torch.bfloat16, "cpu") == "bf16"  # explicit: honoured on CPU too
    assert resolve_param_dtype("fp32", torch.bfloat16, "cuda") == "fp32"
    with pytest.raises(ValueError, match=r"param_dtype=bf16 needs .* autocast.*train.precision=bf16"):
        resolve_param_dtype("bf16", torch.float32, "cuda")  # inputs are not cast: bf16 weights need autocast
    with pytest.raises(ValueError, match="param_dtype"):
        dims(2, param_dtype="int8")
