"""Stage hand-offs: one typed reader/writer per stage output.

The stage that writes an output, every stage that reads it, bench and tests all go through this module, so
the layout and conventions of each file are known in one place:
- image names are relative to the ingest folder (`images/000000.png`, `queries/0001.png`) everywhere: in
  ingest's manifest, in sfm's COLMAP model (its image path is the ingest folder) and in poses.csv;
- poses are `cam_from_world` (x_cam = R x_world + t, COLMAP's convention), stored as a w-first quaternion and
  a translation under column names that say so;
- what a consumer needs is in a declared output (capture.json, alignment.json), never in metrics.json, which
  is for people, DVC and reports.

`*_OUTPUTS` list what each stage declares to DVC (a test checks dvc.yaml against them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.common.align import Sim3, pose_errors
from stages.common.errors import StageError
from stages.common.geometry import R_from_quat_wxyz, camera_center, quat_wxyz_from_R
from stages.common.outputs import write_json
from stages.common.scene import SceneSettings, read_scene_settings, sequence_numbers, write_scene_settings

# ------------------------------------------------------------------------------------------------ poses

POSE_FIELDS = ("qw", "qx", "qy", "qz", "tx", "ty", "tz")
"""A cam_from_world pose in a table: rotation as a w-first unit quaternion, then the translation."""
GT_PREFIX = "gt_cam_from_world_"
POSE_PREFIX = "cam_from_world_"


def pose_columns(prefix: str) -> list[str]:
    """The column names of a pose stored under `prefix`."""
    return [prefix + f for f in POSE_FIELDS]


def pose_record(prefix: str, cam_from_world_34: np.ndarray | None) -> dict[str, float]:
    """A pose as table columns (NaN when there is none)."""
    if cam_from_world_34 is None:
        return dict.fromkeys(pose_columns(prefix), math.nan)
    P = np.asarray(cam_from_world_34, float)
    return dict(zip(pose_columns(prefix), [*quat_wxyz_from_R(P[:3, :3]), *P[:3, 3]], strict=True))


def poses_from_table(table: pd.DataFrame, prefix: str, name_column: str) -> dict[str, np.ndarray]:
    """Name -> cam_from_world (3x4) for the rows whose pose columns are all finite."""
    cols = pose_columns(prefix)
    if not set(cols) <= set(table.columns):
        return {}
    values = table[cols].to_numpy(float)
    out = {}
    for name, v in zip(table[name_column].astype(str), values):
        if np.all(np.isfinite(v)):
            out[name] = np.concatenate([R_from_quat_wxyz(v[:4]), v[4:, None]], axis=1)
    return out


# ------------------------------------------------------------------------------------------------ ingest

IMAGES_DIR = "images"
QUERIES_DIR = "queries"
MANIFEST = "manifest.csv"
CAMERAS = "cameras.json"
CAPTURE = "capture.json"
METRICS = "metrics.json"
TRUTH_DIR = "truth"
"""Ground truth beyond poses, copied from the scene folder for evaluation only (never to build)."""
TRUTH_FILES = ("hdmap.geojson", "points.ply")
INGEST_OUTPUTS = (IMAGES_DIR, QUERIES_DIR, MANIFEST, CAMERAS, "scene.yaml", CAPTURE, TRUTH_DIR)
INGEST_METRICS = METRICS
INGEST_PLOTS = MANIFEST


@dataclasses.dataclass(frozen=True)
class Capture:
    """Facts about a capture that ingest finds and later stages need (capture.json)."""

    source_kind: str
    """"video" or "images"."""
    sequence: bool
    """Frames in capture order (a video, or image names that count up); sfm still checks the overlap."""
    sequence_from: str = ""
    """What decided `sequence` (the input kind, the file names, scene.yaml)."""
    metric: bool | None = None
    """Ground-truth poses in metres (transforms.json `metric`); None without ground truth."""


def write_capture(folder: Path, capture: Capture) -> Path:
    return write_json(Path(folder) / CAPTURE, dataclasses.asdict(capture))


@dataclasses.dataclass(frozen=True)
class Frames:
    """Ingest's output as the stages after it read it."""

    image_dir: Path
    """The folder image names are relative to (the ingest folder)."""
    names: list[str]
    """Mapping image names (`images/...`) in capture order."""
    groups: dict[str, list[str]]
    """Camera group id -> mapping image names."""
    intrinsics: dict[str, dict | None]
    """Camera group id -> known intrinsics in output pixels (fx, fy, cx, cy, k1, k2, p1, p2) or None."""
    is_video: bool
    gt: dict[str, np.ndarray]
    """Image name -> ground-truth cam_from_world (3x4): for evaluation only, never to build."""
    metric: bool | None
    sequence: bool = False
    """Ingest judged the capture ordered (video, or image names that count up)."""
    settings: SceneSettings = dataclasses.field(default_factory=SceneSettings)
    """The scene's scene.yaml, as ingest resolved it."""
    position: dict[str, float] = dataclasses.field(default_factory=dict)
    """Image name -> position in the capture, in typical frame intervals (1.0 between neighbours): the counting
    number of an image sequence or the keyframe ordinal of a video, so frames left out (held-out queries, a
    numbering gap) are expected to be a longer step apart. Empty: consecutive names are one interval apart."""
    queries: list[str] = dataclasses.field(default_factory=list)
    """Query image names (`queries/...`), held out of mapping."""
    query_gt: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Query name -> ground-truth cam_from_world (3x4)."""

    def truth(self, name: str) -> Path | None:
        """A ground-truth file of the scene (one of TRUTH_FILES), or None when the scene has none."""
        path = self.image_dir / TRUTH_DIR / name
        return path if path.is_file() else None

    @property
    def focal_known(self) -> bool:
        """Every camera group has known intrinsics."""
        return all(self.intrinsics.get(g) for g in self.groups)


def read_ingest(folder: str | Path) -> Frames:
    """Read ingest's output folder; a missing file is a StageError that says to run ingest."""
    folder = Path(folder)
    for name in (MANIFEST, CAMERAS, CAPTURE, IMAGES_DIR):
        if not (folder / name).exists():
            raise StageError(f"{folder / name} not found; run the ingest stage for this scene first "
                             f"(python -m stages.ingest --scene data/raw/<scene> --out {folder})")
    manifest = pd.read_csv(folder / MANIFEST)
    cams = json.loads((folder / CAMERAS).read_text())
    capture = Capture(**json.loads((folder / CAPTURE).read_text()))
    mapping = manifest[manifest["split"] == "mapping"].sort_values(["frame_index", "name"], kind="stable")
    names = [str(n) for n in mapping["name"]]
    groups: dict[str, list[str]] = {}
    for name, cam in zip(names, mapping["camera"]):
        groups.setdefault(str(int(cam)), []).append(name)
    gt = poses_from_table(manifest, GT_PREFIX, "name")
    queries = [str(n) for n in manifest.loc[manifest["split"] == "query"].sort_values("frame_index")["name"]]
    is_video = capture.source_kind == "video"
    return Frames(folder, names, groups, {g: (cams.get(g) or {}).get("intrinsics") for g in groups}, is_video,
                  {n: gt[n] for n in names if n in gt}, capture.metric, sequence=capture.sequence,
                  settings=read_scene_settings(folder), position=capture_positions(manifest, is_video),
                  queries=queries, query_gt={n: gt[n] for n in queries if n in gt})


def capture_positions(manifest: pd.DataFrame, is_video: bool) -> dict[str, float]:
    """Each mapping image's position in the capture, in median frame intervals (see Frames.position)."""
    if is_video:  # keyframe ordinal: held-out query keyframes leave a gap
        kept = manifest[manifest["split"].isin(["mapping", "query"])].sort_values("frame_index")
        raw = {str(n): float(i) for i, (n, sp) in enumerate(zip(kept["name"], kept["split"])) if sp == "mapping"}
    else:
        rows = manifest[manifest["split"] == "mapping"].sort_values("frame_index")
        numbers = sequence_numbers([Path(str(s)).name for s in rows["source"]])
        if numbers is None:
            return {}
        raw = {str(n): float(v) for n, v in zip(rows["name"], numbers)}
    values = np.array(sorted(raw.values()))
    gap = float(np.median(np.diff(values))) if len(values) > 1 else 1.0
    return {n: v / gap for n, v in raw.items()} if gap > 0 else {}


def write_ingest(folder: Path, manifest: pd.DataFrame, cameras: dict, capture: Capture,
                 settings: SceneSettings, scene_dir: Path) -> None:
    """Ingest's declared files (the frames themselves are written as they are decoded); the scene's other
    ground truth (TRUTH_FILES) is copied into truth/, which exists, possibly empty, for every scene."""
    (folder / TRUTH_DIR).mkdir(exist_ok=True)
    for name in TRUTH_FILES:
        if (Path(scene_dir) / name).is_file():
            shutil.copyfile(Path(scene_dir) / name, folder / TRUTH_DIR / name)
    manifest.to_csv(folder / MANIFEST, index=False)
    write_json(folder / CAMERAS, cameras)
    write_capture(folder, capture)
    write_scene_settings(folder, settings)


# --------------------------------------------------------------------------------------------------- sfm

MODEL_DIR = "model"
POSES = "poses.csv"
SPARSE = "sparse.ply"
ALIGNMENT = "alignment.json"
PER_IMAGE = "per_image.csv"
SFM_OUTPUTS = (MODEL_DIR, POSES, SPARSE, ALIGNMENT)
SFM_METRICS = METRICS
SFM_PLOTS = PER_IMAGE


def sim3_dict(sim3: Sim3 | None) -> dict | None:
    return None if sim3 is None else {"scale": sim3.scale, "R": np.asarray(sim3.R_33).tolist(),
                                      "t": np.asarray(sim3.t_3).tolist()}


def sim3_from_dict(d: dict | None) -> Sim3 | None:
    return None if d is None else Sim3(float(d["scale"]), np.asarray(d["R"], float), np.asarray(d["t"], float))


@dataclasses.dataclass(frozen=True)
class Alignment:
    """How sfm's world relates to the mapper's and to ground truth (alignment.json)."""

    world_from_mapper: Sim3
    """x_world = s R x_mapper + t: gravity (z up, ground at z = 0) and, where earned, metres."""
    metric: bool
    """The world is in metres (scaled from the camera height)."""
    gt_from_world: Sim3 | None = None
    """x_gt = s R x_world + t, fitted to the ground-truth poses (None without ground truth)."""
    ground: bool = False
    """A ground plane was found below the cameras (z = 0); else z = 0 is the points' median height."""
    driving_confidence: float = 0.0
    """How much the capture looks like a camera driven over that ground (sfm's scale confidence, 0..1)."""

    def to_json(self) -> dict:
        return {"convention": "x_to = scale * R @ x_from + t; poses are cam_from_world",
                "world": "z up, " + ("ground plane at z = 0" if self.ground else "no ground found, z = 0 at the "
                                     "points' median height") + (", metres" if self.metric else ", unscaled"),
                "world_from_mapper": sim3_dict(self.world_from_mapper), "metric": self.metric,
                "gt_from_world": sim3_dict(self.gt_from_world), "ground": self.ground,
                "driving_confidence": self.driving_confidence}


@dataclasses.dataclass(frozen=True)
class SparseModel:
    """sfm's output as the stages after it read it."""

    folder: Path
    poses: dict[str, np.ndarray]
    """Registered image name -> cam_from_world (3x4), in sfm's world."""
    alignment: Alignment

    def reconstruction(self) -> Any:
        """The COLMAP model (pycolmap.Reconstruction); image names as in `poses`."""
        import pycolmap

        return pycolmap.Reconstruction(str(self.folder / MODEL_DIR))


def write_sfm(folder: Path, rec: Any, frames: Frames, reasons: dict[str, str], alignment: Alignment,
              per_image: pd.DataFrame) -> pd.DataFrame:
    """COLMAP binary model, poses.csv, sparse.ply, alignment.json and per_image.csv into `folder`."""
    (folder / MODEL_DIR).mkdir()
    rec.write_binary(str(folder / MODEL_DIR))
    rec.export_PLY(str(folder / SPARSE))
    by_name = {im.name: im for im in rec.images.values() if im.has_pose}
    rows = []
    for name in frames.names:
        im = by_name.get(name)
        if im is not None:
            P = im.cam_from_world().matrix()
            c = camera_center(P)
            rows.append({"image": name, "registered": True, "reason": "", **pose_record(POSE_PREFIX, P),
                         "center_x": c[0], "center_y": c[1], "center_z": c[2], "camera_id": im.camera_id})
        else:
            rows.append({"image": name, "registered": False, **pose_record(POSE_PREFIX, None),
                         "reason": reasons.get(name, "not registered by the mapper (too few verified matches)")})
    table = pd.DataFrame(rows)
    table.to_csv(folder / POSES, index=False)
    write_json(folder / ALIGNMENT, alignment.to_json())
    per_image.to_csv(folder / PER_IMAGE, index=False)
    return table


def model_unit(alignment: Alignment, centers: np.ndarray, points: np.ndarray, camera_height_m: float) -> tuple[float, str]:
    """Model units per metre, and what that came from, for stages whose params are in metres.

    A metric model: 1. An unscaled one takes the cameras' median height above its ground plane as
    `camera_height_m`; without a ground plane z = 0 is the points' median height, so that height can be ~0 or
    negative (an object orbited at its own height), and the cameras' median distance to the points stands in
    for it."""
    if alignment.metric:
        return 1.0, "metres"
    cam_h = float(np.median(centers[:, 2])) if len(centers) else 0.0
    if alignment.ground and cam_h > 0:
        return cam_h / camera_height_m, "the camera height"
    sample = points[::max(1, len(points) // 5000)]  # a few thousand points and 50 cameras are plenty
    dist = np.linalg.norm(sample[:, None, :] - centers[None, ::max(1, len(centers) // 50)], axis=2) \
        if len(sample) and len(centers) else np.ones(1)
    return max(float(np.median(dist)), 1e-6) / camera_height_m, "the cameras' distance to the scene (no ground plane)"


def read_sfm(folder: str | Path) -> SparseModel:
    """Read sfm's output folder; a missing file is a StageError that says to run sfm."""
    folder = Path(folder)
    for name in (MODEL_DIR, POSES, ALIGNMENT):
        if not (folder / name).exists():
            raise StageError(f"{folder / name} not found; run the sfm stage for this scene first")
    poses = poses_from_table(pd.read_csv(folder / POSES), POSE_PREFIX, "image")
    a = json.loads((folder / ALIGNMENT).read_text())
    alignment = Alignment(sim3_from_dict(a["world_from_mapper"]), bool(a["metric"]), sim3_from_dict(a["gt_from_world"]),
                          bool(a.get("ground", False)), float(a.get("driving_confidence", 0.0)))
    return SparseModel(folder, poses, alignment)


# ------------------------------------------------------------------------------------------------- hdmap

HDMAP_OUTPUTS = ("hdmap.geojson", "map.osm", "rasters.npz", "surface.npz", "ortho.png", "ortho.json", "overlay.png")
HDMAP_METRICS = METRICS


@dataclasses.dataclass(frozen=True)
class MapRasters:
    """hdmap's raster channels for map-based localization (rasters.npz), in sfm's world."""

    channels: np.ndarray
    """(C, H, W) uint8 0/1 layers."""
    names: list[str]
    world_from_pixel: np.ndarray
    """3x3 affine: [x, y, 1] = world_from_pixel @ [col, row, 1]."""

    def channel(self, name: str) -> np.ndarray:
        return self.channels[self.names.index(name)]


def write_map_rasters(path: Path, rasters: MapRasters) -> None:
    np.savez_compressed(path, channels=rasters.channels, names=np.array(rasters.names),
                        world_from_pixel=rasters.world_from_pixel)


def read_map_rasters(folder: str | Path) -> MapRasters:
    path = Path(folder) / "rasters.npz"
    if not path.is_file():
        raise StageError(f"{path} not found; run the hdmap stage for this scene first")
    with np.load(path) as z:
        return MapRasters(z["channels"], [str(n) for n in z["names"]], z["world_from_pixel"])


# ----------------------------------------------------------------------------------------------- scoring


def evaluate_poses(est: dict[str, np.ndarray], frames: Frames) -> tuple[dict, pd.DataFrame, Sim3 | None]:
    """Pose errors of the registered mapping frames that have ground truth, per-frame rows, and the alignment.

    Returns (summary, per-frame table with `image`, `frame`, `rotation_error_deg`, `position_error`, the Sim3
    x_gt = s R x_est + t); the summary is empty and the Sim3 None with fewer than 3 frames to compare.
    """
    evaluated = [n for n in frames.names if n in est and n in frames.gt]  # capture order: path length
    table = pd.DataFrame({"image": frames.names, "frame": range(len(frames.names))})
    table["rotation_error_deg"] = math.nan
    table["position_error"] = math.nan
    if len(evaluated) < 3:
        return {}, table, None
    err = pose_errors([est[n] for n in evaluated], [frames.gt[n] for n in evaluated])
    sim3 = err.pop("sim3")
    at = table.set_index("image")
    at.loc[evaluated, "rotation_error_deg"] = err.pop("per_image_rotation_error_deg")
    at.loc[evaluated, "position_error"] = err.pop("per_image_position_error")
    err["evaluated_images"] = len(evaluated)
    return err, at.reset_index(), sim3
