"""vdit-eval checkpoint / vdit-eval watch: score checkpoints beside training, on a device of their own.

Run:
    vdit-eval checkpoint runs/my_run/checkpoints/step-00002000                 # the run's eval config
    vdit-eval checkpoint runs/my_run/checkpoints/step-00002000 --device cuda:1 eval.cfg_scale=4 eval.num_steps=30
    CUDA_VISIBLE_DEVICES=7 vdit-eval watch runs/my_run                           # a spare GPU of the node
    vdit-eval watch runs/my_run --every-seconds 300 --device cpu eval.num_physics_prompts=8
    vdit-eval watch runs/my_run --once                                           # score what exists, exit

Both commands load the checkpoint's weights (EMA unless ``eval.use_ema=false``) into a plain
single-device model with the run's ``config.yaml`` plus the given dotlist overrides (``eval.*`` in
practice; ``model.*`` is refused, the weights fix it), and run the in-loop evaluation's own code
(:func:`vdit.eval.hook.evaluate_model`), so the output is the one training writes:
``{run}/samples/step-N/`` (mp4s, contact_sheet.png, prompts.json, scenes.json) and
``{run}/eval/step-N.json`` (which also records ``scored_by``, ``checkpoint``, ``suspect``, ``device``
and ``overrides``). One row ``{"step": N, "eval/<metric>": mean, "gen/...": mean}`` (the Trainer's key
naming; strict JSON) is appended to ``{run}/metrics_eval.jsonl``, then ``report.html`` is refreshed.
Nothing is ever written inside ``checkpoints/``.

The watcher polls ``checkpoints/`` every ``--every-seconds`` for checkpoints with a ``COMPLETE``
marker and handles each new one in step order:

* **scored**, also when the marker says ``suspect`` (saved during a streak of bad steps): its scores
  tell whether the streak hurt the samples; the eval JSON has ``"suspect": true`` and the metrics row
  ``"suspect": true``, so a suspect checkpoint is never picked by accident;
* **skipped** when ``eval/step-N.json`` exists: the in-loop evaluation (or an earlier ``vdit-eval``)
  scored it. If the run's config says the in-loop evaluation will score step N (``eval.enabled`` and
  ``eval.every`` divides N, or N is ``train.steps``) and the file is not there yet, the step is
  deferred, for at most ``--in-loop-grace-seconds`` after its ``COMPLETE`` marker, so the two never
  write the same files; after that (a crashed run) the watcher scores it;
* **skipped** when it was deleted by ``keep_last_k`` pruning before it could be loaded (a message,
  never a crash): give the run a larger ``train.keep_last_k`` if the watcher falls behind;
* **failed** (error logged) when scoring raises; it is tried again at the next polls, up to
  ``ATTEMPTS`` times in all (a config.yaml being rewritten, memory another job holds), then left to
  the next watcher.

What it has handled is kept in ``{run}/eval/watch_state.json`` (written atomically), so a restarted
watcher continues without rescoring; one watcher per run (``eval/watch.lock``, an advisory lock that
the OS drops when the process dies). The first SIGINT/SIGTERM stops it after the current checkpoint
(exit status 0); a second one stops it at once (130; that checkpoint is scored again next time).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

STATE_FILE = "watch_state.json"  # in {run}/eval/
LOCK_FILE = "watch.lock"  # in {run}/eval/
ROWS_FILE = "metrics_eval.jsonl"  # in {run}/
ATTEMPTS = 3  # tries per checkpoint in one watcher


# ------------------------------------------------------------------------------------ helpers
def resolve_eval_device(name: str = "auto") -> torch.device:
    """``auto``: ``cuda:0`` when a GPU is visible, else ``cpu``; otherwise ``torch.device(name)``.

    A CUDA device becomes the current device, so nothing (no context, no cache) lands on another
    GPU of the node, e.g. one the training job uses.

    Raises:
        ValueError: a CUDA device that does not exist here.
    """
    if name == "auto":
        name = "cuda:0" if torch.cuda.is_available() else "cpu"
        if name == "cuda:0" and "CUDA_VISIBLE_DEVICES" not in os.environ:
            log.warning("eval device: auto picked cuda:0 of all this node's GPUs; if training uses it, pass "
                        "--device cuda:N (a spare GPU) or set CUDA_VISIBLE_DEVICES")
    dev = torch.device(name)
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible)")
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    return dev


def run_dir_of(checkpoint: str) -> str:
    """The run directory of ``{run}/checkpoints/step-N``.

    Raises:
        FileNotFoundError: the parent folder is not ``checkpoints`` or the run has no config.yaml.
    """
    parent = os.path.dirname(os.path.abspath(checkpoint.rstrip("/")))
    run_dir = os.path.dirname(parent)
    if os.path.basename(parent) != "checkpoints" or not os.path.exists(os.path.join(run_dir, "config.yaml")):
        raise FileNotFoundError(f"{checkpoint} is not {{run}}/checkpoints/step-N of a run with config.yaml; "
                                "give the run with --run-dir")
    return run_dir


def read_marker(checkpoint: str) -> dict[str, Any]:
    """The ``COMPLETE`` record ``{"step", "suspect"}`` of a checkpoint.

    Raises:
        FileNotFoundError: no marker (not a checkpoint, one being written, or one pruned away).
    """
    path = os.path.join(checkpoint, "COMPLETE")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{checkpoint} is not a complete vdit checkpoint (no COMPLETE marker)")
    with open(path) as f:
        return json.load(f)


def run_config(run_dir: str, overrides: Sequence[str] = ()):
    """The run's ``config.yaml`` with dotlist ``overrides`` (``eval.cfg_scale=3``), validated against the schema.

    Returns a :class:`vdit.train.config.TrainConfig`.

    Raises:
        FileNotFoundError: no config.yaml. ValueError: an undeclared key, a ``model.*`` key (the
            checkpoint fixes the model), a ``+``/``~`` override, or a value :func:`validate` refuses.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from vdit.train.config import validate
    from vdit.train.export import load_run_config

    cfg = OmegaConf.structured(load_run_config(run_dir))
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or key[:1] in "+~" or key.startswith("model."):
            raise ValueError(f"override {item!r}: give key=value for a declared key (e.g. eval.num_steps=10); "
                             "model.* keys are fixed by the checkpoint")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exn:
        raise ValueError(f"override refused: {exn}".splitlines()[0]) from None
    return validate(cfg)


def load_weights(cfg, checkpoint: str, use_ema: bool, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The model of ``cfg`` on ``device`` with a checkpoint's EMA (or raw) weights; returns ``(model, step)``.

    EMA weights are read by DCP straight into the model's parameters (the checkpoint's ``ema`` entry
    maps parameter names to fp32 tensors, as :class:`vdit.train.ema.EMA` saves it), so the device
    holds one fp32 copy of the weights, 4 bytes per parameter (56 GB for 14B), not the 8 of
    building an EMA shadow beside the model as ``vdit.train.export.load_checkpoint_weights`` does.
    Raw weights go through that function (the optimizer state is never read).

    Raises:
        FileNotFoundError: not a complete checkpoint. CheckpointError: an unsafe checkpoint.
    """
    from vdit.train.build import build_model
    from vdit.train.checkpoint import CheckpointManager
    from vdit.train.export import load_checkpoint_weights

    if not use_ema:
        return load_checkpoint_weights(cfg, checkpoint, "raw", device)
    model = build_model(cfg, device)
    params = {n: p.data for n, p in model.named_parameters() if p.requires_grad}  # loaded in place
    step = CheckpointManager(os.path.dirname(checkpoint)).load(checkpoint, {"ema": params})
    return model, step


def metric_row(step: int, result: dict[str, Any]) -> dict[str, Any]:
    """The metrics row of an evaluation, keyed like ``Trainer._log_eval`` (``gen/*`` as they are, the
    others ``eval/<name>``, not-evaluable metrics left out), strict JSON (non-finite -> null, listed
    under ``nonfinite``); ``"suspect": true`` for a suspect checkpoint."""
    from vdit.train.runrecord import strict_row

    row: dict[str, Any] = {"step": step}
    if result.get("suspect"):
        row["suspect"] = True
    row.update({name if name.startswith("gen/") else f"eval/{name}": m["mean"]
                for name, m in result["metrics"].items() if m.get("mean") is not None})
    return strict_row(row)


def append_row(run_dir: str, row: dict[str, Any]) -> None:
    """Append one line to ``{run}/metrics_eval.jsonl`` (one write: concurrent appenders do not interleave)."""
    with open(os.path.join(run_dir, ROWS_FILE), "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")


def has_row(run_dir: str, step: int) -> bool:
    path = os.path.join(run_dir, ROWS_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step") == step:
                    return True
            except ValueError:
                continue
    return False


def _write_json(path: str, obj: Any) -> None:
    """Atomic write (temp file + rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- one checkpoint
def score_checkpoint(checkpoint: str, run_dir: str | None = None, overrides: Sequence[str] = (),
                     device: str | torch.device = "auto", scored_by: str = "vdit-eval checkpoint") -> dict[str, Any]:
    """Score one checkpoint with the in-loop evaluation: samples, ``eval/step-N.json``, a
    ``metrics_eval.jsonl`` row, ``report.html``. Reads ``checkpoint``, writes only outside it.

    Returns the eval JSON (``{"step", "metrics", "videos", ...}``).

    Raises:
        FileNotFoundError: not a complete checkpoint (also: pruned while loading) or no config.yaml.
        ValueError: a refused override; vdit.train.checkpoint.CheckpointError: an unsafe checkpoint.
    """
    from vdit.eval.hook import evaluate_model
    from vdit.eval.run_report import refresh_report
    from vdit.train.build import TextCache, build_frozen

    checkpoint = os.path.abspath(checkpoint.rstrip("/"))
    run_dir = run_dir or run_dir_of(checkpoint)
    marker = read_marker(checkpoint)
    cfg = run_config(run_dir, overrides)
    dev = device if isinstance(device, torch.device) else resolve_eval_device(device)
    t0 = time.perf_counter()
    model, step = load_weights(cfg, checkpoint, cfg.eval.use_ema, dev)
    text_encoder, vae = build_frozen(cfg, dev)
    encode_text = TextCache(text_encoder, cfg.text_encoder.max_length, dev, cfg.text_encoder.cache_bytes)
    extra = {"scored_by": scored_by, "checkpoint": os.path.relpath(checkpoint, run_dir),
             "suspect": bool(marker.get("suspect", False)), "device": str(dev), "overrides": list(overrides)}
    result = evaluate_model(cfg, model, text_encoder, vae, step, run_dir, dev, encode_text=encode_text, extra=extra)
    del model, text_encoder, vae, encode_text
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    append_row(run_dir, metric_row(step, result))
    refresh_report(run_dir)
    log.info("scored step %d (%s%s) on %s in %.1f s -> eval/step-%d.json", step, extra["checkpoint"],
             ", suspect" if extra["suspect"] else "", dev, time.perf_counter() - t0, step)
    return result


def in_loop_will_score(cfg, step: int) -> bool:
    """Whether the Trainer's in-loop evaluation evaluates step ``step`` (see ``Trainer.fit``)."""
    e = cfg.eval
    return bool(e.enabled and ((e.every and step % e.every == 0) or step == cfg.train.steps))


# ------------------------------------------------------------------------------------- the watcher
class Watcher:
    """Scores each new complete checkpoint of ``run_dir`` (see the module docstring for the rules).

    Args:
        device: ``auto``, ``cpu`` or ``cuda:N`` (:func:`resolve_eval_device`).
        overrides: dotlist overrides of the run's config, applied to every checkpoint.
        every_seconds: polling period.
        once: one pass over the checkpoints that exist, then :meth:`run` returns.
        max_checkpoints: :meth:`run` returns after scoring this many (None: no limit).
        in_loop_grace_s: how long a step the in-loop evaluation will score is left to it.
    """

    def __init__(self, run_dir: str, device: str = "auto", overrides: Sequence[str] = (), every_seconds: float = 60.0,
                 once: bool = False, max_checkpoints: int | None = None, in_loop_grace_s: float = 3600.0):
        from vdit.train.checkpoint import CheckpointManager

        if not os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise FileNotFoundError(f"{run_dir} has no config.yaml: not a vdit run directory")
        run_config(run_dir, overrides)  # refuse bad overrides now, not at the first checkpoint
        self.run_dir, self.overrides = run_dir, list(overrides)
        self.device_name, self.device = device, None  # resolved at the first checkpoint scored
        self.every_seconds, self.once, self.max_checkpoints = every_seconds, once, max_checkpoints
        self.in_loop_grace_s = in_loop_grace_s
        self.manager = CheckpointManager(os.path.join(run_dir, "checkpoints"))
        self.state_path = os.path.join(run_dir, "eval", STATE_FILE)
        self.state = self._load_state()
        self.stop = threading.Event()  # set by a signal (watch_main) or by the caller
        self.summary: dict[str, list[int]] = {"scored": [], "skipped": [], "failed": [], "deferred": []}
        self._deferred_logged: set[int] = set()
        self.failures: Counter[int] = Counter()  # failed tries per step in this watcher

    # state ------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                state = json.load(f)
            log.info("watch: %s: %d steps handled before (%s)", self.state_path, len(state["steps"]),
                     ", ".join(f"{s}: {e['status']}" for s, e in sorted(state["steps"].items(), key=lambda i: int(i[0]))))
            return state
        return {"format": 1, "steps": {}}

    def _record(self, step: int, status: str, **info: Any) -> None:
        self.state["steps"][str(step)] = {"status": status, "time": round(time.time(), 3), **info}
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        _write_json(self.state_path, self.state)
        if status != "failed":
            self.summary[status].append(step)

    def handled(self, step: int) -> bool:
        """Scored or skipped by this or an earlier watcher, or failed ``ATTEMPTS`` times in this one."""
        entry = self.state["steps"].get(str(step))
        return (entry is not None and entry["status"] in ("scored", "skipped")) or self.failures[step] >= ATTEMPTS

    # loop -------------------------------------------------------------------------------------
    def done(self) -> bool:
        return self.stop.is_set() or (self.max_checkpoints is not None
                                      and len(self.summary["scored"]) >= self.max_checkpoints)

    def run(self) -> dict[str, list[int]]:
        """Poll until stopped, ``once`` or ``max_checkpoints``; returns this process's summary."""
        with self._lock():
            log.info("watch: watching %s every %.0f s (device %s%s)", self.manager.directory, self.every_seconds,
                     self.device_name, f", overrides {' '.join(self.overrides)}" if self.overrides else "")
            while True:
                self.poll()
                if self.once or self.done():
                    break
                self.stop.wait(self.every_seconds)
                if self.stop.is_set():
                    break
        self.summary["deferred"] = sorted(set(self.summary["deferred"]) - set(self.summary["scored"]))
        self.summary["failed"] = sorted(s for s in self.failures if self.state["steps"][str(s)]["status"] == "failed")
        log.info("watch: stopped (%s)", ", ".join(f"{k} {v}" for k, v in self.summary.items() if v) or "nothing new")
        return self.summary

    def poll(self) -> None:
        """One pass over the complete checkpoints, in step order."""
        for step in self.manager.complete_steps():
            if self.done():
                return
            if not self.handled(step):
                self.process(step)

    def process(self, step: int) -> None:
        """Score, skip or defer checkpoint ``step``; never raises for a checkpoint-level problem."""
        from vdit.eval.hook import eval_json_path

        path = self.manager.path(step)
        existing = eval_json_path(self.run_dir, step)
        if os.path.exists(existing):
            try:
                with open(existing) as f:
                    by = json.load(f).get("scored_by")
            except (OSError, ValueError):
                by = None  # written by an older, non-atomic in-loop evaluation right now
            if by and by.startswith("vdit-eval"):  # e.g. a watcher stopped between the JSON and its state
                if not has_row(self.run_dir, step):
                    with open(existing) as f:
                        append_row(self.run_dir, metric_row(step, json.load(f)))
                log.info("watch: step %d: eval/step-%d.json was written by %s; recorded as scored", step, step, by)
                self._record(step, "scored", found=True)
            else:
                log.info("watch: step %d skipped: the in-loop evaluation already wrote eval/step-%d.json", step, step)
                self._record(step, "skipped", reason="in-loop evaluation")
            return
        try:
            age = time.time() - os.path.getmtime(os.path.join(path, "COMPLETE"))
            if age < self.in_loop_grace_s and in_loop_will_score(run_config(self.run_dir), step):
                if step not in self._deferred_logged:
                    log.info("watch: step %d deferred: the run's in-loop evaluation scores it (eval.every / final "
                             "step); scored here only if eval/step-%d.json has not appeared %.0f s after COMPLETE",
                             step, step, self.in_loop_grace_s)
                    self._deferred_logged.add(step)
                self.summary["deferred"].append(step)
                return
            if self.device is None:
                self.device = resolve_eval_device(self.device_name)
            t0 = time.perf_counter()
            result = score_checkpoint(path, self.run_dir, self.overrides, self.device, scored_by="vdit-eval watch")
            self._record(step, "scored", checkpoint=os.path.relpath(path, self.run_dir), suspect=result["suspect"],
                         device=str(self.device), seconds=round(time.perf_counter() - t0, 2), overrides=self.overrides)
        except Exception as exn:  # noqa: BLE001 - one bad checkpoint must not stop the watcher
            if not os.path.exists(os.path.join(path, "COMPLETE")):
                log.warning("watch: step %d skipped: %s was deleted (keep_last_k pruning) before it could be "
                            "scored; a larger train.keep_last_k keeps checkpoints for a slow watcher", step, path)
                self._record(step, "skipped", reason="pruned before it was scored")
            else:
                self.failures[step] += 1
                log.exception("watch: step %d failed (try %d of %d): %s", step, self.failures[step], ATTEMPTS, exn)
                self._record(step, "failed", error=f"{type(exn).__name__}: {exn}", attempts=self.failures[step])

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One watcher per run: an advisory lock on ``eval/watch.lock`` (dropped by the OS if the process dies)."""
        path = os.path.join(self.run_dir, "eval", LOCK_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise RuntimeError(f"another watcher holds {path} ({f.read().strip() or 'pid unknown'})") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM: set ``stop`` (finish the current checkpoint); second: KeyboardInterrupt."""
    def handler(signum, frame):  # noqa: ARG001
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("watch: %s: stopping after the current checkpoint (send it again to stop now)",
                 signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------ CLI
def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("vdit").setLevel(logging.INFO)


def checkpoint_main(argv: list[str]) -> int:
    """``vdit-eval checkpoint <path> [--run-dir R] [--device D] [key=value ...]``; 0, or 1 on a bad input."""
    ap = argparse.ArgumentParser(prog="vdit-eval checkpoint",
                                 description="Score one checkpoint with the run's (overridden) eval config.")
    ap.add_argument("checkpoint", help="a {run}/checkpoints/step-N directory")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. eval.cfg_scale=3 eval.num_steps=10")
    ap.add_argument("--run-dir", default=None, help="the run (default: two levels above the checkpoint)")
    ap.add_argument("--device", default="auto", help="cpu or cuda:N (default: cuda:0 when a GPU is visible, else cpu)")
    args = ap.parse_intermixed_args(argv)
    _setup_logging()
    try:
        result = score_checkpoint(args.checkpoint, args.run_dir, args.overrides, args.device)
    except (FileNotFoundError, ValueError) as exn:  # incl. CheckpointError
        print(f"vdit-eval checkpoint: {exn}", file=sys.stderr)
        return 1
    run_dir = args.run_dir or run_dir_of(args.checkpoint)
    print(json.dumps({"step": result["step"], "suspect": result["suspect"],
                      "eval": os.path.join(run_dir, "eval", f"step-{result['step']}.json"),
                      "samples": os.path.join(run_dir, os.path.dirname(result["contact_sheet"])),
                      "metrics": metric_row(result["step"], result)}, indent=2))
    return 0


def watch_main(argv: list[str]) -> int:
    """``vdit-eval watch <run dir> ...``; 0, or 1 when a checkpoint failed or the run/overrides are bad."""
    ap = argparse.ArgumentParser(prog="vdit-eval watch",
                                 description="Score each new complete checkpoint of a run as it appears.")
    ap.add_argument("run_dir")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. eval.cfg_scale=3 eval.num_steps=10")
    ap.add_argument("--every-seconds", type=float, default=60.0, help="polling period (default 60)")
    ap.add_argument("--device", default="auto", help="cpu or cuda:N (default: cuda:0 when a GPU is visible, else cpu)")
    ap.add_argument("--once", action="store_true", help="score the checkpoints that exist, then exit")
    ap.add_argument("--max-checkpoints", type=int, default=None, help="exit after scoring this many")
    ap.add_argument("--in-loop-grace-seconds", type=float, default=3600.0,
                    help="leave a step the run's in-loop eval scores to it for this long (default 3600)")
    args = ap.parse_intermixed_args(argv)
    _setup_logging()
    try:
        watcher = Watcher(args.run_dir, args.device, args.overrides, args.every_seconds, args.once,
                          args.max_checkpoints, args.in_loop_grace_seconds)
        with stop_on_signals(watcher.stop):
            summary = watcher.run()
    except (FileNotFoundError, ValueError, RuntimeError) as exn:
        print(f"vdit-eval watch: {exn}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log.warning("watch: interrupted; the checkpoint being scored is scored again by the next watcher")
        return 130
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0
