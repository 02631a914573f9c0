"""FLOPs and MFU accounting: training FLOPs of a step from its shapes, accelerator peaks, CPU peak.

Conventions (as PaLM, Chowdhery et al. 2022, App. B, and torchtitan):

* FLOPs are *model* FLOPs: the matmuls of the forward pass (:meth:`DiTConfig.flops_per_token`,
  one multiply-add = 2 FLOPs, attention's ``QK^T`` and ``PV`` included) times 3 for forward +
  backward. Recomputation by activation checkpointing is not counted, so MFU does not reward it.
  Norms, activations, RoPE and the optimizer are not counted (they are memory-bound, < 1 %).
* The peak of an accelerator is its dense (no sparsity) bf16 tensor-core rate from the vendor's
  datasheet, per device, whatever ``train.precision`` is (an fp32 run's MFU is then honestly low).
* On CPU there is no datasheet: the peak is an fp32 GEMM rate measured once on this machine with
  this many threads, cached in ``$VDIT_CACHE_DIR`` (default ``~/.cache/vdit``) ``/peak_flops.json``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Sequence

import torch

# Dense bf16 tensor-core peak per device, FLOP/s (vendor datasheets; "sparsity" figures halved out).
ACCELERATOR_PEAK_FLOPS: dict[str, float] = {
    "h100-sxm": 989.4e12,   # NVIDIA H100 SXM5 80GB
    "h100-pcie": 756.0e12,  # NVIDIA H100 PCIe 80GB
    "h100-nvl": 835.0e12,   # NVIDIA H100 NVL 94GB (per GPU)
    "h200": 989.4e12,       # NVIDIA H200 SXM 141GB (same compute as H100 SXM)
    "h20": 148.0e12,        # NVIDIA H20
    "a100": 312.0e12,       # NVIDIA A100 40/80GB SXM and PCIe
    "a10g": 70.0e12,        # NVIDIA A10G (AWS g5)
    "l40s": 362.05e12,      # NVIDIA L40S
    "l4": 121.0e12,         # NVIDIA L4
    "b200": 2250.0e12,      # NVIDIA B200 (HGX, per GPU)
    "gb200": 2500.0e12,     # NVIDIA GB200 (per B200 GPU of the superchip)
    "mi300x": 1307.4e12,    # AMD Instinct MI300X
    "mi250x": 383.0e12,     # AMD Instinct MI250X (both dies)
    "rtx4090": 165.2e12,    # NVIDIA GeForce RTX 4090 (fp32 accumulate)
}

# Substrings of torch.cuda.get_device_name() -> table key, most specific first.
_DEVICE_NAMES = (
    ("gb200", "gb200"), ("b200", "b200"), ("h200", "h200"), ("h100 nvl", "h100-nvl"), ("h100 pcie", "h100-pcie"),
    ("h100", "h100-sxm"), ("h20", "h20"), ("a100", "a100"), ("a10g", "a10g"), ("l40s", "l40s"), ("l4", "l4"),
    ("mi300x", "mi300x"), ("mi250x", "mi250x"), ("4090", "rtx4090"),
)


def accelerator_key(device_name: str) -> str | None:
    """The :data:`ACCELERATOR_PEAK_FLOPS` key of a CUDA device name (``"NVIDIA H100 80GB HBM3"`` ->
    ``"h100-sxm"``), or None when the card is not in the table."""
    name = device_name.lower()
    return next((key for sub, key in _DEVICE_NAMES if sub in name), None)


def peak_flops(name: str) -> float:
    """Dense bf16 peak of an accelerator by table key (``h100-sxm``, ``h200``, ``a100``, ...), FLOP/s.
    Raises KeyError listing the known names."""
    key = name.lower().replace("_", "-")
    key = {"h100": "h100-sxm"}.get(key, key)
    if key not in ACCELERATOR_PEAK_FLOPS:
        raise KeyError(f"unknown accelerator {name!r}; known: {', '.join(sorted(ACCELERATOR_PEAK_FLOPS))}")
    return ACCELERATOR_PEAK_FLOPS[key]


def _cache_path() -> str:
    root = os.environ.get("VDIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vdit")
    return os.path.join(root, "peak_flops.json")


def measure_gemm_flops(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> float:
    """Best achieved rate of a ``size x size`` by ``size x size`` matmul over ``repeats`` runs, FLOP/s
    (``2 * size^3`` FLOPs per matmul; one warm-up run not counted)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best


def cpu_peak_flops() -> tuple[float, str]:
    """This machine's fp32 GEMM rate with the current ``torch.get_num_threads()``, FLOP/s, measured once
    (about a second) and cached per CPU model and thread count. Returns ``(flops, description)``."""
    key = f"{platform.machine()}|{platform.processor() or _cpu_model()}|threads={torch.get_num_threads()}"
    path = _cache_path()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = max(measure_gemm_flops(1024), measure_gemm_flops(2048, repeats=2))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # a read-only home only costs a re-measurement next time
    return float(cache[key]), f"cpu fp32 GEMM measured ({key})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown-cpu"


def device_peak_flops(device: torch.device) -> tuple[float | None, str]:
    """Peak FLOP/s of one device of this run and where the number comes from.

    CUDA: the datasheet's dense bf16 peak of the card (None, with the card's name, when it is not
    in :data:`ACCELERATOR_PEAK_FLOPS`: MFU is then not logged rather than guessed). CPU: the measured
    fp32 GEMM rate (:func:`cpu_peak_flops`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = accelerator_key(name)
        return (ACCELERATOR_PEAK_FLOPS[key], f"{key} dense bf16 datasheet") if key else (None, f"unknown card {name}")
    if device.type == "cpu":
        return cpu_peak_flops()
    return None, f"no peak known for device type {device.type}"


def training_flops(model_cfg, latent_shape: Sequence[int], text_len: int, batch_size: int = 1) -> float:
    """Model FLOPs of one forward + backward pass over ``batch_size`` samples of one shape.

    Args:
        model_cfg: a :class:`vdit.model.dit.DiTConfig`.
        latent_shape: ``(C, T', H', W')`` or ``(T', H', W')`` of one sample's latent.
        text_len: text tokens per sample as the model sees them (the padded ``max_length``: the
            cross-attention computes over padding too).
        batch_size: samples.

    Returns ``3 * flops_per_token(L, text_len) * L * batch_size`` with ``L`` the patch tokens.
    """
    from vdit.model.dit import num_tokens

    seq_len = num_tokens(model_cfg, latent_shape)
    return 3.0 * model_cfg.flops_per_token(seq_len, text_len) * seq_len * batch_size


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA's max allocated bytes on ``device``, or on CPU the peak
    resident set size (``ru_maxrss``; it includes the interpreter and libraries)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class PerfMeter:
    """Turns a log interval's global counts into the ``perf/*`` and ``mem/*`` metrics of a run.

    Args:
        device: this rank's device (its peak is looked up, or measured once on CPU, on rank 0 only).
        world_size: devices in the job (data-parallel x sequence-parallel ranks).
        num_params: the DiT's parameter count, logged once per process as ``model/num_params``.
        is_main: rank 0 (the only rank whose metrics are written).
    """

    def __init__(self, device: torch.device, world_size: int, num_params: int, is_main: bool):
        self.device, self.world_size, self.num_params, self.is_main = device, world_size, num_params, is_main
        self._peak: tuple[float | None, str] | None = None
        self._logged_params = False

    @property
    def peak(self) -> tuple[float | None, str]:
        """``(peak FLOP/s per device or None, its source)``, resolved on first use."""
        if self._peak is None:
            self._peak = device_peak_flops(self.device) if self.is_main else (None, "not rank 0")
        return self._peak

    def interval(self, counts: dict[str, float], steps: int, elapsed: float, totals: dict[str, float],
                 peak_memory: float) -> dict[str, float]:
        """Metrics of one log interval.

        Args:
            counts: global ``flops`` (model FLOPs), ``tokens`` and ``samples`` of the interval's steps.
            steps: optimizer steps in the interval.
            elapsed: wall seconds of the interval.
            totals: the run's cumulative global ``flops``, ``tokens``, ``samples`` (checkpointed).
            peak_memory: peak bytes of the fullest rank (:func:`peak_memory_bytes`, max over ranks).

        Returns ``perf/flops_per_step``, ``perf/total_flops``, ``perf/total_tokens``,
        ``perf/total_samples``, ``perf/tokens_per_s`` and ``perf/samples_per_s`` (global, counted from
        the batches, so right with buckets), ``perf/tflops_per_device`` (achieved), ``perf/mfu``
        (when the device's peak is known), ``mem/peak_gb`` (GiB) and, the first time,
        ``model/num_params``.
        """
        if not self.is_main:
            return {}
        per_device = counts["flops"] / max(elapsed, 1e-9) / self.world_size
        out = {
            "perf/flops_per_step": counts["flops"] / max(steps, 1),
            "perf/total_flops": totals["flops"],
            "perf/total_tokens": totals["tokens"],
            "perf/total_samples": totals["samples"],
            "perf/tokens_per_s": counts["tokens"] / max(elapsed, 1e-9),
            "perf/samples_per_s": counts["samples"] / max(elapsed, 1e-9),
            "perf/tflops_per_device": per_device / 1e12,
            "mem/peak_gb": peak_memory / 2 ** 30,
        }
        peak, _ = self.peak
        if peak:
            out["perf/mfu"] = per_device / peak
        if not self._logged_params:
            out["model/num_params"] = float(self.num_params)
            self._logged_params = True
        return out


class WorkCounter:
    """The run's global training work -- model FLOPs, patch tokens, samples over every data-parallel
    rank -- counted every step without a host sync (DESIGN.md rule 3.7).

    Each step's local counts are host numbers (from batch shapes). With data-parallel ranks they
    are summed by one all-reduce of a ``(3,)`` float64 device tensor per step (the token-weighted
    loss needs the step's global token count at once) and accumulated on the device; :meth:`flush`
    brings the interval's sums to the host once per log interval, and :meth:`exact_totals` at a
    checkpoint. float64 keeps the sums exact (integers below 2**53). Without a group the counts
    never leave the host.

    Args:
        device: where the all-reduced counts live (the rank's device; NCCL needs CUDA tensors).
        group: the data-parallel process group, or None (one data stream: no all-reduce).

    Attributes:
        totals: cumulative ``{"flops", "tokens", "samples"}`` up to the last :meth:`flush`
            (host floats; checkpointed by the Trainer).
    """

    KEYS = ("flops", "tokens", "samples")

    def __init__(self, device: torch.device, group=None):
        self.device, self.group = torch.device(device), group
        self.totals = dict.fromkeys(self.KEYS, 0.0)
        self._host = [0.0, 0.0, 0.0]  # interval sums without a group
        self._device: torch.Tensor | None = None  # (3,) float64 interval sums with a group

    def add_step(self, flops: float, tokens: float, samples: float) -> float | torch.Tensor:
        """Count one step's local work; returns the step's global token count: a host float without
        a group, else a 0-dim float64 tensor on ``device`` (all-reduced, not synced to the host)."""
        local = [float(flops), float(tokens), float(samples)]
        if self.group is None:
            self._host = [a + b for a, b in zip(self._host, local)]
            return local[1]
        t = torch.tensor(local, dtype=torch.float64)  # (3,) host
        if self.device.type == "cuda":  # pinned -> an asynchronous copy, no wait for the queued kernels
            t = t.pin_memory()
        t = t.to(self.device, non_blocking=True)
        torch.distributed.all_reduce(t, group=self.group)
        self._device = t.clone() if self._device is None else self._device.add_(t)
        return t[1]

    def _pending(self) -> list[float]:
        """The interval's global sums on the host (one host sync with a group)."""
        return self._host if self._device is None else self._device.tolist()

    def flush(self) -> dict[str, float]:
        """The global ``{"flops", "tokens", "samples"}`` since the last flush, added to :attr:`totals`."""
        interval = dict(zip(self.KEYS, self._pending()))
        for k, v in interval.items():
            self.totals[k] += v
        self._host, self._device = [0.0, 0.0, 0.0], None
        return interval

    def exact_totals(self) -> dict[str, float]:
        """:attr:`totals` plus what is not flushed yet (for a checkpoint); flushes nothing."""
        return {k: self.totals[k] + v for k, v in zip(self.KEYS, self._pending())}
