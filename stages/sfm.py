"""SfM: ingest's frames -> camera poses, sparse points and their health, with pycolmap (COLMAP + GLOMAP).

Features are SIFT by default (on CUDA when the installed pycolmap has it). Matching is chosen from the
input: sequential (+ loop closure by retrieval) for video, exhaustive for small image sets, retrieval pairs
for large ones. Retrieval ranks images by VLAD vectors built from the database's own SIFT descriptors, so
nothing is downloaded (COLMAP's vocabulary tree would have to be). Mapping is global (GLOMAP) by default,
incremental as the fallback. Known intrinsics (ingest's cameras.json, from transforms.json) are used as
calibration; other camera groups get one camera each, with the focal length estimated.

Every attempt passes a health gate: registered ratio, number of models, mean reprojection error, mean track
length, and geometric sanity, because reprojection error alone does not reveal a wrong focal length:
plausible field of view, and for video a smooth trajectory (no jumps in the camera steps or turns). An
attempt that fails escalates: more features and matches, then another matcher, then another mapper. Each
attempt, its numbers and why it was rejected go into metrics.json; the best attempt is kept even when none
passes (metrics say `gate_passed: false`).

The kept model is rotated so z is up (ground plane fitted to the sparse points, signed by the cameras' up
vectors) and scaled to metres from the known camera height above the ground (`camera_height_m`); the scale
source and a confidence are recorded. Ground-truth poses (ingest's manifest) are used only to evaluate,
after a Sim3 alignment whose rotation comes from the camera orientations.

Outputs in --out: model/ (COLMAP binary), poses.csv, sparse.ply, metrics.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pycolmap
from scipy.cluster.vq import kmeans2

from stages.common.align import pose_errors, rotation_angle_deg
from stages.common.cli import guarded, make_parser
from stages.common.errors import StageError
from stages.common.geometry import R_from_quat_wxyz, camera_center, quat_wxyz_from_R
from stages.common.outputs import atomic_dir, write_json
from stages.common.params import load_section, require

log = logging.getLogger("scenepipe.sfm")

NO_BASELINE = "no baseline (pure rotation)"
INPUTS = {"frames": "ingest output folder: images/, manifest.csv, cameras.json, metrics.json"}
OUTPUTS = {"out": "output folder: model/, poses.csv, sparse.ply, metrics.json"}


@dataclasses.dataclass(frozen=True)
class SfmParams:
    """Params of the sfm stage (params.yaml section `sfm`)."""

    features: Literal["sift", "aliked"] = "sift"
    """Feature preset: SIFT, or ALIKED + LightGlue (needs pycolmap's model files available offline)."""
    max_num_features: int = 2048
    """Features per image on the first attempt; the ladder doubles it."""
    matcher: Literal["auto", "sequential", "exhaustive", "retrieval"] = "auto"
    """auto: sequential for video, exhaustive up to `exhaustive_max_images` images, retrieval above."""
    exhaustive_max_images: int = 60
    """auto matcher: image sets up to this size are matched exhaustively."""
    sequential_overlap: int = 5
    """Sequential matching: each frame is matched with this many following frames."""
    retrieval_neighbors: int = 12
    """Retrieval matching and loop closure: pairs per image from VLAD similarity."""
    loop_closure: bool = True
    """Video: add retrieval pairs between frames farther apart than the sequential overlap."""
    mapper: Literal["global", "incremental"] = "global"
    """First mapper; the ladder tries the other one."""
    refine_intrinsics: bool = False
    """Refine known intrinsics in bundle adjustment (unknown ones are always estimated)."""
    camera_model: Literal["SIMPLE_RADIAL", "RADIAL", "OPENCV", "PINHOLE", "SIMPLE_PINHOLE"] = "SIMPLE_RADIAL"
    """COLMAP camera model for camera groups without known intrinsics."""
    min_images: int = 3
    """Fewest mapping images to attempt SfM."""
    max_attempts: int = 4
    """Length of the escalation ladder (1 = no escalation)."""
    gate_min_registered_ratio: float = 0.95
    """Gate: registered fraction of the mapping images."""
    gate_max_reprojection_px: float = 1.5
    """Gate: mean reprojection error in pixels."""
    gate_min_track_length: float = 3.0
    """Gate: mean number of images observing a 3D point."""
    gate_fov_deg: tuple[float, float] = (15.0, 150.0)
    """Gate: plausible horizontal field of view of estimated cameras (degrees)."""
    gate_max_rotation_only: float = 0.8
    """Gate: largest fraction of verified pairs that COLMAP explains as a camera rotating in place."""
    gate_max_step_ratio: float = 4.0
    """Gate, video: largest camera step over the median step between consecutive frames."""
    gate_max_turn_deg: float = 25.0
    """Gate, video: largest rotation between consecutive frames (degrees)."""
    camera_height_m: float = 1.6
    """Known camera height above the ground (metres), for gravity and metric scale."""
    seed: int = 0
    """Random seed of the mappers and of retrieval's k-means."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Feature extraction and matching device; cuda needs pycolmap's CUDA build."""
    extraction: dict = dataclasses.field(default_factory=lambda: {"sift": {"first_octave": 0}})
    """Overrides merged into pycolmap.FeatureExtractionOptions (COLMAP's own keys); by default SIFT starts at
    the native resolution (first_octave 0), ~3x faster than COLMAP's upsampled octave at no accuracy cost
    measured on the default scene and kitti06."""
    matching: dict = dataclasses.field(default_factory=dict)
    """Overrides merged into pycolmap.FeatureMatchingOptions."""
    mapping: dict = dataclasses.field(default_factory=dict)
    """Overrides merged into the mapper's options (GlobalPipelineOptions or IncrementalPipelineOptions)."""

    def __post_init__(self) -> None:
        require(self, [  # (ok, key, what is required)
            (self.max_num_features >= 64, "max_num_features", "must be at least 64"),
            (self.min_images >= 2, "min_images", "must be at least 2"),
            (self.max_attempts >= 1, "max_attempts", "must be at least 1"),
            (0 < self.gate_min_registered_ratio <= 1, "gate_min_registered_ratio", "must lie in (0, 1]"),
            (self.camera_height_m > 0, "camera_height_m", "must be positive"),
            (self.sequential_overlap >= 1, "sequential_overlap", "must be at least 1"),
        ])


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One rung of the escalation ladder."""

    name: str
    max_num_features: int
    upsample: bool
    """SIFT from the upsampled octave (first_octave -1): more, smaller features."""
    matcher: str
    overlap: int
    neighbors: int
    mapper: str


@dataclasses.dataclass(frozen=True)
class SfmResult:
    """What `run` wrote."""

    out_dir: Path
    metrics: dict
    reconstruction: Any


# ------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Frames:
    """Ingest's output as SfM needs it."""

    image_dir: Path
    names: list[str]
    """Mapping image names relative to image_dir, in capture order."""
    groups: dict[str, list[str]]
    """Camera group id -> image names."""
    intrinsics: dict[str, dict | None]
    """Camera group id -> known intrinsics (cameras.json) or None."""
    is_video: bool
    gt: dict[str, np.ndarray]
    """Image name -> ground-truth cam_from_world (3x4), evaluation only."""
    metric: bool


def read_frames(frames_dir: Path) -> Frames:
    """Read ingest's manifest, cameras.json and metrics.json; missing files are a StageError."""
    for name in ("manifest.csv", "cameras.json", "metrics.json", "images"):
        if not (frames_dir / name).exists():
            raise StageError(f"{frames_dir / name} not found; run the ingest stage for this scene first")
    manifest = pd.read_csv(frames_dir / "manifest.csv")
    cams = json.loads((frames_dir / "cameras.json").read_text())
    ingest_metrics = json.loads((frames_dir / "metrics.json").read_text())
    mapping = manifest[manifest["split"] == "mapping"].copy()
    mapping = mapping.sort_values(["frame_index", "name"]) if "frame_index" in mapping else mapping
    names, groups, gt = [], {}, {}
    for row in mapping.itertuples(index=False):
        name = str(row.name).removeprefix("images/")
        names.append(name)
        groups.setdefault(str(int(row.camera)), []).append(name)
        q = [getattr(row, k) for k in ("gt_qw", "gt_qx", "gt_qy", "gt_qz", "gt_tx", "gt_ty", "gt_tz")]
        if all(np.isfinite(q)):
            R_33 = R_from_quat_wxyz(np.asarray(q[:4], float))
            gt[name] = np.concatenate([R_33, np.asarray(q[4:], float)[:, None]], axis=1)
    intr = {g: (cams.get(g) or {}).get("intrinsics") for g in groups}
    return Frames(frames_dir / "images", names, groups, intr, ingest_metrics.get("source_kind") == "video", gt,
                  bool(ingest_metrics.get("metric")))


# ------------------------------------------------------------------------------------- pycolmap glue


def merge_options(opts: Any, overrides: dict, where: str) -> Any:
    """Merge a nested dict of COLMAP option names into a pycolmap options object; a bad key is a StageError."""
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise StageError(f"sfm.{where}: {key!r} is not a pycolmap option of {type(opts).__name__}")
        if isinstance(value, dict):
            merge_options(getattr(opts, key), value, f"{where}.{key}")
        else:
            try:
                setattr(opts, key, value)
            except (TypeError, ValueError) as exc:
                raise StageError(f"sfm.{where}.{key}: {value!r} is not accepted ({exc})") from None
    return opts


def _device(pref: str) -> pycolmap.Device:
    if pref == "cuda" and not pycolmap.has_cuda:
        raise StageError("sfm.device: cuda was asked for but this pycolmap has no CUDA; install the gpu extra "
                         "(pycolmap-cuda12) or set device: auto")
    return pycolmap.Device.cuda if pref != "cpu" and pycolmap.has_cuda else pycolmap.Device.cpu


def _camera_params(intr: dict) -> tuple[str, str]:
    """COLMAP camera model and params string for known intrinsics."""
    k = [intr.get(n, 0.0) for n in ("k1", "k2", "p1", "p2")]
    if any(abs(v) > 0 for v in k):
        vals = [intr["fx"], intr["fy"], intr["cx"], intr["cy"], *k]
        return "OPENCV", ",".join(f"{v:.10g}" for v in vals)
    return "PINHOLE", ",".join(f"{intr[n]:.10g}" for n in ("fx", "fy", "cx", "cy"))


def extract(db: Path, frames: Frames, params: SfmParams, max_num_features: int, upsample: bool) -> None:
    """Extract features into a new database, one camera per camera group (known intrinsics where given)."""
    for group, names in frames.groups.items():
        opts = pycolmap.FeatureExtractionOptions()
        opts.sift.max_num_features = max_num_features
        if params.features == "aliked":
            opts.type = pycolmap.FeatureExtractorType.ALIKED_N16ROT
            opts.aliked.max_num_features = max_num_features
        merge_options(opts, params.extraction, "extraction")
        if upsample:
            opts.sift.first_octave = -1
        reader = pycolmap.ImageReaderOptions()
        intr = frames.intrinsics.get(group)
        if intr:
            reader.camera_model, reader.camera_params = _camera_params(intr)
        else:
            reader.camera_model = params.camera_model
        try:
            pycolmap.extract_features(db, frames.image_dir, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
                                      reader_options=reader, extraction_options=opts, device=_device(params.device))
        except RuntimeError as exc:
            raise StageError(f"feature extraction ({params.features}) failed: {exc}; use features: sift") from None


def vlad_pairs(db: Path, names: list[str], k: int, min_gap: int, seed: int) -> set[tuple[str, str]]:
    """Retrieval pairs: each image with its `k` most similar images (VLAD of its own SIFT descriptors)."""
    database = pycolmap.Database.open(str(db))
    try:
        by_name = {im.name: im.image_id for im in database.read_all_images()}
        descs = [np.asarray(database.read_descriptors(by_name[n]).data, np.float32) for n in names]
    finally:
        database.close()
    rng = np.random.default_rng(seed)
    sample = np.concatenate([d[rng.choice(len(d), min(len(d), 300), replace=False)] for d in descs if len(d)])
    sample /= np.linalg.norm(sample, axis=1, keepdims=True) + 1e-9
    n_words = int(min(64, max(8, len(sample) // 50)))
    centers, _ = kmeans2(sample, n_words, minit="++", seed=seed, iter=10)
    vlad = np.zeros((len(names), n_words * sample.shape[1]), np.float32)
    for i, d in enumerate(descs):
        if not len(d):
            continue
        d = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)
        word = np.argmin(((d[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
        v = np.zeros((n_words, d.shape[1]), np.float32)
        np.add.at(v, word, d - centers[word])
        v = np.sign(v) * np.sqrt(np.abs(v))  # power normalisation against bursty features
        vlad[i] = (v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-9)).ravel()
    vlad /= np.linalg.norm(vlad, axis=1, keepdims=True) + 1e-9
    sim = vlad @ vlad.T
    pairs = set()
    for i in range(len(names)):
        order = [j for j in np.argsort(-sim[i]) if abs(int(j) - i) > min_gap]
        for j in order[:k]:
            pairs.add(tuple(sorted((names[i], names[int(j)]))))
    return pairs


def match(db: Path, work: Path, frames: Frames, params: SfmParams, att: Attempt) -> int:
    """Match and verify the attempt's pairs; returns the number of pairs tried."""
    opts = merge_options(pycolmap.FeatureMatchingOptions(), params.matching, "matching")
    opts.max_num_matches = max(opts.max_num_matches, 2 * att.max_num_features)
    if params.features == "aliked":
        opts.type = pycolmap.FeatureMatcherType.ALIKED_LIGHTGLUE
    names = frames.names
    pairs: set[tuple[str, str]] = set()
    if att.matcher == "exhaustive":
        pairs = {(a, b) for i, a in enumerate(names) for b in names[i + 1:]}
    elif att.matcher == "sequential":
        for i, a in enumerate(names):
            steps = list(range(1, att.overlap + 1)) + [2**e for e in range(int(math.log2(att.overlap)) + 1, 8)]
            pairs |= {(a, names[i + s]) for s in steps if i + s < len(names)}
        if params.loop_closure and len(names) > 2 * att.overlap:
            pairs |= vlad_pairs(db, names, 3, att.overlap, params.seed)
    else:  # retrieval
        pairs = vlad_pairs(db, names, att.neighbors, 0, params.seed)
    pairs_file = work / f"pairs_{att.name}.txt"
    pairs_file.write_text("".join(f"{a} {b}\n" for a, b in sorted(pairs)))
    pairing = pycolmap.ImportedPairingOptions()
    pairing.match_list_path = str(pairs_file)
    pycolmap.match_image_pairs(db, matching_options=opts, pairing_options=pairing, device=_device(params.device))
    return len(pairs)


def map_images(db: Path, frames: Frames, params: SfmParams, att: Attempt, out: Path) -> dict[int, Any]:
    """Run the attempt's mapper; returns pycolmap's models."""
    out.mkdir(parents=True, exist_ok=True)
    known = all(frames.intrinsics.get(g) for g in frames.groups)
    refine = params.refine_intrinsics or not known
    if att.mapper == "global":
        opts = pycolmap.GlobalPipelineOptions()
        opts.random_seed = params.seed
        ba = opts.mapper.bundle_adjustment
        ba.refine_focal_length = refine
        ba.refine_extra_params = refine
        merge_options(opts, params.mapping, "mapping")
        return pycolmap.global_mapping(db, frames.image_dir, out, opts)
    opts = pycolmap.IncrementalPipelineOptions()
    opts.random_seed = params.seed
    opts.ba_refine_focal_length = refine
    opts.ba_refine_extra_params = refine
    # A forward-driving camera makes every initial pair "forward motion"; COLMAP's 0.95 limit rejects them all.
    opts.mapper.init_max_forward_motion = 1.0
    opts.min_model_size = min(opts.min_model_size, max(3, len(frames.names) // 4))
    merge_options(opts, params.mapping, "mapping")
    return pycolmap.incremental_mapping(db, frames.image_dir, out, opts)


# ------------------------------------------------------------------------------------- health gate


def rotation_only_ratio(db: Path) -> float:
    """Fraction of verified pairs COLMAP explains by a homography of a rotating camera (panoramic)."""
    database = pycolmap.Database.open(str(db))
    try:
        _, geoms = database.read_two_view_geometries()
    finally:
        database.close()
    cfg = pycolmap.TwoViewGeometryConfiguration
    verified = [g for g in geoms if g.config not in (cfg.UNDEFINED, cfg.DEGENERATE, cfg.WATERMARK)]
    if not verified:
        return 0.0
    return sum(g.config in (cfg.PANORAMIC, cfg.PLANAR_OR_PANORAMIC) for g in verified) / len(verified)


def model_numbers(rec: Any, frames: Frames) -> dict:
    """Health numbers of one model."""
    names = set(frames.names)
    reg = [im for im in rec.images.values() if im.has_pose and im.name in names]
    fov = []
    for cam in rec.cameras.values():
        fx = cam.focal_length_x if hasattr(cam, "focal_length_x") else cam.focal_length
        fov.append(math.degrees(2 * math.atan(cam.width / (2 * fx))))
    out = {
        "registered": len(reg),
        "registered_ratio": len(reg) / max(1, len(frames.names)),
        "reprojection_error_px": float(rec.compute_mean_reprojection_error()),
        "track_length": float(rec.compute_mean_track_length()),
        "points": int(rec.num_points3D()),
        "fov_deg": [round(f, 2) for f in fov],
    }
    if len(reg) >= 2 and rec.num_points3D():
        # Baseline over scene depth: near zero for a camera that only rotates (no triangulation possible).
        centers = np.stack([im.projection_center() for im in reg])
        pts = np.array([p.xyz for p in rec.points3D.values()])
        depth = np.median(np.linalg.norm(pts - centers.mean(0), axis=1))
        out["baseline_ratio"] = float(np.linalg.norm(centers - centers.mean(0), axis=1).max() / max(depth, 1e-12))
    if frames.is_video and len(reg) >= 3:
        order = {n: i for i, n in enumerate(frames.names)}
        poses = sorted(((order[im.name], im.cam_from_world().matrix()) for im in reg), key=lambda t: t[0])
        centers = np.stack([camera_center(p) for _, p in poses])
        steps = np.linalg.norm(np.diff(centers, axis=0), axis=1)
        turns = [rotation_angle_deg(a[:3, :3] @ b[:3, :3].T) for (_, a), (_, b) in zip(poses, poses[1:])]
        out["step_ratio"] = float(steps.max() / max(np.median(steps), 1e-12))
        out["max_turn_deg"] = float(max(turns))
    return out


def gate(numbers: dict, n_models: int, params: SfmParams) -> list[str]:
    """Reasons an attempt fails the health gate (empty when it passes)."""
    why = []
    if numbers["registered_ratio"] < params.gate_min_registered_ratio:
        why.append(f"registered {numbers['registered_ratio']:.0%} < {params.gate_min_registered_ratio:.0%}")
    if numbers.get("rotation_only_pairs", 0.0) > params.gate_max_rotation_only:
        why.append(f"{NO_BASELINE}: {numbers['rotation_only_pairs']:.0%} of the verified pairs are explained by "
                   f"a rotating camera > {params.gate_max_rotation_only:.0%}")
    if n_models > 1:
        why.append(f"{n_models} models")
    if numbers["reprojection_error_px"] > params.gate_max_reprojection_px:
        why.append(f"reprojection {numbers['reprojection_error_px']:.2f} px > {params.gate_max_reprojection_px}")
    if numbers["track_length"] < params.gate_min_track_length:
        why.append(f"track length {numbers['track_length']:.2f} < {params.gate_min_track_length}")
    lo, hi = params.gate_fov_deg
    bad_fov = [f for f in numbers["fov_deg"] if not lo <= f <= hi]
    if bad_fov:
        why.append(f"implausible field of view {bad_fov} deg (focal length wrong?)")
    if numbers.get("step_ratio", 0) > params.gate_max_step_ratio:
        why.append(f"trajectory jumps: step ratio {numbers['step_ratio']:.1f} > {params.gate_max_step_ratio}")
    if numbers.get("max_turn_deg", 0) > params.gate_max_turn_deg:
        why.append(f"trajectory turns {numbers['max_turn_deg']:.1f} deg between frames > {params.gate_max_turn_deg}")
    return why


def ladder(frames: Frames, params: SfmParams) -> list[Attempt]:
    """The escalation ladder: base, more features/matches, another matcher, another mapper."""
    n = len(frames.names)
    if params.matcher != "auto":
        first = params.matcher
    elif frames.is_video:
        first = "sequential"
    else:
        first = "exhaustive" if n <= params.exhaustive_max_images else "retrieval"
    other_matcher = "exhaustive" if n <= 3 * params.exhaustive_max_images and first != "exhaustive" else (
        "retrieval" if first != "retrieval" else "sequential")
    other_mapper = "incremental" if params.mapper == "global" else "global"
    f, o, k = params.max_num_features, params.sequential_overlap, params.retrieval_neighbors
    rungs = [
        Attempt("base", f, False, first, o, k, params.mapper),
        Attempt("more_features", 2 * f, True, first, 2 * o, 2 * k, params.mapper),
        Attempt("other_matcher", 2 * f, True, other_matcher, 2 * o, 2 * k, params.mapper),
        Attempt("other_mapper", 2 * f, True, other_matcher, 2 * o, 2 * k, other_mapper),
    ]
    return rungs[: params.max_attempts]


# ------------------------------------------------------------------------------ gravity, scale, output


def gravity_and_scale(rec: Any, names: list[str], params: SfmParams) -> dict:
    """Rotate `rec` so z is up with the ground at z=0, scale it to metres from the camera height."""
    order = {n: i for i, n in enumerate(names)}
    ims = sorted((im for im in rec.images.values() if im.has_pose), key=lambda im: order.get(im.name, 0))
    poses = [im.cam_from_world().matrix() for im in ims]
    centers = np.stack([camera_center(p) for p in poses])
    up = -np.mean([p[1, :3] for p in poses], axis=0)  # camera -y axis, in world coordinates
    up /= np.linalg.norm(up)
    pts = np.array([p.xyz for p in rec.points3D.values()]) if rec.num_points3D() else np.zeros((0, 3))
    info: dict = {"scale_source": "camera_height", "camera_height_m": params.camera_height_m}
    # Ground candidates: points below the cameras along `up`.
    h_pts = pts @ up
    below = pts[h_pts < np.median(centers @ up) - 1e-9] if len(pts) else pts
    normal, offset, inliers = up, float(np.percentile(h_pts, 5)) if len(pts) else 0.0, 0.0
    if len(below) >= 20:
        rng = np.random.default_rng(params.seed)
        spread = np.median(np.abs(np.diff(centers @ up))) + np.median(np.linalg.norm(np.diff(centers, axis=0), axis=1))
        thresh = max(spread, 1e-6) * 0.05
        best = (0, normal, offset)
        for _ in range(300):
            s = below[rng.choice(len(below), 3, replace=False)]
            n = np.cross(s[1] - s[0], s[2] - s[0])
            if np.linalg.norm(n) < 1e-12:
                continue
            n /= np.linalg.norm(n)
            if n @ up < 0:
                n = -n
            if n @ up < np.cos(np.radians(30)):  # the ground is roughly perpendicular to the cameras' up
                continue
            d = float(n @ s[0])
            cnt = int((np.abs(below @ n - d) < thresh).sum())
            if cnt > best[0]:
                best = (cnt, n, d)
        cnt, normal, offset = best
        inl = below[np.abs(below @ normal - offset) < thresh]
        if len(inl) >= 3:  # least-squares refit on the inliers
            c = inl.mean(0)
            normal = np.linalg.svd(inl - c)[2][2]
            normal = normal if normal @ up > 0 else -normal
            offset = float(normal @ c)
        inliers = cnt / len(below)
    heights = centers @ normal - offset
    h_med = float(np.median(heights))
    if h_med > 0:
        scale = params.camera_height_m / h_med
    else:
        # No ground below the cameras (an object-centric capture): z up from the cameras, no metric scale.
        log.warning("no ground plane below the cameras: gravity from the camera up vectors, scale left as is")
        normal, offset, inliers, scale = up, float(np.median(h_pts)) if len(pts) else 0.0, 0.0, 1.0
        heights = centers @ normal - offset
        h_med = float(np.median(np.abs(heights))) or 1.0
        info["scale_source"] = "none: no ground plane below the cameras"
    # Rotation taking `normal` to +z; x along the main direction of travel projected on the ground.
    travel = centers[-1] - centers[0]
    x = travel - (travel @ normal) * normal
    if np.linalg.norm(x) < 1e-9:
        x = np.cross(normal, [1.0, 0, 0]) if abs(normal[0]) < 0.9 else np.cross(normal, [0, 1.0, 0])
    x /= np.linalg.norm(x)
    R_33 = np.stack([x, np.cross(normal, x), normal])
    t_3 = -scale * (R_33 @ (normal * offset))  # ground plane to z = 0
    rec.transform(pycolmap.Sim3d(scale, pycolmap.Rotation3d(R_33), t_3))
    rel_spread = float(np.std(heights) / h_med)
    info.update({
        "scale": float(scale),
        "ground_inlier_ratio": float(inliers),
        "camera_height_rel_spread": rel_spread,
        # High when the ground plane is well supported and the cameras ride at a constant height over it.
        "scale_confidence": float(np.clip(inliers, 0, 1) * np.exp(-rel_spread / 0.1)) if inliers else 0.0,
    })
    return info


def write_outputs(tmp: Path, rec: Any, frames: Frames, reasons: dict[str, str]) -> pd.DataFrame:
    """COLMAP binary model, poses.csv and sparse.ply into `tmp`."""
    (tmp / "model").mkdir()
    rec.write_binary(str(tmp / "model"))
    rec.export_PLY(str(tmp / "sparse.ply"))
    by_name = {im.name: im for im in rec.images.values()}
    rows = []
    for name in frames.names:
        im = by_name.get(name)
        if im is not None and im.has_pose:
            P = im.cam_from_world().matrix()
            q, c = quat_wxyz_from_R(P[:3, :3]), camera_center(P)
            rows.append({"image": f"images/{name}", "registered": True, "reason": "",
                         "qw": q[0], "qx": q[1], "qy": q[2], "qz": q[3], "tx": P[0, 3], "ty": P[1, 3], "tz": P[2, 3],
                         "cx": c[0], "cy": c[1], "cz": c[2], "camera_id": im.camera_id})
        else:
            rows.append({"image": f"images/{name}", "registered": False,
                         "reason": reasons.get(name, "not registered by the mapper (too few verified matches)")})
    table = pd.DataFrame(rows)
    table.to_csv(tmp / "poses.csv", index=False)
    return table


def evaluate(rec: Any, frames: Frames) -> dict:
    """Pose errors against ground truth for the registered images that have it (empty when none)."""
    est, gt = [], []
    by_name = {im.name: im for im in rec.images.values() if im.has_pose}
    for name in frames.names:  # capture order: the trajectory length sums consecutive steps
        if name in by_name and name in frames.gt:
            est.append(by_name[name].cam_from_world().matrix())
            gt.append(frames.gt[name])
    if len(est) < 3:
        return {}
    err = pose_errors(est, gt)
    err.pop("per_image_rotation_error_deg")
    err.pop("per_image_position_error")
    err["evaluated_images"] = len(est)
    return err


# ----------------------------------------------------------------------------------------------- run


def run(params: SfmParams, *, frames: Path, out_dir: Path) -> SfmResult:
    """Estimate camera poses for ingest's mapping frames; write model, poses, sparse cloud and metrics."""
    t_start = time.perf_counter()
    fr = read_frames(Path(frames))
    if len(fr.names) < params.min_images:
        raise StageError(f"only {len(fr.names)} mapping image(s) in {frames} (SfM needs sfm.min_images="
                         f"{params.min_images}); add images or lower ingest.query_every / sfm.min_images")
    attempts, best = [], None
    seconds: dict[str, float] = {"features": 0.0, "matching": 0.0, "mapping": 0.0}
    with tempfile.TemporaryDirectory(prefix="sfm-") as work_s:
        work = Path(work_s)
        feature_dbs: dict[int, Path] = {}
        for att in ladder(fr, params):
            t0 = time.perf_counter()
            key = (att.max_num_features, att.upsample)
            if key not in feature_dbs:
                db = work / f"features_{att.max_num_features}_{int(att.upsample)}.db"
                extract(db, fr, params, att.max_num_features, att.upsample)
                feature_dbs[key] = db
            seconds["features"] += (t1 := time.perf_counter()) - t0
            db = work / f"{att.name}.db"
            shutil.copy(feature_dbs[key], db)
            n_pairs = match(db, work, fr, params, att)
            seconds["matching"] += (t2 := time.perf_counter()) - t1
            rotation_only = rotation_only_ratio(db)
            models = map_images(db, fr, params, att, work / att.name)
            seconds["mapping"] += time.perf_counter() - t2
            record = {**dataclasses.asdict(att), "pairs": n_pairs, "rotation_only_pairs": rotation_only,
                      "models": len(models),
                      "seconds": round(time.perf_counter() - t0, 2)}
            if not models:
                record.update(registered_ratio=0.0, rejected=["no model: too few verified matches or no baseline"])
            else:
                ranked = sorted(models.values(), key=lambda r: r.num_reg_images(), reverse=True)
                numbers = {**model_numbers(ranked[0], fr), "rotation_only_pairs": rotation_only}
                record.update(numbers, rejected=gate(numbers, len(models), params),
                              other_models=[sorted(im.name for im in r.images.values() if im.has_pose)
                                            for r in ranked[1:]])
                if best is None or numbers["registered"] > best[1]["registered"] or (
                        numbers["registered"] == best[1]["registered"] and not record["rejected"]):
                    best = (ranked[0], record)
            attempts.append(record)
            log.info("attempt %s: %d pairs, %.0f%% rotation-only, %d model(s), %d/%d registered: %s", att.name,
                     n_pairs, 100 * rotation_only, len(models), record.get("registered", 0), len(fr.names),
                     "; ".join(record["rejected"]) or "passed the health gate")
            if not record["rejected"]:
                break
        if best is None:
            raise StageError(_no_model_message(fr, attempts, frames))
        rec, chosen = best
        if any(r.startswith(NO_BASELINE) for r in chosen["rejected"]):
            raise StageError(f"{NO_BASELINE} in {frames}: the camera rotated in place ("
                             f"{chosen['rotation_only_pairs']:.0%} of the image pairs), so no 3D structure can be "
                             "triangulated; capture while moving the camera, or raise sfm.gate_max_rotation_only")
        t0 = time.perf_counter()
        scale_info = gravity_and_scale(rec, fr.names, params)
        seconds["gravity_scale"] = time.perf_counter() - t0
        registered = {im.name for im in rec.images.values() if im.has_pose}
        others = {n: f"in another model ({i + 1})" for i, m in enumerate(chosen.get("other_models", [])) for n in m}
        with atomic_dir(out_dir) as tmp:
            write_outputs(tmp, rec, fr, {n: r for n, r in others.items() if n not in registered})
            errors = evaluate(rec, fr)
            seconds["total"] = time.perf_counter() - t_start
            metrics = {
                "images": len(fr.names),
                "registered_images": chosen["registered"],
                "registered_ratio": chosen["registered_ratio"],
                "reprojection_error_px": chosen["reprojection_error_px"],
                "track_length": chosen["track_length"],
                "points": int(rec.num_points3D()),
                "models": chosen["models"],
                "attempt": chosen["name"],
                "gate_passed": not chosen["rejected"],
                **{k: errors.get(k) for k in ("rotation_error_deg_median", "rotation_error_deg_max",
                                              "position_error_median", "position_error_max",
                                              "position_error_pct_median", "ate_rmse", "ate_rmse_pct")},
                "gravity_scale": scale_info,
                "gt_metric": fr.metric,
                # Estimated metres per ground-truth unit; 1.0 is a perfect scale on a metric scene.
                "scale_vs_gt": (1.0 / errors["sim3_scale"]) if errors else None,
                "device": "cuda" if _device(params.device) == pycolmap.Device.cuda else "cpu",
                "seconds": round(seconds["total"], 2),
                "seconds_per_phase": {k: round(v, 2) for k, v in seconds.items()},
                "attempts": attempts,
            }
            write_json(tmp / "metrics.json", metrics)
    log.info("registered %d/%d images (%s), %.1f s", chosen["registered"], len(fr.names), chosen["name"],
             seconds["total"])
    return SfmResult(Path(out_dir), metrics, rec)


def _no_model_message(fr: Frames, attempts: list[dict], frames: Path) -> str:
    """The one error line when every attempt failed to build any model."""
    pairs = max(a["pairs"] for a in attempts)
    return (f"no model from {len(fr.names)} images in {frames} after {len(attempts)} attempt(s) ({pairs} pairs "
            "tried): the images do not overlap enough or have no baseline (pure rotation); capture with more "
            "overlap and camera translation, or raise sfm.max_num_features / sfm.sequential_overlap")


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m stages.sfm --params params.yaml --frames data/ingest/S --out data/sfm/S`."""
    args = make_parser("sfm", __doc__, INPUTS, OUTPUTS).parse_args(argv)
    return guarded("sfm", lambda: run(load_section(args.params, "sfm", SfmParams), frames=Path(args.frames),
                                      out_dir=Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
