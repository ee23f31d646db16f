"""Dense reconstruction: sfm's model and ingest's frames -> undistorted images, MVS depth, a radiance field, fused
point clouds and meshes, and their scores.

- Undistortion (pycolmap.undistort_images): pinhole images and model of the registered mapping frames, plus a
  nerfstudio-format transforms.json of them with sfm's poses, so any nerfstudio method trains on our poses.
- MVS depth (mvs.py): COLMAP PatchMatch stereo and its fusion when pycolmap has CUDA; otherwise a plane sweep in
  torch (on the GPU when torch has one) with photometric and geometric-consistency filtering.
- Radiance field (field.py): trained on the mapping frames except every `holdout_every`-th registered one
  (nerfstudio's convention), which are rendered and scored (PSNR, SSIM); the scene's queries too, at their
  ground-truth poses brought into sfm's world (not optimised), a harder extrapolation figure.
- Fusion (fusion.py): the MVS depth maps, and the field's rendered depth, back-projected into point clouds and
  TSDF-fused (open3d) into meshes; PLY files.
- Scores (scoring.py): against the scene's points.ply (ingest's truth/), in the ground truth's frame through
  sfm's alignment, cropped to what the cameras observed: accuracy, completeness, Chamfer distance, F-score at
  5, 10 and 20 cm (scene units when the ground truth is not metric), EMD on equal random subsamples.

Outputs in --out: undistorted/ (images/, sparse/, transforms.json), mvs/ (depth/<image>.npz: depth and confidence,
fused.ply, mesh.ply, points.ply), nerf/ (field.pt, renders/, mesh.ply, points.ply), metrics.json.
Lengths in params are metres; an unscaled model takes them in units of the camera height (as hdmap does).
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd

from stages.common.artifacts import MANIFEST, METRICS, model_unit, read_ingest, read_sfm
from stages.common.cli import guarded, make_parser
from stages.common.device import pick_colmap_device, pick_device
from stages.common.errors import StageError
from stages.common.outputs import atomic_dir, write_json
from stages.common.params import load_section, require
from stages.recon import field as nerf
from stages.recon import mvs
from stages.recon import scoring
from stages.recon.fusion import DepthView, fuse_points, read_ply, tsdf_fuse, write_ply

log = logging.getLogger("scenepipe.recon")

INPUTS = {"frames": "ingest output folder (frames, truth/)", "sfm": "sfm output folder (model/, alignment.json)"}
OUTPUTS = {"out": "output folder: undistorted/, mvs/, nerf/, metrics.json"}
# The plane sweep and the radiance field run in torch on a GPU when there is one; PatchMatch needs CUDA.
USES_GPU = True
RECON_OUTPUTS = ("undistorted", "mvs", "nerf")


@dataclasses.dataclass(frozen=True)
class ReconParams:
    """Params of the recon stage (params.yaml section `recon`). Lengths in metres."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mvs_backend: Literal["auto", "sweep", "colmap"] = "auto"
    """auto: COLMAP PatchMatch when pycolmap has CUDA, else the torch plane sweep."""
    mvs: mvs.SweepParams = dataclasses.field(default_factory=mvs.SweepParams)
    """The plane sweep's settings (stages/recon/mvs.py)."""
    field_preset: Literal["auto", "cpu", "gpu"] = "auto"
    """Radiance-field preset (stages/recon/field.py PRESETS); auto: gpu on a CUDA device, else cpu."""
    field: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides of the preset's FieldConfig fields, e.g. {steps: 2000}."""
    holdout_every: int = 8
    """Every N-th registered mapping frame is held out of the field's training and scored (nerfstudio: 8)."""
    max_depth_m: float = 30.0
    """Depths beyond this are not fused, and ground truth beyond it from every camera is not scored."""
    fused_voxel_m: float = 0.03
    """Back-projected depths within one cell of this size are averaged into one point."""
    tsdf_voxel_m: float = 0.05
    tsdf_trunc_m: float = 0.2
    tsdf_min_views: int = 2
    """Voxels integrated by fewer views are not meshed."""
    field_depth_every: int = 2
    """The field's depth is rendered for TSDF fusion from every N-th training frame ..."""
    field_depth_max_edge: int = 320
    """... at this longest side (px)."""
    field_min_opacity: float = 0.5
    render_max_edge: int = 640
    """Held-out frames and queries are rendered and scored at this longest side (px), downscaled from the
    undistorted images as nerfstudio evaluates at its training downscale; a 1600 px frame costs ~6x the
    render time of a 640 px one on a CPU."""
    """A rendered depth counts where the field's opacity reaches this (sky and empty space do not)."""
    fscore_m: tuple[float, ...] = (0.05, 0.1, 0.2)
    emd_points: int = 2000
    camera_height_m: float = 1.6
    """An unscaled model's unit: lengths in camera heights (as in hdmap)."""

    def __post_init__(self) -> None:
        require(self, [
            (self.holdout_every >= 2, "holdout_every", "must be at least 2"),
            (self.max_depth_m > 0, "max_depth_m", "must be positive"),
            (self.tsdf_voxel_m > 0 and self.tsdf_trunc_m > self.tsdf_voxel_m, "tsdf_trunc_m",
             "must exceed tsdf_voxel_m (> 0)"),
            (self.field_depth_every >= 1, "field_depth_every", "must be at least 1"),
            (len(self.fscore_m) >= 1 and all(t > 0 for t in self.fscore_m), "fscore_m", "must be positive lengths"),
        ])
        allowed = {f.name for f in dataclasses.fields(nerf.FieldConfig)}
        unknown = sorted(set(self.field) - allowed)
        if unknown:
            raise ValueError(f"field: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}")


@dataclasses.dataclass(frozen=True)
class ReconResult:
    out_dir: Path
    metrics: dict


def _threshold_name(t: float) -> str:
    cm = t * 100
    return f"{cm:g}cm"


def _field_config(params: ReconParams, device: str) -> tuple[str, nerf.FieldConfig]:
    preset = params.field_preset if params.field_preset != "auto" else ("gpu" if device == "cuda" else "cpu")
    base = nerf.PRESETS[preset].to_dict()
    return preset, nerf.FieldConfig.from_dict({**base, **params.field})


@dataclasses.dataclass(frozen=True)
class _Scene:
    """The undistorted registered mapping frames in capture order and what the later phases share."""

    views: list[mvs.StereoView]
    observations: list[np.ndarray]
    points: np.ndarray
    unit: float
    unit_from: str


def undistort(model_dir: Path, image_dir: Path, names: list[str], out: Path) -> _Scene:
    """pycolmap's undistortion of the registered mapping frames into out/ (images/, sparse/)."""
    import pycolmap

    pycolmap.undistort_images(str(out), str(model_dir), str(image_dir), image_names=names, num_threads=2)
    rec = pycolmap.Reconstruction(str(out / "sparse"))
    order = {n: i for i, n in enumerate(names)}
    ims = sorted((im for im in rec.images.values() if im.has_pose and im.name in order), key=lambda im: order[im.name])
    pid = {p: i for i, p in enumerate(rec.points3D.keys())}
    points = np.array([p.xyz for p in rec.points3D.values()]).reshape(-1, 3)
    views, observations = [], []
    for im in ims:
        cam = rec.cameras[im.camera_id]
        views.append(mvs.StereoView(im.name, out / "images" / im.name, cam.calibration_matrix(),
                                    im.cam_from_world().matrix(), cam.width, cam.height))
        observations.append(np.array([pid[p.point3D_id] for p in im.points2D if p.has_point3D()], int))
    return _Scene(views, observations, points, 1.0, "")


def nerfstudio_transforms(views: list[mvs.StereoView], holdout: set[str]) -> dict:
    """nerfstudio's transforms.json of the undistorted frames: per-frame pinhole intrinsics, camera-to-world in
    OpenGL axes (x right, y up, z back), and our train/eval split as nerfstudio's train_filenames/val_filenames."""
    frames = []
    for v in views:
        c2w = np.eye(4)
        R, t = v.cam_from_world[:, :3], v.cam_from_world[:, 3]
        c2w[:3, :3] = R.T
        c2w[:3, 3] = -R.T @ t
        c2w[:3, 1:3] *= -1  # OpenCV (y down, z forward) -> OpenGL (y up, z back)
        frames.append({"file_path": f"images/{v.name}", "transform_matrix": c2w.tolist(),
                       "fl_x": float(v.K[0, 0]), "fl_y": float(v.K[1, 1]), "cx": float(v.K[0, 2]),
                       "cy": float(v.K[1, 2]), "w": int(v.width), "h": int(v.height)})
    return {"camera_model": "OPENCV", "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": frames,
            "train_filenames": [f["file_path"] for f, v in zip(frames, views) if v.name not in holdout],
            "val_filenames": [f["file_path"] for f, v in zip(frames, views) if v.name in holdout]}


def _read_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise StageError(f"cannot read {path}; rerun ingest for this scene")
    if size is not None and img.shape[1::-1] != size:
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img[:, :, ::-1])


def _mvs_views(scene: _Scene, depth_dir: Path, p: mvs.SweepParams, max_depth: float):
    """The plane sweep's depth maps as DepthViews, read from disk one at a time."""
    for v in scene.views:
        K, w, h = mvs.scaled(v, p.max_edge)
        with np.load(depth_dir / f"{mvs.depth_file_stem(v.name)}.npz") as z:
            depth = z["depth"]
        depth[depth > max_depth] = 0
        yield DepthView(depth, _read_rgb(v.image, (w, h)), K, v.cam_from_world)


def _colmap_mvs(workspace: Path, fused_ply: Path) -> None:
    """COLMAP PatchMatch stereo (CUDA) with its geometric consistency in pycolmap's undistorted workspace, then
    COLMAP's own stereo fusion of the geometric depth maps into fused_ply."""
    import pycolmap

    pycolmap.patch_match_stereo(str(workspace))
    pycolmap.stereo_fusion(str(fused_ply), str(workspace))


def _read_colmap_depth(path: Path) -> np.ndarray:
    """A COLMAP depth map (.bin): an ASCII header "width&height&channels&", then float32 values, channel-major
    (COLMAP's scripts/python/read_write_dense.py reads them the same way)."""
    with open(path, "rb") as f:
        header = b""
        while header.count(b"&") < 3:
            header += f.read(1)
        w, h, c = (int(x) for x in header.split(b"&")[:3])
        data = np.fromfile(f, np.float32)
    return np.transpose(data.reshape((w, h, c), order="F"), (1, 0, 2))[:, :, 0]


def _colmap_views(scene: _Scene, workspace: Path, max_depth: float):
    for v in scene.views:
        path = workspace / "stereo" / "depth_maps" / f"{v.name}.geometric.bin"
        depth = _read_colmap_depth(path) if path.is_file() else np.zeros((v.height, v.width), np.float32)
        depth[depth > max_depth] = 0
        yield DepthView(depth.astype(np.float32), _read_rgb(v.image), v.K, v.cam_from_world)


def _query_views(frames, scene: _Scene, model, out: Path) -> list[tuple[str, np.ndarray, np.ndarray, Path]]:
    """The scene's queries with ground-truth poses, in sfm's world and undistorted to the mapping frames' pinhole
    camera of their camera group: (name, K, cam_from_world, image path). Empty without ground truth."""
    import pycolmap

    gt_from_world = model.alignment.gt_from_world
    if not frames.query_gt or gt_from_world is None:
        return []
    manifest = pd.read_csv(frames.image_dir / MANIFEST)
    group_of = {str(n): str(int(c)) for n, c in zip(manifest["name"], manifest["camera"])}
    rec = model.reconstruction()
    undist = {v.name: v for v in scene.views}
    by_name = {im.name: im for im in rec.images.values()}
    s, R, t = gt_from_world.scale, np.asarray(gt_from_world.R_33), np.asarray(gt_from_world.t_3)
    out.mkdir(parents=True, exist_ok=True)
    queries = []
    maps: dict[int, np.ndarray] = {}
    for q, P_gt in frames.query_gt.items():
        group = group_of.get(q)
        ref = next((n for n in frames.groups.get(group, []) if n in undist and n in by_name), None)
        if ref is None:
            continue
        cam: pycolmap.Camera = rec.cameras[by_name[ref].camera_id]
        v = undist[ref]
        if cam.camera_id not in maps:  # one undistortion map per camera, not per query
            # pixel of the undistorted pinhole image -> ray -> pixel of the original (distorted) image
            ys, xs = np.mgrid[0:v.height, 0:v.width].astype(np.float64)
            rays = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], 1) @ np.linalg.inv(v.K).T
            maps[cam.camera_id] = cam.img_from_cam(rays).reshape(v.height, v.width, 2).astype(np.float32)
        src = maps[cam.camera_id]
        img = cv2.imread(str(frames.image_dir / q), cv2.IMREAD_COLOR)
        if img is None:
            continue
        if img.shape[1::-1] != (cam.width, cam.height):
            img = cv2.resize(img, (int(cam.width), int(cam.height)), interpolation=cv2.INTER_AREA)
        und = cv2.remap(img, src[..., 0], src[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        path = out / Path(q).name
        cv2.imwrite(str(path), und)
        # x_gt = s R x_w + t and x_cam = R_c x_gt + t_c (gt units) -> x_cam / s = R_c R x_w + (R_c t + t_c) / s
        P = np.c_[P_gt[:, :3] @ R, (P_gt[:, :3] @ t + P_gt[:, 3]) / s]
        queries.append((q, v.K, P, path))
    return queries


def _render_and_score(model_field, items, out: Path, seconds_key: str, seconds: dict, max_edge: int) -> dict:
    """Render each (name, K, cam_from_world, image path) at most max_edge px on its longest side; PSNR and SSIM
    against the image downscaled alike; renders saved as <name>.png beside <name>.depth.png (normalised)."""
    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, K_full, P, path in items:
        full = _read_rgb(path)
        K, w, h = mvs.scaled(mvs.StereoView(name, path, K_full, P, full.shape[1], full.shape[0]), max_edge)
        gt = (full if (w, h) == full.shape[1::-1] else cv2.resize(full, (w, h), interpolation=cv2.INTER_AREA))
        gt = gt.astype(np.float32) / 255.0
        rgb, depth, _ = nerf.render_view(model_field, K, P, w, h)
        rows.append({"image": name, "psnr": scoring.psnr(rgb, gt), "ssim": scoring.ssim(rgb, gt)})
        stem = Path(name).stem
        cv2.imwrite(str(out / f"{stem}.png"), np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)[:, :, ::-1])
        finite = depth[np.isfinite(depth) & (depth > 0)]
        scale = float(np.percentile(finite, 95)) if len(finite) else 1.0
        cv2.imwrite(str(out / f"{stem}.depth.png"), np.round(np.clip(depth / scale, 0, 1) * 255).astype(np.uint8))
    seconds[seconds_key] = time.perf_counter() - t
    if not rows:
        return {}
    table = pd.DataFrame(rows)
    table.to_csv(out / "scores.csv", index=False)
    return {"psnr": float(table["psnr"].mean()), "ssim": float(table["ssim"].mean()), "images": len(rows)}


def _render_field_depths(model_field, scene: _Scene, train: list[int], p: ReconParams, unit: float,
                         folder: Path) -> list[Path]:
    """The field's depth of every field_depth_every-th training frame, where it is opaque, rendered once into
    folder/<i>.npz (both fusions read them, one at a time)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in train[::p.field_depth_every]:
        v = scene.views[i]
        K, w, h = mvs.scaled(v, p.field_depth_max_edge)
        rgb, depth, opacity = nerf.render_view(model_field, K, v.cam_from_world, w, h)
        depth = np.where((opacity >= p.field_min_opacity) & (depth <= p.max_depth_m * unit), depth, 0)
        paths.append(folder / f"{i}.npz")
        np.savez(paths[-1], depth=depth.astype(np.float32), K=K, P=v.cam_from_world,
                 rgb=np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    return paths


def _saved_views(paths: list[Path]):
    for path in paths:
        with np.load(path) as z:
            yield DepthView(z["depth"], z["rgb"], z["K"], z["P"])


def _geometry(clouds: dict[str, np.ndarray], truth: Path | None, model, scene: _Scene, p: ReconParams,
              metric_gt: bool | None) -> tuple[dict, str]:
    """Scores of each cloud against the scene's points.ply, in the ground truth's frame; ({}, why) without."""
    sim = model.alignment.gt_from_world
    if truth is None:
        return {}, "no ground-truth points.ply for this scene"
    if sim is None:
        return {}, "no ground-truth alignment (sfm had no ground-truth poses to align to)"
    gt, normals = read_ply(truth)
    R, t, s = np.asarray(sim.R_33), np.asarray(sim.t_3), sim.scale
    cams = []
    for v in scene.views:
        Rc, tc = v.cam_from_world[:, :3], v.cam_from_world[:, 3]
        # x_cam(gt units) = s x_cam(world) = s Rc R^T (x_gt - t) / s + s tc
        cams.append(scoring.Camera(v.K, np.c_[Rc @ R.T, s * tc - Rc @ R.T @ t], v.width, v.height))
    max_depth = p.max_depth_m * (1.0 if metric_gt else s * scene.unit)
    seen = scoring.observed_mask(gt, cams, max_depth, normals=normals)
    gt, normals = gt[seen], (normals[seen] if normals is not None else None)
    thresholds = {_threshold_name(th): th * (1.0 if metric_gt else s * scene.unit) for th in p.fscore_m}
    out = {}
    for name, pts in clouds.items():
        if not len(pts):
            out[name] = {"note": "no points"}
            continue
        try:
            out[name] = scoring.geometry_scores(s * pts @ R.T + t, gt, thresholds, emd_points=p.emd_points,
                                                seed=p.seed, gt_normals=normals)
        except StageError as exc:  # e.g. a cloud wholly outside the observed ground truth: a score cannot be had
            out[name] = {"note": str(exc)}
    units = "metres" if metric_gt else "ground-truth units (thresholds are the metre values times sfm's unit)"
    distance = "to the sampled surface (the nearest sample's tangent plane, its normals)" if normals is not None \
        else "to the nearest sample"
    return out, f"against points.ply in the ground truth's frame, {int(seen.sum())} of its points observed " \
                f"(in view within {p.max_depth_m} m, not occluded); accuracy and precision {distance}; {units}"


def run(params: ReconParams, *, frames: Path, sfm: Path, out_dir: Path) -> ReconResult:
    import torch

    from stages.common.colmap import quiet_colmap

    quiet_colmap(False)  # COLMAP's undistorter and stereo log a line per image; ours say what runs
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    torch.manual_seed(params.seed)
    fr = read_ingest(frames)
    model = read_sfm(sfm)
    names = [n for n in fr.names if n in model.poses]
    if len(names) < 3:
        raise StageError(f"only {len(names)} registered mapping frame(s) in {sfm}; dense reconstruction needs "
                         "sfm's poses for at least 3 overlapping frames")
    device = pick_device(params.device)
    backend = params.mvs_backend
    if backend == "auto":
        backend = "colmap" if pick_colmap_device(params.device) == "cuda" else "sweep"
    elif backend == "colmap" and pick_colmap_device(params.device) != "cuda":
        raise StageError("recon.mvs_backend: colmap needs pycolmap's CUDA build (PatchMatch runs on CUDA only); "
                         "install the gpu extra or set mvs_backend: sweep")
    notes: list[str] = []
    with atomic_dir(out_dir) as tmp:
        t = time.perf_counter()
        undist = tmp / "undistorted"
        scene = undistort(sfm / "model", fr.image_dir, names, undist)
        centers = np.stack([v.center for v in scene.views])
        unit, unit_from = model_unit(model.alignment, centers, scene.points, params.camera_height_m)
        scene = dataclasses.replace(scene, unit=unit, unit_from=unit_from)
        if not model.alignment.metric:
            notes.append(f"sfm's model is not in metres: lengths are in model units (1 m of params = {unit:.3g} "
                         f"units, from {unit_from})")
        holdout_idx = list(range(0, len(scene.views), params.holdout_every))
        holdout = {scene.views[i].name for i in holdout_idx}
        train = [i for i in range(len(scene.views)) if i not in set(holdout_idx)]
        write_json(undist / "transforms.json", nerfstudio_transforms(scene.views, holdout))
        seconds["undistort"] = time.perf_counter() - t

        # --- MVS depth, fused cloud and TSDF mesh
        t = time.perf_counter()
        mvs_dir = tmp / "mvs"
        max_depth = params.max_depth_m * unit
        up = np.array([0.0, 0.0, 1.0]) if model.alignment.ground else None
        if backend == "colmap":
            mvs_dir.mkdir(parents=True, exist_ok=True)
            _colmap_mvs(undist, mvs_dir / "fused.ply")
            depth_views = lambda: _colmap_views(scene, undist, max_depth)  # noqa: E731
            mvs_stats = {"backend": "colmap_patch_match"}
        else:
            mvs_stats = mvs.stereo(scene.views, scene.observations, scene.points, params.mvs, mvs_dir / "depth",
                                   device, up, log)
            mvs_stats = {"backend": "plane_sweep", "views": mvs_stats["views"],
                         "kept_fraction": float(np.mean(mvs_stats["kept"])),
                         "raw_fraction": float(np.mean(mvs_stats["raw_valid"])),
                         "views_without_sources": mvs_stats["no_sources"]}
            depth_views = lambda: _mvs_views(scene, mvs_dir / "depth", params.mvs, max_depth)  # noqa: E731
        seconds["mvs_depth"] = time.perf_counter() - t
        t = time.perf_counter()
        if backend == "colmap":  # COLMAP's own fusion (consistency across views, not only voxel averaging)
            fused, fused_rgb = read_ply(mvs_dir / "fused.ply", colours=True)
        else:
            fused, fused_rgb = fuse_points(depth_views(), params.fused_voxel_m * unit)
        if not len(fused):
            raise StageError("MVS kept no depth in any frame (nothing passed the photometric and consistency "
                             "filters); check sfm's model (overlapping registered frames) or lower recon.mvs.min_ncc")
        write_ply(mvs_dir / "fused.ply", fused, fused_rgb)
        mesh, mesh_pts, mesh_rgb, _ = tsdf_fuse(depth_views(), params.tsdf_voxel_m * unit, params.tsdf_trunc_m * unit,
                                                max_depth, params.tsdf_min_views, device, "MVS depth maps")
        _write_tsdf(mvs_dir, mesh, mesh_pts, mesh_rgb, notes)
        seconds["mvs_fusion"] = time.perf_counter() - t

        # --- radiance field
        t = time.perf_counter()
        preset, cfg = _field_config(params, device)
        nerf_dir = tmp / "nerf"
        nerf_dir.mkdir()
        train_views = [nerf.TrainView(scene.views[i].name, scene.views[i].image, scene.views[i].K,
                                      scene.views[i].cam_from_world) for i in train]
        field_model, field_stats = nerf.train_field(train_views, scene.points, cfg, device=device, seed=params.seed,
                                                    work_dir=tmp / ".field_work", log=log)
        nerf.save_field(nerf_dir / "field.pt", field_model)
        seconds["field_training"] = time.perf_counter() - t
        eval_items = [(scene.views[i].name, scene.views[i].K, scene.views[i].cam_from_world, scene.views[i].image)
                      for i in holdout_idx]
        held_out = _render_and_score(field_model, eval_items, nerf_dir / "renders" / "held_out", "render_held_out",
                                     seconds, params.render_max_edge)
        queries = _query_views(fr, scene, model, tmp / ".queries")
        query_scores = _render_and_score(field_model, [(q, K, P, path) for q, K, P, path in queries],
                                         nerf_dir / "renders" / "queries", "render_queries", seconds,
                                         params.render_max_edge)
        t = time.perf_counter()
        depth_paths = _render_field_depths(field_model, scene, train, params, unit, tmp / ".field_depth")
        nerf_pts, nerf_rgb = fuse_points(_saved_views(depth_paths), params.fused_voxel_m * unit)
        nerf_mesh_pts = np.zeros((0, 3))
        if len(nerf_pts):
            nerf_mesh, nerf_mesh_pts, nerf_mesh_rgb, _ = tsdf_fuse(
                _saved_views(depth_paths), params.tsdf_voxel_m * unit, params.tsdf_trunc_m * unit, max_depth,
                params.tsdf_min_views, device, "field's depth renders")
            write_ply(nerf_dir / "fused.ply", nerf_pts, nerf_rgb)
            _write_tsdf(nerf_dir, nerf_mesh, nerf_mesh_pts, nerf_mesh_rgb, notes)
        else:
            notes.append(f"the radiance field is nowhere opaque (>= {params.field_min_opacity}) within "
                         f"{params.max_depth_m} m of the training frames: no field cloud or mesh (train longer?)")
        seconds["field_fusion"] = time.perf_counter() - t

        # --- scores
        t = time.perf_counter()
        geometry, geometry_note = _geometry({"mvs": fused, "mvs_mesh": mesh_pts, "nerf": nerf_pts,
                                             "nerf_mesh": nerf_mesh_pts}, fr.truth("points.ply"), model, scene,
                                            params, fr.metric)
        seconds["scoring"] = time.perf_counter() - t
        for f in (tmp / ".field_work", tmp / ".queries", tmp / ".field_depth"):
            _remove(f)
        seconds["total"] = time.perf_counter() - t0
        metrics = _metrics(params, device, backend, preset, cfg, scene, train, held_out, query_scores, bool(queries),
                           field_stats, mvs_stats, geometry, geometry_note, seconds, notes, len(fused), len(mesh_pts),
                           model.alignment.metric)
        write_json(tmp / METRICS, metrics)
    log.info("held-out PSNR %s dB; MVS F-score@10cm %s; %.0f s", held_out.get("psnr"),
             (geometry.get("mvs") or {}).get("fscore_10cm"), seconds["total"])
    return ReconResult(Path(out_dir), metrics)


def _write_tsdf(folder: Path, mesh, points: np.ndarray, colours: np.ndarray, notes: list[str]) -> None:
    """The TSDF mesh and its vertices as PLY (mesh.ply, points.ply); an empty mesh (no voxel integrated by
    tsdf_min_views views) is no file and a note."""
    import open3d as o3d

    if not len(points):
        notes.append(f"{folder.name}/mesh.ply not written: the TSDF volume has no surface seen by enough views "
                     "(recon.tsdf_min_views)")
        return
    if not o3d.io.write_triangle_mesh(str(folder / "mesh.ply"), mesh):
        raise StageError(f"could not write {folder / 'mesh.ply'}")
    write_ply(folder / "points.ply", points, colours)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _peak_memory_mb(device: str) -> dict:
    import torch

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def _metrics(params, device, backend, preset, cfg, scene, train, held_out, query_scores, had_queries, field_stats,
             mvs_stats, geometry, geometry_note, seconds, notes, n_fused, n_mesh, metric) -> dict:
    def nest(source: str) -> dict:
        g = {k: v for k, v in (geometry.get(source) or {}).items()}
        mesh = geometry.get(f"{source}_mesh")
        if mesh:
            g["mesh"] = mesh
        return g

    return {
        "device": device, "mvs_backend": backend, "field_preset": preset, "field_config": cfg.to_dict(),
        "frames": len(scene.views), "train_frames": len(train), "held_out_frames": held_out.get("images", 0),
        "psnr": held_out.get("psnr"), "ssim": held_out.get("ssim"),
        "queries": {**query_scores, "poses": "ground truth through sfm's alignment, not optimised"}
        if had_queries else {"note": "no queries with ground-truth poses"},
        "poses_optimised": False,
        "field": field_stats, "mvs_stats": {**mvs_stats, "fused_points": n_fused, "mesh_vertices": n_mesh},
        "mvs": nest("mvs"), "nerf": nest("nerf"), "geometry": geometry_note,
        "chamfer": (geometry.get("mvs") or {}).get("chamfer"),
        **{f"fscore_{_threshold_name(th)}": (geometry.get("mvs") or {}).get(f"fscore_{_threshold_name(th)}")
           for th in params.fscore_m},
        "emd": (geometry.get("mvs") or {}).get("emd"),
        "seconds": round(seconds["total"], 1), "seconds_per_phase": {k: round(v, 2) for k, v in seconds.items()},
        **_peak_memory_mb(device), "metric": metric, "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m stages.recon --params params.yaml --frames data/ingest/S --sfm data/sfm/S
    --out data/recon/S."""
    args = make_parser("recon", __doc__, INPUTS, OUTPUTS).parse_args(argv)
    return guarded("recon", lambda: run(load_section(args.params, "recon", ReconParams), frames=Path(args.frames),
                                        sfm=Path(args.sfm), out_dir=Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
