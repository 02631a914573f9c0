"""Checkpoints with torch.distributed.checkpoint (DCP), also in a single process.

Layout: ``{run_dir}/checkpoints/step-{N:08d}/`` holds DCP's sharded files plus ``COMPLETE``, written
last, so a checkpoint interrupted mid-save is never picked by ``resume=auto``. ``keep_last_k``
complete checkpoints are kept; older ones are deleted after a successful save.

``save(blocking=False)`` (``train.async_checkpoint``) writes DCP's files in the background
(:mod:`vdit.train.async_checkpoint`): the JSON state is written and the tensors are copied to CPU
at the call, ``COMPLETE`` follows once every rank's write has finished (agreed in :meth:`poll` /
:meth:`wait`), pruning only after that, and at most one save is in flight.

Everything that must survive a restart is a ``Stateful`` (an object with ``state_dict()`` /
``load_state_dict()``) registered under a name: model + optimizer (:class:`ModelOptimizerState`,
through DCP's ``get_state_dict``/``set_state_dict`` so FQNs match across sharding layouts),
scheduler, EMA, data pipeline, trainer step and RNG states.

Loading never runs code from the checkpoint. Our own free-form state (trainer step, RNG states,
data position, config record: :class:`JsonState` subclasses) is stored as tagged JSON in
``vdit_state.json`` (``vdit_state.rank{r}.json`` for per-rank entries), never pickled. DCP's
``.metadata`` is read by :class:`SafeFileSystemReader` through a restricted unpickler that allows
only DCP's metadata classes and plain containers, and its byte entries (scheduler, optimizer
hyper-parameters) are loaded with ``torch.load(weights_only=True)`` by :class:`SafeLoadPlanner`.
Anything else raises :class:`CheckpointError` naming the file and the refused global.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from vdit.train.async_checkpoint import AsyncSaver

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


class ModelOptimizerState(Stateful):
    """Model and optimizer as one Stateful, keyed by parameter FQNs (layout independent)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely (foreign code in it, an old pickled format, bad JSON)."""


# ------------------------------------------------------------------------------- JSON (no pickle)
def to_json(obj: Any) -> Any:
    """Encode plain data with tensors, arrays, tuples and non-string dict keys as tagged JSON.

    Exact round trip through :func:`from_json`: tuples stay tuples, int keys stay ints, tensors keep
    dtype and bytes (base64), non-finite floats are kept (``{"__float__": "nan"}``).

    Raises:
        TypeError: a value that is not plain data (the state would need pickle).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "data": base64.b64encode(raw).decode()}
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return {"__ndarray__": a.dtype.str, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_json(v) for k, v in obj.items()}
        return {"__dict__": [[to_json(k), to_json(v)] for k, v in obj.items()]}
    raise TypeError(f"{type(obj).__name__} is not plain data; checkpoint state must be JSON-encodable")


def from_json(obj: Any) -> Any:
    """Inverse of :func:`to_json`. Raises CheckpointError on an unknown tag or dtype."""
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(from_json(v) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_hashable(from_json(k)): from_json(v) for k, v in obj["__dict__"]}
    if "__tensor__" in obj:
        dtype = getattr(torch, obj["__tensor__"], None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"unknown tensor dtype {obj['__tensor__']!r} in checkpoint state")
        raw = bytearray(base64.b64decode(obj["data"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(obj["shape"]).clone()
    if "__ndarray__" in obj:
        dt = np.dtype(obj["__ndarray__"])
        if dt.hasobject:
            raise CheckpointError("object arrays are not allowed in checkpoint state")
        return np.frombuffer(base64.b64decode(obj["data"]), dtype=dt).reshape(obj["shape"]).copy()
    return {k: from_json(v) for k, v in obj.items()}


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k


class JsonState(Stateful):
    """A Stateful stored as JSON beside DCP's files instead of inside them (never pickled).

    ``per_rank=True``: every rank saves and restores its own entry (the layout must not change);
    ``per_rank=False``: rank 0's entry, restored on every rank of any layout.
    """

    per_rank = False


class ObjectState(JsonState):
    """Wrap an object whose state is plain Python data (and small tensors / numpy arrays), stored as JSON."""

    def __init__(self, obj: Any, per_rank: bool = True):
        self.obj, self.per_rank = obj, per_rank

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.obj.load_state_dict(state)


# ----------------------------------------------------------------------- safe DCP reading
def _safe_torch_globals() -> set[tuple[str, str]]:
    names = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
             ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
    names |= {("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), (torch.dtype, torch.layout,
                                                                                         torch.memory_format))}
    return names


_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP metadata classes, dtypes/layouts, ``torch.Size`` and plain containers."""

    allowed = _safe_torch_globals()

    def find_class(self, module: str, name: str) -> Any:
        if module == _DCP_METADATA_MODULE or (module, name) in self.allowed:
            return super().find_class(module, name)
        raise CheckpointError(f"refusing to load global {module}.{name}: not a DCP metadata class")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose ``.metadata`` goes through :class:`_MetadataUnpickler` (no code runs)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except CheckpointError as exn:
                raise CheckpointError(f"{path}: {exn}; the checkpoint is not safe to load") from None
            except Exception as exn:  # noqa: BLE001 - any parse failure is a bad checkpoint
                raise CheckpointError(f"{path}: unreadable DCP metadata ({exn})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that unpickles byte entries with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as exn:  # noqa: BLE001 - UnpicklingError and friends
            first = str(exn).strip().splitlines()
            raise CheckpointError(f"checkpoint entry {fqn!r} is not plain data and was not loaded "
                                  f"({first[0] if first else type(exn).__name__})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


@contextmanager
def _single_process_quiet():
    """DCP warns on every call that it runs without a process group; in one process that is intended."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


class GlobalDataState(JsonState):
    """The data position of the whole job as one rank-independent entry.

    At save, every rank's ``pipeline.state_dict()`` is gathered and merged
    (:func:`vdit.data.pipeline.merge_states`) and stored as JSON (rank 0's copy); at load, every
    rank of the new job, whatever its layout, reads that one entry and takes its own share
    (the pipeline re-deals what the epoch has left when the number of data slots changed).

    Args:
        pipeline: this rank's VideoPipeline (all ranks of the default process group take part).
    """

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline

    def state_dict(self) -> dict[str, Any]:
        from vdit.data.pipeline import merge_states

        local = self.pipeline.state_dict()
        if dist.is_initialized():
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, local)
        else:
            states = [local]
        return merge_states(states)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pipeline.load_state_dict(state)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Save, find and load DCP checkpoints of a run.

    Args:
        directory: ``{run_dir}/checkpoints``.
        keep_last_k: complete checkpoints to keep (>= 1).
        timeout_s: timeout of the async saves' gloo groups (``reliability.collective_timeout_s``).
    """

    def __init__(self, directory: str, keep_last_k: int = 2, timeout_s: float = 1800.0):
        if keep_last_k < 1:
            raise ValueError(f"keep_last_k must be >= 1; got {keep_last_k}")
        self.directory = directory
        self.keep_last_k = keep_last_k
        self.background = AsyncSaver(timeout_s)

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step:08d}")

    def complete_steps(self) -> list[int]:
        """Steps of complete checkpoints (with ``COMPLETE``), ascending."""
        if not os.path.isdir(self.directory):
            return []
        steps = []
        for name in os.listdir(self.directory):
            m = _STEP_DIR.match(name)
            if m and os.path.exists(os.path.join(self.directory, name, "COMPLETE")):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> str | None:
        """Directory of the newest complete checkpoint, or None."""
        steps = self.complete_steps()
        return self.path(steps[-1]) if steps else None

    def marker(self, step: int) -> dict[str, Any]:
        """The ``COMPLETE`` record of checkpoint ``step``: ``{"step", "suspect"}`` (suspect: saved during a
        streak of bad steps, so not a rollback target)."""
        with open(os.path.join(self.path(step), "COMPLETE")) as f:
            return json.load(f)

    def last_good(self) -> str | None:
        """Directory of the newest complete checkpoint not marked suspect, or None."""
        good = [s for s in self.complete_steps() if not self.marker(s).get("suspect", False)]
        return self.path(good[-1]) if good else None

    def save(self, step: int, state: dict[str, Any], suspect: bool = False, blocking: bool = True) -> str:
        """Write ``state`` (name -> Stateful or tensors/plain data) as checkpoint ``step``; returns its path.

        :class:`JsonState` entries go to ``vdit_state.json`` (rank 0) / ``vdit_state.rank{r}.json``,
        everything else through DCP; ``COMPLETE`` (with ``suspect``) is written last, atomically.
        Collective: every rank calls it at the same step.

        ``blocking=False``: returns once the state is snapshotted (JSON written, tensors copied to CPU)
        while DCP writes the files in the background; a save still in flight is finished first, and
        ``COMPLETE`` is written by a later :meth:`poll` / :meth:`wait`.
        """
        if self.background.pending is not None:
            self.wait()  # at most one save in flight
        path = self.path(step)
        if _is_rank0() and os.path.exists(path):
            shutil.rmtree(path)  # a half-written leftover of a crashed save
        _barrier()
        json_items = {k: v for k, v in state.items() if isinstance(v, JsonState)}
        dcp_items = {k: v for k, v in state.items() if k not in json_items}
        if blocking:
            with _single_process_quiet():
                dcp.save(dcp_items, checkpoint_id=path)
        # Serialised now, in the training thread: the JSON state is that of this step, async or not.
        shared = {k: to_json(v.state_dict()) for k, v in json_items.items() if not v.per_rank}  # all ranks gather
        own = {k: to_json(v.state_dict()) for k, v in json_items.items() if v.per_rank}
        os.makedirs(path, exist_ok=True)
        if own:
            _write_json(os.path.join(path, f"vdit_state.rank{_rank()}.json"), {"format": 1, "entries": own})
        if _is_rank0():
            _write_json(os.path.join(path, "vdit_state.json"), {"format": 1, "entries": shared})
        if not blocking:
            self.background.start(step, path, dcp_items, suspect)
            return path
        _barrier()
        if _is_rank0():
            self._mark_complete(step, suspect)
        _barrier()
        return path

    def poll(self) -> str | None:
        """Mark the in-flight save ``COMPLETE`` if every rank has finished writing it; returns its path then.

        Collective while a save is in flight (one small all-reduce): call it at the same point of
        every step on every rank. A failed write raises (as a blocking save would).
        """
        if self.background.pending is None or not self.background.all_done():
            return None
        return self.wait()

    def wait(self, collective: bool = True) -> str | None:
        """Wait for the in-flight save (if any) and mark it ``COMPLETE``; returns its path, or None.

        ``collective``: the ranks agree that every write succeeded, then rank 0 writes the marker and
        prunes; a failed write raises :class:`CheckpointError` on every rank. ``collective=False``
        (leaving after an exception, when another rank may be gone): no collectives; rank 0 marks the
        checkpoint if its own save succeeded, which DCP only reports once every rank's files are written.
        """
        if self.background.pending is None:
            return None
        pending, ok, error = self.background.take(collective)
        if ok and _is_rank0():
            self._mark_complete(pending.step, pending.suspect)
            log.info("checkpoint: %s complete (written in the background, %.1f s)", pending.path,
                     time.perf_counter() - pending.started)
        if collective:
            self.background.barrier()  # every rank sees the marker (and the pruning) from here on
        if not ok:
            msg = f"checkpoint {pending.path} was not written" + (f" on this rank: {error!r}" if error else
                                                                 " on another rank")
            if not collective:
                log.error("%s; it stays incomplete and is never resumed from", msg)
                return None
            raise CheckpointError(msg) from error
        return pending.path

    def _mark_complete(self, step: int, suspect: bool) -> None:
        """Rank 0, once every rank's files of ``step`` are written: the marker, then pruning."""
        _write_json(os.path.join(self.path(step), "COMPLETE"), {"step": step, "suspect": bool(suspect)})
        self._prune()

    def load(self, path: str, state: dict[str, Any]) -> int:
        """Load checkpoint ``path`` into ``state`` in place (Statefuls get ``load_state_dict``); returns its step.

        No code from the checkpoint runs: see the module docstring.

        Raises:
            FileNotFoundError: ``path`` is not a complete checkpoint.
            CheckpointError: the checkpoint holds anything but tensors and plain data, or is in the
                old pickled format.
        """
        if not os.path.exists(os.path.join(path, "COMPLETE")):
            raise FileNotFoundError(f"{path} is not a complete vdit checkpoint (no COMPLETE marker)")
        json_items = {k: v for k, v in state.items() if isinstance(v, JsonState)}
        dcp_items = {k: v for k, v in state.items() if k not in json_items}
        entries: dict[str, Any] = {}
        if any(not v.per_rank for v in json_items.values()):
            entries.update(read_json_state(path))
        if any(v.per_rank for v in json_items.values()):
            entries.update(read_json_state(path, f"vdit_state.rank{_rank()}.json"))
        for k in json_items:
            if k not in entries:
                raise CheckpointError(f"{path}: no {k!r} entry in its vdit_state JSON")
        if dcp_items:
            SafeFileSystemReader(path).read_metadata()  # refuse a foreign .metadata here, with our message
            try:
                with _single_process_quiet():
                    dcp.load(dcp_items, checkpoint_id=path, storage_reader=SafeFileSystemReader(path),
                             planner=SafeLoadPlanner())
            except CheckpointException as exn:
                for failure in exn.failures.values():
                    inner = failure[0] if isinstance(failure, tuple) else failure
                    if isinstance(inner, CheckpointError):
                        raise CheckpointError(f"{path}: {inner}") from None
                raise
        for k, v in json_items.items():
            v.load_state_dict(from_json(entries[k]))
        with open(os.path.join(path, "COMPLETE")) as f:
            return int(json.load(f)["step"])

    def _prune(self) -> None:
        """Keep the newest ``keep_last_k`` complete checkpoints, and always the newest non-suspect one."""
        steps = self.complete_steps()
        good = self.last_good()
        for step in steps[:-self.keep_last_k]:
            if self.path(step) == good:
                log.info("checkpoint: keeping %s, the last good checkpoint (newer ones are suspect)", good)
                continue
            shutil.rmtree(self.path(step), ignore_errors=True)
            log.info("checkpoint: removed %s (keep_last_k=%d)", self.path(step), self.keep_last_k)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a kill never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json_state(path: str, name: str = "vdit_state.json") -> dict[str, Any]:
    """The raw (still tagged) JSON entries of checkpoint ``path``: ``{name: to_json(state)}``.

    Raises:
        CheckpointError: the file is missing (a checkpoint of the old pickled format) or not valid JSON.
    """
    file = os.path.join(path, name)
    if not os.path.exists(file):
        raise CheckpointError(f"{path} has no {name}: it was written by an older vdit that pickled the trainer "
                              "and data state, which is never unpickled (it could run code). Start a new run "
                              "(another run_dir, or train.resume=never) or load weights only with vdit-export")
    try:
        with open(file) as f:
            return json.load(f)["entries"]
    except (ValueError, KeyError, TypeError) as exn:
        raise CheckpointError(f"{file}: not a valid vdit state file ({exn})") from None
