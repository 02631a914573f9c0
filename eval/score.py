"""vdit-eval: score any folder of mp4 videos with the metric registry and write one JSON.

Run:
    vdit-eval videos runs/quickstart/samples/step-400 --out scores.json          # every weight-free metric
    vdit-eval videos gen/ --metrics temporal_flickering,dynamic_degree,motion_smoothness
    vdit-eval videos gen/ --scenes scenes.json                   # + trajectory physics (SceneParams per file)
    vdit-eval videos gen/ --reference physics-IQ-benchmark/split-videos/testing/30FPS   # + Physics-IQ
    vdit-eval videos gen/ --weights dino=/models/dino-vitb16 --weights clip=/models/clip-b32 --metrics all
    vdit-eval runs/quickstart/samples/step-400          # old form: same as `vdit-eval videos ...`
    vdit-eval checkpoint runs/quickstart/checkpoints/step-00000400 eval.num_steps=10   # score one checkpoint
    vdit-eval watch runs/quickstart --every-seconds 60 --device cuda:1     # score checkpoints as they appear

``checkpoint`` and ``watch`` sample with a checkpoint's weights and the run's eval config, as the
in-loop evaluation does, and write where it writes: see :mod:`vdit.eval.watch`.

Inputs: ``--prompts`` a JSON list of ``{"prompt", "path"}`` (as ``prompts.json`` of a samples
folder, used automatically when present) or ``{file name: prompt}``; ``--scenes`` a JSON
``{file name: SceneParams JSON}`` (or one SceneParams for a single video; a samples folder's
``scenes.json`` is used automatically); ``--reference`` a folder
of real videos: the Physics-IQ benchmark's layout (``{ID}_testing-videos_{fps}FPS_perspective-{view}
_take-{1|2}_{scenario}.mp4``; generated files named ``{ID}_perspective-{view}_{scenario}.mp4``,
matched by the take-1 ID) gives the Physics-IQ score; otherwise files are matched by name and
only the raw IoUs / MSE are reported. ``--metrics all`` (default) runs every metric whose inputs
and weights are available and lists the others under ``skipped`` with the reason.

Output: ``{"metrics": {name: {"value", "count", "not_evaluable", "implementation", "original",
"exact", ...}}, "videos": [{"path", name: value, ...}], "errors": [{"path", "error"}], "skipped":
{name: reason}}``. An unreadable video is listed under ``errors`` and the rest are scored.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

from vdit.data.synthetic import SceneParams
from vdit.data.video_io import read_all_frames
from vdit.eval.metrics.registry import REGISTRY, Inputs, score_set

_REF = re.compile(r"^(?P<id>\d+)_.*?(?P<view>perspective-[a-z]+)_take-(?P<take>\d)_(?P<scenario>.+)\.mp4$")
_GEN = re.compile(r"^(?P<id>\d+)_")


def _list_videos(paths: list[str]) -> list[str]:
    files: list[str] = []
    for v in paths:
        files += sorted(glob.glob(os.path.join(v, "*.mp4"))) if os.path.isdir(v) else [v]
    return files


def _sidecar(path: str | None, files: list[str], name: str) -> str | None:
    """``path``, else the one ``name`` (e.g. prompts.json) beside the videos; None if absent or ambiguous."""
    if path is not None:
        return path
    auto = {os.path.join(d, name) for d in {os.path.dirname(f) for f in files}}
    auto = [a for a in auto if os.path.exists(a)]
    return auto[0] if len(auto) == 1 else None


def _load_prompts(path: str | None, files: list[str]) -> dict[str, str]:
    path = _sidecar(path, files, "prompts.json")
    if path is None:
        return {}
    with open(path) as f:
        raw = json.load(f)
    if isinstance(raw, list):
        return {os.path.basename(r["path"]): r["prompt"] for r in raw}
    return {os.path.basename(k): v for k, v in raw.items()}


def _load_scenes(path: str | None, files: list[str]) -> dict[str, SceneParams]:
    path = _sidecar(path, files, "scenes.json")  # a samples folder written by training carries scenes.json
    if path is None:
        return {}
    with open(path) as f:
        raw = json.load(f)
    if "balls" in raw:  # one SceneParams for a single video
        raw = {os.path.basename(files[0]): raw}
    return {os.path.basename(k): SceneParams.from_json(v) for k, v in raw.items()}


class References:
    """Real videos for Physics-IQ: the benchmark's take-1/take-2 layout, or plain files by name."""

    def __init__(self, folder: str) -> None:
        self.by_name: dict[str, str] = {}
        self.takes: dict[tuple[str, str, str], str] = {}  # (scenario, view, take) -> path
        self.take1_by_id: dict[str, tuple[str, str]] = {}
        for path in sorted(glob.glob(os.path.join(folder, "**", "*.mp4"), recursive=True)):
            name = os.path.basename(path)
            self.by_name.setdefault(name, path)
            m = _REF.match(name)
            if m:
                self.takes[(m["scenario"], m["view"], m["take"])] = path
                if m["take"] == "1":
                    self.take1_by_id[m["id"]] = (m["scenario"], m["view"])

    def match(self, generated: str) -> tuple[str | None, str | None, str | None, str | None]:
        """(take 1 or single reference, take 2 or None, scenario, view) for a generated file."""
        name = os.path.basename(generated)
        m = _GEN.match(name)
        if m and m["id"] in self.take1_by_id:
            scenario, view = self.take1_by_id[m["id"]]
            return self.takes[(scenario, view, "1")], self.takes.get((scenario, view, "2")), scenario, view
        return self.by_name.get(name), None, None, None


def videos_main(argv: list[str]) -> int:
    """``vdit-eval videos``; returns 0, or 1 when no video could be scored."""
    ap = argparse.ArgumentParser(prog="vdit-eval videos", description="Score mp4 videos; write one JSON.")
    ap.add_argument("videos", nargs="+", help="mp4 files or folders of mp4s")
    ap.add_argument("--prompts", default=None, help="JSON: [{prompt, path}] or {file name: prompt}")
    ap.add_argument("--scenes", "--scene-json", dest="scenes", default=None,
                    help="JSON: {file name: SceneParams} (or one SceneParams for one video)")
    ap.add_argument("--reference", default=None, help="folder of real videos (Physics-IQ layout or same names)")
    ap.add_argument("--metrics", default="all", help=f"comma-separated names or 'all'; known: {','.join(REGISTRY)}")
    ap.add_argument("--weights", action="append", default=[], metavar="KEY=PATH",
                    help="local weights: dino, clip, clip_l14, aesthetic_head, musiq, raft, i3d")
    ap.add_argument("--fps", type=float, default=None, help="override the fps read from the files")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the JSON here as well")
    args = ap.parse_args(argv)

    files = _list_videos(args.videos)
    prompts = _load_prompts(args.prompts, files)
    scenes = _load_scenes(args.scenes, files)
    refs = References(args.reference) if args.reference else None
    weights = dict(w.split("=", 1) for w in args.weights)
    names = "all" if args.metrics == "all" else [m.strip() for m in args.metrics.split(",") if m.strip()]
    items, paths, errors = [], [], []
    for path in files:
        try:
            frames, fps = read_all_frames(path)
            fps = args.fps or fps
            item = Inputs(frames, fps, prompt=prompts.get(os.path.basename(path)),
                          scene=scenes.get(os.path.basename(path)))
            if refs is not None:
                r1, r2, scenario, view = refs.match(path)
                if r1:
                    item.reference = read_all_frames(r1)[0]
                    item.reference2 = read_all_frames(r2)[0] if r2 else None
                    item.scenario, item.view = scenario or os.path.basename(path), view or "view"
        except Exception as exn:  # noqa: BLE001 - report and continue with the other videos
            errors.append({"path": path, "error": f"{type(exn).__name__}: {exn}"})
            continue
        items.append(item)
        paths.append(path)
    if not items:
        print(json.dumps({"error": "no video could be scored", "errors": errors}), file=sys.stderr)
        return 1

    def on_error(idx: int, exn: Exception) -> None:
        errors.append({"path": paths[idx], "error": f"{type(exn).__name__}: {exn}"})

    result = score_set(items, names, weights, args.device, on_error=on_error)
    result["videos"] = [{"path": p, **row} for p, row in zip(paths, result["videos"]) if row is not None]
    result["errors"] = errors
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``vdit-eval``): ``vdit-eval videos ...``, ``vdit-eval checkpoint ...``,
    ``vdit-eval watch ...``, or the old ``vdit-eval <videos or folders> [--scene-json F] [--out F]``,
    which runs ``videos``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("checkpoint", "watch"):
        from vdit.eval import watch

        return (watch.checkpoint_main if argv[0] == "checkpoint" else watch.watch_main)(argv[1:])
    if argv and argv[0] == "videos":
        argv = argv[1:]
    return videos_main(argv)


if __name__ == "__main__":
    sys.exit(main())
