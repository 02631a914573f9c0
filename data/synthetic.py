"""Procedural captioned physics scenes with known parameters.

Balls fly under gravity, bounce on a floor (restitution, horizontal friction) and off the left and
right walls, rendered as small RGB clips with a caption generated from the parameters. The
parameters travel with each clip (``{key}.json`` -> ``"synthetic"``) so that ``vdit.eval.physics``
can later check a generated video against the physics its prompt describes.

Quick look::

    from vdit.data.synthetic import make_clip, write_synthetic_dataset
    frames, caption, meta = make_clip(seed=0)          # uint8 (48, 64, 64, 3), str, dict
    rows = write_synthetic_dataset("/tmp/synth", num_clips=16, seed=0)

Conventions (used by the renderer and by the physics checks alike):

- Positions are in pixels, image coordinates, ``x`` to the right and ``y`` downwards. The pixel in
  row ``i``, column ``j`` has its centre at ``(x=j, y=i)`` (OpenCV's convention), so the image
  spans ``[-0.5, width - 0.5] x [-0.5, height - 0.5]``.
- The floor band covers the bottom ``floor_height`` rows; its surface is the line
  ``y = height - floor_height - 0.5`` (:attr:`SceneParams.floor_line`). A ball of radius ``r``
  touches the floor when its centre is at ``floor_line - r`` and never goes below it.
- Walls are the image borders ``x = -0.5`` and ``x = width - 0.5`` (when ``walls`` is true).
- Velocities in px/s, gravity in px/s^2 (positive = downwards), times in seconds; frame ``i`` is
  at ``t = i / fps``.

Simulation is event-driven and closed-form: between events (floor contact, wall contact, end of
sliding) a ball follows the exact parabola / linear law, and event times are roots of those laws,
so sampled trajectories are exact ballistic parabolas at frame times (up to float64 rounding).
Balls do not collide with each other; :func:`random_scene` keeps them apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np

from vdit.data.video_io import write_mp4

__all__ = [
    "SCENE_TYPES",
    "BALL_COLORS",
    "BACKGROUND_COLORS",
    "FLOOR_COLORS",
    "REST_APEX_PX",
    "BallParams",
    "SceneParams",
    "simulate",
    "render",
    "caption",
    "random_scene",
    "make_clip",
    "write_synthetic_dataset",
]

SCENE_TYPES = ("drop", "throw", "bounce")

# Named colors (RGB). Ball colors are saturated/bright; backgrounds and floors are chosen so that
# random_scene can always find ball colors far from both (see _distinct).
BALL_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "orange": (250, 140, 20),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
    "magenta": (230, 50, 200),
    "white": (245, 245, 245),
    "pink": (255, 150, 190),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "dark blue": (20, 30, 80),
    "dark gray": (50, 50, 50),
    "dark green": (20, 60, 30),
    "beige": (225, 210, 170),
    "sky blue": (135, 190, 235),
    "light gray": (200, 200, 200),
}
FLOOR_COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "brown": (120, 80, 40),
    "green": (60, 140, 60),
    "tan": (190, 160, 110),
    "dark gray": (70, 70, 70),
}

# A floor contact whose rebound would rise less than this (pixels) ends the bouncing: the ball
# rests on the floor (and slides with friction). Cuts the infinite series of ever smaller
# bounces, which a renderer cannot show anyway.
REST_APEX_PX = 1.0

_NUMBER_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times", 5: "five times",
                 6: "six times", 7: "seven times", 8: "eight times", 9: "nine times"}


def _rgb(value: Any) -> tuple[int, int, int]:
    rgb = tuple(int(v) for v in value)
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"an RGB color needs 3 integers in 0..255; got {value!r}")
    return rgb  # type: ignore[return-value]


@dataclass
class BallParams:
    """One ball: ``color`` name and ``rgb`` (0-255), ``radius`` (px), initial centre ``x``, ``y``
    (px, image coordinates) and initial velocity ``vx``, ``vy`` (px/s, ``vy > 0`` is downwards)."""

    color: str
    rgb: tuple[int, int, int]
    radius: float
    x: float
    y: float
    vx: float = 0.0
    vy: float = 0.0

    def __post_init__(self) -> None:
        self.rgb = _rgb(self.rgb)
        self.radius, self.x, self.y = float(self.radius), float(self.x), float(self.y)
        self.vx, self.vy = float(self.vx), float(self.vy)


@dataclass
class SceneParams:
    """Everything needed to simulate, render and caption one procedural clip.

    Fields:
        scene: ``'drop' | 'throw' | 'bounce'`` (what the caption says; the physics is the same).
        height, width: frame size in pixels. num_frames: T. fps: frames per second.
        background, background_rgb: name and RGB of the background.
        floor, floor_rgb, floor_height: name, RGB and thickness (pixels, from the bottom) of the
            floor band; 0 means the floor is the bottom image border.
        balls: list of :class:`BallParams` (distinct colors, so that tracking can tell them apart).
        gravity: g in px/s^2, positive = downwards; must be > 0.
        restitution: e in (0, 1]; a floor contact maps vy -> -e*vy, a wall contact vx -> -e*vx.
        friction: in [0, 1]; a floor impact maps vx -> (1 - friction)*vx, and a ball resting on the
            floor decelerates horizontally at friction*gravity px/s^2 (Coulomb sliding).
        walls: reflect at the left/right image borders.

    Raises (from :meth:`validate`, called by ``__post_init__``): ValueError on an unknown scene
    type, non-positive sizes/fps/gravity/radius, restitution or friction out of range, or a ball
    starting below the floor or inside a wall.
    """

    scene: str
    height: int
    width: int
    num_frames: int
    fps: float
    background: str
    background_rgb: tuple[int, int, int]
    floor: str
    floor_rgb: tuple[int, int, int]
    floor_height: int
    balls: list[BallParams] = field(default_factory=list)
    gravity: float = 300.0
    restitution: float = 0.7
    friction: float = 0.1
    walls: bool = True

    def __post_init__(self) -> None:
        self.balls = [b if isinstance(b, BallParams) else BallParams(**b) for b in self.balls]
        self.background_rgb = _rgb(self.background_rgb)
        self.floor_rgb = _rgb(self.floor_rgb)
        self.height, self.width = int(self.height), int(self.width)
        self.num_frames, self.floor_height = int(self.num_frames), int(self.floor_height)
        self.fps, self.gravity = float(self.fps), float(self.gravity)
        self.restitution, self.friction = float(self.restitution), float(self.friction)
        self.walls = bool(self.walls)
        self.validate()

    @property
    def floor_line(self) -> float:
        """y of the floor surface in pixels (image coordinates): ``height - floor_height - 0.5``."""
        return self.height - self.floor_height - 0.5

    @property
    def duration(self) -> float:
        """Time of the last frame in seconds: ``(num_frames - 1) / fps``."""
        return (self.num_frames - 1) / self.fps

    def validate(self) -> None:
        """Check ranges and the initial placement; raises ValueError with the offending field."""
        if self.scene not in SCENE_TYPES:
            raise ValueError(f"scene must be one of {SCENE_TYPES}; got {self.scene!r}")
        if self.height < 4 or self.width < 4:
            raise ValueError(f"height and width must be >= 4 pixels; got {self.height}x{self.width}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1; got {self.num_frames}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0; got {self.fps}")
        if not 0 <= self.floor_height < self.height:
            raise ValueError(f"floor_height must be in [0, height); got {self.floor_height}")
        if not self.gravity > 0:
            raise ValueError(f"gravity must be > 0 px/s^2 (downwards); got {self.gravity}")
        if not 0 < self.restitution <= 1:
            raise ValueError(f"restitution must be in (0, 1]; got {self.restitution}")
        if not 0 <= self.friction <= 1:
            raise ValueError(f"friction must be in [0, 1]; got {self.friction}")
        for k, b in enumerate(self.balls):
            if not b.radius > 0:
                raise ValueError(f"balls[{k}].radius must be > 0; got {b.radius}")
            if b.y + b.radius > self.floor_line + 1e-6:
                raise ValueError(f"balls[{k}] starts below the floor: y + radius = {b.y + b.radius} "
                                 f"> floor_line = {self.floor_line}")
            if self.walls and not (-0.5 + b.radius - 1e-6 <= b.x <= self.width - 0.5 - b.radius + 1e-6):
                raise ValueError(f"balls[{k}] starts inside a wall: x = {b.x}, radius = {b.radius}, "
                                 f"width = {self.width}")

    def to_json(self) -> dict:
        """Plain, JSON-serialisable dict (lists instead of tuples); inverse of :meth:`from_json`."""
        d = dataclasses.asdict(self)
        d["background_rgb"] = list(self.background_rgb)
        d["floor_rgb"] = list(self.floor_rgb)
        for b in d["balls"]:
            b["rgb"] = list(b["rgb"])
        return d

    @classmethod
    def from_json(cls, data: dict | str) -> "SceneParams":
        """Build from :meth:`to_json` output (a dict, or its JSON text). Raises ValueError/TypeError
        on missing or invalid fields."""
        if isinstance(data, str):
            data = json.loads(data)
        data = dict(data)
        data["balls"] = [BallParams(**b) for b in data.get("balls", [])]
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------


def _time_to_floor(y: float, vy: float, g: float, y_contact: float) -> float:
    """Smallest tau >= 0 with y + vy*tau + g*tau^2/2 = y_contact (g > 0, y <= y_contact)."""
    gap = max(y_contact - y, 0.0)
    root = math.sqrt(vy * vy + 2.0 * g * gap)
    if vy > 0:  # avoid cancellation in (-vy + root)
        return 2.0 * gap / (vy + root) if gap > 0 else 0.0
    return (-vy + root) / g


def _simulate_ball(b: BallParams, p: SceneParams, times: np.ndarray) -> dict:
    g, e, mu = p.gravity, p.restitution, p.friction
    r = b.radius
    y_contact = p.floor_line - r
    x_lo, x_hi = (-0.5 + r, p.width - 0.5 - r) if p.walls else (-math.inf, math.inf)
    decel = mu * g  # sliding deceleration on the floor, px/s^2
    v_rest = math.sqrt(2.0 * g * REST_APEX_PX)  # rebound speed below which the ball rests

    T = len(times)
    pos = np.zeros((T, 2))
    vel = np.zeros((T, 2))
    bounces: list[float] = []
    walls_hit: list[list] = []
    rest_time: float | None = None

    t0, x, y, vx, vy = 0.0, b.x, b.y, b.vx, b.vy
    resting = False

    def floor_contact(t: float) -> None:
        nonlocal vx, vy, y, resting, rest_time
        y = y_contact
        if vy > 0:
            vx *= 1.0 - mu
        vy = -e * vy
        if -vy < v_rest:
            vy, resting, rest_time = 0.0, True, t
        else:
            bounces.append(t)

    if y >= y_contact - 1e-9 and vy >= 0:  # starts on the floor
        floor_contact(0.0)

    def state_at(tau: float) -> tuple[float, float, float, float]:
        if resting:
            s = math.copysign(1.0, vx)
            tc = min(tau, abs(vx) / decel) if decel > 0 else tau
            xs = x + vx * tc - s * decel * tc * tc / 2.0
            return min(max(xs, x_lo), x_hi), y_contact, vx - s * decel * tc, 0.0
        xs = min(max(x + vx * tau, x_lo), x_hi)
        ys = min(y + vy * tau + g * tau * tau / 2.0, y_contact)
        return xs, ys, vx, vy + g * tau

    idx = 0
    for _ in range(1_000_000):
        # Candidate events from the current state, as delays from t0.
        dt_floor = math.inf if resting else _time_to_floor(y, vy, g, y_contact)
        dt_wall, side = math.inf, None
        dt_stop = math.inf
        if vx != 0.0:
            wall, side = (x_hi, "right") if vx > 0 else (x_lo, "left")
            dist = abs(wall - x)
            if resting and decel > 0:
                dt_stop = abs(vx) / decel
                disc = vx * vx - 2.0 * decel * dist
                if disc >= 0:
                    dt_wall = (abs(vx) - math.sqrt(disc)) / decel
            elif math.isfinite(dist):
                dt_wall = dist / abs(vx)
        dt = min(dt_floor, dt_wall, dt_stop)
        while idx < T and times[idx] - t0 <= dt:
            xs, ys, vxs, vys = state_at(times[idx] - t0)
            pos[idx], vel[idx] = (xs, ys), (vxs, vys)
            idx += 1
        if idx >= T or not math.isfinite(dt):
            break
        # Advance to the event and apply it.
        xs, ys, vxs, vys = state_at(dt)
        t0, x, y, vx, vy = t0 + dt, xs, ys, vxs, vys
        if dt == dt_stop and dt_stop <= min(dt_floor, dt_wall):
            vx = 0.0
        elif dt == dt_wall:
            x = x_hi if side == "right" else x_lo
            vx = -e * vx
            walls_hit.append([t0, side])
        else:
            floor_contact(t0)
    else:  # pragma: no cover - only with pathological parameters
        raise RuntimeError("simulation did not converge (too many events)")

    last = times[-1] if T else 0.0
    bounces = [t for t in bounces if t <= last]
    return {
        "positions": pos,
        "velocities": vel,
        "bounce_times": bounces,
        "bounce_frames": [min(int(round(t * p.fps)), T - 1) for t in bounces],
        "wall_hits": [w for w in walls_hit if w[0] <= last],
        "rest_time": rest_time if rest_time is not None and rest_time <= last else None,
    }


def simulate(params: SceneParams) -> dict:
    """Exact ground-truth trajectories of every ball at the frame times ``t_i = i / fps``.

    Closed form between events (floor contact, wall contact, end of sliding), events at the exact
    roots, so each flight is an exact parabola ``y = y0 + vy t + g t^2 / 2`` sampled at frame
    times. A ball's bottom never goes below ``params.floor_line`` and its edge never enters a wall.

    Returns a dict:
        ``times``: float64 (T,) seconds.
        ``positions``: float64 (T, K, 2) ball centres (x, y) in pixels, image coordinates.
        ``velocities``: float64 (T, K, 2) (vx, vy) in px/s (just before an event when a frame
        falls exactly on one).
        ``bounce_times``: per ball, floor contacts with a rebound (seconds, within the clip).
        ``bounce_frames``: per ball, the frame index nearest to each bounce.
        ``wall_hits``: per ball, ``[time_s, 'left' | 'right']`` pairs.
        ``rest_time``: per ball, the time (s) it came to rest on the floor, or None.
        ``floor_line``: float, y of the floor surface in pixels.

    Raises:
        ValueError: invalid parameters (see :meth:`SceneParams.validate`).
    """
    params.validate()
    T, K = params.num_frames, len(params.balls)
    times = np.arange(T, dtype=np.float64) / params.fps
    per_ball = [_simulate_ball(b, params, times) for b in params.balls]
    positions = np.zeros((T, K, 2))
    velocities = np.zeros((T, K, 2))
    for k, res in enumerate(per_ball):
        positions[:, k], velocities[:, k] = res["positions"], res["velocities"]
    return {
        "times": times,
        "positions": positions,
        "velocities": velocities,
        "bounce_times": [res["bounce_times"] for res in per_ball],
        "bounce_frames": [res["bounce_frames"] for res in per_ball],
        "wall_hits": [res["wall_hits"] for res in per_ball],
        "rest_time": [res["rest_time"] for res in per_ball],
        "floor_line": params.floor_line,
    }


# ---------------------------------------------------------------------------------------------
# Rendering and captions
# ---------------------------------------------------------------------------------------------

_SHIFT = 4  # cv2 fractional bits: centres and radii at 1/16 pixel


def render(params: SceneParams, trajectory: dict | np.ndarray | None = None) -> np.ndarray:
    """Draw the scene: background, floor band, then each ball as a filled anti-aliased disc.

    Args:
        params: the scene.
        trajectory: None (simulate), a :func:`simulate` dict, or ball centres as an array
            float (T, K, 2) of (x, y) pixels; a NaN centre leaves that ball out of that frame.
            Any trajectory is drawn as given (no physics), which is how tests build
            physically wrong variants.

    Returns:
        uint8 (T, H, W, 3) RGB frames, T = number of trajectory frames.

    Raises:
        ValueError: a trajectory whose shape is not (T, K, 2) with K = len(params.balls).
    """
    if trajectory is None:
        trajectory = simulate(params)
    pos = np.asarray(trajectory["positions"] if isinstance(trajectory, dict) else trajectory, dtype=np.float64)
    K = len(params.balls)
    if pos.ndim != 3 or pos.shape[1:] != (K, 2):
        raise ValueError(f"trajectory must have shape (T, {K}, 2); got {pos.shape}")
    H, W = params.height, params.width
    base = np.empty((H, W, 3), np.uint8)
    base[:] = params.background_rgb
    if params.floor_height > 0:
        base[H - params.floor_height:] = params.floor_rgb
    frames = np.empty((pos.shape[0], H, W, 3), np.uint8)
    scale = 1 << _SHIFT
    for i in range(pos.shape[0]):
        img = base.copy()
        for k, b in enumerate(params.balls):
            x, y = pos[i, k]
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            center = (int(round(x * scale)), int(round(y * scale)))
            cv2.circle(img, center, int(round(b.radius * scale)), b.rgb, thickness=-1,
                       lineType=cv2.LINE_AA, shift=_SHIFT)
        frames[i] = img
    return frames


def _size_word(radius: float, params: SceneParams) -> str:
    rel = radius / min(params.height, params.width)
    if rel < 0.066:
        return "small"
    if rel < 0.088:
        return "medium-sized"
    return "large"


def _where_word(x: float, width: int) -> str:
    """Where a ball centre ``x`` (px) lies: the left, middle or right third of the frame."""
    rel = (x + 0.5) / width
    if rel < 1 / 3:
        return "on the left"
    if rel > 2 / 3:
        return "on the right"
    return "in the middle"


def _times_word(n: int) -> str:
    return _NUMBER_WORDS.get(n, f"{n} times")


def _join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _ball_clause(params: SceneParams, k: int, sim: dict, start_third: bool = False) -> str:
    b = params.balls[k]
    subject = f"a {_size_word(b.radius, params)} {b.color} ball"
    if start_third:
        subject += f" {_where_word(b.x, params.width)}"
    direction = "right" if b.vx > 0 else "left"
    n_bounce = len(sim["bounce_times"][k])
    rest = sim["rest_time"][k]
    events: list[tuple[float, str]] = []
    if params.scene == "drop":
        head = f"{subject} is dropped"
        if abs(b.vx) > 1e-6:
            head += f" drifting to the {direction}"
    elif params.scene == "throw":
        up = " up and" if b.vy < -1e-6 else ""
        head = f"{subject} is thrown{up} to the {direction}"
    else:  # bounce
        head = f"{subject} bounces {_times_word(n_bounce)} while moving to the {direction}" if n_bounce \
            else f"{subject} moves to the {direction}"
    if params.scene != "bounce" and n_bounce:
        events.append((sim["bounce_times"][k][0], f"bounces {_times_word(n_bounce)}"))
    sides = []
    for t, side in sim["wall_hits"][k]:
        if side not in sides:
            sides.append(side)
            events.append((t, f"hits the {side} wall"))
    if rest is not None:
        moving = abs(sim["velocities"][-1, k, 0]) > 1e-6
        if n_bounce == 0 and params.scene != "bounce":
            events.append((rest, "lands on the floor" + (" and slides" if moving else "")))
        else:
            events.append((rest, "rolls along the floor" if moving else "comes to rest"))
    events.sort(key=lambda te: te[0])
    return _join([head] + [text for _, text in events])


def caption(params: SceneParams, sim: dict | None = None, start_third: bool = False) -> str:
    """A natural, specific caption generated from the parameters (and the simulated events).

    Mentions the floor and background colors, then per ball its size (radius relative to the
    frame: small / medium-sized / large), color, with ``start_third`` where it starts (``on the
    left``, ``in the middle``, ``on the right``: the third of the frame width), the scene verb (``dropped``, ``thrown``,
    ``bounces``), direction (sign of vx), the number of floor bounces inside the clip, walls hit
    and whether it comes to rest. ``sim`` is :func:`simulate` output (computed when None).

    Example: "On a gray floor in front of a dark blue background, a small red ball is thrown up
    and to the right, bounces twice and hits the right wall." (``start_third``: "a small red ball
    on the left is thrown ...").
    """
    if sim is None:
        sim = simulate(params)
    clauses = [_ball_clause(params, k, sim, start_third) for k in range(len(params.balls))]
    setting = f"On a {params.floor} floor in front of a {params.background} background"
    if not clauses:
        return setting + ", nothing moves."
    return f"{setting}, " + ", while ".join(clauses) + "."


# ---------------------------------------------------------------------------------------------
# Random scenes, clips and datasets
# ---------------------------------------------------------------------------------------------


def _distinct(a: tuple[int, int, int], b: tuple[int, int, int], min_channel: int = 100) -> bool:
    """Colors far enough apart for a +-40-per-channel threshold tracker (with mp4 noise)."""
    d = np.abs(np.subtract(a, b, dtype=np.int64))
    return int(d.max()) >= min_channel and float(np.linalg.norm(d)) >= 120.0


DEFAULT_RADIUS_FRAC = (0.045, 0.11)


def random_scene(rng: np.random.Generator, height: int = 64, width: int = 64, num_frames: int = 48,
                 fps: float = 24.0, radius_frac: Sequence[float] = DEFAULT_RADIUS_FRAC,
                 spread: float = 1.0) -> SceneParams:
    """A random but plausible scene: type drop / throw / bounce, 1-2 balls.

    Gravity is 150-400 px/s^2 per 64 px of height (a ball falls the frame height in ~0.6-0.9 s),
    radius ``radius_frac`` (default 4.5-11 %) of min(height, width) but at least 2.5 px (2.5-3.5 px
    at 32x32 by default), floor band
    8-16 % of the height, restitution 0.5-0.9 (0.75-0.9 for 'bounce'), friction 0-0.3. Colors are drawn so that balls, floor and background
    are pairwise distinct. Scenes are re-drawn until every ball stays fully inside the frame,
    balls never overlap, drops bounce at least once and 'bounce' scenes at least twice.

    ``spread`` in ``[0, 1]`` narrows every continuous motion draw (gravity, floor band, restitution,
    friction, start height, speeds, and the start ``x`` towards the centre of the third of the
    frame it falls in, which the caption names) to ``spread`` times its range around the middle:
    1 is the full variety, 0 makes the motion a function of the caption's words (scene, direction,
    third, ball size) and of the number of balls. Every spread consumes the generator alike, so the
    discrete choices (scene, colours, balls, direction, third) come from the same draws. Scenes drawn
    with ``spread < 1`` are captioned with ``caption(..., start_third=True)`` by :func:`make_clip`
    and the evaluation's prompts, since the third then fixes where the ball starts.

    Args:
        rng: numpy Generator; the result is a pure function of its state.
        height, width: pixels. num_frames: T. fps: frames per second.
        radius_frac: ``(lo, hi)`` ball radius range as fractions of min(height, width).
        spread: share of each motion parameter's range that is drawn (above).

    Raises:
        ValueError: ``radius_frac`` not ``0 < lo <= hi < 0.5``; ``spread`` outside ``[0, 1]``.
        RuntimeError: no valid scene found in 500 draws (only for degenerate sizes).
    """
    r_lo, r_hi = (float(x) for x in radius_frac)
    if not 0.0 < r_lo <= r_hi < 0.5:
        raise ValueError(f"radius_frac must be (lo, hi) with 0 < lo <= hi < 0.5; got {tuple(radius_frac)}")
    spread = float(spread)
    if not 0.0 <= spread <= 1.0:
        raise ValueError(f"spread must be in [0, 1]; got {spread}")

    def uniform(lo: float, hi: float) -> float:  # rng.uniform narrowed to spread x the range
        u = float(rng.uniform(lo, hi))
        return u if spread == 1.0 else (lo + hi) / 2 + spread * (u - (lo + hi) / 2)

    H, W = int(height), int(width)
    thirds = [(k * W / 3 - 0.5, (k + 1) * W / 3 - 0.5) for k in range(3)]

    def third_x(x: float, x_lo: float, x_hi: float) -> float:  # x pulled towards its third's centre
        if spread == 1.0:
            return x
        a, b = next((t for t in thirds if x <= t[1]), thirds[2])
        return min(max((a + b) / 2 + spread * (x - (a + b) / 2), x_lo), x_hi)

    s = H / 64.0
    duration = (num_frames - 1) / fps
    ball_names = list(BALL_COLORS)
    for _ in range(500):
        scene = SCENE_TYPES[int(rng.integers(len(SCENE_TYPES)))]
        bg = list(BACKGROUND_COLORS)[int(rng.integers(len(BACKGROUND_COLORS)))]
        floors = [f for f in FLOOR_COLORS if _distinct(FLOOR_COLORS[f], BACKGROUND_COLORS[bg], 60)]
        fl = floors[int(rng.integers(len(floors)))]
        g = uniform(150.0, 400.0) * s
        floor_height = max(1, int(round(uniform(0.08, 0.16) * H)))
        floor_line = H - floor_height - 0.5
        n_balls = 2 if rng.random() < (0.2 if scene == "throw" else 0.35) else 1
        restitution = uniform(0.75, 0.9) if scene == "bounce" else uniform(0.5, 0.9)
        friction = uniform(0.0, 0.3)
        colors = [c for c in ball_names
                  if _distinct(BALL_COLORS[c], BACKGROUND_COLORS[bg]) and _distinct(BALL_COLORS[c], FLOOR_COLORS[fl])]
        balls: list[BallParams] = []
        for k in range(n_balls):
            usable = [c for c in colors if all(_distinct(BALL_COLORS[c], b.rgb) for b in balls)]
            if not usable:
                break
            color = usable[int(rng.integers(len(usable)))]
            # At least 2.5 px: below that, mp4 chroma subsampling (2x2) smears the ball's color.
            r = float(rng.uniform(max(r_lo * min(H, W), 2.5), max(r_hi * min(H, W), 3.5)))
            y_top, y_contact = r - 0.5, floor_line - r  # centre range that keeps the ball in frame
            x_lo, x_hi = r - 0.5, W - 0.5 - r
            if y_contact - y_top < 4 or x_hi - x_lo < 4:
                break
            # With two balls, give each its own half of the width to start in.
            lo, hi = (x_lo, x_hi) if n_balls == 1 else \
                ((x_lo, (x_lo + x_hi) / 2) if k == 0 else ((x_lo + x_hi) / 2, x_hi))
            span = y_contact - y_top
            if scene == "drop":
                x0 = third_x(float(rng.uniform(lo, hi)), x_lo, x_hi)
                y0 = y_top + 1 + uniform(0.0, 0.4) * span
                vx0, vy0 = 0.0, 0.0
            elif scene == "throw":
                to_right = rng.random() < 0.5 if n_balls == 1 else k == 0
                edge = uniform(0.0, 0.25) * (hi - lo)
                x0 = lo + edge if to_right else hi - edge
                y0 = y_top + uniform(0.4, 0.85) * span
                vx0 = (1 if to_right else -1) * uniform(0.3, 0.8) * W / duration
                vy0 = -uniform(0.3, 0.95) * math.sqrt(2 * g * max(y0 - y_top - 1, 0.0))
            else:  # bounce
                x0 = third_x(float(rng.uniform(lo, hi)), x_lo, x_hi)
                y0 = y_top + 1 + uniform(0.1, 0.6) * span
                vx0 = (1 if rng.random() < 0.5 else -1) * uniform(0.1, 0.4) * W / duration
                vy0 = uniform(-0.3, 0.5) * math.sqrt(2 * g * max(y0 - y_top - 1, 0.0))
            balls.append(BallParams(color, BALL_COLORS[color], r, x0, y0, vx0, vy0))
        if len(balls) != n_balls:
            continue
        try:
            params = SceneParams(scene, H, W, num_frames, fps, bg, BACKGROUND_COLORS[bg], fl,
                                 FLOOR_COLORS[fl], floor_height, balls, g, restitution, friction, True)
        except ValueError:
            continue
        if _acceptable(params, simulate(params)):
            return params
    raise RuntimeError(f"random_scene found no valid scene for {height}x{width}, {num_frames} frames")


def _acceptable(params: SceneParams, sim: dict) -> bool:
    pos = sim["positions"]  # (T, K, 2)
    radii = np.array([b.radius for b in params.balls])
    if np.any(pos[:, :, 1] - radii < -0.5 - 1e-6):  # top of a ball leaves the frame
        return False
    need = {"drop": 1, "throw": 0, "bounce": 2}[params.scene]
    if any(len(bt) < need for bt in sim["bounce_times"]):
        return False
    if len(params.balls) == 2:
        gap = np.linalg.norm(pos[:, 0] - pos[:, 1], axis=-1) - radii.sum()
        if gap.min() < 2.0:
            return False
    return True


def make_clip(seed: int, height: int = 64, width: int = 64, num_frames: int = 48,
              fps: float = 24.0, radius_frac: Sequence[float] = DEFAULT_RADIUS_FRAC,
              spread: float = 1.0) -> tuple[np.ndarray, str, dict]:
    """One random clip, fully determined by ``seed`` (and ``radius_frac``, ``spread``, see :func:`random_scene`).

    Returns:
        ``(frames, caption, meta)``: frames uint8 (num_frames, height, width, 3) RGB; the caption;
        meta ``{"synthetic": SceneParams.to_json(), "seed": seed}`` (JSON-serialisable).
    """
    params = random_scene(np.random.default_rng(seed), height, width, num_frames, fps, radius_frac, spread)
    sim = simulate(params)
    text = caption(params, sim, start_third=spread < 1)
    return render(params, sim), text, {"synthetic": params.to_json(), "seed": int(seed)}


def write_synthetic_dataset(out_dir: str | os.PathLike, num_clips: int, seed: int = 0, height: int = 64,
                            width: int = 64, num_frames: int = 48, fps: float = 24.0,
                            radius_frac: Sequence[float] = DEFAULT_RADIUS_FRAC, spread: float = 1.0) -> list[dict]:
    """Write ``num_clips`` random clips as ``{out_dir}/synthetic_{i:05d}.mp4`` plus ``manifest.jsonl``.
    ``radius_frac``: the balls' radius range; ``spread``: the share of the motion parameters' ranges
    drawn (:func:`random_scene`).

    Clip ``i`` uses the seed ``SeedSequence([seed, i]).generate_state(1)[0]``, so clips are
    independent and the dataset is a pure function of ``seed``. ``manifest.jsonl`` holds one line
    per clip: ``{"path": "synthetic_00000.mp4" (relative to out_dir), "caption": ...,
    "synthetic": {...SceneParams.to_json()...}}``.

    Returns:
        rows ``{"path": absolute mp4 path, "caption": str, "meta": {"synthetic": params_json,
        "seed": clip_seed}}`` in clip order.

    Raises:
        ValueError: ``num_clips < 0``.
    """
    if num_clips < 0:
        raise ValueError(f"num_clips must be >= 0; got {num_clips}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    with open(os.path.join(out_dir, "manifest.jsonl"), "w", encoding="utf-8") as manifest:
        for i in range(num_clips):
            clip_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
            frames, text, meta = make_clip(clip_seed, height, width, num_frames, fps, radius_frac, spread)
            name = f"synthetic_{i:05d}.mp4"
            path = write_mp4(os.path.join(out_dir, name), frames, fps)
            rows.append({"path": os.path.abspath(path), "caption": text, "meta": meta})
            manifest.write(json.dumps({"path": name, "caption": text, "synthetic": meta["synthetic"]}) + "\n")
    return rows
