"""Reading a scene folder in the format of DESIGN.md: images/ or one video, queries/, transforms.json, scene.yaml.

transforms.json follows nerfstudio: shared intrinsics (`camera_model`, `fl_x`, `fl_y`, `cx`, `cy`, `w`,
`h`, optional `k1 k2 p1 p2`, any of which a frame may override) and per-frame camera-to-world
`transform_matrix` in OpenGL axes keyed by `file_path` relative to the scene folder (and inside it); plus
our key `metric`. A frame of a video scene names the video as `file_path` and gives its `timestamp` in seconds.

scene.yaml holds `SceneSettings`: facts about one capture that override params.yaml for that scene only.
Ingest copies the resolved settings into its output folder, where later stages read them with
`read_scene_settings`.

An image folder is a sequence (frames in capture order) when its file names say so (`sequence_order`):
one integer field that counts up, everything around it the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

import numpy as np
import yaml

from stages.common.errors import StageError
from stages.common.geometry import world_from_cam_gl_to_cam_from_world
from stages.common.params import build, require

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "k1", "k2", "p1", "p2", "camera_model")
SCENE_SETTINGS_FILE = "scene.yaml"
# Fewer files than this say nothing about an order: any two names "count up".
MIN_SEQUENCE_FILES = 3


@dataclasses.dataclass(frozen=True)
class Intrinsics:
    """Pinhole (+ optional OpenCV distortion) intrinsics in pixels of a `w` x `h` image."""

    w: int
    h: int
    fx: float
    fy: float
    cx: float
    cy: float
    k1: float = 0.0
    k2: float = 0.0
    p1: float = 0.0
    p2: float = 0.0
    model: str = "OPENCV"

    def scaled(self, w: int, h: int) -> "Intrinsics":
        """The same camera for an image resized to `w` x `h` (distortion is scale-free)."""
        sx, sy = w / self.w, h / self.h
        # COLMAP and nerfstudio put pixel centres at +0.5 (the image spans [0, w]), so c scales as c * s.
        return dataclasses.replace(self, w=w, h=h, fx=self.fx * sx, fy=self.fy * sy, cx=self.cx * sx, cy=self.cy * sy)

    def K_33(self) -> np.ndarray:
        """Calibration matrix."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])

    @property
    def has_distortion(self) -> bool:
        """True when any distortion coefficient is non-zero."""
        return any(abs(v) > 0 for v in (self.k1, self.k2, self.p1, self.p2))


@dataclasses.dataclass(frozen=True)
class GtFrame:
    """One ground-truth frame of transforms.json."""

    file_path: str
    cam_from_world_34: np.ndarray | None
    intrinsics: Intrinsics | None
    timestamp: float | None = None


@dataclasses.dataclass(frozen=True)
class Transforms:
    """Parsed transforms.json."""

    metric: bool
    intrinsics: Intrinsics | None
    frames: list[GtFrame]

    def by_path(self) -> dict[str, GtFrame]:
        """Frames of image scenes keyed by their normalised file_path."""
        return {norm_rel(f.file_path): f for f in self.frames if f.timestamp is None}

    def video_frames(self) -> list[GtFrame]:
        """Frames that carry a video timestamp, sorted by it."""
        return sorted((f for f in self.frames if f.timestamp is not None), key=lambda f: f.timestamp)


class OutsideScene(ValueError):
    """A path that is absolute or climbs out of the scene folder; the message says which."""


def norm_rel(path: str) -> str:
    """Normalise a scene-relative path ('./images/../images/a.png' -> 'images/a.png'); OutsideScene if it leaves.

    Judged on the text alone, without following symlinks: a link inside the scene folder is the user's
    choice, while an absolute path or a `..` that climbs above the folder never names part of the scene.
    """
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).drive:
        raise OutsideScene("is absolute")
    parts: list[str] = []
    for p in PurePosixPath(path).as_posix().split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                raise OutsideScene("climbs out of the scene folder with '..'")
            parts.pop()
        else:
            parts.append(p)
    return "/".join(parts)


def _intrinsics(d: dict, base: Intrinsics | None, where: str) -> Intrinsics | None:
    keys = {k: d[k] for k in INTRINSIC_KEYS if k in d}
    if not keys:
        return base
    merged = dataclasses.asdict(base) if base else {}
    rename = {"fl_x": "fx", "fl_y": "fy", "camera_model": "model"}
    for k, v in keys.items():
        merged[rename.get(k, k)] = v
    if "fy" not in merged and "fx" in merged:
        merged["fy"] = merged["fx"]
    missing = [k for k in ("w", "h", "fx", "cx", "cy") if k not in merged]
    if missing:
        raise StageError(f"{where}: intrinsics lack {', '.join(missing)}; give fl_x, fl_y, cx, cy, w, h")
    try:
        return Intrinsics(
            w=int(merged["w"]), h=int(merged["h"]), fx=float(merged["fx"]), fy=float(merged["fy"]),
            cx=float(merged["cx"]), cy=float(merged["cy"]),
            **{k: float(merged.get(k, 0.0)) for k in ("k1", "k2", "p1", "p2")},
            model=str(merged.get("model", "OPENCV")),
        )
    except (TypeError, ValueError) as exc:
        raise StageError(f"{where}: intrinsics are not numbers ({exc})") from None


def read_transforms(scene_dir: str | Path, check_files: bool = True) -> Transforms | None:
    """Parse `scene_dir/transforms.json`, or None when there is none.

    With `check_files`, a frame naming a file that does not exist is a StageError naming it.
    """
    scene_dir = Path(scene_dir)
    path = scene_dir / "transforms.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StageError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(data, dict) or not isinstance(data.get("frames", []), list):
        raise StageError(f"{path}: expected an object with a 'frames' list")
    base = _intrinsics(data, None, str(path))
    frames = []
    for i, fr in enumerate(data.get("frames", [])):
        where = f"{path} frame {i}"
        if not isinstance(fr, dict) or "file_path" not in fr:
            raise StageError(f"{where}: has no 'file_path'")
        try:
            rel = norm_rel(str(fr["file_path"]))
        except OutsideScene as exc:
            # Refused even when the file exists: ground truth must describe the scene, not any file on disk.
            raise StageError(
                f"{path}: frame {i} has file_path {fr['file_path']!r}, which {exc}; file paths must be relative "
                "to the scene folder and stay inside it"
            ) from None
        if not rel:
            raise StageError(f"{path}: frame {i} has file_path {fr['file_path']!r}, which names the scene folder "
                             "itself; give the path of its image or video relative to the scene folder")
        if check_files and not (scene_dir / rel).exists():
            raise StageError(
                f"{path} names a missing file {fr['file_path']!r} (frame {i}); fix its file_path or "
                "remove the frame"
            )
        pose = None
        if "transform_matrix" in fr:
            T = np.asarray(fr["transform_matrix"], float)
            if T.shape != (4, 4) or not np.all(np.isfinite(T)):
                raise StageError(f"{where}: transform_matrix must be a finite 4x4 matrix")
            pose = world_from_cam_gl_to_cam_from_world(T)
        ts = fr.get("timestamp")
        frames.append(GtFrame(rel, pose, _intrinsics(fr, base, where), None if ts is None else float(ts)))
    return Transforms(metric=bool(data.get("metric", False)), intrinsics=base, frames=frames)


@dataclasses.dataclass(frozen=True)
class SceneSettings:
    """Facts about one capture (scene.yaml in the scene folder) that override params.yaml for this scene only."""

    camera_height_m: float | None = None
    """Camera height above the road (m) in a driving capture; overrides sfm.camera_height_m; null = params.yaml's."""
    metric_scale: Literal["auto", "camera_height", "none"] = "auto"
    """Metric scale from camera height: auto (if sfm finds a ground plane under the cameras), camera_height, none."""
    sequence: bool | None = None
    """Force (true/false) whether images/ is an ordered sequence; null = decide from the file names."""
    geo_origin: tuple[float, float] | None = None
    """Latitude and longitude (degrees, WGS84) of the map's local origin, for map exports (Lanelet2 OSM);
    null = hdmap.geo_origin from params.yaml."""

    def __post_init__(self) -> None:
        # A ValueError here becomes a StageError naming the file (stages.common.params.build).
        require(self, [  # (ok, key, what is required)
            (self.camera_height_m is None or 0 < self.camera_height_m < math.inf, "camera_height_m",
             "is not allowed; it must be a height > 0 in metres, or null to use params.yaml"),
            (self.geo_origin is None or (len(self.geo_origin) == 2 and -90 <= self.geo_origin[0] <= 90
                                         and -180 <= self.geo_origin[1] <= 180), "geo_origin",
             "is not allowed; it must be [latitude, longitude] in degrees, or null to use params.yaml"),
        ])


def read_scene_settings(folder: str | Path) -> SceneSettings:
    """`folder/scene.yaml` as SceneSettings (defaults when there is none); a malformed file is a StageError."""
    path = Path(folder) / SCENE_SETTINGS_FILE
    if not path.is_file():
        return SceneSettings()
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise StageError(f"{path} is not valid YAML ({exc}); fix or remove it".replace("\n", " ")) from None
    if data is not None and not isinstance(data, dict):
        raise StageError(f"{path} must hold a mapping of settings (e.g. `camera_height_m: 1.65`), "
                         f"found {type(data).__name__}; fix or remove it")
    try:
        return build(SceneSettings, data, str(path))
    except StageError as exc:
        # build names a key as "<where>.<key>", which after a file name reads like another file name.
        raise StageError(str(exc).replace(f"{path}.", f"{path}: ", 1)) from None


def write_scene_settings(folder: str | Path, settings: SceneSettings) -> Path:
    """Write every key of `settings` (nulls included) to `folder/scene.yaml`, readable by `read_scene_settings`."""
    path = Path(folder) / SCENE_SETTINGS_FILE
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
    text = yaml.safe_dump(values, sort_keys=False, default_flow_style=None)
    path.write_text("# Per-scene settings (the scene's scene.yaml over the defaults); null: params.yaml or "
                    "decided by the stages.\n" + text)
    return path


def _name_tokens(name: str) -> list[str]:
    """Text and digit runs, alternating, text first and last: 'img10.png' -> ['img', '10', '.png']."""
    return re.split(r"(\d+)", name)


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value ('img9.png' before 'img10.png')."""
    return tuple(int(t) if i % 2 else t for i, t in enumerate(_name_tokens(name)))


def sequence_numbers(names: Sequence[str]) -> list[int] | None:
    """The counting integer of each name (in the given order) when the names form a sequence, else None.

    Sequence: the same text around one digit run that differs between files (000000.png, 000001.png;
    frame_0001.jpg; IMG_1234.JPG; img9.png, img10.png), gaps allowed. Not a sequence: fewer than
    MIN_SEQUENCE_FILES names, no digits, different text or extensions, two digit runs that vary
    (Flickr ids `02928139_3448003521.jpg`), or two names with the same number (img1.png, img01.png).
    Gaps in the numbers are gaps in the capture (frames left out), which a camera-path check must allow for.
    """
    if len(names) < MIN_SEQUENCE_FILES:
        return None
    tokens = [_name_tokens(n) for n in names]
    first = tokens[0]
    if len(first) < 3 or any(len(t) != len(first) for t in tokens):
        return None
    if any(t[k] != first[k] for t in tokens for k in range(0, len(first), 2)):
        return None
    varying = [k for k in range(1, len(first), 2) if any(t[k] != first[k] for t in tokens)]
    if len(varying) != 1:
        return None
    values = [int(t[varying[0]]) for t in tokens]
    return values if len(set(values)) == len(values) else None


def sequence_order(names: Sequence[str]) -> list[int] | None:
    """Capture order (indices into `names`) when the names count up in one integer field, else None."""
    values = sequence_numbers(names)
    return None if values is None else sorted(range(len(names)), key=values.__getitem__)


@dataclasses.dataclass(frozen=True)
class SceneInputs:
    """What a scene folder holds; `images` in capture order when they are a sequence, else by name."""

    video: Path | None
    images: list[Path]
    queries: list[Path]
    sequence: bool = False
    """Frames are in capture order: always for a video; for images/ by their names or scene.yaml."""
    sequence_from: Literal["video", "file names", "scene.yaml"] = "file names"
    """What decided `sequence`."""


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def find_scene_inputs(scene_dir: str | Path, sequence: bool | None = None) -> SceneInputs:
    """Locate images/ or the one video, and queries/, in a scene folder; nothing usable is a StageError.

    `sequence` (scene.yaml's) forces whether images/ is an ordered sequence; None judges by the file names.
    """
    scene_dir = Path(scene_dir)
    if not scene_dir.is_dir():
        raise StageError(f"scene folder not found: {scene_dir}; put the scene in data/raw/<scene>/")
    videos = sorted(p for p in scene_dir.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    images = _files(scene_dir / "images")
    queries = _files(scene_dir / "queries")
    if len(videos) > 1:
        raise StageError(f"{scene_dir} holds {len(videos)} videos ({', '.join(v.name for v in videos)}); "
                         "keep one per scene")
    if videos and images:
        raise StageError(f"{scene_dir} holds both a video and images/; keep one of them")
    if not videos and not images:
        raise StageError(
            f"{scene_dir} has no input: expected images in {scene_dir / 'images'} or one video "
            f"({', '.join(VIDEO_EXTS)})"
        )
    if videos:
        return SceneInputs(video=videos[0], images=[], queries=queries, sequence=True, sequence_from="video")
    order = sequence_order([p.name for p in images])
    if sequence is None:
        is_seq, source = order is not None, "file names"
    else:
        is_seq, source = sequence, "scene.yaml"
    if is_seq:
        # Names that do not fit one pattern (forced by scene.yaml) still sort img9 before img10.
        images = [images[i] for i in order] if order is not None else sorted(images, key=lambda p: natural_key(p.name))
    return SceneInputs(video=None, images=images, queries=queries, sequence=is_seq, sequence_from=source)
