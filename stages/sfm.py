"""SfM: ingest's frames -> camera poses, sparse points and their health, with pycolmap (COLMAP + GLOMAP).

Features are SIFT by default (on CUDA when the installed pycolmap has it). Matching is chosen from the
input: sequential (+ loop closure by retrieval) for ordered captures (video, or an image folder whose names
count up, once consecutive frames are seen to overlap), exhaustive for small image sets, retrieval pairs for
large ones. Retrieval ranks images by VLAD vectors built from the database's own SIFT descriptors, so
nothing is downloaded (COLMAP's vocabulary tree would have to be). Mapping is global (GLOMAP) by default,
incremental as the fallback. Known intrinsics (ingest's cameras.json, from transforms.json) are used as
calibration; other camera groups get one camera each, with the focal length estimated.

Every attempt passes a health gate that looks for wrong models, not only bad ones, because reprojection error
cannot see a wrong focal length or a trajectory glued from pieces at different scales:
- registered ratio (a stray second model whose images the main model also holds is no reason to reject),
  mean reprojection error, mean track length;
- a plausible field of view on the image's long side;
- ordered captures: a continuous camera path (no step far longer than its neighbours', no sudden turn);
- no baseline: most pairs explained by a camera rotating in place (a homography that is a rotation);
- a cross-check where the focal length is estimated on an ordered capture (`cross_check: auto`): the other
  mapper (incremental or global) maps the same matches, and the two models must agree (focal length,
  orientations, camera path) after a Sim3; two different algorithms converging on one answer is evidence that
  no single one has.
An attempt that fails climbs the escalation ladder, each rung changing something for the failure at hand:
the other mapper on the same matches for geometric failures (path, focal, disagreement), more features and
wider matching for too few registered images, then another matcher where it adds pairs. Each attempt, the
values it used, its numbers and why it was rejected go into metrics.json; the best attempt is kept even when
none passes (metrics say `gate_passed: false` with the reasons).

For cameras whose intrinsics are estimated, the kept model's camera model is then chosen by the images
(stages.common.intrinsics): distortion and a principal point off the image centre are kept only where they are
determined and fit better (BIC), since either, when the data do not support it, biases the focal length and
with it every rotation of a turn. Where the cross-check runs, both of its models get this choice before they are
compared, so the check judges the models as they would be kept.

The kept model is rotated so z is up (ground plane fitted to the sparse points below the cameras, signed by
the cameras' up vectors) and, where it is earned, scaled to metres from the camera height above the ground:
the scale confidence is high only for a driving-like capture (ground plane under the cameras, level cameras
moving forward at a constant height over it); below `min_scale_confidence` no scale is applied and metrics
say so. The scene's scene.yaml (copied by ingest) may set the camera height or force/forbid the scale.
Ground-truth poses (ingest's manifest) are used only to evaluate, after a Sim3 alignment whose rotation comes
from the camera orientations.

Runs are deterministic: RANSAC, the mappers and retrieval are seeded from `seed`, pairs are sorted, and the
matcher and GLOMAP run on one thread each (with more, matches and poses varied from run to run under load).
COLMAP's own log is quiet unless `verbose: true`.

Outputs in --out (layout owned by stages.common.artifacts): model/ (COLMAP binary; image names relative to
the ingest folder, as in its manifest), poses.csv (cam_from_world per mapping image, with the reason for
any left unregistered), sparse.ply, alignment.json (the gravity/scale transform applied to the mapper's model
and the Sim3 to ground truth), per_image.csv (reprojection and pose errors per frame), metrics.json.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pycolmap

from stages.common.align import Sim3, pose_errors, rotation_angle_deg
from stages.common.artifacts import METRICS, Alignment, Frames, evaluate_poses, read_ingest, write_sfm
from stages.common.colmap import (
    PAIRS,
    extract,
    extraction_options,
    match,
    merge_options,
    quiet_colmap,
    verified_pairs,
)
from stages.common.cli import guarded, make_parser
from stages.common.device import pick_colmap_device
from stages.common.errors import StageError
from stages.common.geometry import camera_center
from stages.common.intrinsics import reprojection_errors, select_intrinsics
from stages.common.outputs import atomic_dir, write_json
from stages.common.params import load_section, require
from stages.common.scene import SceneSettings

log = logging.getLogger("scenepipe.sfm")

NO_BASELINE = "no baseline (pure rotation)"
INPUTS = {"frames": "ingest output folder: images/, manifest.csv, cameras.json, capture.json, scene.yaml"}
OUTPUTS = {"out": "output folder: model/, poses.csv, sparse.ply, alignment.json, per_image.csv, metrics.json"}
# COLMAP extraction, matching and bundle adjustment run on CUDA with pycolmap's CUDA build (flows tag `gpu`).
USES_GPU = True

# An ordered capture is trusted as a sequence when at least this share of consecutive frames overlap.
MIN_SEQUENCE_OVERLAP = 0.8
# Path continuity: each step is compared with the median of this many steps on each side of it.
STEP_WINDOW = 3
# ... floored at this fraction of the median step, so a camera that slows to a stop is no "jump".
STEP_FLOOR = 0.25
# Ground plane RANSAC: iterations (300 draws of 3 points hit a plane holding 30 % of the points with
# probability 1 - (1 - 0.3^3)^300 > 99.9 %; a least-squares refit on the inliers follows), and the largest tilt
# of the ground from the cameras' mean up vector (a road's slope stays far below; a facade is near 90).
GROUND_RANSAC_ITERS = 300
GROUND_MAX_TILT_DEG = 30.0
# Ground inlier band: this fraction of the typical camera step plus the height jitter (scene units, so it
# follows the model's arbitrary scale), and the fewest points below the cameras worth a RANSAC fit.
GROUND_BAND = 0.05
GROUND_MIN_POINTS = 20
# With no fit, the ground is put at this percentile of the points' heights (below most of the scene).
GROUND_FALLBACK_PERCENTILE = 5
# Share of the points below the cameras that a ground plane must hold to be fully trusted.
GROUND_MIN_SHARE = 0.1
# Scale confidence: the relative spread of camera heights, the camera tilt from the ground normal and the share
# of sideways motion at which a driving-capture factor has fallen to 1/e (physical, not fitted to any scene).
HEIGHT_SPREAD_SCALE = 0.1
LEVEL_TILT_SCALE_DEG = 25.0
# Homographies whose calibrated singular values agree within this (median) are rotations: pixel noise gives
# ~0.01, a baseline of a tenth of the scene depth ~0.1.
ROTATION_H_TOL = 0.03
# The cross-check maps every other frame of captures with at least twice this many frames.
CROSS_CHECK_MIN_IMAGES = 10
# Points sampled for the triangulation-angle statistic (enough for a stable median, cheap on big models).
TRI_ANGLE_SAMPLES = 5000


@dataclasses.dataclass(frozen=True)
class GateParams:
    """The health gate's thresholds (params.yaml `sfm.gate`)."""

    min_registered_ratio: float = 0.95
    """Registered fraction of the mapping images."""
    max_reprojection_px: float = 1.5
    """Mean reprojection error in pixels."""
    min_track_length: float = 3.0
    """Mean number of images observing a 3D point."""
    fov_deg: tuple[float, float] = (5.0, 150.0)
    """Plausible field of view across the image's long side (degrees); telephoto photos reach ~5."""
    max_rotation_only: float = 0.8
    """Largest fraction of verified pairs explained by a homography that is a pure rotation (no baseline)."""
    max_step_ratio: float = 4.0
    """Ordered captures: largest camera step over the median of its neighbouring steps."""
    max_turn_deg: float = 25.0
    """Ordered captures: largest rotation between consecutive frames (degrees)."""
    max_focal_disagreement: float = 0.10
    """Cross-check: largest relative difference of the two mappers' focal lengths. On a straight drive the
    focal is weakly observed: right models (0.09 deg, 0.5 %) came with the mappers' focals 3-6 % apart, while
    a wrong focal was 18 % off; the poses' own disagreement is checked by the next two thresholds."""
    max_rotation_disagreement_deg: float = 0.3
    """Cross-check: largest median orientation difference between the two mappers (degrees). Two models this
    far apart mean one is off by more than the 0.1-0.2 deg a right model reaches. The first check maps half
    the frames (cheap, noisier); on a disagreement the ladder repeats it on every frame before anything else."""
    max_position_disagreement: float = 0.02
    """Cross-check: largest median camera-position difference, as a fraction of the path length."""

    def __post_init__(self) -> None:
        require(self, [
            (0 < self.min_registered_ratio <= 1, "min_registered_ratio", "must lie in (0, 1]"),
            (0 < self.fov_deg[0] < self.fov_deg[1] < 180, "fov_deg", "must be (low, high) in (0, 180)"),
        ])


@dataclasses.dataclass(frozen=True)
class SfmParams:
    """Params of the sfm stage (params.yaml section `sfm`; `seed` and `device` from the top level)."""

    features: Literal["sift", "aliked"] = "sift"
    """Feature preset (stages.common.colmap.FEATURES): SIFT, or ALIKED + LightGlue (needs pycolmap's model
    files available offline)."""
    max_num_features: int = 2048
    """Features per image on the first attempt; the ladder doubles it."""
    matcher: Literal["auto", "sequential", "exhaustive", "retrieval"] = "auto"
    """auto: sequential for ordered captures, exhaustive up to `exhaustive_max_images` images, retrieval above."""
    exhaustive_max_images: int = 60
    """auto matcher: unordered image sets up to this size are matched exhaustively."""
    sequential_overlap: int = 5
    """Sequential matching: each frame is matched with this many following frames."""
    retrieval_neighbors: int = 12
    """Retrieval matching: pairs per image from VLAD similarity."""
    loop_closure_neighbors: int = 3
    """Ordered captures: retrieval pairs per image between frames farther apart than the sequential overlap
    (loop closure); 0 = none."""
    mapper: Literal["global", "incremental"] = "global"
    """First mapper; the ladder and the cross-check use the other one."""
    cross_check: Literal["auto", "always", "never"] = "auto"
    """Map the same matches with the other mapper and require agreement: auto = ordered captures whose focal
    length is estimated (the case where a wrong focal can hide behind a low reprojection error)."""
    refine_intrinsics: bool = False
    """Refine known intrinsics in bundle adjustment (unknown ones are always estimated)."""
    camera_model: Literal["SIMPLE_RADIAL", "RADIAL", "OPENCV", "PINHOLE", "SIMPLE_PINHOLE"] = "SIMPLE_RADIAL"
    """COLMAP camera model for camera groups without known intrinsics."""
    select_intrinsics: bool = True
    """For cameras whose intrinsics are estimated, let the images choose the camera model after mapping:
    distortion terms and a free principal point are kept only where they are determined and fit better (BIC);
    see stages.common.intrinsics."""
    min_images: int = 3
    """Fewest mapping images to attempt SfM."""
    max_attempts: int = 4
    """Length of the escalation ladder (1 = no escalation)."""
    gate: GateParams = dataclasses.field(default_factory=GateParams)
    """The health gate's thresholds."""
    camera_height_m: float = 1.6
    """Known camera height above the ground (metres) for metric scale; a scene's scene.yaml overrides it."""
    min_scale_confidence: float = 0.3
    """Metric scale from the camera height is applied only at or above this confidence (scene.yaml can force)."""
    seed: int = 0
    """Random seed of RANSAC, the mappers and retrieval's k-means (params.yaml's top-level `seed`)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Feature extraction, matching and bundle adjustment device; cuda needs pycolmap's CUDA build
    (params.yaml's top-level `device`). Resolved once per run and recorded in metrics.json."""
    verbose: bool = False
    """Show COLMAP's own log (thousands of lines); off, only warnings and our own progress lines."""
    extraction: dict = dataclasses.field(default_factory=dict)
    """pycolmap.FeatureExtractionOptions overrides (COLMAP's own keys), merged over the feature preset and the
    ladder's values: a value set here wins on every rung, and the attempt records say so."""
    matching: dict = dataclasses.field(default_factory=dict)
    """pycolmap.FeatureMatchingOptions overrides."""
    verification: dict = dataclasses.field(default_factory=dict)
    """pycolmap.TwoViewGeometryOptions overrides (geometric verification, RANSAC)."""
    global_mapping: dict = dataclasses.field(default_factory=dict)
    """pycolmap.GlobalPipelineOptions overrides (the global mapper, GLOMAP)."""
    incremental_mapping: dict = dataclasses.field(default_factory=dict)
    """pycolmap.IncrementalPipelineOptions overrides (the incremental mapper)."""

    def __post_init__(self) -> None:
        require(self, [  # (ok, key, what is required)
            (self.max_num_features >= 64, "max_num_features", "must be at least 64"),
            (self.min_images >= 2, "min_images", "must be at least 2"),
            (self.max_attempts >= 1, "max_attempts", "must be at least 1"),
            (self.camera_height_m > 0, "camera_height_m", "must be positive"),
            (self.sequential_overlap >= 1, "sequential_overlap", "must be at least 1"),
            (self.loop_closure_neighbors >= 0, "loop_closure_neighbors", "must be 0 or more"),
            (0 <= self.min_scale_confidence <= 1, "min_scale_confidence", "must lie in [0, 1]"),
        ])


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One rung of the escalation ladder: the values it runs with."""

    name: str
    max_num_features: int
    upsample: bool
    """SIFT from the upsampled octave (first_octave -1): more, smaller features."""
    matcher: str
    overlap: int
    neighbors: int
    mapper: str
    cross_subset: bool = True
    """The cross-check maps every other frame (cheap); a rung after a disagreement maps them all."""

    @property
    def matches_key(self) -> tuple:
        """Attempts with equal keys share features and matches (only the mapper differs)."""
        return self.max_num_features, self.upsample, self.matcher, self.overlap, self.neighbors


@dataclasses.dataclass(frozen=True)
class SfmResult:
    """What `run` wrote."""

    out_dir: Path
    metrics: dict
    reconstruction: Any


# ------------------------------------------------------------------------------------- pycolmap glue


def consecutive_overlap(names: list[str], geoms: dict) -> float:
    """Share of consecutive frames whose pair was verified (1.0 for a true sequence)."""
    if len(names) < 2:
        return 0.0
    return sum((a, b) in geoms or (b, a) in geoms for a, b in zip(names, names[1:])) / (len(names) - 1)


def rotation_only(geoms: dict, rec: Any) -> dict:
    """How far the verified pairs look like a camera rotating in place.

    COLMAP labels a pair PLANAR_OR_PANORAMIC when a homography explains it, which a camera moving around an
    object on a table (a hand-held orbit) or past a flat facade also gives: `homography_pairs` is necessary for
    a rotation-only capture, not sufficient. A rotating camera's homography is a rotation conjugated by the
    calibration, H = K2 R K1^-1, so K2^-1 H K1 has three equal singular values, while a baseline adds
    t n^T / d and spreads them: `rotation_residual` is the median spread (model intrinsics), ~0.01 for a
    rotating camera, ~0.1 and more with a baseline a tenth of the scene depth.
    """
    cfg = pycolmap.TwoViewGeometryConfiguration
    K_of = {im.name: rec.cameras[im.camera_id].calibration_matrix() for im in rec.images.values()}
    homography = [(a, b, g) for (a, b), g in geoms.items() if g.config in (cfg.PANORAMIC, cfg.PLANAR_OR_PANORAMIC)]
    spread = [sv[0] / max(sv[2], 1e-12) - 1 for sv in (
        np.linalg.svd(np.linalg.inv(K_of[b]) @ np.asarray(g.H) @ K_of[a], compute_uv=False)
        for a, b, g in homography if a in K_of and b in K_of)]
    return {"homography_pairs": len(homography) / max(len(geoms), 1),
            "rotation_residual": float(np.median(spread)) if spread else None}


def mapper_options(mapper: str, frames: Frames, params: SfmParams) -> Any:
    """The mapper's pycolmap options: our defaults (seeds, device, intrinsics refinement), then the user's
    `global_mapping` / `incremental_mapping` overrides, each merged into its own mapper's options only."""
    refine = params.refine_intrinsics or not frames.focal_known
    gpu = params.device == "cuda"  # resolved by pick_colmap_device: cuda only with a CUDA pycolmap
    if mapper == "global":
        opts = pycolmap.GlobalPipelineOptions()
        opts.random_seed = params.seed
        # GLOMAP's threads make its result vary from run to run (up to 1e-3 in cam_from_world on the default
        # scene, 0.03 after metric scaling); one thread makes it repeatable, for ~3 s more on 80 frames.
        opts.num_threads = opts.mapper.num_threads = 1
        m = opts.mapper
        m.random_seed = m.rotation_averaging.random_seed = m.global_positioning.random_seed = params.seed
        m.retriangulation.random_seed = params.seed
        m.global_positioning.use_gpu = gpu
        ba = m.bundle_adjustment
        ba.ceres.use_gpu = gpu
        ba.refine_focal_length = refine
        ba.refine_extra_params = refine
        return merge_options(opts, params.global_mapping, "sfm.global_mapping")
    opts = pycolmap.IncrementalPipelineOptions()
    opts.random_seed = opts.mapper.random_seed = opts.triangulation.random_seed = params.seed
    opts.ba_use_gpu = gpu
    opts.ba_refine_focal_length = refine
    opts.ba_refine_extra_params = refine
    # A forward-driving camera makes every initial pair "forward motion"; COLMAP's 0.95 limit rejects them all.
    opts.mapper.init_max_forward_motion = 1.0
    opts.min_model_size = min(opts.min_model_size, max(3, len(frames.names) // 4))
    return merge_options(opts, params.incremental_mapping, "sfm.incremental_mapping")


def check_options(frames: Frames, params: SfmParams) -> None:
    """Merge every COLMAP overrides section into a fresh options object before any work, so a bad key fails
    at once, not on a ladder rung after earlier rungs have run."""
    extraction_options(params.features, params.max_num_features, False, params.extraction)
    for section in ("matching", "verification"):
        obj = pycolmap.FeatureMatchingOptions() if section == "matching" else pycolmap.TwoViewGeometryOptions()
        merge_options(obj, getattr(params, section), f"sfm.{section}")
    for mapper in ("global", "incremental"):
        mapper_options(mapper, frames, params)


def map_images(db: Path, frames: Frames, params: SfmParams, mapper: str, out: Path,
               image_names: list[str] | None = None) -> dict[int, Any]:
    """Run one mapper on the database's matches; pycolmap's models.

    `image_names` restricts the mapper to those images (the cross-check maps every other frame).
    """
    out.mkdir(parents=True, exist_ok=True)
    opts = mapper_options(mapper, frames, params)
    opts.image_names = image_names or []
    run_mapper = pycolmap.global_mapping if mapper == "global" else pycolmap.incremental_mapping
    return run_mapper(db, frames.image_dir, out, opts)


# ------------------------------------------------------------------------------------- health gate


def _registered(rec: Any, frames: Frames) -> list[Any]:
    """The model's registered mapping images in capture order."""
    order = {n: i for i, n in enumerate(frames.names)}
    return sorted((im for im in rec.images.values() if im.has_pose and im.name in order), key=lambda im: order[im.name])


def fov_long_side_deg(cam: Any) -> float:
    """Field of view across the image's long side, from the camera's focal length (degrees)."""
    f, size = (cam.focal_length_x, cam.width) if cam.width >= cam.height else (cam.focal_length_y, cam.height)
    return math.degrees(2 * math.atan(size / (2 * f)))


def triangulation_angles_deg(rec: Any, seed: int) -> np.ndarray:
    """Largest angle between the viewing rays of each 3D point (a sample of the points), degrees."""
    ids = sorted(rec.points3D)
    if not ids:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    ids = [ids[i] for i in sorted(rng.choice(len(ids), min(len(ids), TRI_ANGLE_SAMPLES), replace=False))]
    centers = {i: im.projection_center() for i, im in rec.images.items() if im.has_pose}
    out = []
    for pid in ids:
        p = rec.points3D[pid]
        rays = np.stack([centers[e.image_id] - p.xyz for e in p.track.elements if e.image_id in centers])
        rays /= np.linalg.norm(rays, axis=1, keepdims=True) + 1e-12
        cos = rays @ rays.T
        out.append(math.degrees(math.acos(float(np.clip(cos.min(), -1, 1)))))
    return np.asarray(out)


def path_continuity(ims: list[Any], position: dict[str, float] | None = None) -> dict:
    """Step spikes and turns along an ordered capture's camera path, per frame interval.

    A step is compared with the median of the STEP_WINDOW steps on either side, floored at STEP_FLOOR of the
    path's median step: a model glued from pieces at different scales jumps at the seams, while a vehicle that
    speeds up or slows down changes its step gradually. Steps and turns are divided by the number of frame
    intervals between the two images (`position`), so frames left out of the capture are no jump.
    """
    poses = [im.cam_from_world().matrix() for im in ims]
    centers = np.stack([camera_center(p) for p in poses])
    pos = position or {im.name: float(i) for i, im in enumerate(ims)}
    gaps = np.array([max(pos[b.name] - pos[a.name], 1.0) for a, b in zip(ims, ims[1:])])
    steps = np.linalg.norm(np.diff(centers, axis=0), axis=1) / gaps
    floor = STEP_FLOOR * max(float(np.median(steps)), 1e-12)
    spikes = []
    for i, s in enumerate(steps):
        nb = np.concatenate([steps[max(0, i - STEP_WINDOW):i], steps[i + 1:i + 1 + STEP_WINDOW]])
        spikes.append(s / max(float(np.median(nb)) if len(nb) else s, floor))
    turns = [rotation_angle_deg(b[:3, :3] @ a[:3, :3].T) / g for a, b, g in zip(poses, poses[1:], gaps)]
    worst = int(np.argmax(spikes))
    return {"step_ratio": float(spikes[worst]), "step_ratio_at": f"{ims[worst].name} -> {ims[worst + 1].name}",
            "max_turn_deg": float(max(turns))}


def model_numbers(rec: Any, frames: Frames, ordered: bool, seed: int) -> dict:
    """Health numbers of one model."""
    reg = _registered(rec, frames)
    out = {
        "registered": len(reg),
        "registered_ratio": len(reg) / max(1, len(frames.names)),
        "reprojection_error_px": float(rec.compute_mean_reprojection_error()),
        "track_length": float(rec.compute_mean_track_length()),
        "points": int(rec.num_points3D()),
        "fov_deg": [round(fov_long_side_deg(c), 2) for _, c in sorted(rec.cameras.items())],
        "focal_px": [round(float(c.mean_focal_length()), 2) for _, c in sorted(rec.cameras.items())],
    }
    angles = triangulation_angles_deg(rec, seed)
    out["triangulation_angle_deg_median"] = float(np.median(angles)) if len(angles) else 0.0
    if ordered and len(reg) >= 3:
        # Unregistered frames between two registered ones count as intervals too.
        out.update(path_continuity(reg, frames.position or {n: float(i) for i, n in enumerate(frames.names)}))
    return out


def compare_models(rec_a: Any, rec_b: Any, frames: Frames) -> dict:
    """How far two models of the same images disagree after a Sim3 (b's frame); empty if < 3 shared images."""
    a = {im.name: im.cam_from_world().matrix() for im in _registered(rec_a, frames)}
    b = {im.name: im.cam_from_world().matrix() for im in _registered(rec_b, frames)}
    shared = [n for n in frames.names if n in a and n in b]
    if len(shared) < 3:
        return {}
    err = pose_errors([a[n] for n in shared], [b[n] for n in shared])
    fa = np.mean([c.mean_focal_length() for c in rec_a.cameras.values()])
    fb = np.mean([c.mean_focal_length() for c in rec_b.cameras.values()])
    extent = max(err["trajectory_length"], 1e-12)
    return {
        "shared_images": len(shared),
        "rotation_deg_median": err["rotation_error_deg_median"],
        "position_median_of_path": err["position_error_median"] / extent,
        "focal_rel": float(abs(fa - fb) / max(fa, fb)),
    }


def gate(numbers: dict, params: GateParams) -> list[str]:
    """Reasons an attempt fails the health gate (empty when it passes)."""
    why = []
    if numbers["registered_ratio"] < params.min_registered_ratio:
        models = numbers.get("models", 1)
        why.append(f"registered {numbers['registered_ratio']:.0%} < {params.min_registered_ratio:.0%}"
                   + (f" ({models} models)" if models > 1 else ""))
    residual = numbers.get("rotation_residual")
    if numbers.get("homography_pairs", 0.0) > params.max_rotation_only and residual is not None \
            and residual < ROTATION_H_TOL:
        why.append(f"{NO_BASELINE}: {numbers['homography_pairs']:.0%} of the verified pairs are homographies "
                   f"> {params.max_rotation_only:.0%}, and rotations (calibrated singular values "
                   f"{residual:.3f} apart < {ROTATION_H_TOL})")
    if numbers["reprojection_error_px"] > params.max_reprojection_px:
        why.append(f"reprojection {numbers['reprojection_error_px']:.2f} px > {params.max_reprojection_px}")
    if numbers["track_length"] < params.min_track_length:
        why.append(f"track length {numbers['track_length']:.2f} < {params.min_track_length}")
    lo, hi = params.fov_deg
    bad_fov = [f for f in numbers["fov_deg"] if not lo <= f <= hi]
    if bad_fov:
        why.append(f"implausible field of view {bad_fov} deg on the long side (focal length wrong?)")
    if numbers.get("step_ratio", 0) > params.max_step_ratio:
        why.append(f"camera path jumps: a step {numbers['step_ratio']:.1f}x its neighbours' "
                   f"({numbers['step_ratio_at']}) > {params.max_step_ratio}")
    if numbers.get("max_turn_deg", 0) > params.max_turn_deg:
        why.append(f"camera path turns {numbers['max_turn_deg']:.1f} deg between consecutive frames > "
                   f"{params.max_turn_deg}")
    cross = numbers.get("cross_check") or {}
    if cross.get("mapper") and not cross.get("shared_images"):
        why.append(f"cross-check: the {cross['mapper']} mapper shares fewer than 3 images with this model")
    elif cross.get("shared_images"):
        what = []
        if cross["focal_rel"] > params.max_focal_disagreement:
            what.append(f"focal lengths {cross['focal_rel']:.1%} apart")
        if cross["rotation_deg_median"] > params.max_rotation_disagreement_deg:
            what.append(f"orientations {cross['rotation_deg_median']:.2f} deg apart")
        if cross["position_median_of_path"] > params.max_position_disagreement:
            what.append(f"positions {cross['position_median_of_path']:.1%} of the path apart")
        if what:
            why.append(f"cross-check: the {cross['mapper']} mapper disagrees ({', '.join(what)})")
    return why


GEOMETRIC = ("camera path", "field of view", "cross-check")


def first_matcher(frames: Frames, params: SfmParams, ordered: bool) -> str:
    """The matcher of the first attempt."""
    if params.matcher != "auto":
        return params.matcher
    if ordered:
        return "sequential"
    return "exhaustive" if len(frames.names) <= params.exhaustive_max_images else "retrieval"


def next_rung(frames: Frames, params: SfmParams, ordered: bool, done: list[Attempt], why: list[str],
              mapped: set[tuple]) -> Attempt | None:
    """The next rung of the ladder for the last attempt's rejection reasons, or None when no rung is left.

    Each rung changes something for the input at hand: a disagreement with the half-frame cross-check first
    repeats the check on every frame (same matches, same model); a geometric failure (camera path, focal
    length, mapper disagreement) first tries the other mapper on the same matches; too few registered images or short tracks
    first try more features and wider matching; another matcher is only tried where it adds pairs (retrieval
    pairs are a subset of an exhaustive set's). `mapped` holds (matches_key, mapper) already run, so a
    cross-check's model is not tried again as a rung.
    """
    if len(done) >= params.max_attempts:
        return None
    n = len(frames.names)
    base = done[0]
    other_mapper = "incremental" if params.mapper == "global" else "global"
    f, o, k = 2 * params.max_num_features, 2 * params.sequential_overlap, 2 * params.retrieval_neighbors
    last = done[-1]
    first = base.matcher
    if first == "exhaustive":
        other_matcher = None
    elif n <= 3 * params.exhaustive_max_images:
        other_matcher = "exhaustive"
    else:
        other_matcher = "sequential" if first == "retrieval" and ordered else (
            "retrieval" if first == "sequential" else None)
    candidates = {
        "other_mapper": dataclasses.replace(last, name="other_mapper", mapper=other_mapper),
        "more_features": Attempt("more_features", f, True, first, o, k, last.mapper),
        "other_matcher": Attempt("other_matcher", f, True, other_matcher, o, k, last.mapper) if other_matcher else None,
    }
    if any(r.startswith("cross-check") for r in why) and last.cross_subset and n >= 2 * CROSS_CHECK_MIN_IMAGES \
            and "full_cross_check" not in {a.name for a in done}:
        # The check model saw half the frames; before spending on more features, let it see them all.
        return dataclasses.replace(last, name="full_cross_check", cross_subset=False)
    geometric = any(r.startswith(g) for r in why for g in GEOMETRIC)
    order = ["other_mapper", "more_features", "other_matcher"] if geometric else [
        "more_features", "other_matcher", "other_mapper"]
    tried = {a.name for a in done}
    for name in order:
        rung = candidates[name]
        if rung is None or name in tried:
            continue
        if name == "other_mapper" and (rung.matches_key, rung.mapper) in mapped:
            continue
        return rung
    return None


# ------------------------------------------------------------------------------ gravity, scale, output


def _fit_ground(below: np.ndarray, up: np.ndarray, thresh: float, seed: int) -> tuple[np.ndarray, float, float]:
    """RANSAC plane among points below the cameras, roughly perpendicular to `up`: (normal, offset, inlier share)."""
    rng = np.random.default_rng(seed)
    best = (0, up, float(np.median(below @ up)))
    for _ in range(GROUND_RANSAC_ITERS):
        s = below[rng.choice(len(below), 3, replace=False)]
        n = np.cross(s[1] - s[0], s[2] - s[0])
        if np.linalg.norm(n) < 1e-12:
            continue
        n /= np.linalg.norm(n)
        n = n if n @ up > 0 else -n
        if n @ up < np.cos(np.radians(GROUND_MAX_TILT_DEG)):
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
    return normal, offset, cnt / len(below)


def scale_evidence(poses: list[np.ndarray], normal: np.ndarray, offset: float, inlier_share: float) -> dict:
    """How much the capture looks like a camera driven over the fitted ground, each factor in [0, 1].

    - support: a plane holds at least a tenth of the points below the cameras (cars, kerbs and plants take
      the rest on a street);
    - height: the cameras ride at a constant height over it (relative spread, 1/e at HEIGHT_SPREAD_SCALE);
    - level: the cameras' up axes stay near the plane's normal (1/e at LEVEL_TILT_SCALE_DEG);
    - forward: the cameras move along their viewing direction, as a vehicle does (an orbit or a walk past a
      facade moves sideways).
    Their product is the scale confidence: the camera height is a metric yardstick only for such a capture.
    """
    centers = np.stack([camera_center(p) for p in poses])
    heights = centers @ normal - offset
    h_med = float(np.median(heights))
    if h_med <= 0:
        return {"support": 0.0, "height": 0.0, "level": 0.0, "forward": 0.0, "camera_height_model": h_med,
                "camera_height_rel_spread": None}
    spread = float(np.std(heights) / h_med)
    tilt = np.degrees(np.arccos(np.clip([-p[1, :3] @ normal for p in poses], -1, 1)))
    steps = np.diff(centers, axis=0)
    steps -= np.outer(steps @ normal, normal)
    fwd = np.stack([p[2, :3] - (p[2, :3] @ normal) * normal for p in poses[:-1]])
    ok = (np.linalg.norm(steps, axis=1) > 1e-12) & (np.linalg.norm(fwd, axis=1) > 1e-12)
    cos = np.abs((steps[ok] * fwd[ok]).sum(1)) / (np.linalg.norm(steps[ok], axis=1) * np.linalg.norm(fwd[ok], axis=1))
    return {
        "support": float(np.clip(inlier_share / GROUND_MIN_SHARE, 0, 1)),
        "height": float(np.exp(-spread / HEIGHT_SPREAD_SCALE)),
        "level": float(np.exp(-((np.median(tilt) / LEVEL_TILT_SCALE_DEG) ** 2))),
        "forward": float(np.median(cos)) if len(cos) else 0.0,
        "camera_height_model": h_med,
        "camera_height_rel_spread": spread,
    }


def gravity_and_scale(rec: Any, names: list[str], params: SfmParams, settings: SceneSettings) -> tuple[dict, Sim3]:
    """Rotate `rec` so z is up with the ground at z=0; scale it to metres from the camera height where earned.

    Returns the numbers for metrics.json and the transform applied (x_world = s R x_mapper + t).
    """
    order = {n: i for i, n in enumerate(names)}
    ims = sorted((im for im in rec.images.values() if im.has_pose), key=lambda im: order.get(im.name, 0))
    poses = [im.cam_from_world().matrix() for im in ims]
    centers = np.stack([camera_center(p) for p in poses])
    up = -np.mean([p[1, :3] for p in poses], axis=0)  # camera -y axis, in world coordinates
    up /= np.linalg.norm(up)
    pts = np.array([p.xyz for p in rec.points3D.values()]) if rec.num_points3D() else np.zeros((0, 3))
    height_m = settings.camera_height_m or params.camera_height_m
    info: dict = {"camera_height_m": height_m, "camera_height_from": "scene.yaml" if settings.camera_height_m
                  else "params.yaml", "metric_scale_setting": settings.metric_scale}
    h_pts = pts @ up
    below = pts[h_pts < np.median(centers @ up) - 1e-9] if len(pts) else pts
    normal, offset = up, float(np.percentile(h_pts, GROUND_FALLBACK_PERCENTILE)) if len(pts) else 0.0
    inliers = 0.0
    if len(below) >= GROUND_MIN_POINTS:
        step = np.median(np.linalg.norm(np.diff(centers, axis=0), axis=1)) if len(centers) > 1 else 0.0
        thresh = max(np.median(np.abs(np.diff(centers @ up))) + step, 1e-6) * GROUND_BAND
        normal, offset, inliers = _fit_ground(below, up, thresh, params.seed)
    evidence = scale_evidence(poses, normal, offset, inliers)
    ground = evidence["camera_height_model"] > 0
    confidence = float(np.prod([evidence[k] for k in ("support", "height", "level", "forward")])) if ground else 0.0
    if not ground:
        # No ground below the cameras (an object-centric capture): z up from the cameras, no metric scale.
        normal, offset = up, float(np.median(h_pts)) if len(pts) else 0.0
    if settings.metric_scale == "none":
        apply, why = False, "scene.yaml sets metric_scale: none"
    elif not ground:
        apply, why = False, "no ground plane below the cameras"
    elif settings.metric_scale == "camera_height":
        apply, why = True, "scene.yaml sets metric_scale: camera_height"
    elif confidence >= params.min_scale_confidence:
        apply, why = True, f"confidence {confidence:.2f} >= sfm.min_scale_confidence {params.min_scale_confidence}"
    else:
        apply, why = False, (f"confidence {confidence:.2f} < sfm.min_scale_confidence {params.min_scale_confidence}"
                             " (not a camera driven over a ground plane); set metric_scale: camera_height in the "
                             "scene's scene.yaml to force it")
    scale = height_m / evidence["camera_height_model"] if apply else 1.0
    if not apply:
        log.info("model left unscaled: %s", why)
    # Rotation taking `normal` to +z; x along the main direction of travel projected on the ground.
    travel = centers[-1] - centers[0]
    x = travel - (travel @ normal) * normal
    if np.linalg.norm(x) < 1e-9:
        x = np.cross(normal, [1.0, 0, 0]) if abs(normal[0]) < 0.9 else np.cross(normal, [0, 1.0, 0])
    x /= np.linalg.norm(x)
    R_33 = np.stack([x, np.cross(normal, x), normal])
    t_3 = -scale * (R_33 @ (normal * offset))  # ground plane (or the points' median height) to z = 0
    rec.transform(pycolmap.Sim3d(scale, pycolmap.Rotation3d(R_33), t_3))
    applied = Sim3(float(scale), R_33, np.asarray(t_3, float))
    info.update({
        "metric": apply,
        "scale_source": "camera_height" if apply else f"none: {why}",
        "scale_reason": why,
        "scale": float(scale),
        "ground_inlier_ratio": float(inliers),
        "scale_confidence": confidence,
        "ground": bool(ground),
        "scale_evidence": evidence,
    })
    return info, applied


def per_image_reprojection(rec: Any) -> dict[str, float]:
    """Mean reprojection error (px) of each registered image's triangulated observations."""
    return {name: float(err.mean()) for name, err in reprojection_errors(rec).items()}


# ----------------------------------------------------------------------------------------------- run


class _Work:
    """Features, matches and models of one run, each computed once and shared by the attempts that need it."""

    def __init__(self, root: Path, frames: Frames, params: SfmParams):
        self.root, self.frames, self.params = root, frames, params
        self.features: dict[tuple, tuple[Path, dict]] = {}
        self.matched: dict[tuple, tuple[Path, int, dict]] = {}
        self.models: dict[tuple, dict[int, Any]] = {}
        self.selected: dict[int, tuple[Any, dict]] = {}  # by id() of a model held in self.models
        self.seconds = {"features": 0.0, "matching": 0.0, "mapping": 0.0, "intrinsics": 0.0}

    def features_used(self, att: Attempt) -> dict:
        """The extraction values the attempt's features were made with (the user's overrides win)."""
        return self.features[(att.max_num_features, att.upsample)][1]

    def database(self, att: Attempt) -> tuple[Path, int, dict]:
        """A database holding the attempt's features and verified matches, the number of pairs tried, and the
        verified two-view geometries (read once, shared by the rungs that reuse these matches)."""
        if att.matches_key not in self.matched:
            fkey = (att.max_num_features, att.upsample)
            fr, p = self.frames, self.params
            t0 = time.perf_counter()
            if fkey not in self.features:
                db = self.root / f"features_{att.max_num_features}_{int(att.upsample)}.db"
                log.info("features: %s, %d per image%s, %d images", p.features, att.max_num_features,
                         " (upsampled octave)" if att.upsample else "", len(fr.names))
                used = extract(db, fr.image_dir, fr.groups, fr.intrinsics, fr.names, features=p.features,
                               max_num_features=att.max_num_features, upsample=att.upsample,
                               overrides=p.extraction, camera_model=p.camera_model, device=p.device)
                self.features[fkey] = (db, used)
            t1 = time.perf_counter()
            self.seconds["features"] += t1 - t0
            db = self.root / f"matches_{len(self.matched)}.db"
            shutil.copy(self.features[fkey][0], db)
            log.info("matching: %s%s", att.matcher, f" (overlap {att.overlap})" if att.matcher == "sequential" else "")
            pairs = PAIRS[att.matcher](db, fr.names, overlap=att.overlap, neighbors=att.neighbors,
                                      loop_neighbors=p.loop_closure_neighbors, seed=p.seed)
            match(db, pairs, self.root / f"pairs_{att.name}.txt", features=p.features,
                  max_num_features=self.features[fkey][1]["max_num_features"], matching=p.matching,
                  verification=p.verification, seed=p.seed, device=p.device)
            self.seconds["matching"] += time.perf_counter() - t1
            self.matched[att.matches_key] = (db, len(pairs), verified_pairs(db))
        return self.matched[att.matches_key]

    def choose_intrinsics(self, rec: Any) -> tuple[Any, dict]:
        """choose_intrinsics of one of this run's models, made once per model (rungs share models)."""
        if id(rec) not in self.selected:
            t0 = time.perf_counter()
            self.selected[id(rec)] = choose_intrinsics(rec, self.frames, self.params)
            self.seconds["intrinsics"] += time.perf_counter() - t0
        return self.selected[id(rec)]

    def map(self, att: Attempt, mapper: str, image_names: list[str] | None = None) -> dict[int, Any]:
        """The models of `mapper` on the attempt's matches (on `image_names` only, when given)."""
        key = (att.matches_key, mapper, len(image_names or []))
        if key not in self.models:
            db = self.database(att)[0]
            t0 = time.perf_counter()
            log.info("mapping: %s mapper%s", mapper, f" on {len(image_names)} images" if image_names else "")
            self.models[key] = map_images(db, self.frames, self.params, mapper, self.root / f"map_{len(self.models)}",
                                          image_names)
            self.seconds["mapping"] += time.perf_counter() - t0
        return self.models[key]


def estimated_cameras(rec: Any, frames: Frames) -> set[int]:
    """Camera ids of the model whose images belong to camera groups without known intrinsics."""
    group_of = {n: g for g, names in frames.groups.items() for n in names}
    return {im.camera_id for im in rec.images.values()
            if im.has_pose and not frames.intrinsics.get(group_of.get(im.name, ""))}


def choose_intrinsics(rec: Any, frames: Frames, params: SfmParams) -> tuple[Any, dict]:
    """`rec` with its estimated cameras' model chosen by the images (stages/common/intrinsics.py), and the record
    of that choice; `rec` as it is where every camera is known, the step is off, or pycolmap refuses it."""
    estimated = estimated_cameras(rec, frames) if params.select_intrinsics else set()
    if not estimated:
        return rec, {"skipped": "every camera's intrinsics are known" if params.select_intrinsics
                     else "sfm.select_intrinsics is false"}
    log.info("intrinsics: choosing distortion and principal point for %d estimated camera(s)", len(estimated))
    try:
        return select_intrinsics(rec, estimated)
    except (RuntimeError, ValueError) as exc:  # pycolmap's BA or covariance refused: keep the mapper's
        log.warning("intrinsics selection failed (%s); the mapper's camera model is kept", exc)
        return rec, {"skipped": f"selection failed: {exc}"}


def _largest(models: dict[int, Any]) -> Any | None:
    return max(models.values(), key=lambda r: (r.num_reg_images(), r.num_points3D())) if models else None


def run(params: SfmParams, *, frames: Path, out_dir: Path) -> SfmResult:
    """Estimate camera poses for ingest's mapping frames; write model, poses, sparse cloud and metrics."""
    t_start = time.perf_counter()
    quiet_colmap(params.verbose)
    pycolmap.set_random_seed(params.seed)
    # One device choice per run: every COLMAP call below sees "cuda" or "cpu", and metrics.json records it.
    params = dataclasses.replace(params, device=pick_colmap_device(params.device))
    fr = read_ingest(Path(frames))
    check_options(fr, params)
    if len(fr.names) < params.min_images:
        raise StageError(f"only {len(fr.names)} mapping image(s) in {frames} (SfM needs sfm.min_images="
                         f"{params.min_images}); add images or lower ingest.query_every / sfm.min_images")
    ordered = fr.sequence
    sequence: dict = {"from_ingest": fr.sequence}
    cross = params.cross_check == "always" or (params.cross_check == "auto" and ordered and not fr.focal_known)
    other = "incremental" if params.mapper == "global" else "global"
    attempts: list[dict] = []
    done: list[Attempt] = []
    best = None
    with tempfile.TemporaryDirectory(prefix="sfm-") as work_s:
        work = _Work(Path(work_s), fr, params)
        att: Attempt | None = Attempt("base", params.max_num_features, False, first_matcher(fr, params, ordered),
                                      params.sequential_overlap, params.retrieval_neighbors, params.mapper)
        while att is not None:
            t0 = time.perf_counter()
            _, n_pairs, geoms = work.database(att)
            if not done and att.matcher == "sequential" and ordered and params.matcher == "auto":
                sequence["consecutive_overlap"] = consecutive_overlap(fr.names, geoms)
                if sequence["consecutive_overlap"] < MIN_SEQUENCE_OVERLAP:
                    log.warning("not matched as a sequence: only %.0f%% of consecutive frames overlap",
                                100 * sequence["consecutive_overlap"])
                    ordered, cross = False, params.cross_check == "always"
                    att = dataclasses.replace(att, matcher=first_matcher(fr, params, False))
                    continue
            models = work.map(att, att.mapper)
            record = {**dataclasses.asdict(att), **work.features_used(att), "pairs": n_pairs,
                      "verified_pairs": len(geoms), "models": len(models)}
            rec = _largest(models)
            if rec is None:
                record.update(registered_ratio=0.0, rejected=["no model: too few verified matches or no baseline"])
            else:
                numbers = {**model_numbers(rec, fr, ordered, params.seed),
                           **rotation_only(geoms, rec), "models": len(models)}
                if cross:
                    numbers["cross_check"] = {"mapper": other if att.mapper == params.mapper else params.mapper}
                    # Every other frame: consecutive frames still share matches (overlap >= 2), and the other
                    # mapper costs a fraction of a full run; a wrong focal or scale shows on half the frames too.
                    subset = fr.names[::2] if att.cross_subset and len(fr.names) >= 2 * CROSS_CHECK_MIN_IMAGES else None
                    other_rec = _largest(work.map(att, numbers["cross_check"]["mapper"], subset))
                    if other_rec is not None:
                        # Both models with the camera model the images choose: the mapper's fixed principal
                        # point and free k1 bend each model its own way (kitti00_turn without its intrinsics:
                        # 0.56 deg apart as mapped, 0.14 deg once both chose theirs).
                        numbers["cross_check"].update(compare_models(work.choose_intrinsics(rec)[0],
                                                                     work.choose_intrinsics(other_rec)[0], fr))
                main_names = {im.name for im in rec.images.values() if im.has_pose}
                # A second model only matters when it holds images the main one lacks (registered_ratio says so).
                extra = [sorted(im.name for im in r.images.values() if im.has_pose and im.name not in main_names)
                         for r in models.values() if r is not rec]
                record.update(numbers, rejected=gate(numbers, params.gate), other_models=[m for m in extra if m])
                score = (not record["rejected"], numbers["registered"], -len(record["rejected"]))
                if best is None or score > best[2]:
                    best = (rec, record, score)
            record["seconds"] = round(time.perf_counter() - t0, 2)
            attempts.append(record)
            done.append(att)
            log.info("attempt %s: %d pairs, %d model(s), %d/%d registered: %s", att.name, n_pairs, len(models),
                     record.get("registered", 0), len(fr.names), "; ".join(record["rejected"]) or "passed the health gate")
            if not record["rejected"]:
                break
            mapped = {k[:2] for k in work.models}  # (matches, mapper) of every model built so far
            att = next_rung(fr, params, ordered, done, record["rejected"], mapped)
        if best is None:
            raise StageError(_no_model_message(fr, attempts, frames))
        rec, chosen, _ = best
        if any(r.startswith(NO_BASELINE) for r in chosen["rejected"]):
            raise StageError(f"{NO_BASELINE} in {frames}: the camera rotated in place ("
                             f"{chosen['homography_pairs']:.0%} of the image pairs), so no 3D structure can be "
                             "triangulated; capture while moving the camera, or raise sfm.gate.max_rotation_only")
        rec, intrinsics_info = work.choose_intrinsics(rec)  # made once: the cross-check may have made it
        seconds = dict(work.seconds)
        t0 = time.perf_counter()
        scale_info, world_from_mapper = gravity_and_scale(rec, fr.names, params, fr.settings)
        seconds["gravity_scale"] = time.perf_counter() - t0
        est = {im.name: im.cam_from_world().matrix() for im in rec.images.values() if im.has_pose}
        others = {n: f"in another model ({i + 1})" for i, m in enumerate(chosen.get("other_models", [])) for n in m}
        errors, per_image, gt_from_world = evaluate_poses(est, fr)
        reproj = per_image_reprojection(rec)
        per_image.insert(2, "reprojection_error_px", [reproj.get(n, math.nan) for n in per_image["image"]])
        with atomic_dir(out_dir) as tmp:
            write_sfm(tmp, rec, fr, {n: r for n, r in others.items() if n not in est},
                      Alignment(world_from_mapper, scale_info["metric"], gt_from_world,
                                ground=scale_info["ground"], driving_confidence=scale_info["scale_confidence"]),
                      per_image)
            seconds["total"] = time.perf_counter() - t_start
            metrics = {
                "images": len(fr.names),
                "registered_images": chosen["registered"],
                "registered_ratio": chosen["registered_ratio"],
                "reprojection_error_px": float(rec.compute_mean_reprojection_error()),
                "track_length": chosen["track_length"],
                "points": int(rec.num_points3D()),
                "models": chosen["models"],
                "attempt": chosen["name"],
                "gate_passed": not chosen["rejected"],
                "gate_reasons": chosen["rejected"],
                "sequence": {**sequence, "used": ordered},
                "focal_known": fr.focal_known,
                "fov_deg": [round(fov_long_side_deg(c), 2) for _, c in sorted(rec.cameras.items())],
                "intrinsics": intrinsics_info,
                **{k: errors.get(k) for k in ("rotation_error_deg_median", "rotation_error_deg_max",
                                              "position_error_median", "position_error_max",
                                              "position_error_pct_median", "ate_rmse", "ate_rmse_pct",
                                              "trajectory_length")},
                "gravity_scale": scale_info,
                "metric": scale_info["metric"],
                "gt_metric": fr.metric,
                # Estimated units per ground-truth unit; 1.0 is a perfect scale on a metric scene with metric: true.
                "scale_vs_gt": (1.0 / errors["sim3_scale"]) if errors else None,
                "device": params.device,
                "seconds": round(seconds["total"], 2),
                "seconds_per_phase": {k: round(v, 2) for k, v in seconds.items()},
                "attempts": attempts,
            }
            write_json(tmp / METRICS, metrics)
    log.info("registered %d/%d images (%s), gate %s, %.1f s", chosen["registered"], len(fr.names), chosen["name"],
             "passed" if metrics["gate_passed"] else "FAILED: " + "; ".join(chosen["rejected"]), seconds["total"])
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
