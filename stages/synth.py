"""Render the embedded default scene `street` as raw input in the scene format, with exact ground truth.

The street is procedural and deterministic from `seed`. World frame: x along the road, y to the left, z up,
metres, ground at z = 0. It holds a 7 m road (|y| <= 3.5) of grainy asphalt with a solid white edge line
near each edge and a dashed white centre line (3 m dash, 5 m gap), granite kerbs, paving-stone sidewalks,
one row of buildings per side (a vertical facade plane per side; each building has its own length, height,
wall colour, brick or plaster, window grid), poles (vertical cylinders) along both sidewalks, and a sky
gradient. Frames are ray cast with torch on the device picked from `device`: analytic intersections,
mip-mapped procedural noise textures, analytically box-filtered stripes, `supersample`^2 rays per pixel.

`road` picks the layout; `straight` (the default) is the street above. `curve` bends it: its centre line is
straight, then one circular arc of `curve_angle_deg` on `curve_radius_m` centred on the mapped stretch, then
straight again. `junction` is a crossroads: the cameras drive straight, turn right by `turn_angle_deg` on
`turn_radius_m` into the cross street and drive down it; the straight-on street and the cross street's left
arm continue. A layout is built from centre lines of segments and arcs (`PlanCurve`) and roadside blocks: each
kerb runs parallel to the road edge, round a junction's corners on arcs concentric with the turn, with the
sidewalk, poles (placed by arc length) and a row of buildings behind it (facades: vertical planes and
cylinders, so corner buildings are rounded). The ground stays the plane z = 0, shaded in the road coordinates
(arc length along, offset across) of the street a point lies on; the world frame is the same as above (x
forward at the first camera).

A mapping camera drives +x in the right lane (gentle lateral sway and yaw); query cameras drive +x in the
left lane at another speed and height, spread over the same stretch. With turns, each keeps to its lane (an
offset of the centre line) with the same sway and yaw about the lane's heading.

Written to `--out` (data/raw/<scene>), the scene format of DESIGN.md:
- `video.mp4` (H.264 yuv420p, frame i at time i / fps) or `images/000000.png ...` (param `output`);
- `queries/000000.png ...`;
- `transforms.json`: nerfstudio convention, OPENCV model with zero distortion, `metric: true`, per frame a
  camera-to-world `transform_matrix` (OpenGL axes); video frames have `file_path: video.mp4` and their
  `timestamp` in seconds; mapping frames also name their ground-truth depth as `depth_file_path`;
- `depth/000000.png ...`: ground truth of mapping frame i as a 16-bit PNG: z-depth along the optical axis
  at the pixel centre, in millimetres; 0 = no surface (sky) or farther than 65.535 m;
- `hdmap.geojson`: FeatureCollection in the world frame ([x, y, z] in metres, not WGS84): lane markings as
  LineStrings along the painted line's centre, `kind: lane_marking`, `type: solid` (one LineString per edge
  line over the whole street; with turns, one per roadside block, round its corner) or `type: dashed` (one
  LineString per painted dash), `width` in metres; arcs as polylines within 1 mm of them (vertices at most
  0.5 m apart); poles as Points at their base centre, `kind: pole`, `height`, `radius`;
- `points.ply`: ground-truth surface samples (uniform per area, with colours and normals) on the ground,
  facades and poles, from the first mapping camera to `points_ahead_m` past the last one (with turns: by
  arc length along the centre line).

Pixel convention is COLMAP's and nerfstudio's: pixel (col, row) covers [col, col+1) x [row, row+1), its
centre is at (col + 0.5, row + 0.5), so cx = w / 2 and cy = h / 2.

Usage: python -m stages.synth --params params.yaml --out data/raw/street
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np
import open3d as o3d
import torch
import torch.nn.functional as F
from tqdm import tqdm

from stages.common.cli import guarded, make_parser
from stages.common.device import pick_device
from stages.common.geometry import camera_center, cam_from_world_to_world_from_cam_gl, look_at_cam_from_world
from stages.common.outputs import atomic_dir, write_json
from stages.common.params import load_section, require

log = logging.getLogger("scenepipe.synth")

INPUTS: dict[str, str] = {}
OUTPUTS = {"out": "scene folder to write (data/raw/<scene>); synth.json in it records the device"}
# Renders with torch on a GPU when one is present (flows tag its tasks `gpu`).
USES_GPU = True
SYNTH_RECORD = "synth.json"


# ---- The embedded street (metres). These define the scene itself, so they are not params. ----
ROAD_HALF_WIDTH_M = 3.5
LINE_WIDTH_M = 0.15
EDGE_LINE_Y_M = 3.25  # centre of each solid edge line, 0.175 m inside the road edge
DASH_M, GAP_M = 3.0, 5.0
KERB_OUTER_M = 3.8  # granite kerb between the road edge and here, sidewalk beyond
BEHIND_M = 20.0  # street behind the first camera: never in view, keeps texture borders out of sight
AHEAD_M = 60.0  # street past the last camera: what the cameras see ahead
MAX_BUILDING_M = 15.0
GROUND_TEXEL_M, FACADE_TEXEL_M, POLE_TEXEL_M = 0.02, 0.03, 0.01
POLE_STRIP_M = 1.0  # width of each pole's own strip in the pole texture (>= the largest circumference)
POLE_MAX_H_M = 8.0

SKY, GROUND, FACADE_RIGHT, FACADE_LEFT, POLE, WALL = 0, 1, 2, 3, 4, 5  # WALL: a layout block's facade
WALL_PIECES = 64  # a WALL hit's object index is block * WALL_PIECES + piece of the block's facade
HORIZON_RGB = (0.80, 0.85, 0.90)
ZENITH_RGB = (0.33, 0.52, 0.82)
SUN_3 = np.array([-0.35, 0.45, 0.82]) / np.linalg.norm([-0.35, 0.45, 0.82])
FOG_M = 350.0
MAX_ANISO = 4.0  # mip level follows the minor footprint axis up to this anisotropy (sharper far ground)

BRICK_RGB = [(0.55, 0.27, 0.20), (0.62, 0.36, 0.25), (0.45, 0.25, 0.22), (0.70, 0.55, 0.42)]
PLASTER_RGB = [(0.86, 0.80, 0.70), (0.74, 0.77, 0.80), (0.80, 0.68, 0.52), (0.64, 0.72, 0.62), (0.90, 0.88, 0.84)]
POLE_RGB = [(0.60, 0.62, 0.63), (0.16, 0.30, 0.20), (0.13, 0.13, 0.14), (0.42, 0.31, 0.20)]
BAND_RGB = [(0.85, 0.12, 0.10), (0.92, 0.92, 0.90), (0.95, 0.78, 0.10), (0.10, 0.30, 0.70)]


@dataclasses.dataclass(frozen=True)
class SynthParams:
    """Parameters of the synth stage (params.yaml section `synth`)."""

    seed: int = 0
    """seeds every random choice: textures, buildings, poles, dash phase, camera sway phases"""
    n_frames: int = 80
    """mapping frames (video frames or images)"""
    width: int = 640
    """image width in pixels (even for output: video)"""
    height: int = 360
    """image height in pixels (even for output: video)"""
    fps: float = 10.0
    """mapping frame rate: frame i is taken at time i / fps"""
    output: Literal["video", "images"] = "video"
    """mapping frames as one H.264 video.mp4, or as images/NNNNNN.png"""
    n_queries: int = 20
    """query images (queries/NNNNNN.png) from the other lane, spread over the mapped stretch"""
    fov_x_deg: float = 70.0
    """horizontal field of view; fl_x = fl_y = width / 2 / tan(fov_x / 2)"""
    camera_height_m: float = 1.6
    """height of the mapping camera above the road"""
    pitch_deg: float = 3.0
    """downward pitch of every camera"""
    speed_mps: float = 10.0
    """speed of the mapping camera along +x (10 m/s at 10 fps = 1 m per frame)"""
    lane_y_m: float = -1.75
    """lateral centre of the mapping camera's lane (negative: right lane)"""
    lateral_amplitude_m: float = 0.3
    """amplitude of the sinusoidal lateral sway around the lane centre"""
    lateral_period_s: float = 4.0
    """period of the lateral sway"""
    yaw_amplitude_deg: float = 4.0
    """amplitude of the sinusoidal yaw around the road direction"""
    yaw_period_s: float = 5.0
    """period of the yaw oscillation"""
    query_lane_y_m: float = 1.75
    """lateral centre of the query cameras' lane (positive: left lane)"""
    query_speed_mps: float = 7.0
    """speed of the query camera along +x; sets how its sway maps onto the road"""
    query_height_m: float = 1.45
    """height of the query cameras above the road"""
    pole_spacing_m: float = 15.0
    """mean distance between poles along each side (jittered by up to a quarter of it)"""
    supersample: int = 2
    """rays per pixel along each axis (2: 4 rays averaged per pixel) against aliasing"""
    video_crf: int = 17
    """x264 constant rate factor of video.mp4 (lower: better quality, larger file)"""
    video_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = "medium"
    """x264 speed/size preset"""
    n_points: int = 150_000
    """ground-truth surface samples in points.ply"""
    points_ahead_m: float = 30.0
    """points.ply covers x from the first mapping camera to this far past the last one"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """torch device for rendering (auto: cuda when available)"""
    road: Literal["straight", "curve", "junction"] = "straight"
    """road layout: a straight street, a street with one bend, or a right turn at a crossroads"""
    curve_radius_m: float = 40.0
    """road: curve: radius of the bend at the road's centre line"""
    curve_angle_deg: float = 60.0
    """road: curve: how far the road bends (positive: left, negative: right), centred on the mapped stretch"""
    turn_angle_deg: float = 90.0
    """road: junction: heading change of the right turn into the cross street (90: a square crossroads)"""
    turn_radius_m: float = 12.0
    """road: junction: radius of the right turn at the road's centre line (each lane's: this plus its lane_y_m)"""

    def __post_init__(self) -> None:
        road = ROAD_HALF_WIDTH_M - abs(self.lateral_amplitude_m)
        checks = [  # (ok, key, what is required)
            (self.n_frames >= 2, "n_frames", "must be at least 2"),
            (self.width >= 16, "width", "must be at least 16"),
            (self.height >= 16, "height", "must be at least 16"),
            (self.output != "video" or self.width % 2 == 0, "width", "must be even for output: video (H.264 "
             "yuv420p); use an even width or output: images"),
            (self.output != "video" or self.height % 2 == 0, "height", "must be even for output: video (H.264 "
             "yuv420p); use an even height or output: images"),
            (self.fps > 0, "fps", "must be positive"),
            (self.n_queries >= 0, "n_queries", "must be 0 or more"),
            (10.0 <= self.fov_x_deg <= 150.0, "fov_x_deg", "must lie in [10, 150]"),
            (0.3 <= self.camera_height_m <= 5.0, "camera_height_m", "must lie in [0.3, 5]"),
            (0.3 <= self.query_height_m <= 5.0, "query_height_m", "must lie in [0.3, 5]"),
            (-30.0 <= self.pitch_deg <= 30.0, "pitch_deg", "must lie in [-30, 30]"),
            (self.speed_mps > 0, "speed_mps", "must be positive"),
            (self.query_speed_mps > 0, "query_speed_mps", "must be positive"),
            (abs(self.lane_y_m) < road, "lane_y_m", f"must keep the swaying camera on the road: |lane_y_m| + "
             f"lateral_amplitude_m < {ROAD_HALF_WIDTH_M}"),
            (abs(self.query_lane_y_m) < road, "query_lane_y_m", f"must keep the swaying camera on the road: "
             f"|query_lane_y_m| + lateral_amplitude_m < {ROAD_HALF_WIDTH_M}"),
            (self.lateral_period_s > 0, "lateral_period_s", "must be positive"),
            (self.yaw_period_s > 0, "yaw_period_s", "must be positive"),
            (self.pole_spacing_m >= 2.0, "pole_spacing_m", "must be at least 2"),
            (1 <= self.supersample <= 4, "supersample", "must lie in [1, 4]"),
            (0 <= self.video_crf <= 51, "video_crf", "must lie in [0, 51]"),
            (self.n_points >= 0, "n_points", "must be 0 or more"),
            (self.points_ahead_m >= 0, "points_ahead_m", "must be 0 or more"),
            (20.0 <= self.curve_radius_m <= 1000.0, "curve_radius_m", "must lie in [20, 1000] (the inner "
             "facades stand up to 10 m from the centre line)"),
            (-180.0 <= self.curve_angle_deg <= 180.0, "curve_angle_deg", "must lie in [-180, 180]"),
            (45.0 <= self.turn_angle_deg <= 135.0, "turn_angle_deg", "must lie in [45, 135]"),
            (11.0 <= self.turn_radius_m <= 40.0, "turn_radius_m", "must lie in [11, 40] (the corner buildings "
             "are rounded concentrically, so it must exceed the facades' 8-10 m offset)"),
        ]
        require(self, checks)


@dataclasses.dataclass(frozen=True)
class SynthResult:
    """What `run` wrote and how long it took."""

    out_dir: Path
    n_frames: int
    n_queries: int
    width: int
    height: int
    output: str
    device: str
    n_poles: int
    n_lane_markings: int
    n_points: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class BuildingRow:
    """The buildings along one side: building b spans x in [edges[b], edges[b+1])."""

    facade_y: float
    edges: np.ndarray
    height: np.ndarray
    rgb: np.ndarray
    brick: np.ndarray
    win_spacing: np.ndarray
    win_width: np.ndarray
    floor_h: np.ndarray
    win_height: np.ndarray
    sill: np.ndarray


@dataclasses.dataclass(frozen=True)
class Street:
    """The street: extent, buildings, poles and the centre line's dash phase.

    The straight street (layout None) runs along x in [x_min, x_max] with rows (right, left) of facades at
    y = facade_y. A layout with turns (road: curve or junction) holds its own geometry; there x_min, x_max is
    the arc length range of the centre line the cameras follow and rows are its blocks' building rows.
    """

    x_min: float
    x_max: float
    rows: tuple[BuildingRow, ...]  # straight: right (y < 0), left (y > 0); layout: one per block
    poles_P4: np.ndarray  # x, y, radius, height
    pole_rgb_P3: np.ndarray
    bands_PK2: np.ndarray  # z0, z1 of up to K coloured bands per pole (z0 = z1 = -1: none)
    band_rgb_PK3: np.ndarray
    dash_origin: float  # dashes start at dash_origin + k * (DASH_M + GAP_M)
    layout: Layout | None = None
    pole_seam: np.ndarray | None = None  # per pole, the angle its texture's seam faces (None: +x)

    def dashes(self) -> list[tuple[float, float]]:
        """[x0, x1] of each painted centre-line dash inside the straight street (a layout: Layout.dashes)."""
        if self.layout is not None:
            raise ValueError("a layout's dashes lie along its streets: use street.layout.dashes()")
        period = DASH_M + GAP_M
        k0 = math.floor((self.x_min - self.dash_origin) / period)
        out = []
        for k in range(k0, k0 + int((self.x_max - self.x_min) / period) + 2):
            x0, x1 = self.dash_origin + k * period, self.dash_origin + k * period + DASH_M
            x0, x1 = max(x0, self.x_min), min(x1, self.x_max)
            if x1 > x0:
                out.append((x0, x1))
        return out


def _mm(a) -> np.ndarray:
    """Round layout numbers to millimetres so hdmap.geojson states exactly what is rendered."""
    return np.round(np.asarray(a, float), 3)


def _building_row(rng: np.random.Generator, side: int, x_min: float, x_max: float) -> BuildingRow:
    """Buildings of random length, height, wall and window grid covering [x_min, x_max] on one side."""
    edges = [x_min - 1.0]
    while edges[-1] < x_max + 1.0:
        edges.append(edges[-1] + rng.uniform(8.0, 20.0))
    n = len(edges) - 1
    brick = rng.random(n) < 0.55
    rgb = np.array([
        np.array(BRICK_RGB[rng.integers(len(BRICK_RGB))] if b else PLASTER_RGB[rng.integers(len(PLASTER_RGB))])
        * rng.uniform(0.88, 1.08, 3) for b in brick
    ])
    win_spacing = rng.uniform(2.2, 3.6, n)
    floor_h = rng.uniform(2.8, 3.6, n)
    win_height = floor_h * rng.uniform(0.42, 0.6, n)
    return BuildingRow(
        facade_y=float(_mm(side * rng.uniform(8.0, 10.0))),
        edges=_mm(edges), height=_mm(rng.uniform(7.0, MAX_BUILDING_M, n)), rgb=np.clip(rgb, 0, 1),
        brick=brick, win_spacing=win_spacing, win_width=win_spacing * rng.uniform(0.38, 0.6, n),
        floor_h=floor_h, win_height=win_height, sill=(floor_h - win_height) * rng.uniform(0.35, 0.6, n),
    )


# ---- Road layouts with turns: centre lines of segments and arcs, blocks of kerb, sidewalk and buildings ----

def _wrap(a):
    """Angle(s) wrapped into [-pi, pi) (numpy or torch)."""
    if isinstance(a, torch.Tensor):
        return torch.remainder(a + math.pi, 2 * math.pi) - math.pi
    return np.remainder(np.asarray(a) + math.pi, 2 * math.pi) - math.pi


@dataclasses.dataclass(frozen=True)
class PlanCurve:
    """A 2D curve of straight segments and circular arcs joined with equal headings, by arc length s.

    Piece i starts at arc length s0[i] at (x0[i], y0[i]), heading h0[i] (radians from +x, left positive), and
    runs length[i] metres with curvature k[i] (1 / signed radius: > 0 bends left, 0 straight). Offsets d are
    measured to the left. The first and last pieces are segments, which extend the curve beyond its ends.
    """

    x0: np.ndarray
    y0: np.ndarray
    h0: np.ndarray
    length: np.ndarray
    k: np.ndarray
    s0: np.ndarray

    @staticmethod
    def chain(x: float, y: float, heading: float, s_start: float, pieces: list[tuple[float, float]]) -> PlanCurve:
        """The path from (x, y) heading `heading`, s from `s_start`, of (length, curvature) pieces in order."""
        rows = []
        for length, k in pieces:
            if length <= 0:
                continue
            rows.append((x, y, heading, length, k, s_start))
            x, y = _advance(x, y, heading, length, k)
            heading, s_start = heading + k * length, s_start + length
        return PlanCurve(*np.array(rows, float).T)

    @property
    def s_start(self) -> float:
        return float(self.s0[0])

    @property
    def s_end(self) -> float:
        return float(self.s0[-1] + self.length[-1])

    def index(self, s) -> np.ndarray:
        """Index of the piece holding arc length s (the end pieces also hold what lies beyond)."""
        return np.clip(np.searchsorted(self.s0, s, side="right") - 1, 0, len(self.s0) - 1)

    def point(self, s, d=0.0) -> np.ndarray:
        """(..., 2) points at arc length s, offset d to the left."""
        s = np.asarray(s, float)
        i = self.index(s)
        ds, h0, k = s - self.s0[i], self.h0[i], self.k[i]
        phi = h0 + k * ds
        arc = k != 0
        kk = np.where(arc, k, 1.0)
        ax = np.where(arc, (np.sin(phi) - np.sin(h0)) / kk, ds * np.cos(h0))
        ay = np.where(arc, (np.cos(h0) - np.cos(phi)) / kk, ds * np.sin(h0))
        return np.stack([self.x0[i] + ax - d * np.sin(phi), self.y0[i] + ay + d * np.cos(phi)], -1)

    def heading(self, s) -> np.ndarray:
        """Direction of travel (radians) at arc length s."""
        s = np.asarray(s, float)
        i = self.index(s)
        return self.h0[i] + self.k[i] * (s - self.s0[i])

    def end_point(self, d: float = 0.0) -> np.ndarray:
        """The point at the end of the path, offset d."""
        return self.point(self.s_end, d)

    def offset(self, d: float) -> PlanCurve:
        """The parallel curve d to the left (arcs stay concentric); arc length starts at the same s."""
        scale = 1.0 - self.k * d
        if np.any(scale <= 0):
            raise ValueError(f"offset {d} m reaches past an arc's centre")
        length = self.length * scale
        s0 = self.s0[0] + np.concatenate([[0.0], np.cumsum(length)[:-1]])
        return PlanCurve(self.x0 - d * np.sin(self.h0), self.y0 + d * np.cos(self.h0), self.h0.copy(), length,
                    self.k / scale, s0)

    def reversed(self) -> PlanCurve:
        """The same curve run backwards, arc length from 0 (left and right swap)."""
        ends = np.array([_advance(*a) for a in zip(self.x0, self.y0, self.h0, self.length, self.k)])[::-1]
        length = self.length[::-1].copy()
        return PlanCurve(ends[:, 0].copy(), ends[:, 1].copy(), (self.h0 + self.k * self.length + math.pi)[::-1].copy(),
                    length, -self.k[::-1], np.concatenate([[0.0], np.cumsum(length)[:-1]]))

    def s_on(self, lane: PlanCurve, s_lane: float) -> float:
        """Arc length on this path level with arc length s_lane on its offset curve `lane`."""
        i = int(lane.index(s_lane))
        return float(self.s0[i] + (s_lane - lane.s0[i]) * self.length[i] / lane.length[i])

    def s_of(self, lane: PlanCurve, s: float) -> float:
        """Arc length on the offset curve `lane` level with arc length s on this path."""
        i = int(self.index(s))
        return float(lane.s0[i] + (s - self.s0[i]) * lane.length[i] / self.length[i])

    def polyline(self, s_a: float, s_b: float, d: float = 0.0, max_err_m: float = 1e-3,
                 max_step_m: float = 0.5) -> np.ndarray:
        """(N, 2) vertices from s_a to s_b at offset d: segments' ends and arcs sampled within max_err_m."""
        s = [s_a]
        for i in range(len(self.s0)):
            lo, hi = max(s_a, self.s0[i]), min(s_b, self.s0[i] + self.length[i])
            if i == 0:
                lo = s_a
            if i == len(self.s0) - 1:
                hi = s_b
            if hi <= lo:
                continue
            n = 1
            if self.k[i] != 0:
                radius = abs(1.0 / self.k[i] - d)
                step = min(max_step_m, math.sqrt(8.0 * radius * max_err_m))
                n = max(1, math.ceil((hi - lo) / step))
            s.extend(np.linspace(lo, hi, n + 1)[1:])
        return self.point(np.array(s), d)

    def project(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Road coordinates of points (x, y) from the piece that holds them (nearest when several do).

        Returns s (arc length), d (offset to the left), heading (of the curve at s), k (curvature of the
        piece) and piece (its index).
        """
        n = len(self.s0)
        best = None
        for i in range(n):
            x0, y0, h0, L, k, s0 = (float(a[i]) for a in (self.x0, self.y0, self.h0, self.length, self.k, self.s0))
            if k == 0:
                c, sn = math.cos(h0), math.sin(h0)
                ex, ey = x - x0, y - y0
                along = ex * c + ey * sn
                d = ey * c - ex * sn
                inside = torch.ones_like(d, dtype=torch.bool)
                if i > 0:
                    inside &= along >= 0
                if i < n - 1:
                    inside &= along <= L
                s = along + s0
                heading = torch.full_like(d, h0)
            else:
                rho = 1.0 / k
                sg = 1.0 if k > 0 else -1.0
                vx, vy = x - (x0 - rho * math.sin(h0)), y - (y0 + rho * math.cos(h0))
                d = sg * (abs(rho) - torch.sqrt(vx * vx + vy * vy))
                mid = h0 + k * L / 2
                delta = _wrap(torch.atan2(sg * vx, -sg * vy) - mid)
                inside = delta.abs() <= abs(k) * L / 2 + 1e-6
                s = delta / k + (s0 + L / 2)
                heading = delta + mid
            score = d.abs() + torch.where(inside, 0.0, 1e9)
            cur = {"s": s, "d": d, "heading": heading, "k": torch.full_like(d, k),
                   "piece": torch.full_like(d, i, dtype=torch.int64)}
            if best is None:
                best, best_score = cur, score
            else:
                take = score < best_score
                best = {key: torch.where(take, cur[key], best[key]) for key in best}
                best_score = torch.minimum(score, best_score)
        return best


def _advance(x: float, y: float, heading: float, length: float, k: float) -> tuple[float, float]:
    """End point of a piece of `length` with curvature k from (x, y) heading `heading`."""
    if k == 0:
        return x + length * math.cos(heading), y + length * math.sin(heading)
    phi = heading + k * length
    return x + (math.sin(phi) - math.sin(heading)) / k, y + (math.cos(heading) - math.cos(phi)) / k


@dataclasses.dataclass(frozen=True)
class Block:
    """The roadside between two road edges that meet: kerb line, sidewalk, poles and a row of buildings.

    `kerb` runs along the road's edge with the road on its left; the kerb stone, the sidewalk, the poles and
    the facade lie to its right. The facade is the kerb line moved `facade_m` - ROAD_HALF_WIDTH_M to the right
    (arcs stay concentric); the buildings stand along the facade's own arc length.
    """

    kerb: PlanCurve
    facade: PlanCurve
    facade_m: float  # distance of the facade from the street's centre line
    row: BuildingRow


@dataclasses.dataclass(frozen=True)
class Junction:
    """A crossroads: arms leave the centre (cx, cy); between arms a and a+1 (counter-clockwise) the kerb turns
    on a circular corner centred at corner_xy[a], concentric with the turn, tangent to both arms' edges at
    corner_t[a] from the centre. Arm a belongs to street arm_street[a], whose arc length there is
    arm_s_centre[a] + arm_sign[a] * (distance from the centre).
    """

    cx: float
    cy: float
    arm_angle: np.ndarray  # (A,) ascending in [0, 2 pi)
    arm_length: np.ndarray
    arm_street: np.ndarray
    arm_sign: np.ndarray
    arm_s_centre: np.ndarray
    corner_xy: np.ndarray  # (A, 2)
    corner_t: np.ndarray  # (A,)
    turn_radius: float  # radius of the corners at the centre lines; the kerb's is this - ROAD_HALF_WIDTH_M

    def arm_of(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Index of the arm whose sector (between the bisectors to its neighbours) holds each point."""
        ang = torch.as_tensor(self.arm_angle, dtype=x.dtype, device=x.device)
        nxt = torch.roll(ang, -1)
        gap = torch.remainder(nxt - ang, 2 * math.pi)
        bis = ang + gap / 2  # bisector after each arm
        start = float(bis[-1]) - 2 * math.pi  # sector of arm 0 starts at the last bisector
        rel = torch.remainder(torch.atan2(y - self.cy, x - self.cx) - start, 2 * math.pi)
        return torch.bucketize(rel, bis[:-1] - start, right=True)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A road layout with turns: the centre line the cameras follow, the streets and their roadside blocks.

    Centre dashes run along each street's centre line from dash_origin[i] in steps of DASH_M + GAP_M,
    except across dash_clear[i] (an interval of arc length: the junction).
    """

    kind: str
    drive: PlanCurve
    streets: tuple[PlanCurve, ...]
    dash_origin: tuple[float, ...]
    dash_clear: tuple[tuple[float, float] | None, ...]
    blocks: tuple[Block, ...]
    junction: Junction | None
    tex_half_m: tuple[float, ...]  # half-width of each street's ground texture (junction: main, cross)

    def dashes(self) -> list[tuple[int, float, float]]:
        """(street, s0, s1) of each painted centre-line dash."""
        out = []
        period = DASH_M + GAP_M
        for i, street in enumerate(self.streets):
            lo, hi = street.s_start, street.s_end
            k0 = math.floor((lo - self.dash_origin[i]) / period)
            for k in range(k0, k0 + int((hi - lo) / period) + 2):
                a = self.dash_origin[i] + k * period
                for x0, x1 in _minus((max(a, lo), min(a + DASH_M, hi)), self.dash_clear[i]):
                    out.append((i, x0, x1))
        return out

    def ground_valid(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Whether the ground at (x, y) belongs to the scene (the streets end where their facades do)."""
        # Most points pass a cheap test that implies the full one: short of both end lines of the curve (its
        # end pieces are segments), or nearer the junction's centre than its shortest arm is long.
        if self.junction is None:
            c = self.streets[0]
            (xa, ya), (xb, yb) = c.point(c.s_start), c.end_point()
            ha, hb = float(c.h0[0]), float(c.heading(c.s_end))
            maybe_out = ((x - xa) * math.cos(ha) + (y - ya) * math.sin(ha) < 0) | \
                ((x - xb) * math.cos(hb) + (y - yb) * math.sin(hb) > 0)
        else:
            j = self.junction
            maybe_out = (x - j.cx) ** 2 + (y - j.cy) ** 2 > float(j.arm_length.min()) ** 2
        valid = torch.ones_like(x, dtype=torch.bool)
        idx = maybe_out.nonzero().squeeze(1)
        if idx.numel():
            valid[idx] = self._ground_valid(x[idx], y[idx])
        return valid

    def _ground_valid(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ground_valid by the street or arm that holds each point."""
        if self.junction is None:
            s = self.streets[0].project(x, y)["s"]
            return (s >= self.streets[0].s_start) & (s <= self.streets[0].s_end)
        j = self.junction
        arm = j.arm_of(x, y)
        ang = torch.as_tensor(j.arm_angle, dtype=x.dtype, device=x.device)[arm]
        along = (x - j.cx) * torch.cos(ang) + (y - j.cy) * torch.sin(ang)
        return along <= torch.as_tensor(j.arm_length, dtype=x.dtype, device=x.device)[arm]

    def ground_frame(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Road coordinates of ground points for shading.

        along, across: coordinates of the kerb, sidewalk and marking patterns (across: signed distance
        from the street's centre line; round a junction's corner, the distance from the turn's centre line
        arc, so that kerb and edge line follow the corner); along_dir: angle of the direction `along` grows
        in, along_scale: metres of `along` per metre there; across_dir likewise; dash_s, dash_w: position in
        the centre-dash pattern and its weight (0 where there are no dashes); block: the roadside there;
        valid: ground that belongs to the scene.
        """
        if self.junction is None:
            street = self.streets[0]
            p = street.project(x, y)
            along_dir = p["heading"]
            return {"along": p["s"], "across": p["d"], "along_dir": along_dir,
                    "along_scale": 1.0 / (1.0 - p["k"] * p["d"]),
                    "across_dir": along_dir + math.pi / 2, "dash_s": p["s"] - self.dash_origin[0],
                    "dash_w": None, "block": (p["d"] > 0).to(torch.int64),
                    "valid": (p["s"] >= street.s_start) & (p["s"] <= street.s_end)}
        j = self.junction
        dev, dt = x.device, x.dtype

        def t(a):
            return torch.as_tensor(np.asarray(a), dtype=dt, device=dev)

        n_arms = len(j.arm_angle)
        arm = j.arm_of(x, y)
        ang = t(j.arm_angle)[arm]
        ca, sa = torch.cos(ang), torch.sin(ang)
        ex, ey = x - j.cx, y - j.cy
        s = ex * ca + ey * sa
        d = ey * ca - ex * sa
        block = torch.where(d >= 0, arm, torch.remainder(arm - 1, n_arms))
        cx, cy = t(j.corner_xy[:, 0])[block], t(j.corner_xy[:, 1])[block]
        corner = s < t(j.corner_t)[block]
        vx, vy = x - cx, y - cy
        rp = torch.sqrt(vx * vx + vy * vy).clamp(min=1e-6)
        sign = t(j.arm_sign)[arm]
        street = t(j.arm_street).to(torch.int64)[arm]
        along_street = t(j.arm_s_centre)[arm] + sign * s
        across_street = sign * d
        # Round the corner: `along` is the arc length on the kerb circle, `across` the distance from the turn's
        # centre line arc toward the kerb, so the kerb stone, the edge line and the paving rows turn with the
        # corner; on the junction's side of that arc the road is open (0: no kerb, no line).
        kerb_r = j.turn_radius - ROAD_HALF_WIDTH_M
        radial = torch.atan2(vy, vx)
        along_corner = kerb_r * _wrap(radial - torch.atan2(j.cy - cy, j.cx - cx))
        across_corner = torch.where(across_street >= 0, 1.0, -1.0) * (j.turn_radius - rp).clamp(min=0.0)
        origin = t(self.dash_origin)[street]
        lo, hi = t([c[0] for c in self.dash_clear])[street], t([c[1] for c in self.dash_clear])[street]
        return {
            "along": torch.where(corner, along_corner, along_street),
            "across": torch.where(corner, across_corner, across_street),
            "along_dir": torch.where(corner, radial + math.pi / 2, ang),
            "along_scale": torch.where(corner, kerb_r / rp, torch.ones_like(rp)),
            "across_dir": torch.where(corner, radial, ang + math.pi / 2),
            "dash_s": along_street - origin, "dash_lo": lo, "dash_hi": hi, "dash_street_s": along_street,
            "dash_w": (~corner).to(dt), "block": block,
            "valid": s <= t(j.arm_length)[arm],
        }


def _minus(iv: tuple[float, float], cut: tuple[float, float] | None) -> list[tuple[float, float]]:
    """The interval iv without the open interval cut (empty intervals dropped)."""
    a, b = iv
    if cut is None:
        return [iv] if b > a else []
    parts = [(a, min(b, cut[0])), (max(a, cut[1]), b)]
    return [(x0, x1) for x0, x1 in parts if x1 > x0]


KERB_M = KERB_OUTER_M - ROAD_HALF_WIDTH_M  # width of the kerb stone
EDGE_INSET_M = ROAD_HALF_WIDTH_M - EDGE_LINE_Y_M  # edge line centre inside the road edge


def _drive_path(params: SynthParams, k: float, arc_m: float) -> tuple[PlanCurve, float, float]:
    """Centre line the cameras follow: straight from the first camera, one arc of curvature k (arc_m long at
    the centre line) centred on the mapped stretch of the mapping lane, straight on to AHEAD_M past the last
    camera. Returns the path, where the arc starts and the arc length of the last camera's centre line point.
    """
    stretch = _stretch_m(params)
    lane_arc = arc_m * (1.0 - k * params.lane_y_m)
    s_arc = max(0.0, (stretch - lane_arc) / 2)
    long = PlanCurve.chain(-BEHIND_M, 0.0, 0.0, -BEHIND_M, [(BEHIND_M + s_arc, 0.0), (arc_m, k), (stretch + 1.0, 0.0)])
    s_last = long.s_on(long.offset(params.lane_y_m), stretch)
    tail = max(0.0, s_last - s_arc - arc_m) + AHEAD_M
    drive = PlanCurve.chain(-BEHIND_M, 0.0, 0.0, -BEHIND_M, [(BEHIND_M + s_arc, 0.0), (arc_m, k), (tail, 0.0)])
    return drive, s_arc, s_last


def _block(rng: np.random.Generator, kerb: PlanCurve) -> Block:
    """The roadside along `kerb`: a random building row (its offset 8-10 m from the centre line)."""
    lengths = [kerb.offset(-(f - ROAD_HALF_WIDTH_M)).length.sum() for f in (8.0, 10.0)]
    row = _building_row(rng, 1, kerb.s_start, kerb.s_start + max(lengths))
    facade_m = float(row.facade_y)
    return Block(kerb=kerb, facade=kerb.offset(-(facade_m - ROAD_HALF_WIDTH_M)), facade_m=facade_m, row=row)


def build_layout(params: SynthParams, rng: np.random.Generator) -> Layout:
    """The layout of road `params.road` (curve or junction): centre lines, corners and roadside blocks."""
    if params.road == "curve":
        ang = math.radians(params.curve_angle_deg)
        k = math.copysign(1.0 / params.curve_radius_m, ang) if ang else 0.0
        drive, _, _ = _drive_path(params, k, abs(ang) * params.curve_radius_m)
        blocks = (_block(rng, drive.offset(-ROAD_HALF_WIDTH_M)),  # right side, then left (run backwards)
                  _block(rng, drive.offset(ROAD_HALF_WIDTH_M).reversed()))
        half = max(b.facade_m for b in blocks) + 0.5
        origin = float(_mm(drive.s_start + rng.uniform(0.0, DASH_M + GAP_M)))
        return Layout(kind="curve", drive=drive, streets=(drive,), dash_origin=(origin,), dash_clear=(None,),
                      blocks=blocks, junction=None, tex_half_m=(half,))

    theta, radius = math.radians(params.turn_angle_deg), params.turn_radius_m
    drive, s_arc, s_last = _drive_path(params, -1.0 / radius, radius * theta)
    tan_turn = radius * math.tan(theta / 2)  # from the junction's centre to where the turn meets each arm
    cx = s_arc + tan_turn
    # Arms counter-clockwise from straight on: straight on, left, back (where the cameras come from), right.
    angle = np.array([0.0, math.pi - theta, math.pi, 2 * math.pi - theta])
    gap = np.roll(angle, -1) - angle
    gap[-1] += 2 * math.pi
    corner_t = radius / np.tan(gap / 2)
    reach = np.maximum(corner_t, np.roll(corner_t, 1))  # each arm's farther corner tangent point
    length = np.array([AHEAD_M, AHEAD_M, cx + BEHIND_M, drive.s_end - (s_arc + radius * theta) + tan_turn])
    length = np.maximum(length, reach + 10.0)
    bis = angle + gap / 2
    corner_xy = np.stack([cx + radius / np.sin(gap / 2) * np.cos(bis), radius / np.sin(gap / 2) * np.sin(bis)], 1)
    kerb_r = radius - ROAD_HALF_WIDTH_M
    blocks = []
    for a in range(4):
        b = (a + 1) % 4
        ua, na = np.array([math.cos(angle[a]), math.sin(angle[a])]), np.array([-math.sin(angle[a]), math.cos(angle[a])])
        start = np.array([cx, 0.0]) + length[a] * ua + ROAD_HALF_WIDTH_M * na
        kerb = PlanCurve.chain(float(start[0]), float(start[1]), float(angle[a] + math.pi), 0.0, [
            (float(length[a] - corner_t[a]), 0.0), (float(kerb_r * (math.pi - gap[a])), -1.0 / kerb_r),
            (float(length[b] - corner_t[a]), 0.0)])
        blocks.append(_block(rng, kerb))
    u_back = np.array([math.cos(angle[1]), math.sin(angle[1])])
    main_start = float(cx - length[2])
    main = PlanCurve.chain(main_start, 0.0, 0.0, main_start, [(float(length[2] + length[0]), 0.0)])
    cross_start = np.array([cx, 0.0]) + length[1] * u_back
    cross = PlanCurve.chain(float(cross_start[0]), float(cross_start[1]), -theta, float(-length[1]),
                       [(float(length[1] + length[3]), 0.0)])
    junction = Junction(cx=float(cx), cy=0.0, arm_angle=angle, arm_length=length, arm_street=np.array([0, 1, 0, 1]),
                        arm_sign=np.array([1.0, -1.0, -1.0, 1.0]), arm_s_centre=np.array([cx, 0.0, cx, 0.0]),
                        corner_xy=corner_xy, corner_t=corner_t, turn_radius=radius)
    facade_max = max(b.facade_m for b in blocks)
    # Round a corner the sidewalk reaches past the facades' offset: the cross street's texture covers it.
    corner_excess = max((radius - b.facade_m) * (1.0 - math.sin(g / 2)) for b, g in zip(blocks, gap))
    origins = tuple(float(_mm(s.s_start + rng.uniform(0.0, DASH_M + GAP_M))) for s in (main, cross))
    return Layout(kind="junction", drive=drive, streets=(main, cross), dash_origin=origins,
                  dash_clear=((cx - reach[2], cx + reach[0]), (-reach[1], reach[3])), blocks=tuple(blocks),
                  junction=junction, tex_half_m=(facade_max + 0.5, facade_max + corner_excess + 0.5))


def _layout_poles(rng: np.random.Generator, layout: Layout, spacing: float):
    """Poles along every block's sidewalk by arc length: (x, y, radius, height), colours, bands, seam angles."""
    poles, pole_rgb, bands, band_rgb, seam = [], [], [], [], []
    jitter = spacing / 4
    for blk in layout.blocks:
        u = blk.kerb.s_start + rng.uniform(0.0, spacing)
        while u < blk.kerb.s_end - 1.0:
            xy = blk.kerb.point(u, -(KERB_M + rng.uniform(0.3, 0.7)))
            poles.append([xy[0], xy[1], rng.uniform(0.08, 0.15), rng.uniform(4.0, POLE_MAX_H_M)])
            _pole_style(rng, pole_rgb, bands, band_rgb)
            seam.append(float(blk.kerb.heading(u)) - math.pi / 2)  # the texture's seam faces the buildings
            u += spacing + rng.uniform(-jitter, jitter)
    return poles, pole_rgb, bands, band_rgb, np.array(seam)


def _pole_style(rng: np.random.Generator, pole_rgb: list, bands: list, band_rgb: list) -> None:
    """Draw one pole's colour and up to three coloured bands (z0, z1; -1: none) onto the lists."""
    pole_rgb.append(np.array(POLE_RGB[rng.integers(len(POLE_RGB))]) * rng.uniform(0.9, 1.1))
    zb = np.full((3, 2), -1.0)
    rgb = np.zeros((3, 3))
    for k in range(rng.integers(0, 4)):
        z0 = rng.uniform(0.6, 3.5)
        zb[k] = (z0, z0 + rng.uniform(0.08, 0.4))
        rgb[k] = BAND_RGB[rng.integers(len(BAND_RGB))]
    bands.append(zb)
    band_rgb.append(rgb)


def build_street(params: SynthParams) -> Street:
    """The street layout for `params` (extent from the trajectory; everything random from the seed)."""
    rng = np.random.default_rng([params.seed, 1])
    if params.road != "straight":
        layout = build_layout(params, rng)
        poles, pole_rgb, bands, band_rgb, seam = _layout_poles(rng, layout, params.pole_spacing_m)
        return Street(
            x_min=layout.drive.s_start, x_max=layout.drive.s_end, rows=tuple(b.row for b in layout.blocks),
            poles_P4=_mm(poles).reshape(-1, 4), pole_rgb_P3=np.clip(np.array(pole_rgb).reshape(-1, 3), 0, 1),
            bands_PK2=np.array(bands).reshape(-1, 3, 2), band_rgb_PK3=np.array(band_rgb).reshape(-1, 3, 3),
            dash_origin=layout.dash_origin[0], layout=layout, pole_seam=seam,
        )
    x_min, x_max = -BEHIND_M, _stretch_m(params) + AHEAD_M
    rows = (_building_row(rng, -1, x_min, x_max), _building_row(rng, +1, x_min, x_max))
    poles, pole_rgb, bands, band_rgb = [], [], [], []
    jitter = params.pole_spacing_m / 4
    for side in (-1, 1):
        x = x_min + rng.uniform(0.0, params.pole_spacing_m)
        while x < x_max - 1.0:
            poles.append([x, side * (KERB_OUTER_M + rng.uniform(0.3, 0.7)), rng.uniform(0.08, 0.15),
                          rng.uniform(4.0, POLE_MAX_H_M)])
            _pole_style(rng, pole_rgb, bands, band_rgb)
            x += params.pole_spacing_m + rng.uniform(-jitter, jitter)
    return Street(
        x_min=x_min, x_max=x_max, rows=rows, poles_P4=_mm(poles).reshape(-1, 4),
        pole_rgb_P3=np.clip(np.array(pole_rgb).reshape(-1, 3), 0, 1), bands_PK2=np.array(bands).reshape(-1, 3, 2),
        band_rgb_PK3=np.array(band_rgb).reshape(-1, 3, 3),
        dash_origin=float(_mm(x_min + rng.uniform(0.0, DASH_M + GAP_M))),
    )


# ---- Cameras ----

def _stretch_m(params: SynthParams) -> float:
    """Distance the mapping camera drives from its first to its last frame."""
    return params.speed_mps * (params.n_frames - 1) / params.fps


def intrinsics(params: SynthParams) -> tuple[float, float, float, float]:
    """fx, fy, cx, cy of the pinhole camera (square pixels, centred principal point)."""
    f = params.width / 2 / math.tan(math.radians(params.fov_x_deg) / 2)
    return f, f, params.width / 2, params.height / 2


def _pose(x: float, y: float, z: float, yaw: float, pitch: float) -> np.ndarray:
    """cam_from_world of a camera at (x, y, z) heading `yaw` from +x (left positive), pitched down."""
    forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), -math.sin(pitch)])
    center = np.array([x, y, z])
    return look_at_cam_from_world(center, center + forward)


def trajectories(params: SynthParams, layout: Layout | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """cam_from_world (3x4) of the mapping frames and of the query frames (along `layout` when given)."""
    rng = np.random.default_rng([params.seed, 2])
    ph = rng.uniform(0.0, 2 * math.pi, 4)
    yaw_amp, pitch = math.radians(params.yaw_amplitude_deg), math.radians(params.pitch_deg)
    if layout is None and params.road != "straight":
        layout = build_street(params).layout
    if layout is not None:
        return _layout_trajectories(params, layout.drive, ph)

    def at(t: float, x: float, lane: float, z: float, ph_lat: float, ph_yaw: float) -> np.ndarray:
        y = lane + params.lateral_amplitude_m * math.sin(2 * math.pi * t / params.lateral_period_s + ph_lat)
        yaw = yaw_amp * math.sin(2 * math.pi * t / params.yaw_period_s + ph_yaw)
        return _pose(x, y, z, yaw, pitch)

    mapping = []
    for i in range(params.n_frames):
        t = i / params.fps
        mapping.append(at(t, params.speed_mps * t, params.lane_y_m, params.camera_height_m, ph[0], ph[1]))
    # Queries sit at the midpoints of n_queries equal parts of the mapped stretch, so every one is seen by
    # mapping frames on both sides; their own speed sets where along their sway each one falls.
    queries = []
    for k in range(params.n_queries):
        x = _stretch_m(params) * (k + 0.5) / params.n_queries
        queries.append(at(x / params.query_speed_mps, x, params.query_lane_y_m, params.query_height_m,
                          ph[2], ph[3]))
    return mapping, queries


def _layout_trajectories(params: SynthParams, drive: PlanCurve, ph: np.ndarray):
    """Mapping and query poses along a layout's centre line: each camera keeps to its lane (an offset of the
    centre line) at its speed along the lane, swaying across it and yawing about its heading as on the
    straight street."""
    yaw_amp, pitch = math.radians(params.yaw_amplitude_deg), math.radians(params.pitch_deg)

    def at(lane_curve: PlanCurve, t: float, s: float, z: float, ph_lat: float, ph_yaw: float) -> np.ndarray:
        sway = params.lateral_amplitude_m * math.sin(2 * math.pi * t / params.lateral_period_s + ph_lat)
        yaw = yaw_amp * math.sin(2 * math.pi * t / params.yaw_period_s + ph_yaw)
        x, y = lane_curve.point(s, sway)
        return _pose(float(x), float(y), z, float(lane_curve.heading(s)) + yaw, pitch)

    lane = drive.offset(params.lane_y_m)
    mapping = []
    for i in range(params.n_frames):
        t = i / params.fps
        mapping.append(at(lane, t, params.speed_mps * t, params.camera_height_m, ph[0], ph[1]))
    # Queries: the midpoints of n_queries equal parts of the mapped stretch (on the centre line), in their lane.
    qlane = drive.offset(params.query_lane_y_m)
    s_last = drive.s_on(lane, _stretch_m(params))
    queries = []
    for k in range(params.n_queries):
        sq = drive.s_of(qlane, s_last * (k + 0.5) / params.n_queries)
        queries.append(at(qlane, sq / params.query_speed_mps, sq, params.query_height_m, ph[2], ph[3]))
    return mapping, queries


# ---- Textures ----

def noise_texture(rng: np.random.Generator, h: int, w: int, octaves: list[tuple[int, float]],
                  speckle: float = 0.0) -> np.ndarray:
    """Zero-mean, unit-std multi-octave value noise (h x w, float32); never periodic within the array.

    Each octave is a random lattice with `cell` texels between lattice points, bicubically upsampled and
    weighted by `amp`. `speckle` adds sparse one-texel bright grains and dark pits (asphalt chippings).
    """
    acc = np.zeros((h, w), np.float32)
    for cell, amp in octaves:
        gh, gw = h // cell + 4, w // cell + 4
        lattice = rng.standard_normal((gh, gw)).astype(np.float32)
        up = lattice if cell == 1 else cv2.resize(lattice, (gw * cell, gh * cell), interpolation=cv2.INTER_CUBIC)
        oy, ox = rng.integers(0, cell, 2) + cell  # random sub-cell offset so lattices do not line up
        acc += amp * up[oy:oy + h, ox:ox + w]
    if speckle:
        grains = rng.standard_normal((h, w)).astype(np.float32)
        acc += speckle * (np.maximum(grains - 1.5, 0.0) - np.maximum(-grains - 2.0, 0.0)) * acc.std() * 4
    acc -= acc.mean()
    acc /= acc.std() + 1e-12
    return acc


def _mip_shape(h: int, w: int) -> tuple[int, int, int]:
    """Padded (h, w) and level count such that every level halves the previous one exactly."""
    levels = max(1, int(math.log2(min(h, w) / 8)) + 1)
    m = 2 ** (levels - 1)
    return -(-h // m) * m, -(-w // m) * m, levels


class MipTexture:
    """A one-channel texture over a world rectangle, mip-mapped, sampled bilinearly between levels."""

    def __init__(self, img_HW: np.ndarray, origin_uv: tuple[float, float], texel_m: float, levels: int,
                 device: str):
        self.levels: list[torch.Tensor] = []
        level = np.ascontiguousarray(img_HW, np.float32)
        for _ in range(levels):
            self.levels.append(torch.from_numpy(level)[None, None].to(device))
            # INTER_AREA to exactly half the size is the 2x2 box average
            level = cv2.resize(level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA)
        self.u0, self.v0 = origin_uv
        self.extent_u, self.extent_v = img_HW.shape[1] * texel_m, img_HW.shape[0] * texel_m
        self.texel_m = texel_m

    def level_of(self, footprint_m: torch.Tensor) -> torch.Tensor:
        """Fractional mip level for a footprint in metres."""
        return torch.log2(footprint_m.clamp(min=1e-6) / self.texel_m).clamp(0.0, len(self.levels) - 1.0)

    def sample(self, u: torch.Tensor, v: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Texture values at world coordinates (u, v), trilinear between the two nearest levels."""
        gu = (u - self.u0) * (2.0 / self.extent_u) - 1.0
        gv = (v - self.v0) * (2.0 / self.extent_v) - 1.0
        lo = level.floor().to(torch.int64)
        frac = level - lo
        out = torch.empty_like(u)
        for lvl in range(len(self.levels)):
            sel = (lo == lvl).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            grid = torch.stack([gu[sel], gv[sel]], dim=-1).view(1, 1, -1, 2)
            a = F.grid_sample(self.levels[lvl], grid, mode="bilinear", padding_mode="border",
                              align_corners=False).view(-1)
            if lvl + 1 < len(self.levels):
                b = F.grid_sample(self.levels[lvl + 1], grid, mode="bilinear", padding_mode="border",
                                  align_corners=False).view(-1)
                a = a + (b - a) * frac[sel]
            out[sel] = a
        return out


def _make_texture(rng: np.random.Generator, origin_uv: tuple[float, float], size_uv: tuple[float, float],
                  texel_m: float, octaves: list[tuple[int, float]], speckle: float, device: str) -> MipTexture:
    """A noise MipTexture covering `size_uv` metres from `origin_uv`."""
    h, w, levels = _mip_shape(int(math.ceil(size_uv[1] / texel_m)), int(math.ceil(size_uv[0] / texel_m)))
    return MipTexture(noise_texture(rng, h, w, octaves, speckle), origin_uv, texel_m, levels, device)


# ---- Filtered patterns: the fraction of a footprint [x - fp/2, x + fp/2] a pattern covers ----

def _stripes(x: torch.Tensor, period: float | torch.Tensor, width: float | torch.Tensor,
             fp: torch.Tensor) -> torch.Tensor:
    """Coverage of stripes [k*period, k*period + width] box-filtered over a footprint (no moire far away)."""
    def integral(s: torch.Tensor) -> torch.Tensor:
        k = torch.floor(s / period)
        return k * width + (s - k * period).clamp(min=0.0).minimum(torch.as_tensor(width, device=s.device))

    fp = fp.clamp(min=1e-4)
    return ((integral(x + fp / 2) - integral(x - fp / 2)) / fp).clamp(0.0, 1.0)


def _box(x: torch.Tensor, lo: float | torch.Tensor, hi: float | torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Coverage of the interval [lo, hi] box-filtered over a footprint."""
    fp = fp.clamp(min=1e-4)
    inside = torch.minimum(x + fp / 2, torch.as_tensor(hi, device=x.device)) - \
        torch.maximum(x - fp / 2, torch.as_tensor(lo, device=x.device))
    return (inside / fp).clamp(0.0, 1.0)


def _hash01(i: torch.Tensor, j: torch.Tensor, salt: int | torch.Tensor) -> torch.Tensor:
    """Deterministic pseudo-random value in [0, 1] per integer cell (i, j); integer-only, so exact anywhere."""
    # 32-bit multiply-xorshift mixing in int64; multipliers below 2^31 keep every product below 2^63.
    h = (i.to(torch.int64) * 73856093 + j.to(torch.int64) * 19349663 + salt * 83492791) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return h.to(torch.float32) / 4294967296.0


def _lerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a + (b - a) * w with w broadcast over the colour channels."""
    return a + (b - a) * w[:, None]


def _mip_footprint(fp_a: torch.Tensor, fp_b: torch.Tensor) -> torch.Tensor:
    """Footprint that picks the mip level: the minor axis, unless the major one is MAX_ANISO times longer."""
    return torch.maximum(torch.minimum(fp_a, fp_b), torch.maximum(fp_a, fp_b) / MAX_ANISO)


def _rgb(values, device: str) -> torch.Tensor:
    """A colour (or colours) as a float32 tensor on `device`."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def _piece(curve: PlanCurve, i: int) -> tuple[float, float, float, float, float, float]:
    """x0, y0, h0, length, k, s0 of piece i as floats."""
    return tuple(float(a[i]) for a in (curve.x0, curve.y0, curve.h0, curve.length, curve.k, curve.s0))


def _hit_wall(facade: PlanCurve, i: int, ox: float, oy: float, dx: torch.Tensor, dy: torch.Tensor):
    """Ray parameter t (inf: miss) and facade arc length u where rays from (ox, oy) meet piece i of a facade.

    A facade is one-sided: it faces the road, on its left. A segment is a vertical plane, an arc a vertical
    cylinder: seen from outside when it bends right (a corner building), from inside when it bends left.
    """
    x0, y0, h0, length, k, s0 = _piece(facade, i)
    inf = torch.full_like(dx, float("inf"))
    if k == 0:
        c, sn = math.cos(h0), math.sin(h0)
        front = (oy - y0) * c - (ox - x0) * sn  # the origin's distance in front of the wall
        if front <= 0:
            return inf, torch.zeros_like(dx)
        dn = dy * c - dx * sn
        toward = dn < -1e-9
        t = torch.where(toward, front / torch.where(toward, -dn, torch.ones_like(dn)), inf)
        along = ((ox - x0) * c + (oy - y0) * sn) + t * (dx * c + dy * sn)
        t = torch.where(toward & (along >= 0) & (along <= length), t, inf)
        return t, along + s0
    rho = 1.0 / k
    radius, sg = abs(rho), (1.0 if k > 0 else -1.0)
    ex, ey = ox - (x0 - rho * math.sin(h0)), oy - (y0 + rho * math.cos(h0))
    hn = torch.sqrt(dx * dx + dy * dy).clamp(min=1e-12)
    nx, ny = dx / hn, dy / hn
    along = -(ex * nx + ey * ny)  # horizontal distance to the closest approach to the axis
    perp = ex * ny - ey * nx
    half = torch.sqrt((radius * radius - perp * perp).clamp(min=0.0))
    t = (along + sg * half) / hn  # bends left: the far side (from inside); bends right: the near side
    hx, hy = ex + t * dx, ey + t * dy
    mid = h0 + k * length / 2
    delta = _wrap(torch.atan2(sg * hx, -sg * hy) - mid)
    ok = (perp.abs() <= radius) & (t > 0) & (delta.abs() <= abs(k) * length / 2)
    return torch.where(ok, t, inf), delta / k + (s0 + length / 2)


def _wall_light(nx: torch.Tensor, ny: torch.Tensor) -> torch.Tensor:
    """Sun light on walls with horizontal normal (nx, ny): as on the straight street, where the facade facing
    +y gets 1 and the one facing -y 0.62."""
    return 0.62 + 0.38 * (nx * float(SUN_3[0]) + ny * float(SUN_3[1])).clamp(min=0.0) / float(SUN_3[1])


# ---- The renderer ----

class Renderer:
    """Ray caster of one street on one torch device."""

    def __init__(self, street: Street, seed: int, device: str):
        self.street, self.device = street, device
        self.layout = street.layout
        dev = device
        rng = np.random.default_rng([seed, 3])
        # Pink-ish octave weights: 2 cm grain dominates close up, metre-scale patches survive far away.
        ground_octaves = [(1, 1.0), (2, 0.8), (4, 0.6), (8, 0.5), (16, 0.45), (32, 0.45), (64, 0.4), (128, 0.35)]
        facade_octaves = [(1, 0.8), (2, 0.8), (4, 0.7), (8, 0.6), (16, 0.6), (64, 0.5)]
        if self.layout is None:
            y_max = max(abs(r.facade_y) for r in street.rows) + 0.5
            length = street.x_max - street.x_min
            self.ground = _make_texture(rng, (street.x_min, -y_max), (length, 2 * y_max), GROUND_TEXEL_M,
                                        ground_octaves, 0.6, dev)
            self.facades = [
                _make_texture(rng, (street.x_min - 1.0, 0.0), (length + 2.0, MAX_BUILDING_M + 1.0), FACADE_TEXEL_M,
                              facade_octaves, 0.3, dev)
                for _ in street.rows
            ]
        else:
            # One ground texture per street in its own (arc length, offset) coordinates; facades along each
            # block's facade arc length.
            self.grounds = [
                _make_texture(rng, (c.s_start, -half), (c.s_end - c.s_start, 2 * half), GROUND_TEXEL_M,
                              ground_octaves, 0.6, dev)
                for c, half in zip(self.layout.streets, self.layout.tex_half_m)
            ]
            self.ground = self.grounds[0]
            self.facades = [
                _make_texture(rng, (b.facade.s_start - 1.0, 0.0), (b.facade.s_end - b.facade.s_start + 2.0,
                              MAX_BUILDING_M + 1.0), FACADE_TEXEL_M, facade_octaves, 0.3, dev)
                for b in self.layout.blocks
            ]
        n_poles = max(1, len(street.poles_P4))
        self.pole_tex = _make_texture(rng, (0.0, 0.0), (n_poles * POLE_STRIP_M, POLE_MAX_H_M + 0.5), POLE_TEXEL_M,
                                      [(1, 0.6), (2, 0.8), (4, 0.8), (8, 0.6), (32, 0.5)], 0.0, dev)
        self.rows = [{k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=dev)
                      for k, v in dataclasses.asdict(r).items() if k != "facade_y"} for r in street.rows]
        self.poles = torch.as_tensor(street.poles_P4, dtype=torch.float32, device=dev)
        self.pole_rgb = torch.as_tensor(street.pole_rgb_P3, dtype=torch.float32, device=dev)
        self.bands = torch.as_tensor(street.bands_PK2, dtype=torch.float32, device=dev)
        self.band_rgb = torch.as_tensor(street.band_rgb_PK3, dtype=torch.float32, device=dev)
        self.pole_seam = None if street.pole_seam is None else \
            torch.as_tensor(street.pole_seam, dtype=torch.float32, device=dev)
        self.salt = int(np.random.default_rng([seed, 4]).integers(1, 2**20))
        self._dirs_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- rays and intersections --

    def _cam_dirs(self, w: int, h: int, K: tuple[float, float, float, float], ss: int):
        """Camera-frame ray directions (z = 1) through the ss x ss sub-pixel centres, each (h*ss, w*ss)."""
        key = (w, h, K, ss)
        if key not in self._dirs_cache:
            fx, fy, cx, cy = K
            u = (torch.arange(w * ss, device=self.device, dtype=torch.float64) + 0.5) / ss
            v = (torch.arange(h * ss, device=self.device, dtype=torch.float64) + 0.5) / ss
            a = ((u - cx) / fx).to(torch.float32)
            b = ((v - cy) / fy).to(torch.float32)
            self._dirs_cache[key] = (a[None, :].expand(h * ss, w * ss), b[:, None].expand(h * ss, w * ss))
        return self._dirs_cache[key]

    def _intersect(self, cam_from_world: np.ndarray, w: int, h: int, K, ss: int):
        """Nearest hit of every ray: z-depth t, material, object index, and the world ray directions."""
        R, tvec = cam_from_world[:, :3], cam_from_world[:, 3]
        o = -R.T @ tvec
        a, b = self._cam_dirs(w, h, K, ss)
        # world direction = R^T (a, b, 1); written out so the result never depends on a BLAS library
        d = [a * float(R[0, k]) + b * float(R[1, k]) + float(R[2, k]) for k in range(3)]
        dx, dy, dz = d
        ox, oy, oz = (float(v) for v in o)
        st = self.street
        inf = torch.tensor(float("inf"), device=self.device)

        # ground z = 0: t along (unnormalised, camera z = 1) directions is the z-depth
        tg = torch.where(dz < -1e-9, -oz / dz.clamp(max=-1e-9), inf)
        if self.layout is not None:
            tbest, mat, obj = self._intersect_layout(cam_from_world, w, h, K, ss, tg, d, (ox, oy, oz))
        else:
            xg = ox + tg * dx
            tbest = torch.where((xg >= st.x_min) & (xg <= st.x_max), tg, inf)
            mat = torch.where(torch.isfinite(tbest), GROUND, SKY).to(torch.uint8)

            for side, row in enumerate(st.rows):
                toward = (dy < -1e-9) if row.facade_y < 0 else (dy > 1e-9)
                tf = torch.where(toward, (row.facade_y - oy) / torch.where(toward, dy, torch.ones_like(dy)), inf)
                xf, zf = ox + tf * dx, oz + tf * dz
                rowt = self.rows[side]
                bi = (torch.bucketize(xf.clamp(st.x_min, st.x_max), rowt["edges"], right=True) - 1).clamp(
                    0, len(row.height) - 1)
                ok = toward & (xf >= st.x_min) & (xf <= st.x_max) & (zf >= 0) & (zf <= rowt["height"][bi])
                ok &= tf < tbest
                tbest = torch.where(ok, tf, tbest)
                mat = torch.where(ok, FACADE_RIGHT + side, mat)

            obj = torch.full_like(mat, -1, dtype=torch.int32)
        for p, (px, py, r, ph) in enumerate(st.poles_P4):
            box = self._pole_box(cam_from_world, (px, py, r, ph), K, w, h, ss)
            if box is None:
                continue
            r0, r1, c0, c1 = box
            sdx, sdy, sdz = dx[r0:r1, c0:c1], dy[r0:r1, c0:c1], dz[r0:r1, c0:c1]
            ex, ey = ox - px, oy - py
            hn = torch.sqrt(sdx * sdx + sdy * sdy).clamp(min=1e-12)
            nx, ny = sdx / hn, sdy / hn
            along = -(ex * nx + ey * ny)  # horizontal distance to the closest approach
            perp = ex * ny - ey * nx  # signed closest horizontal distance: a 2D cross product, no cancellation
            half = torch.sqrt((r * r - perp * perp).clamp(min=0.0))
            tp = (along - half) / hn
            zp = oz + tp * sdz
            sub_t = tbest[r0:r1, c0:c1]
            ok = (perp.abs() <= r) & (tp > 0) & (zp >= 0) & (zp <= ph) & (tp < sub_t)
            tbest[r0:r1, c0:c1] = torch.where(ok, tp, sub_t)
            mat[r0:r1, c0:c1] = torch.where(ok, POLE, mat[r0:r1, c0:c1])
            obj[r0:r1, c0:c1] = torch.where(ok, p, obj[r0:r1, c0:c1])
        return tbest, mat, obj, (dx, dy, dz), (ox, oy, oz)

    def _intersect_layout(self, cam_from_world, w, h, K, ss, tg, d, o):
        """Nearest hit on the ground and the blocks' facades of a layout: z-depth, material, object index."""
        dx, dy, dz = d
        ox, oy, oz = o
        lay = self.layout
        hit = torch.isfinite(tg).reshape(-1).nonzero().squeeze(1)
        valid = torch.zeros(tg.numel(), dtype=torch.bool, device=self.device)
        tgh = tg.reshape(-1)[hit]
        valid[hit] = lay.ground_valid(ox + tgh * dx.reshape(-1)[hit], oy + tgh * dy.reshape(-1)[hit])
        tbest = torch.where(valid.view_as(tg), tg, torch.full_like(tg, float("inf")))
        mat = torch.where(valid.view_as(tg), GROUND, SKY).to(torch.uint8)
        obj = torch.full_like(mat, -1, dtype=torch.int32)
        for bi, blk in enumerate(lay.blocks):
            rowt = self.rows[bi]
            for pi in range(len(blk.facade.s0)):
                box = self._wall_box(cam_from_world, blk.facade, pi, float(blk.row.height.max()), K, w, h, ss)
                if box is None:
                    continue
                r0, r1, c0, c1 = box
                sdx, sdy, sdz = dx[r0:r1, c0:c1], dy[r0:r1, c0:c1], dz[r0:r1, c0:c1]
                tw, u = _hit_wall(blk.facade, pi, ox, oy, sdx, sdy)
                zw = oz + tw * sdz
                b = (torch.bucketize(u, rowt["edges"], right=True) - 1).clamp(0, len(blk.row.height) - 1)
                sub_t = tbest[r0:r1, c0:c1]
                ok = (zw >= 0) & (zw <= rowt["height"][b]) & (tw < sub_t)
                tbest[r0:r1, c0:c1] = torch.where(ok, tw, sub_t)
                mat[r0:r1, c0:c1] = torch.where(ok, WALL, mat[r0:r1, c0:c1])
                obj[r0:r1, c0:c1] = torch.where(ok, bi * WALL_PIECES + pi, obj[r0:r1, c0:c1])
        return tbest, mat, obj

    @staticmethod
    def _wall_box(cam_from_world, facade: PlanCurve, i: int, top: float, K, w, h, ss):
        """Sub-pixel rows/cols [r0, r1) x [c0, c1) piece i of a facade (up to `top`) can cover, or None."""
        length, k = float(facade.length[i]), float(facade.k[i])
        n = 1 if k == 0 else max(2, math.ceil(length))
        xy = facade.point(facade.s0[i] + np.linspace(0.0, length, n + 1) * (1 - 1e-9))
        sag = 0.0 if k == 0 else abs(k) * (length / n) ** 2 / 8  # how far the arc bulges between samples
        pts = np.concatenate([np.c_[xy, np.zeros(len(xy))], np.c_[xy, np.full(len(xy), top)]])
        cam = pts @ cam_from_world[:, :3].T + cam_from_world[:, 3]
        if np.all(cam[:, 2] + sag <= 0.05):
            return None
        if np.any(cam[:, 2] <= 0.05 + sag):  # reaches beside or behind the camera: test the whole image
            return 0, h * ss, 0, w * ss
        fx, fy, cx, cy = K
        u = fx * cam[:, 0] / cam[:, 2] + cx
        v = fy * cam[:, 1] / cam[:, 2] + cy
        m = max(fx, fy) * sag / cam[:, 2].min() + 1.0
        c0, c1 = int(math.floor((u.min() - m) * ss)) - 1, int(math.ceil((u.max() + m) * ss)) + 1
        r0, r1 = int(math.floor((v.min() - m) * ss)) - 1, int(math.ceil((v.max() + m) * ss)) + 1
        c0, c1, r0, r1 = max(c0, 0), min(c1, w * ss), max(r0, 0), min(r1, h * ss)
        return None if c0 >= c1 or r0 >= r1 else (r0, r1, c0, c1)

    @staticmethod
    def _pole_box(cam_from_world, pole, K, w, h, ss):
        """Sub-pixel rows/cols [r0, r1) x [c0, c1) a pole can cover, or None when it is out of view."""
        px, py, r, ph = pole
        corners = np.array([[px + sx * r, py + sy * r, z] for sx in (-1, 1) for sy in (-1, 1) for z in (0, ph)])
        cam = corners @ cam_from_world[:, :3].T + cam_from_world[:, 3]
        if np.all(cam[:, 2] <= 0.05):
            return None
        if np.any(cam[:, 2] <= 0.05):  # beside the camera: test the whole image, rare and still exact
            return 0, h * ss, 0, w * ss
        fx, fy, cx, cy = K
        u = fx * cam[:, 0] / cam[:, 2] + cx
        v = fy * cam[:, 1] / cam[:, 2] + cy
        c0, c1 = int(math.floor(u.min() * ss)) - 1, int(math.ceil(u.max() * ss)) + 1
        r0, r1 = int(math.floor(v.min() * ss)) - 1, int(math.ceil(v.max() * ss)) + 1
        c0, c1, r0, r1 = max(c0, 0), min(c1, w * ss), max(r0, 0), min(r1, h * ss)
        return None if c0 >= c1 or r0 >= r1 else (r0, r1, c0, c1)

    # -- shading --

    def shade_ground(self, x, y, fp_x, fp_y, g=None, dash_s=None, dash_w=None) -> torch.Tensor:
        """Colour of ground points (road, markings, kerb, sidewalk) for footprints fp_x, fp_y in metres.

        x, y are road coordinates: along the street and across it from the centre line (the straight street:
        world x and y). A layout passes the asphalt noise g it sampled, the position dash_s in the centre-dash
        pattern and a weight dash_w for the dashes (default: x - dash_origin, everywhere).
        """
        dev = self.device
        if g is None:
            level = self.ground.level_of(_mip_footprint(fp_x, fp_y))
            g = self.ground.sample(x, y, level)
        ay = y.abs()
        asphalt = (0.30 + 0.16 * g).clamp(0.03, 1.0)[:, None] * _rgb((0.97, 0.99, 1.03), dev)
        half = LINE_WIDTH_M / 2
        edge = _box(ay, EDGE_LINE_Y_M - half, EDGE_LINE_Y_M + half, fp_y)
        dash_s = x - self.street.dash_origin if dash_s is None else dash_s
        dash = _box(y, -half, half, fp_y) * _stripes(dash_s, DASH_M + GAP_M, DASH_M, fp_x)
        if dash_w is not None:
            dash = dash * dash_w
        paint = (0.80 + 0.05 * g).clamp(0.0, 1.0)[:, None] * _rgb((1.0, 0.99, 0.95), dev)
        road = _lerp(asphalt, paint, torch.maximum(edge, dash))

        kerb = (0.62 + 0.12 * g)[:, None] * _rgb((0.98, 0.98, 1.0), dev)
        kerb = kerb * (1.0 - 0.45 * _stripes(x, 1.0, 0.012, fp_x))[:, None]

        s = ay - KERB_OUTER_M
        row = torch.floor(s / 0.2)
        xs = x + torch.remainder(row, 2) * 0.2  # running bond: every other row shifted half a stone
        joint = 1 - (1 - _stripes(s, 0.2, 0.008, fp_y)) * (1 - _stripes(xs, 0.4, 0.008, fp_x))
        col = torch.floor(xs / 0.4)
        side = (y > 0).to(torch.int64)
        fade = (1.0 - torch.maximum(fp_x, fp_y) / 0.2).clamp(0.0, 1.0)  # per-stone colours average out far away
        h1 = _hash01(row + 1000 * side, col, self.salt) - 0.5
        h2 = _hash01(row + 1000 * side, col, self.salt + 1) - 0.5
        stone = _rgb((0.58, 0.53, 0.47), dev) * (1.0 + 0.5 * h1 * fade + 0.25 * g)[:, None]
        stone = stone + (0.08 * h2 * fade)[:, None] * _rgb((0.6, 0.2, -0.4), dev)
        sidewalk = _lerp(stone, _rgb((0.22, 0.21, 0.20), dev).expand_as(stone), 0.85 * joint)

        region = torch.where(ay < ROAD_HALF_WIDTH_M, 0, torch.where(ay < KERB_OUTER_M, 1, 2))[:, None]
        return torch.where(region == 0, road, torch.where(region == 1, kerb, sidewalk))

    def shade_facade(self, side: int, x, z, fp_x, fp_z, light=None) -> torch.Tensor:
        """Colour of facade points of one side: brick or plaster wall, windows, base and cornice.

        side indexes the building rows (a layout: its blocks), x is the position along the row; `light`
        (per point) replaces the straight street's light of the side's facing.
        """
        dev = self.device
        tex, row = self.facades[side], self.rows[side]
        b = (torch.bucketize(x, row["edges"], right=True) - 1).clamp(0, len(row["height"]) - 1)
        level = tex.level_of(_mip_footprint(fp_x, fp_z))
        g = tex.sample(x, z, level)
        xl = x - row["edges"][b]
        length = row["edges"][b + 1] - row["edges"][b]
        height = row["height"][b]
        base_rgb = row["rgb"][b]
        salt = self.salt + 7919 * (side + 1)

        course = torch.floor(z / 0.075)
        xb = xl + torch.remainder(course, 2) * 0.115
        mortar = 1 - (1 - _stripes(z, 0.075, 0.012, fp_z)) * (1 - _stripes(xb, 0.23, 0.012, fp_x))
        fade = (1.0 - torch.maximum(fp_x, fp_z) / 0.1).clamp(0.0, 1.0)
        hb = _hash01(course, torch.floor(xb / 0.23) + 4099 * b, salt) - 0.5
        brick = base_rgb * (1.0 + 0.6 * hb * fade)[:, None]
        brick = _lerp(brick, _rgb((0.72, 0.70, 0.66), dev).expand_as(brick), 0.8 * mortar)
        wall = torch.where(row["brick"][b][:, None] > 0.5, brick, base_rgb)
        wall = wall * (1.0 + 0.3 * g)[:, None]

        # Window grid: columns centred in the building, floors from the first floor up to below the roof.
        sp, ww = row["win_spacing"][b], row["win_width"][b]
        fh, wh, sill = row["floor_h"][b], row["win_height"][b], row["sill"][b]
        n_cols = torch.floor(length / sp)
        x0 = (length - n_cols * sp) / 2
        in_cols = (xl >= x0) & (xl <= x0 + n_cols * sp)
        floor_i = torch.floor(z / fh)
        upper = (floor_i >= 1) & (floor_i * fh + sill + wh <= height - 0.6)
        frame_m = 0.07
        gx = _stripes(xl - x0 - (sp - ww) / 2, sp, ww, fp_x)
        gz = _stripes(z - sill, fh, wh, fp_z)
        fx_ = _stripes(xl - x0 - (sp - ww) / 2 + frame_m, sp, ww + 2 * frame_m, fp_x)
        fz_ = _stripes(z - sill + frame_m, fh, wh + 2 * frame_m, fp_z)
        glass_cov = torch.where(in_cols & upper, gx * gz, 0.0)
        frame_cov = torch.where(in_cols & upper, fx_ * fz_, 0.0)
        # ground floor: wide shop windows
        shop_x = _stripes(xl - x0 - 0.1 * sp, sp, 0.8 * sp, fp_x)
        shop_z = _box(z, 0.45, fh - 0.6, fp_z)
        shop = torch.where(in_cols, shop_x * shop_z, 0.0)
        glass_cov = torch.maximum(glass_cov, shop)
        frame_cov = torch.maximum(frame_cov, shop)
        wfade = (1.0 - torch.maximum(fp_x, fp_z) / 0.6).clamp(0.0, 1.0)
        hw = _hash01(torch.floor((xl - x0) / sp) + 4099 * b, floor_i, salt + 3)
        glass = _rgb((0.13, 0.16, 0.21), dev) * (1.0 + (2.2 * hw - 0.9) * wfade + 0.5 * g)[:, None]
        glass = glass + (0.25 * (z - floor_i * fh) / fh * wfade)[:, None] * _rgb((0.5, 0.55, 0.6), dev)
        curtain = (hw > 0.82)[:, None] & (wfade[:, None] > 0)
        glass = torch.where(curtain, _rgb((0.78, 0.72, 0.60), dev) * (1.0 + 0.1 * g)[:, None], glass)
        out = _lerp(wall, _rgb((0.88, 0.88, 0.86), dev).expand_as(wall), frame_cov)
        out = _lerp(out, glass, glass_cov)

        cornice = _box(z, height - 0.45, height - 0.2, fp_z)
        out = _lerp(out, _rgb((0.85, 0.84, 0.80), dev).expand_as(out), cornice)
        base = _box(z, -1.0, 0.35, fp_z)
        out = out * (1.0 - 0.45 * base)[:, None]
        if light is not None:
            return out * light[:, None]
        normal_y = 1.0 if self.street.rows[side].facade_y < 0 else -1.0
        light = 0.62 + 0.38 * max(0.0, normal_y * float(SUN_3[1])) / float(SUN_3[1])
        return out * light

    def shade_pole(self, p, x, y, z, fp) -> torch.Tensor:
        """Colour of points on poles `p`: painted metal or wood with coloured bands, lit from the sun."""
        pole = self.poles[p]
        nx, ny = x - pole[:, 0], y - pole[:, 1]
        norm = torch.sqrt(nx * nx + ny * ny).clamp(min=1e-9)
        nx, ny = nx / norm, ny / norm
        # arc length with the seam on the +x side, which faces away from cameras driving +x (a layout: on the
        # side facing the buildings)
        if self.pole_seam is not None:
            c, sn = torch.cos(self.pole_seam[p]), torch.sin(self.pole_seam[p])
            nx, ny = nx * c + ny * sn, ny * c - nx * sn
        theta = torch.atan2(-ny, -nx)
        u = p.to(torch.float32) * POLE_STRIP_M + POLE_STRIP_M / 2 + theta * pole[:, 2]
        g = self.pole_tex.sample(u, z, self.pole_tex.level_of(fp))
        out = self.pole_rgb[p] * (1.0 + 0.18 * g)[:, None]
        for k in range(self.bands.shape[1]):
            cov = _box(z, self.bands[p, k, 0], self.bands[p, k, 1], fp)
            out = _lerp(out, self.band_rgb[p, k] * (1.0 + 0.06 * g)[:, None], cov)
        out = out * (1.0 - 0.5 * _box(z, -1.0, 0.25, fp))[:, None]
        lambert = (nx * float(SUN_3[0]) + ny * float(SUN_3[1])).clamp(min=0.0)
        return out * (0.55 + 0.6 * lambert)[:, None]

    def _shade_layout_ground(self, t, dx, dy, dz, o, du, dv) -> torch.Tensor:
        """Colour of ground hits of a layout."""
        # World offsets on the ground of one sub-pixel step along u and v (ray differentials on z = 0).
        fu = (t * (float(du[0]) - dx * float(du[2]) / dz), t * (float(du[1]) - dy * float(du[2]) / dz))
        fv = (t * (float(dv[0]) - dx * float(dv[2]) / dz), t * (float(dv[1]) - dy * float(dv[2]) / dz))
        return self.shade_layout_ground(o[0] + t * dx, o[1] + t * dy, fu, fv)

    def shade_layout_ground(self, x, y, fu, fv) -> torch.Tensor:
        """Colour of a layout's ground points, shaded in the road coordinates of the street they lie on.

        fu, fv: (x, y) world offsets spanning each point's footprint (the ray differentials of a sub-pixel).
        """
        def extent(angle, scale=1.0):
            c, sn = torch.cos(angle), torch.sin(angle)
            return ((fu[0] * c + fu[1] * sn).abs() + (fv[0] * c + fv[1] * sn).abs()) * scale

        fr = self.layout.ground_frame(x, y)
        fp_along, fp_across = extent(fr["along_dir"], fr["along_scale"]), extent(fr["across_dir"])
        dash_w = fr["dash_w"]
        if "dash_lo" in fr:  # no dashes across the junction (box-filtered where they stop)
            dash_w = dash_w * (1.0 - _box(fr["dash_street_s"], fr["dash_lo"], fr["dash_hi"], fp_along))
        if self.layout.junction is None:
            g = self.grounds[0].sample(fr["along"], fr["across"], self.grounds[0].level_of(
                _mip_footprint(fp_along, fp_across)))
        else:  # the main street's texture (world x, y) across its width, the cross street's beyond
            g = torch.empty_like(x)
            main = y.abs() <= self.layout.tex_half_m[0]
            for tex, street, sel in ((0, self.layout.streets[0], main), (1, self.layout.streets[1], ~main)):
                sel = sel.nonzero().squeeze(1)
                if sel.numel() == 0:
                    continue
                x0, y0, h0, _, _, s0 = _piece(street, 0)
                c, sn = math.cos(h0), math.sin(h0)
                xs, ys = x[sel] - x0, y[sel] - y0
                fa = (fu[0][sel] * c + fu[1][sel] * sn).abs() + (fv[0][sel] * c + fv[1][sel] * sn).abs()
                fb = (fu[1][sel] * c - fu[0][sel] * sn).abs() + (fv[1][sel] * c - fv[0][sel] * sn).abs()
                g[sel] = self.grounds[tex].sample(xs * c + ys * sn + s0, ys * c - xs * sn,
                                                  self.grounds[tex].level_of(_mip_footprint(fa, fb)))
        return self.shade_ground(fr["along"], fr["across"], fp_along, fp_across, g=g, dash_s=fr["dash_s"],
                                 dash_w=dash_w)

    def _shade_walls(self, obj, t, dx, dy, dz, o, du, dv) -> torch.Tensor:
        """Colour of facade hits of a layout's blocks, lit by the sun according to the wall's normal."""
        out = torch.empty((len(t), 3), dtype=torch.float32, device=self.device)
        for key in torch.unique(obj).tolist():
            bi, pi = divmod(int(key), WALL_PIECES)
            sel = (obj == key).nonzero().squeeze(1)
            tt, sdx, sdy, sdz = t[sel], dx[sel], dy[sel], dz[sel]
            hx, hy, hz = o[0] + tt * sdx, o[1] + tt * sdy, o[2] + tt * sdz
            x0, y0, h0, length, k, s0 = _piece(self.layout.blocks[bi].facade, pi)
            if k == 0:
                c, sn = math.cos(h0), math.sin(h0)
                u = (hx - x0) * c + (hy - y0) * sn + s0
                nx, ny = torch.full_like(hx, -sn), torch.full_like(hx, c)  # the front faces left, to the road
            else:
                rho = 1.0 / k
                sg = 1.0 if k > 0 else -1.0
                vx, vy = hx - (x0 - rho * math.sin(h0)), hy - (y0 + rho * math.cos(h0))
                r = torch.sqrt(vx * vx + vy * vy).clamp(min=1e-9)
                mid = h0 + k * length / 2
                u = _wrap(torch.atan2(sg * vx, -sg * vy) - mid) / k + (s0 + length / 2)
                nx, ny = -sg * vx / r, -sg * vy / r
            # World offsets on the wall's tangent plane of one sub-pixel step along u and v.
            dn = sdx * nx + sdy * ny
            fu = [tt * (float(du[a]) - dd * (float(du[0]) * nx + float(du[1]) * ny) / dn)
                  for a, dd in enumerate((sdx, sdy, sdz))]
            fv = [tt * (float(dv[a]) - dd * (float(dv[0]) * nx + float(dv[1]) * ny) / dn)
                  for a, dd in enumerate((sdx, sdy, sdz))]
            fp_u = (fu[0] * ny - fu[1] * nx).abs() + (fv[0] * ny - fv[1] * nx).abs()
            fp_z = fu[2].abs() + fv[2].abs()
            out[sel] = self.shade_facade(bi, u, hz, fp_u, fp_z, light=_wall_light(nx, ny))
        return out

    def _sky(self, dx, dy, dz) -> torch.Tensor:
        """Sky colour per ray: horizon haze to zenith blue."""
        elev = dz / torch.sqrt(dx * dx + dy * dy + dz * dz)
        k = (elev * 3.0).clamp(0.0, 1.0).sqrt()
        horizon, zenith = _rgb(HORIZON_RGB, self.device), _rgb(ZENITH_RGB, self.device)
        return horizon + (zenith - horizon) * k[:, None]

    def render(self, cam_from_world: np.ndarray, w: int, h: int, K: tuple[float, float, float, float],
               ss: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB image (h, w, 3) uint8 and z-depth (h, w) float32 in metres (inf: sky) of one camera."""
        with torch.no_grad():
            t, mat, obj, (dx, dy, dz), (ox, oy, oz) = self._intersect(cam_from_world, w, h, K, ss)
            rgb = self._shade(cam_from_world, t, mat, obj, dx, dy, dz, (ox, oy, oz), K, ss)
            rgb = rgb.view(h, ss, w, ss, 3).mean(dim=(1, 3))
            img = (rgb.clamp(0.0, 1.0) * 255.0 + 0.5).floor().to(torch.uint8).cpu().numpy()
            if ss == 1:
                depth = t
            else:  # ground truth at the pixel centre, not a blend of sub-pixel depths across edges
                depth = self._intersect(cam_from_world, w, h, K, 1)[0]
            return img, depth.cpu().numpy()

    def _shade(self, cam_from_world, t, mat, obj, dx, dy, dz, o, K, ss) -> torch.Tensor:
        """Colour of every ray, (N, 3) float in [0, 1] before clamping, in row-major ray order."""
        fx, fy, _, _ = K
        R = cam_from_world[:, :3]
        # World-space change of the ray direction per sub-pixel step along u and v (ray differentials).
        du = R.T @ np.array([1.0 / (fx * ss), 0.0, 0.0])
        dv = R.T @ np.array([0.0, 1.0 / (fy * ss), 0.0])
        t, mat, obj = t.reshape(-1), mat.reshape(-1), obj.reshape(-1)
        dx, dy, dz = dx.reshape(-1), dy.reshape(-1), dz.reshape(-1)
        out = self._sky(dx, dy, dz)

        def footprint(sel, d_n, n_axis: int, axis: int) -> torch.Tensor:
            """Extent along world `axis` of the sub-pixel footprint on a plane with normal world `n_axis`."""
            d_sel = (dx, dy, dz)[axis][sel]
            tt = t[sel]
            fu = tt * (float(du[axis]) - d_sel * float(du[n_axis]) / d_n)
            fv = tt * (float(dv[axis]) - d_sel * float(dv[n_axis]) / d_n)
            return fu.abs() + fv.abs()

        sel = (mat == GROUND).nonzero().squeeze(1)
        if sel.numel() and self.layout is not None:
            out[sel] = self._shade_layout_ground(t[sel], dx[sel], dy[sel], dz[sel], o, du, dv)
        elif sel.numel():
            dn = dz[sel]
            x, y = o[0] + t[sel] * dx[sel], o[1] + t[sel] * dy[sel]
            out[sel] = self.shade_ground(x, y, footprint(sel, dn, 2, 0), footprint(sel, dn, 2, 1))
        sel = (mat == WALL).nonzero().squeeze(1)
        if sel.numel():
            out[sel] = self._shade_walls(obj[sel], t[sel], dx[sel], dy[sel], dz[sel], o, du, dv)
        for side in (0, 1):
            sel = (mat == FACADE_RIGHT + side).nonzero().squeeze(1)
            if sel.numel():
                dn = dy[sel]
                x, z = o[0] + t[sel] * dx[sel], o[2] + t[sel] * dz[sel]
                out[sel] = self.shade_facade(side, x, z, footprint(sel, dn, 1, 0), footprint(sel, dn, 1, 2))
        sel = (mat == POLE).nonzero().squeeze(1)
        if sel.numel():
            tt = t[sel]
            x, y, z = o[0] + tt * dx[sel], o[1] + tt * dy[sel], o[2] + tt * dz[sel]
            fp = tt * float(np.linalg.norm(du))
            out[sel] = self.shade_pole(obj[sel].to(torch.int64), x, y, z, fp)

        hit = (mat != SKY).nonzero().squeeze(1)
        if hit.numel():
            dist = t[hit] * torch.sqrt(dx[hit] ** 2 + dy[hit] ** 2 + dz[hit] ** 2)
            haze = 1.0 - torch.exp(-dist / FOG_M)
            out[hit] = _lerp(out[hit], _rgb(HORIZON_RGB, self.device).expand(len(hit), 3), haze)
        return out


# ---- Ground-truth files ----

def hdmap_geojson(street: Street) -> dict:
    """The HD map of the street as a GeoJSON FeatureCollection in world metres."""
    if street.layout is not None:
        return _layout_hdmap(street)
    feats = []
    for y in (-EDGE_LINE_Y_M, EDGE_LINE_Y_M):
        feats.append(_feature("LineString", [[street.x_min, y, 0.0], [street.x_max, y, 0.0]],
                              {"kind": "lane_marking", "type": "solid", "width": LINE_WIDTH_M}))
    for x0, x1 in street.dashes():
        feats.append(_feature("LineString", [[x0, 0.0, 0.0], [x1, 0.0, 0.0]],
                              {"kind": "lane_marking", "type": "dashed", "width": LINE_WIDTH_M}))
    for x, y, r, h in street.poles_P4:
        feats.append(_feature("Point", [x, y, 0.0], {"kind": "pole", "height": h, "radius": r}))
    return {
        "type": "FeatureCollection",
        "frame": "world of transforms.json: x along the road, y left, z up, metres (not WGS84)",
        "features": feats,
    }


def _layout_hdmap(street: Street) -> dict:
    """The HD map of a layout: one solid edge line along each block's kerb (round the corners), one LineString
    per centre-line dash; curves as polylines within 1 mm of the arcs (vertices at most 0.5 m apart)."""
    lay = street.layout

    def xyz(pts: np.ndarray) -> list[list[float]]:
        return [[round(float(x), 4), round(float(y), 4), 0.0] for x, y in pts]

    feats = []
    for blk in lay.blocks:
        feats.append(_feature("LineString", xyz(blk.kerb.polyline(blk.kerb.s_start, blk.kerb.s_end, EDGE_INSET_M)),
                              {"kind": "lane_marking", "type": "solid", "width": LINE_WIDTH_M}))
    for i, s0, s1 in lay.dashes():
        feats.append(_feature("LineString", xyz(lay.streets[i].polyline(s0, s1)),
                              {"kind": "lane_marking", "type": "dashed", "width": LINE_WIDTH_M}))
    for x, y, r, h in street.poles_P4:
        feats.append(_feature("Point", [x, y, 0.0], {"kind": "pole", "height": h, "radius": r}))
    return {
        "type": "FeatureCollection",
        "frame": f"world of transforms.json: x along the road at the first camera, y left, z up, metres (not "
                 f"WGS84); road: {lay.kind}",
        "features": feats,
    }


def _feature(kind: str, coords, props: dict) -> dict:
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


def surface_points(renderer: Renderer, street: Street, x0: float, x1: float, n: int, seed: int):
    """n points uniform per area on ground, facades and poles with x in [x0, x1]: xyz, rgb, normals."""
    rng = np.random.default_rng([seed, 5])
    dev = renderer.device
    y_r, y_l = street.rows[0].facade_y, street.rows[1].facade_y
    # Facade area counts only the wall below each building's roof.
    wall = [float(sum(max(0.0, min(e1, x1) - max(e0, x0)) * hh
                      for e0, e1, hh in zip(r.edges[:-1], r.edges[1:], r.height))) for r in street.rows]
    in_range = [(p[0] >= x0) & (p[0] <= x1) for p in street.poles_P4]
    poles = street.poles_P4[np.array(in_range, bool)] if len(street.poles_P4) else street.poles_P4
    pole_area = 2 * np.pi * poles[:, 2] * poles[:, 3] if len(poles) else np.zeros(0)
    areas = np.array([(x1 - x0) * (y_l - y_r), wall[0], wall[1], pole_area.sum()])
    counts = np.floor(n * areas / areas.sum()).astype(int)
    counts[0] += n - counts.sum()
    fp = torch.full((1,), 1e-3, device=dev)  # finest detail: a point's colour is the surface's own
    xyz, rgb, nrm = [], [], []

    def t(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)

    with torch.no_grad():
        gx, gy = rng.uniform(x0, x1, counts[0]), rng.uniform(y_r, y_l, counts[0])
        xyz.append(np.stack([gx, gy, np.zeros_like(gx)], 1))
        rgb.append(renderer.shade_ground(t(gx), t(gy), fp.expand(len(gx)), fp.expand(len(gx))).cpu().numpy())
        nrm.append(np.tile([0.0, 0.0, 1.0], (len(gx), 1)))
        for side, row in enumerate(street.rows):
            fx_list, fz_list = [], []
            need = counts[1 + side]
            while need > 0:  # rejection sampling below the roof line keeps the density uniform
                cx = rng.uniform(x0, x1, 2 * need + 16)
                cz = rng.uniform(0.0, MAX_BUILDING_M, 2 * need + 16)
                b = np.clip(np.searchsorted(row.edges, cx, side="right") - 1, 0, len(row.height) - 1)
                keep = cz <= row.height[b]
                fx_list.append(cx[keep][:need])
                fz_list.append(cz[keep][:need])
                need -= len(fx_list[-1])
            fx_, fz_ = np.concatenate(fx_list), np.concatenate(fz_list)
            xyz.append(np.stack([fx_, np.full_like(fx_, row.facade_y), fz_], 1))
            rgb.append(renderer.shade_facade(side, t(fx_), t(fz_), fp.expand(len(fx_)), fp.expand(len(fx_)))
                       .cpu().numpy())
            nrm.append(np.tile([0.0, -np.sign(row.facade_y), 0.0], (len(fx_), 1)))
        if counts[3] and len(poles):
            idx_in = np.flatnonzero(np.array(in_range, bool))
            k = rng.choice(len(poles), counts[3], p=pole_area / pole_area.sum())
            ang = rng.uniform(-np.pi, np.pi, counts[3])
            pz = rng.uniform(0.0, 1.0, counts[3]) * poles[k, 3]
            n_xy = np.stack([np.cos(ang), np.sin(ang)], 1)
            pxy = poles[k, :2] + poles[k, 2:3] * n_xy
            pts = np.concatenate([pxy, pz[:, None]], 1)
            xyz.append(pts)
            rgb.append(renderer.shade_pole(torch.as_tensor(idx_in[k], device=dev), t(pxy[:, 0]), t(pxy[:, 1]),
                                           t(pz), fp.expand(len(pz))).cpu().numpy())
            nrm.append(np.concatenate([n_xy, np.zeros((len(pz), 1))], 1))
    return np.concatenate(xyz), np.clip(np.concatenate(rgb), 0.0, 1.0), np.concatenate(nrm)


def layout_surface_points(renderer: Renderer, street: Street, s0: float, s1: float, n: int, seed: int):
    """n points uniform per area on a layout's ground, facades and poles whose place on the centre line the
    cameras follow lies in [s0, s1]: xyz, rgb, normals. Ground and facade points are drawn by rejection from
    a box and from the facades' full extent; the share of each surface follows its measured area."""
    lay = street.layout
    rng = np.random.default_rng([seed, 5])
    dev = renderer.device
    line = lay.drive.polyline(s0, s1)
    reach = max(lay.tex_half_m) + 1.0
    lo, hi = line.min(0) - reach, line.max(0) + reach
    box_area = float(np.prod(hi - lo))
    facade_m = torch.tensor([b.facade_m for b in lay.blocks], dtype=torch.float32)
    fac_len = np.array([b.facade.s_end - b.facade.s_start for b in lay.blocks])

    def t(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)

    def in_reach(x, y) -> torch.Tensor:
        s = lay.drive.project(x, y)["s"]
        return (s >= s0) & (s <= s1)

    def ground(m: int) -> np.ndarray:
        xy = rng.uniform(lo, hi, (m, 2))
        x, y = t(xy[:, 0]), t(xy[:, 1])
        fr = lay.ground_frame(x, y)
        keep = fr["valid"] & in_reach(x, y) & (fr["across"].abs() <= facade_m.to(dev)[fr["block"]])
        return xy[keep.cpu().numpy()]

    def facade(m: int) -> np.ndarray:  # rows: block, u, z
        blk = rng.choice(len(lay.blocks), m, p=fac_len / fac_len.sum())
        frac, z = rng.uniform(0.0, 1.0, m), rng.uniform(0.0, MAX_BUILDING_M, m)
        u, keep = np.zeros(m), np.zeros(m, bool)  # in the order drawn, so that a prefix stays uniform
        for b, bl in enumerate(lay.blocks):
            sel = blk == b
            u[sel] = bl.facade.s_start + frac[sel] * fac_len[b]
            k = np.clip(np.searchsorted(bl.row.edges, u[sel], side="right") - 1, 0, len(bl.row.height) - 1)
            xy = bl.facade.point(u[sel])
            keep[sel] = (z[sel] <= bl.row.height[k]) & in_reach(t(xy[:, 0]), t(xy[:, 1])).cpu().numpy()
        return np.stack([blk, u, z], 1)[keep]

    with torch.no_grad():
        m = max(20_000, 2 * n)
        pilot_g, pilot_f = ground(m), facade(m)
        poles_in = np.array([bool(in_reach(t([p[0]]), t([p[1]]))[0]) for p in street.poles_P4], bool)
        poles = street.poles_P4[poles_in] if len(street.poles_P4) else street.poles_P4
        pole_area = 2 * np.pi * poles[:, 2] * poles[:, 3] if len(poles) else np.zeros(0)
        areas = np.array([box_area * len(pilot_g) / m, fac_len.sum() * MAX_BUILDING_M * len(pilot_f) / m,
                          pole_area.sum()])
        counts = np.floor(n * areas / areas.sum()).astype(int)
        counts[0] += n - counts.sum()
        g_xy, f_buz = [pilot_g], [pilot_f]
        while sum(map(len, g_xy)) < counts[0]:
            g_xy.append(ground(m))
        while sum(map(len, f_buz)) < counts[1]:
            f_buz.append(facade(m))
        g_xy, f_buz = np.concatenate(g_xy)[:counts[0]], np.concatenate(f_buz)[:counts[1]]

        xyz = [np.c_[g_xy, np.zeros(len(g_xy))]]
        fine = (t(np.full(len(g_xy), 1e-3)), t(np.zeros(len(g_xy))))
        rgb = [renderer.shade_layout_ground(t(g_xy[:, 0]), t(g_xy[:, 1]), fine, fine[::-1]).cpu().numpy()]
        nrm = [np.tile([0.0, 0.0, 1.0], (len(g_xy), 1))]
        for b, bl in enumerate(lay.blocks):
            sel = f_buz[:, 0] == b
            u, z = f_buz[sel, 1], f_buz[sel, 2]
            xy, head = bl.facade.point(u), bl.facade.heading(u)
            nx, ny = -np.sin(head), np.cos(head)  # facing the road, on the facade's left
            xyz.append(np.c_[xy, z])
            fp = t(np.full(len(u), 1e-3))
            rgb.append(renderer.shade_facade(b, t(u), t(z), fp, fp, light=_wall_light(t(nx), t(ny))).cpu().numpy())
            nrm.append(np.c_[nx, ny, np.zeros(len(u))])
        if counts[2] and len(poles):
            idx_in = np.flatnonzero(poles_in)
            k = rng.choice(len(poles), counts[2], p=pole_area / pole_area.sum())
            ang = rng.uniform(-np.pi, np.pi, counts[2])
            pz = rng.uniform(0.0, 1.0, counts[2]) * poles[k, 3]
            n_xy = np.stack([np.cos(ang), np.sin(ang)], 1)
            pxy = poles[k, :2] + poles[k, 2:3] * n_xy
            xyz.append(np.concatenate([pxy, pz[:, None]], 1))
            rgb.append(renderer.shade_pole(torch.as_tensor(idx_in[k], device=dev), t(pxy[:, 0]), t(pxy[:, 1]),
                                           t(pz), t(np.full(len(pz), 1e-3))).cpu().numpy())
            nrm.append(np.concatenate([n_xy, np.zeros((len(pz), 1))], 1))
    return np.concatenate(xyz), np.clip(np.concatenate(rgb), 0.0, 1.0), np.concatenate(nrm)


def write_points(path: Path, xyz: np.ndarray, rgb: np.ndarray, normals: np.ndarray) -> None:
    """Write a coloured point cloud with normals as PLY (open3d)."""
    pcd = o3d.geometry.PointCloud()
    pcd.points = o3d.utility.Vector3dVector(xyz.astype(np.float64))
    pcd.colors = o3d.utility.Vector3dVector(rgb.astype(np.float64))
    pcd.normals = o3d.utility.Vector3dVector(normals.astype(np.float64))
    if not o3d.io.write_point_cloud(str(path), pcd, write_ascii=False):
        raise OSError(f"could not write {path}")


def write_png(path: Path, img: np.ndarray) -> None:
    """Write an RGB uint8 or a single-channel uint16 image as PNG; a failed write raises."""
    data = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    if not cv2.imwrite(str(path), data, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"could not write {path}")


def depth_to_mm(depth_HW: np.ndarray) -> np.ndarray:
    """z-depth in metres -> uint16 millimetres; sky and depths past 65.535 m become 0 (no value)."""
    mm = np.round(np.where(np.isfinite(depth_HW), depth_HW, 0.0) * 1000.0)
    return np.where((mm > 0) & (mm <= 65535), mm, 0).astype(np.uint16)


class VideoWriter:
    """H.264 yuv420p writer (PyAV) whose frame i carries the timestamp i / fps."""

    def __init__(self, path: Path, params: SynthParams):
        self.container = av.open(str(path), "w")
        rate = Fraction(params.fps).limit_denominator(100000)
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = params.width, params.height
        self.stream.pix_fmt = "yuv420p"
        # mbtree off: with it, x264 (core 165) reads uninitialised memory on small frames (e.g. 160x90), so
        # the same frames encode to different bytes from run to run. It also keeps quality even across frames.
        self.stream.options = {"crf": str(params.video_crf), "preset": params.video_preset,
                               "x264-params": "mbtree=0"}
        # One encoder thread: x264's output depends on its thread count, which varies across machines.
        self.stream.codec_context.thread_count = 1
        self.time_base = 1 / rate
        self.stream.time_base = self.time_base

    def write(self, i: int, rgb: np.ndarray) -> None:
        """Encode frame i."""
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts, frame.time_base = i, self.time_base
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and close the file."""
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _frame_entry(file_path: str, cam_from_world: np.ndarray, **extra) -> dict:
    matrix = cam_from_world_to_world_from_cam_gl(cam_from_world)
    return {"file_path": file_path, **extra, "transform_matrix": np.round(matrix, 12).tolist()}


def run(params: SynthParams, *, out_dir: Path) -> SynthResult:
    """Render the street of `params` into the scene folder `out_dir` (atomically)."""
    t_start = time.perf_counter()
    device = pick_device(params.device)
    street = build_street(params)
    mapping, queries = trajectories(params, street.layout)
    K = intrinsics(params)
    w, h, ss = params.width, params.height, params.supersample
    if street.layout is None:
        log.info("street x in [%.0f, %.0f] m: %d + %d buildings, %d poles, %d dashes; rendering %d %s and %d "
                 "queries at %dx%d (%dx%d rays per pixel) on %s",
                 street.x_min, street.x_max, len(street.rows[0].height), len(street.rows[1].height),
                 len(street.poles_P4), len(street.dashes()), params.n_frames, params.output, len(queries), w, h,
                 ss, ss, device)
    else:
        log.info("road %s, %.0f m of centre line: %d blocks, %d buildings, %d poles, %d dashes; rendering %d %s "
                 "and %d queries at %dx%d (%dx%d rays per pixel) on %s", params.road,
                 street.x_max - street.x_min, len(street.rows), sum(len(r.height) for r in street.rows),
                 len(street.poles_P4), len(street.layout.dashes()), params.n_frames, params.output, len(queries),
                 w, h, ss, ss, device)
    renderer = Renderer(street, params.seed, device)
    fx, fy, cx, cy = K
    frames = []
    with atomic_dir(out_dir) as tmp:
        (tmp / "depth").mkdir()
        video = VideoWriter(tmp / "video.mp4", params) if params.output == "video" else None
        if video is None:
            (tmp / "images").mkdir()
        try:
            for i, pose in enumerate(tqdm(mapping, desc="synth frames", unit="frame", disable=None)):
                img, depth = renderer.render(pose, w, h, K, ss)
                name = f"{i:06d}.png"
                write_png(tmp / "depth" / name, depth_to_mm(depth))
                if video is not None:
                    video.write(i, img)
                    frames.append(_frame_entry("video.mp4", pose, timestamp=i / params.fps,
                                               depth_file_path=f"depth/{name}"))
                else:
                    write_png(tmp / "images" / name, img)
                    frames.append(_frame_entry(f"images/{name}", pose, depth_file_path=f"depth/{name}"))
        finally:
            if video is not None:
                video.close()
        if queries:
            (tmp / "queries").mkdir()
        for k, pose in enumerate(tqdm(queries, desc="synth queries", unit="frame", disable=None)):
            img, _ = renderer.render(pose, w, h, K, ss)
            write_png(tmp / "queries" / f"{k:06d}.png", img)
            frames.append(_frame_entry(f"queries/{k:06d}.png", pose))
        write_json(tmp / "transforms.json", {
            "camera_model": "OPENCV", "fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": w, "h": h,
            "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "metric": True, "frames": frames,
        })
        hdmap = hdmap_geojson(street)
        write_json(tmp / "hdmap.geojson", hdmap)
        if street.layout is None:
            x_first = float(camera_center(mapping[0])[0])
            x_last = x_first + _stretch_m(params) + params.points_ahead_m
            xyz, rgb, nrm = surface_points(renderer, street, x_first, x_last, params.n_points, params.seed)
        else:  # along the centre line, from the first camera's place on it (0) on
            drive = street.layout.drive
            s_last = drive.s_on(drive.offset(params.lane_y_m), _stretch_m(params)) + params.points_ahead_m
            xyz, rgb, nrm = layout_surface_points(renderer, street, 0.0, s_last, params.n_points, params.seed)
        write_points(tmp / "points.ply", xyz, rgb, nrm)
        # What rendered the scene (ingest ignores this file). No timings: the same params and seed give
        # byte-identical files, so DVC sees an unchanged scene.
        write_json(tmp / SYNTH_RECORD, {"device": device, "frames": params.n_frames, "queries": len(queries)})
    seconds = time.perf_counter() - t_start
    n_marks = sum(f["properties"]["kind"] == "lane_marking" for f in hdmap["features"])
    log.info("wrote %s: %d frames, %d queries, %d points, %d lane markings, %d poles in %.1f s",
             out_dir, params.n_frames, len(queries), len(xyz), n_marks, len(street.poles_P4), seconds)
    return SynthResult(out_dir=Path(out_dir), n_frames=params.n_frames, n_queries=len(queries), width=w,
                       height=h, output=params.output, device=device, n_poles=len(street.poles_P4),
                       n_lane_markings=n_marks, n_points=len(xyz), seconds=round(seconds, 3))


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m stages.synth --params params.yaml --out data/raw/street."""
    parser = make_parser("synth", __doc__, INPUTS, OUTPUTS)
    args = parser.parse_args(argv)
    return guarded("synth", lambda: run(load_section(args.params, "synth", SynthParams), out_dir=Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
