"""Render the embedded default scene `street` as raw input in the scene format, with exact ground truth.

The street is procedural and deterministic from `seed`. World frame: x along the road, y to the left, z up,
metres, ground at z = 0. It holds a 7 m road (|y| <= 3.5) of grainy asphalt with a solid white edge line
near each edge and a dashed white centre line (3 m dash, 5 m gap), granite kerbs, paving-stone sidewalks,
one row of buildings per side (a vertical facade plane per side; each building has its own length, height,
wall colour, brick or plaster, window grid), poles (vertical cylinders) along both sidewalks, and a sky
gradient. Frames are ray cast with torch on the device picked from `device`: analytic intersections,
mip-mapped procedural noise textures, analytically box-filtered stripes, `supersample`^2 rays per pixel.

A mapping camera drives +x in the right lane (gentle lateral sway and yaw); query cameras drive +x in the
left lane at another speed and height, spread over the same stretch.

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
  line over the whole street) or `type: dashed` (one LineString per painted dash), `width` in metres;
  poles as Points at their base centre, `kind: pole`, `height`, `radius`;
- `points.ply`: ground-truth surface samples (uniform per area, with colours and normals) on the ground,
  facades and poles, from the first mapping camera to `points_ahead_m` past the last one.

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
OUTPUTS = {"out": "scene folder to write (data/raw/<scene>)"}


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

SKY, GROUND, FACADE_RIGHT, FACADE_LEFT, POLE = 0, 1, 2, 3, 4
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
    """The layout of the street: extent, buildings, poles and the centre line's dash phase."""

    x_min: float
    x_max: float
    rows: tuple[BuildingRow, BuildingRow]  # right (y < 0), left (y > 0)
    poles_P4: np.ndarray  # x, y, radius, height
    pole_rgb_P3: np.ndarray
    bands_PK2: np.ndarray  # z0, z1 of up to K coloured bands per pole (z0 = z1 = -1: none)
    band_rgb_PK3: np.ndarray
    dash_origin: float  # dashes start at dash_origin + k * (DASH_M + GAP_M)

    def dashes(self) -> list[tuple[float, float]]:
        """[x0, x1] of each painted centre-line dash inside the street."""
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


def build_street(params: SynthParams) -> Street:
    """The street layout for `params` (extent from the trajectory; everything random from the seed)."""
    rng = np.random.default_rng([params.seed, 1])
    x_min, x_max = -BEHIND_M, _stretch_m(params) + AHEAD_M
    rows = (_building_row(rng, -1, x_min, x_max), _building_row(rng, +1, x_min, x_max))
    poles, pole_rgb, bands, band_rgb = [], [], [], []
    jitter = params.pole_spacing_m / 4
    for side in (-1, 1):
        x = x_min + rng.uniform(0.0, params.pole_spacing_m)
        while x < x_max - 1.0:
            poles.append([x, side * (KERB_OUTER_M + rng.uniform(0.3, 0.7)), rng.uniform(0.08, 0.15),
                          rng.uniform(4.0, POLE_MAX_H_M)])
            pole_rgb.append(np.array(POLE_RGB[rng.integers(len(POLE_RGB))]) * rng.uniform(0.9, 1.1))
            zb = np.full((3, 2), -1.0)
            rgb = np.zeros((3, 3))
            for k in range(rng.integers(0, 4)):
                z0 = rng.uniform(0.6, 3.5)
                zb[k] = (z0, z0 + rng.uniform(0.08, 0.4))
                rgb[k] = BAND_RGB[rng.integers(len(BAND_RGB))]
            bands.append(zb)
            band_rgb.append(rgb)
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


def trajectories(params: SynthParams) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """cam_from_world (3x4) of the mapping frames and of the query frames."""
    rng = np.random.default_rng([params.seed, 2])
    ph = rng.uniform(0.0, 2 * math.pi, 4)
    yaw_amp, pitch = math.radians(params.yaw_amplitude_deg), math.radians(params.pitch_deg)

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


# ---- The renderer ----

class Renderer:
    """Ray caster of one street on one torch device."""

    def __init__(self, street: Street, seed: int, device: str):
        self.street, self.device = street, device
        dev = device
        rng = np.random.default_rng([seed, 3])
        y_max = max(abs(r.facade_y) for r in street.rows) + 0.5
        length = street.x_max - street.x_min
        # Pink-ish octave weights: 2 cm grain dominates close up, metre-scale patches survive far away.
        self.ground = _make_texture(rng, (street.x_min, -y_max), (length, 2 * y_max), GROUND_TEXEL_M,
                                    [(1, 1.0), (2, 0.8), (4, 0.6), (8, 0.5), (16, 0.45), (32, 0.45),
                                     (64, 0.4), (128, 0.35)], 0.6, dev)
        self.facades = [
            _make_texture(rng, (street.x_min - 1.0, 0.0), (length + 2.0, MAX_BUILDING_M + 1.0), FACADE_TEXEL_M,
                          [(1, 0.8), (2, 0.8), (4, 0.7), (8, 0.6), (16, 0.6), (64, 0.5)], 0.3, dev)
            for _ in street.rows
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

    def shade_ground(self, x, y, fp_x, fp_y) -> torch.Tensor:
        """Colour of ground points (road, markings, kerb, sidewalk) for footprints fp_x, fp_y in metres."""
        dev = self.device
        level = self.ground.level_of(_mip_footprint(fp_x, fp_y))
        g = self.ground.sample(x, y, level)
        ay = y.abs()
        asphalt = (0.30 + 0.16 * g).clamp(0.03, 1.0)[:, None] * _rgb((0.97, 0.99, 1.03), dev)
        half = LINE_WIDTH_M / 2
        edge = _box(ay, EDGE_LINE_Y_M - half, EDGE_LINE_Y_M + half, fp_y)
        dash = _box(y, -half, half, fp_y) * _stripes(x - self.street.dash_origin, DASH_M + GAP_M, DASH_M, fp_x)
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

    def shade_facade(self, side: int, x, z, fp_x, fp_z) -> torch.Tensor:
        """Colour of facade points of one side: brick or plaster wall, windows, base and cornice."""
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
        normal_y = 1.0 if self.street.rows[side].facade_y < 0 else -1.0
        light = 0.62 + 0.38 * max(0.0, normal_y * float(SUN_3[1])) / float(SUN_3[1])
        return out * light

    def shade_pole(self, p, x, y, z, fp) -> torch.Tensor:
        """Colour of points on poles `p`: painted metal or wood with coloured bands, lit from the sun."""
        pole = self.poles[p]
        nx, ny = x - pole[:, 0], y - pole[:, 1]
        norm = torch.sqrt(nx * nx + ny * ny).clamp(min=1e-9)
        nx, ny = nx / norm, ny / norm
        # arc length with the seam on the +x side, which faces away from cameras driving +x
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
        if sel.numel():
            dn = dz[sel]
            x, y = o[0] + t[sel] * dx[sel], o[1] + t[sel] * dy[sel]
            out[sel] = self.shade_ground(x, y, footprint(sel, dn, 2, 0), footprint(sel, dn, 2, 1))
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
    mapping, queries = trajectories(params)
    K = intrinsics(params)
    w, h, ss = params.width, params.height, params.supersample
    log.info("street x in [%.0f, %.0f] m: %d + %d buildings, %d poles, %d dashes; rendering %d %s and %d "
             "queries at %dx%d (%dx%d rays per pixel) on %s",
             street.x_min, street.x_max, len(street.rows[0].height), len(street.rows[1].height),
             len(street.poles_P4), len(street.dashes()), params.n_frames, params.output, len(queries), w, h,
             ss, ss, device)
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
        x_first = float(camera_center(mapping[0])[0])
        x_last = x_first + _stretch_m(params) + params.points_ahead_m
        xyz, rgb, nrm = surface_points(renderer, street, x_first, x_last, params.n_points, params.seed)
        write_points(tmp / "points.ply", xyz, rgb, nrm)
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
