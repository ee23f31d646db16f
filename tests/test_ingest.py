"""The ingest stage: keyframe scoring units, synthetic videos and image folders, bad inputs, scene.yaml, real scenes."""

from __future__ import annotations

import io
import json
import math
import re
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image, ImageOps

from stages import ingest
from stages.common import geometry as geo
from stages.common.artifacts import GT_PREFIX, pose_columns, poses_from_table, read_ingest
from stages.common.errors import StageError
from stages.common.params import build, load_section
from stages.common.scene import Intrinsics, SceneSettings, read_scene_settings
from stages.ingest import IngestParams, run
from tests.conftest import real_scene

# ------------------------------------------------------------------------------------------- helpers


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture: plenty of corners to track, no repeating pattern."""
    rng = np.random.default_rng(seed)
    grey = cv2.GaussianBlur((rng.random((h, w)) * 255).astype(np.uint8), (0, 0), 1.5)
    grey = cv2.normalize(grey, None, 0, 255, cv2.NORM_MINMAX)
    return np.ascontiguousarray(np.stack([grey, np.roll(grey, 7, axis=1), 255 - grey], axis=-1))


def write_video(path: Path, frames: list[np.ndarray], times_s: list[float], *, container_options=None,
                rotation: int | None = None) -> Path:
    """Encode RGB frames with H.264 at explicit presentation times (ms), so the frame rate may vary."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "12", "preset": "ultrafast"}
        stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for img, t in zip(frames, times_s, strict=True):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving_frames(n: int, step: int = 6, h: int = 180, w: int = 320, seed: int = 0) -> list[np.ndarray]:
    """`n` crops of one texture, each `step` pixels right of the previous: a camera panning."""
    tex = texture(h + 20, w + step * n + 10, seed)
    return [np.ascontiguousarray(tex[10:10 + h, step * i:step * i + w]) for i in range(n)]


def save_png(path: Path, pixels: np.ndarray) -> Path:
    """Write an RGB or grey array as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def image_scene(root: Path, n: int, size=(160, 120)) -> Path:
    """A scene folder with `n` distinct PNG images in images/."""
    for i in range(n):
        save_png(root / "images" / f"img{i:02d}.png", texture(size[1], size[0], seed=100 + i))
    return root


def dim_wall(h: int = 120, w: int = 160, seed: int = 0) -> np.ndarray:
    """A wall photographed in dim light: faint texture (grey 20..44), vignetting and sensor noise, grey."""
    grey = cv2.cvtColor(texture(h, w, seed), cv2.COLOR_RGB2GRAY).astype(float)
    wall = 20 + (grey - grey.min()) / np.ptp(grey) * 24
    yy, xx = np.mgrid[:h, :w]
    r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    noise = np.random.default_rng(seed).normal(0, 1.5, (h, w))
    return np.clip(np.round(wall * (1 - 0.2 * r2) + noise), 0, 255).astype(np.uint8)


def assert_no_output(out: Path) -> None:
    """A failed run leaves neither the output folder nor a temporary sibling."""
    assert not out.exists()
    if out.parent.exists():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


FAST = dict(max_edge=160)


# --------------------------------------------------------------------------------------------- units


def test_sharpness_orders_blurred_below_sharp():
    sharp = cv2.cvtColor(texture(120, 160), cv2.COLOR_RGB2GRAY)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 3)
    assert ingest.sharpness(sharp) > 5 * ingest.sharpness(blurred)
    rel = ingest.relative_sharpness([100, 110, 20, 105, 95, 100])
    assert rel[2] < 0.25 and all(0.8 < r < 1.2 for i, r in enumerate(rel) if i != 2)


def test_track_motion_recovers_a_known_shift():
    tex = cv2.cvtColor(texture(200, 300), cv2.COLOR_RGB2GRAY)
    a, b = tex[20:180, 20:260], tex[22:182, 25:265]  # content moves by (-5, -2) pixels
    assert ingest.track_motion(a, b) == pytest.approx(math.hypot(5, 2), abs=0.15)
    assert ingest.track_motion(a, a) == pytest.approx(0, abs=0.05)
    flat = np.full((160, 240), 128, np.uint8)
    assert math.isnan(ingest.track_motion(flat, flat))


def test_scoring_grey_downscales_and_reports_the_scale():
    grey, scale = ingest.scoring_grey(np.zeros((360, 1280, 3), np.uint8), 640)
    assert grey.shape == (180, 640) and scale == 1.0
    grey, scale = ingest.scoring_grey(np.zeros((90, 320), np.uint8), 640)
    assert grey.shape == (90, 320) and scale == 2.0  # never upscaled; motion is rescaled instead


def test_select_keyframes_drops_static_and_blurred_frames():
    sharp = [100.0] * 12
    sharp[9] = 20.0  # far blurrier than its neighbours
    # A jump of 7 px (over twice the threshold) closes the window at once; then the camera rests.
    motion = [math.nan, 5, 7, 0.1, 0.1, 0.2, 5, 5, 5, 5, 5, 5]
    choice = ingest.select_keyframes(sharp, motion, min_motion=3, window=5, blur_ratio=0.5)
    assert np.flatnonzero(choice.keep_N).tolist() == [0, 1, 2, 6, 7, 8, 10, 11]
    assert choice.reasons[0] == "keyframe: first sharp frame"
    assert all(choice.reasons[i].startswith("static: moved") for i in (3, 4, 5))
    assert choice.reasons[9].startswith("blurred: sharpness 20%")
    assert choice.reasons[10].startswith("keyframe: moved 10.0 px since keyframe 8")


def test_select_keyframes_takes_the_sharpest_in_the_window_and_keeps_lost_tracks():
    # 1 px per frame, threshold 3: frames 3, 4, 5 are candidates (motion 3, 4, 5 < 2 * 3); 4 is sharpest.
    sharp = [100, 100, 100, 90, 120, 95, 100, 100, 100]
    motion = [math.nan, 1, 1, 1, 1, 1, 1, 1, math.nan]
    choice = ingest.select_keyframes(sharp, motion, min_motion=3, window=5, blur_ratio=0.5)
    assert choice.keep_N[4] and not choice.keep_N[3] and not choice.keep_N[5]
    assert choice.reasons[3] == choice.reasons[5] == "window: frame 4 nearby was sharper"
    assert choice.keep_N[8] and "tracking lost" in choice.reasons[8]  # lost track = large motion
    window1 = ingest.select_keyframes(sharp, motion, min_motion=3, window=1, blur_ratio=0.5)
    assert window1.keep_N[3] and not window1.keep_N[4]
    every = ingest.select_keyframes(sharp, [math.nan] + [0.0] * 8, min_motion=0, window=5, blur_ratio=0.5)
    assert every.keep_N.all()  # keyframe_motion 0 keeps every sharp frame, static or not


def test_cap_keyframes_raises_the_threshold_to_fit_max_frames():
    n = 200
    params = IngestParams(keyframe_motion=3.0, max_frames=20)
    choice, note = ingest.cap_keyframes([100.0] * n, [math.nan] + [5.0] * (n - 1), params)
    kept = np.flatnonzero(choice.keep_N)
    assert 15 <= len(kept) <= 20 and "exceed max_frames=20" in note and choice.motion_threshold > 3.0
    assert kept[0] == 0 and kept[-1] > n - 15 and np.ptp(np.diff(kept)) <= 1  # spread evenly over the video
    assert ingest.cap_keyframes([100.0] * 5, [math.nan] + [5.0] * 4, params)[1] == ""


def test_match_timestamps_within_half_a_local_frame_interval():
    frames = [0.0, 0.1, 0.2, 0.25, 0.3]  # variable frame rate
    gt = [0.5, 0.101, 0.0, 0.26]
    assert ingest.match_timestamps(frames, gt).tolist() == [2, 1, -1, 3, -1]
    assert ingest.match_timestamps(frames, []).tolist() == [-1] * 5


def test_camera_groups_and_fit_size():
    keys = [(10, 5, "A", "x"), (10, 5, "B", "x"), None, (10, 5, "A", "x"), (5, 10, "A", "x")]
    assert ingest.assign_camera_groups(keys) == [0, 1, None, 0, 2]
    assert ingest.fit_size(1920, 1080, 1600) == (1600, 900)
    assert ingest.fit_size(1080, 1920, 1600) == (900, 1600)
    assert ingest.fit_size(640, 480, 1600) == (640, 480)  # never upscaled


def test_params_are_checked(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("ingest:\n  max_edgee: 100\n")
    with pytest.raises(StageError, match=r"unknown key 'max_edgee'.*allowed keys are blur_ratio, flow_width"):
        load_section(p, "ingest", IngestParams)
    with pytest.raises(StageError, match=r"blur_ratio: 1.5 is not allowed; it must be in \[0, 1\)"):
        build(IngestParams, {"blur_ratio": 1.5}, "params.yaml:ingest")
    with pytest.raises(StageError, match=r"image_format: 'gif' is not allowed; use one of 'png', 'jpg'"):
        build(IngestParams, {"image_format": "gif"}, "params.yaml:ingest")
    with pytest.raises(StageError, match=r"min_image_edge: 0 is not allowed; it must be >= 1"):
        build(IngestParams, {"min_image_edge": 0}, "params.yaml:ingest")


def test_blank_and_too_small_reasons():
    assert ingest.blank_reason(np.full((90, 160), 128, np.uint8)) == "blank: no texture (grey std 0.0 < 2)"
    noisy = np.clip(np.round(128 + np.random.default_rng(0).normal(0, 0.7, (90, 160))), 0, 255).astype(np.uint8)
    assert re.fullmatch(r"blank: no texture \(grey std 0\.[78] < 2\)", ingest.blank_reason(noisy))  # noise only
    wall = dim_wall()
    assert 2.5 < wall.std() < 4 and ingest.blank_reason(wall) == ""  # low contrast, but texture to match
    assert ingest.too_small_reason(1, 1, 32) == "too small: 1x1 px, below ingest.min_image_edge=32"
    assert ingest.too_small_reason(200, 31, 32) == "too small: 200x31 px, below ingest.min_image_edge=32"
    assert ingest.too_small_reason(32, 32, 32) == ""


# --------------------------------------------------------------------------------------------- video


def test_video_keyframes_timestamps_gt_and_manifest(tmp_path):
    moving = moving_frames(16)
    blurred = cv2.GaussianBlur(moving[11], (0, 0), 3)
    # 8 moving frames, 5 exact repeats of the last one (a camera at rest), 8 moving again with one blurred.
    frames = moving[:8] + [moving[7]] * 5 + moving[8:11] + [blurred] + moving[12:16]
    times = [0.1 * i for i in range(13)] + [1.2 + 0.04 * i for i in range(1, 9)]  # variable frame rate
    scene = tmp_path / "scene"
    scene.mkdir()
    write_video(scene / "video.mp4", frames, times)
    poses = {i: geo.look_at_cam_from_world([0.5 * i, 0, 1.5], [0.5 * i, 10, 1.5]) for i in range(0, 21, 2)}
    (scene / "transforms.json").write_text(json.dumps({
        "camera_model": "OPENCV", "fl_x": 300.0, "fl_y": 300.0, "cx": 160.0, "cy": 90.0, "w": 320, "h": 180,
        "metric": True,
        "frames": [{"file_path": "video.mp4", "timestamp": times[i],
                    "transform_matrix": geo.cam_from_world_to_world_from_cam_gl(P).tolist()}
                   for i, P in poses.items()],
    }))
    out = tmp_path / "out"
    res = run(IngestParams(**FAST), scene_dir=scene, out_dir=out)

    m = res.metrics
    assert m["source_kind"] == "video" and m["frames_in"] == 21 and m["video_truncated"] is False
    df = pd.read_csv(out / "manifest.csv")
    assert list(df.columns) == ingest.MANIFEST_COLUMNS and len(df) == 21
    assert df["timestamp"].to_numpy() == pytest.approx(times, abs=1e-6)
    kept = df.index[df["split"].isin(["mapping", "query"])].tolist()
    assert kept == [0, 1, 2, 3, 4, 5, 6, 7, 13, 14, 15, 17, 18, 19, 20]
    assert all(df.loc[i, "reason"].startswith("static:") for i in range(8, 13))
    assert df.loc[16, "split"] == "skipped" and df.loc[16, "reason"].startswith("blurred:")
    assert df.loc[13, "motion_px"] == pytest.approx(12, abs=1)  # 6 px at 320 wide = 12 px at flow_width 640
    # query_every=10: the 10th kept frame is held out.
    assert df.loc[14, "split"] == "query" and df.loc[14, "name"] == "queries/000014.png"
    assert m["mapping_frames"] == 14 and m["query_frames"] == 1 and m["frames_skipped"] == 6
    assert m["frames_kept"] == 15 and m["metric"] is True and m["camera_groups"] == 1

    # Lossless: the written frame is exactly the decoded frame, resized.
    with av.open(str(scene / "video.mp4")) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    png = cv2.cvtColor(cv2.imread(str(out / "images/000005.png")), cv2.COLOR_BGR2RGB)
    assert png.shape == (90, 160, 3)
    assert np.array_equal(png, cv2.resize(decoded[5], (160, 90), interpolation=cv2.INTER_AREA))
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in kept if i != 14]

    # Ground truth by timestamp: even frames have poses, odd ones none.
    frames = read_ingest(out)
    for i in (0, 4, 20):
        q = geo.quat_wxyz_from_R(poses[i][:, :3])
        assert df.loc[i, pose_columns(GT_PREFIX)[:4]].to_numpy(float) == pytest.approx(q, abs=1e-9)
        if i != 14:  # the query
            assert frames.gt[df.loc[i, "name"]] == pytest.approx(poses[i], abs=1e-9)
    assert frames.query_gt["queries/000014.png"] == pytest.approx(poses[14], abs=1e-9)
    assert df.loc[[1, 3, 19], GT_PREFIX + "qw"].isna().all()
    assert frames.is_video and frames.sequence and frames.metric is True  # capture.json
    cams = json.loads((out / "cameras.json").read_text())
    assert list(cams) == ["0"] and cams["0"]["n_images"] == 15
    assert (cams["0"]["width"], cams["0"]["height"]) == (160, 90)
    intr = cams["0"]["intrinsics"]
    assert (intr["fx"], intr["fy"], intr["cx"], intr["cy"]) == pytest.approx((150, 150, 80.0, 45.0))


def test_video_fast_motion_keeps_every_frame_and_rotation_is_applied(tmp_path):
    scene = tmp_path / "scene"
    scene.mkdir()
    frames = moving_frames(8, step=10)
    for f in frames:
        f[:40, :40] = (255, 0, 0)  # red block top-left of the stored frame
    write_video(scene / "clip.mov", frames, [i / 25 for i in range(8)], rotation=90)
    res = run(IngestParams(query_every=0), scene_dir=scene, out_dir=tmp_path / "out")
    assert res.metrics["mapping_frames"] == 8 and res.metrics["frames_skipped"] == 0
    bgr = cv2.imread(str(tmp_path / "out/images/000003.png"))
    # Display rotation 90 degrees counter-clockwise: stored landscape, shown portrait, top-left -> bottom-left.
    assert bgr.shape[:2] == (320, 180)
    assert bgr[300, 10, 2] > 200 and bgr[300, 10, 1] < 60 and bgr[10, 10, 2] < 200


def test_video_static_duplicates_are_dropped_and_max_frames_caps(tmp_path):
    scene = tmp_path / "scene"
    scene.mkdir()
    frames = moving_frames(12, step=4)
    write_video(scene / "video.mkv", [frames[0]] * 6 + frames, [i / 10 for i in range(18)])
    res = run(IngestParams(query_every=0, max_frames=5), scene_dir=scene, out_dir=tmp_path / "out")
    df = res.manifest
    assert df.loc[1:5, "reason"].str.startswith("static:").all()
    assert res.metrics["mapping_frames"] == 5 and res.metrics["keyframe_motion_used"] > 3.0


def test_video_blank_frames_are_skipped_not_kept(tmp_path):
    moving = moving_frames(12)
    black = np.zeros_like(moving[0])
    # A fade from black, then a black frame in the middle (a dropped signal) between moving frames 5 and 6.
    frames = [black] * 4 + moving[:6] + [black] + moving[6:]
    scene = tmp_path / "scene"
    scene.mkdir()
    write_video(scene / "video.mp4", frames, [i / 10 for i in range(len(frames))])
    res = run(IngestParams(query_every=0, **FAST), scene_dir=scene, out_dir=tmp_path / "out")
    df = res.manifest
    blank = [0, 1, 2, 3, 10]
    assert (df.loc[blank, "split"] == "skipped").all()
    assert df.loc[blank, "reason"].str.startswith("blank: no texture (grey std 0.").all()
    assert df.loc[4, "split"] == "mapping" and df.loc[4, "reason"] == "keyframe: first sharp frame"
    # The frame after the black one is measured against the last textured frame: 6 px at 320 = 12 px at 640.
    assert df.loc[11, "motion_px"] == pytest.approx(12, abs=1)
    assert (df.drop(index=blank)["split"] == "mapping").all() and res.metrics["mapping_frames"] == 12
    assert res.metrics["sequence"] is True and res.metrics["sequence_from"] == "video"

    (scene / "video.mp4").unlink()
    write_video(scene / "video.mp4", [black] * 6, [i / 10 for i in range(6)])
    with pytest.raises(StageError, match=r"only 0 usable mapping frames .*6 frames decoded from video.mp4, "
                                         r"6 skipped \(6 blank\); "):
        run(IngestParams(**FAST), scene_dir=scene, out_dir=tmp_path / "out2")
    assert_no_output(tmp_path / "out2")


# ---------------------------------------------------------------------------------------- image folders


def _exif(make: str, model: str, orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = make, model, orientation
    return exif


def test_images_are_uprighted_downscaled_and_grouped_by_camera(tmp_path):
    images = tmp_path / "scene/images"
    images.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(texture(120, 160, seed=i)).save(images / f"canon{i}.jpg", exif=_exif("Canon", "EOS 5D"))
    for i in range(2):
        Image.fromarray(texture(120, 160, seed=10 + i)).save(images / f"sony{i}.jpg", exif=_exif("Sony", "A7"))
    # Upright it is portrait with a red corner top-left; stored rotated, with EXIF orientation 6 to undo it.
    upright = texture(160, 120, seed=20)
    upright[:20, :20] = (255, 0, 0)
    stored = Image.fromarray(upright).rotate(90, expand=True)
    stored.save(images / "canon_portrait.jpg", exif=_exif("Canon", "EOS 5D", orientation=6), quality=98)
    save_png(images / "big.png", texture(400, 800, seed=30))

    out = tmp_path / "out"
    res = run(IngestParams(max_edge=200, query_every=0), scene_dir=tmp_path / "scene", out_dir=out)
    df = res.manifest.set_index("source")
    assert df.loc["images/canon_portrait.jpg", ["src_width", "src_height"]].tolist() == [120, 160]
    portrait = cv2.imread(str(out / "images/canon_portrait.png"))
    assert portrait.shape[:2] == (160, 120) and portrait[5, 5, 2] > 200 and portrait[5, 5, 0] < 60
    assert df.loc["images/big.png", ["width", "height", "src_width", "src_height"]].tolist() == [200, 100, 800, 400]
    assert df.loc["images/canon0.jpg", ["width", "height"]].tolist() == [160, 120]  # never upscaled
    cams = json.loads((out / "cameras.json").read_text())
    groups = {(c["make"], c["model"], c["src_width"], c["src_height"]): c["n_images"] for c in cams.values()}
    assert groups == {("Canon", "EOS 5D", 160, 120): 3, ("Sony", "A7", 160, 120): 2,
                      ("Canon", "EOS 5D", 120, 160): 1, ("", "", 800, 400): 1}
    assert len(set(df.loc[[f"images/canon{i}.jpg" for i in range(3)], "camera"])) == 1
    assert res.metrics["camera_groups"] == 4 and all(c["intrinsics"] is None for c in cams.values())


def test_query_every_holds_out_frames_and_queries_folder_wins(tmp_path):
    scene = image_scene(tmp_path / "scene", 10)
    res = run(IngestParams(query_every=3, **FAST), scene_dir=scene, out_dir=tmp_path / "out")
    df = res.manifest
    assert df.loc[df["split"] == "query", "name"].tolist() == ["queries/img02.png", "queries/img05.png",
                                                                "queries/img08.png"]
    assert res.metrics["mapping_frames"] == 7 and res.metrics["query_frames"] == 3
    save_png(scene / "queries/q1.png", texture(120, 160, seed=999))
    res = run(IngestParams(query_every=3, **FAST), scene_dir=scene, out_dir=tmp_path / "out")
    assert res.metrics["mapping_frames"] == 10 and res.metrics["query_frames"] == 1
    assert (tmp_path / "out/queries/q1.png").is_file() and res.metrics["queries_in"] == 1


def test_image_sequence_is_read_in_capture_order(tmp_path):
    images = tmp_path / "seq/images"
    order = [8, 9, 10, 12, 100]  # gaps are fine; by name 10 < 100 < 12 < 8 < 9
    for i in order:
        save_png(images / f"img{i}.png", texture(120, 160, seed=200 + i))
    res = run(IngestParams(query_every=2, **FAST), scene_dir=tmp_path / "seq", out_dir=tmp_path / "out")
    df = res.manifest
    assert df["source"].tolist() == [f"images/img{i}.png" for i in order]
    assert df["frame_index"].tolist() == [0, 1, 2, 3, 4]
    # Held-out queries follow capture order too: every 2nd frame.
    assert df.loc[df["split"] == "query", "source"].tolist() == ["images/img9.png", "images/img12.png"]
    assert res.metrics["sequence"] is True and res.metrics["sequence_from"] == "file names"
    on_disk = json.loads((tmp_path / "out/metrics.json").read_text())
    assert list(on_disk)[:3] == ["source_kind", "sequence", "sequence_from"] and on_disk["sequence"] is True

    photos = tmp_path / "photos/images"
    names = ["10265353_3838484249.jpg", "02928139_3448003521.jpg", "03903474_1471484089.jpg"]  # Flickr ids
    photos.mkdir(parents=True)
    for k, name in enumerate(names):
        Image.fromarray(texture(120, 160, seed=300 + k)).save(photos / name)
    res = run(IngestParams(query_every=0, **FAST), scene_dir=tmp_path / "photos", out_dir=tmp_path / "out")
    assert res.manifest["source"].tolist() == [f"images/{n}" for n in sorted(names)]
    assert res.metrics["sequence"] is False and res.metrics["sequence_from"] == "file names"


def test_scene_yaml_forces_sequence_and_is_written_resolved(tmp_path):
    scene = image_scene(tmp_path / "scene", 4)  # img00.png .. img03.png: a sequence by name
    out = tmp_path / "out"
    res = run(IngestParams(**FAST), scene_dir=scene, out_dir=out)
    assert res.metrics["sequence"] is True
    assert yaml.safe_load((out / "scene.yaml").read_text()) == {  # always written, every key, nulls included
        "camera_height_m": None, "metric_scale": "auto", "sequence": None, "geo_origin": None}

    (scene / "scene.yaml").write_text("sequence: false\ncamera_height_m: 1.65\nmetric_scale: camera_height\n")
    res = run(IngestParams(**FAST), scene_dir=scene, out_dir=out)
    assert res.metrics["sequence"] is False and res.metrics["sequence_from"] == "scene.yaml"
    assert yaml.safe_load((out / "scene.yaml").read_text()) == {
        "camera_height_m": 1.65, "metric_scale": "camera_height", "sequence": False, "geo_origin": None}
    assert read_scene_settings(out) == SceneSettings(camera_height_m=1.65, metric_scale="camera_height",
                                                     sequence=False)

    (scene / "scene.yaml").write_text("camera_height: 1.65\n")
    with pytest.raises(StageError, match=r"scene.yaml: unknown key 'camera_height'; allowed keys are "
                                         r"camera_height_m, geo_origin, metric_scale, sequence"):
        run(IngestParams(**FAST), scene_dir=scene, out_dir=tmp_path / "out2")
    assert_no_output(tmp_path / "out2")

    video = tmp_path / "video"
    video.mkdir()
    write_video(video / "video.mp4", moving_frames(6, step=10), [i / 10 for i in range(6)])
    (video / "scene.yaml").write_text("sequence: false\n")
    m = run(IngestParams(query_every=0, **FAST), scene_dir=video, out_dir=tmp_path / "out3").metrics
    assert m["sequence"] is True and m["sequence_from"] == "video" and "always a sequence" in m["warnings"][0]


# ----------------------------------------------------------------------------------------- bad inputs


def test_tiny_and_blank_images_are_quarantined_and_dim_walls_stay(tmp_path):
    scene = image_scene(tmp_path / "scene", 3)
    images = scene / "images"
    save_png(images / "dot.png", np.full((1, 1, 3), 200, np.uint8))
    save_png(images / "strip.png", texture(20, 300, seed=1))  # textured, but 20 px tall
    save_png(images / "edge32.png", texture(32, 200, seed=2))  # exactly min_image_edge: kept
    save_png(images / "grey.png", np.full((120, 160, 3), 128, np.uint8))
    Image.fromarray(np.zeros((120, 160, 3), np.uint8)).save(images / "lens_cap.jpg", quality=90)
    noisy = np.clip(np.round(40 + np.random.default_rng(3).normal(0, 0.7, (120, 160))), 0, 255).astype(np.uint8)
    save_png(images / "noise_only.png", noisy)
    Image.fromarray(dim_wall(seed=4)).save(images / "dim_wall.jpg", quality=90)

    res = run(IngestParams(query_every=0, **FAST), scene_dir=scene, out_dir=tmp_path / "out")
    df = res.manifest.set_index("source")
    reason, split = df["reason"], df["split"]
    assert reason["images/dot.png"] == "too small: 1x1 px, below ingest.min_image_edge=32"
    assert reason["images/strip.png"] == "too small: 300x20 px, below ingest.min_image_edge=32"
    assert reason["images/grey.png"] == "blank: no texture (grey std 0.0 < 2)"
    assert reason["images/lens_cap.jpg"] == "blank: no texture (grey std 0.0 < 2)"
    assert re.fullmatch(r"blank: no texture \(grey std 0\.[78] < 2\)", reason["images/noise_only.png"])
    assert split["images/dim_wall.jpg"] == "mapping" and split["images/edge32.png"] == "mapping"
    assert res.metrics["frames_quarantined"] == 5 and res.metrics["mapping_frames"] == 5
    assert (tmp_path / "out/images/dim_wall.png").is_file() and not (tmp_path / "out/images/grey.png").exists()

    res = run(IngestParams(query_every=0, min_image_edge=16, **FAST), scene_dir=scene, out_dir=tmp_path / "out")
    assert res.manifest.set_index("source").loc["images/strip.png", "split"] == "mapping"


def test_six_1x1_images_are_a_clear_error(tmp_path):
    images = tmp_path / "scene/images"
    for i in range(6):
        save_png(images / f"px{i}.png", np.full((1, 1, 3), 90, np.uint8))  # identical: too small, not duplicates
    out = tmp_path / "out"
    with pytest.raises(StageError) as exc:
        run(IngestParams(**FAST), scene_dir=tmp_path / "scene", out_dir=out)
    assert str(exc.value) == (
        f"only 0 usable mapping frames in {tmp_path / 'scene'} (needs min_frames=3): 6 files in images/, "
        "6 quarantined (6 too small; e.g. images/px0.png: too small: 1x1 px, below ingest.min_image_edge=32); "
        "use frames at least 32 px on the shorter side (ingest.min_image_edge), or add images or lower "
        "ingest.min_frames")
    assert_no_output(out)
    for i in range(2):
        save_png(images / f"px{i}.png", np.full((60, 80), 7, np.uint8))
    with pytest.raises(StageError, match=r"6 quarantined \(4 too small, 2 blank; e.g. images/px0.png: blank: no "
                                         r"texture \(grey std 0.0 < 2\); images/px2.png: too small: 1x1 px"):
        run(IngestParams(**FAST), scene_dir=tmp_path / "scene", out_dir=out)


@pytest.mark.parametrize("file_path", ["../outside.png", "../../../etc/passwd", "images/../../outside.png",
                                       "ABSOLUTE"])
def test_transforms_file_path_outside_the_scene_is_refused(tmp_path, file_path):
    scene = image_scene(tmp_path / "scene", 3)
    save_png(tmp_path / "outside.png", texture(120, 160, seed=9))  # exists, and still refused
    file_path = str(tmp_path / "outside.png") if file_path == "ABSOLUTE" else file_path
    (scene / "transforms.json").write_text(json.dumps({"frames": [
        {"file_path": "images/../images/img00.png", "transform_matrix": np.eye(4).tolist()},  # inside: fine
        {"file_path": file_path, "transform_matrix": np.eye(4).tolist()},
    ]}))
    out = tmp_path / "out"
    with pytest.raises(StageError, match=rf"transforms.json: frame 1 has file_path {re.escape(repr(file_path))}, "
                                         r"which .*; file paths must be relative to the scene folder and stay "
                                         r"inside it$"):
        run(IngestParams(**FAST), scene_dir=scene, out_dir=out)
    assert_no_output(out)


def test_bad_files_are_quarantined_with_reasons(tmp_path, caplog):
    scene = image_scene(tmp_path / "scene", 4)
    images = scene / "images"
    buf = io.BytesIO()
    Image.fromarray(texture(120, 160, seed=50)).save(buf, "JPEG")
    jpg = buf.getvalue()
    rng = np.random.default_rng(1)
    scan = jpg.index(b"\xff\xda") + 20  # headers intact, entropy-coded data replaced by garbage
    (images / "garbage_after_header.jpg").write_bytes(jpg[:scan] + rng.integers(0, 256, 4000, np.uint8).tobytes())
    (images / "broken_header.jpg").write_bytes(jpg[:100] + rng.integers(0, 256, 4000, np.uint8).tobytes())
    (images / "random.jpg").write_bytes(rng.integers(0, 256, 3000, np.uint8).tobytes())
    (images / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (images / "empty.png").write_bytes(b"")
    (images / "notes.png").write_text("not an image at all\n")
    save_png(tmp_path / "tmp.png", texture(120, 160, seed=60)).rename(images / "png_named.jpg")  # accepted

    with caplog.at_level("WARNING", logger="scenepipe.ingest"):
        res = run(IngestParams(query_every=0, **FAST), scene_dir=scene, out_dir=tmp_path / "out")
    reason = res.manifest.set_index("source")["reason"]
    assert reason["images/garbage_after_header.jpg"].startswith("corrupt JPEG: ")
    assert reason["images/broken_header.jpg"] == "unreadable image: starts like a JPEG but its header is corrupt"
    assert reason["images/truncated.jpg"].startswith("unreadable image: OSError: image file is truncated")
    assert reason["images/random.jpg"] == "not an image: no known image format in its bytes"
    assert reason["images/notes.png"] == reason["images/random.jpg"]
    assert reason["images/empty.png"] == "empty file (0 bytes)"
    m = res.metrics
    assert m["frames_in"] == 11 and m["frames_quarantined"] == 6 and m["mapping_frames"] == 5
    assert (tmp_path / "out/images/png_named.png").is_file()
    assert sum("quarantined images/" in r.message for r in caplog.records) == 6
    quarantined = res.manifest[res.manifest["split"] == "quarantined"]
    assert (quarantined["name"] == "").all() and quarantined["camera"].isna().all()


def test_one_image_is_too_few(tmp_path):
    scene = image_scene(tmp_path / "scene", 1)
    out = tmp_path / "ingest/out"
    with pytest.raises(StageError, match=r"only 1 usable mapping frame in .*scene \(needs min_frames=3\): "
                                         r"1 files in images/; add images or lower ingest.min_frames"):
        run(IngestParams(**FAST), scene_dir=scene, out_dir=out)
    assert_no_output(out)


def test_identical_images_are_duplicates_then_too_few(tmp_path):
    images = tmp_path / "scene/images"
    for name in "abcd":
        save_png(images / f"{name}.png", texture(120, 160, seed=7))
    out = tmp_path / "out"
    with pytest.raises(StageError, match=r"only 1 usable mapping frame .*needs min_frames=3.*4 files in images/, "
                                         r"3 quarantined \(images/b.png: duplicate of images/a.png; "
                                         r"images/c.png: duplicate of images/a.png; "
                                         r"images/d.png: duplicate of images/a.png\); "
                                         r"add images or lower ingest.min_frames"):
        run(IngestParams(**FAST), scene_dir=tmp_path / "scene", out_dir=out)
    assert_no_output(out)
    res = run(IngestParams(min_frames=1, **FAST), scene_dir=tmp_path / "scene", out_dir=out)
    assert res.manifest["reason"].tolist()[1:] == ["duplicate of images/a.png"] * 3


def test_empty_folder_and_missing_gt_file_are_errors(tmp_path):
    (tmp_path / "empty/images").mkdir(parents=True)
    out = tmp_path / "out"
    with pytest.raises(StageError, match=r"has no input: expected images in"):
        run(IngestParams(), scene_dir=tmp_path / "empty", out_dir=out)
    assert_no_output(out)
    scene = image_scene(tmp_path / "scene", 3)
    (scene / "transforms.json").write_text(json.dumps({"frames": [
        {"file_path": "images/img00.png", "transform_matrix": np.eye(4).tolist()},
        {"file_path": "images/missing.png", "transform_matrix": np.eye(4).tolist()},
    ]}))
    with pytest.raises(StageError, match=r"names a missing file 'images/missing.png' \(frame 1\)"):
        run(IngestParams(), scene_dir=scene, out_dir=out)
    assert_no_output(out)


def test_truncated_video_keeps_what_decoded(tmp_path):
    full = write_video(tmp_path / "full.mp4", moving_frames(30), [i / 10 for i in range(30)],
                       container_options={"movflags": "faststart"})  # index first, so a cut file still opens
    data = full.read_bytes()
    scene = tmp_path / "scene"
    scene.mkdir()
    (scene / "video.mp4").write_bytes(data[: int(len(data) * 0.6)])
    res = run(IngestParams(query_every=0), scene_dir=scene, out_dir=tmp_path / "out")
    m = res.metrics
    assert m["video_truncated"] is True and 3 <= m["frames_in"] < 30
    assert m["warnings"][0].startswith(f"video.mp4 is truncated: decoded {m['frames_in']} of 30 frames")
    assert m["mapping_frames"] == m["frames_in"]

    (scene / "video.mp4").write_bytes(data[: int(len(data) * 0.1)])
    with pytest.raises(StageError, match=r"video.mp4: no frame could be decoded"):
        run(IngestParams(), scene_dir=scene, out_dir=tmp_path / "out2")
    assert_no_output(tmp_path / "out2")


def test_cut_mkv_is_truncated_and_cut_mp4_without_index_is_an_error(tmp_path):
    scene = tmp_path / "scene"
    scene.mkdir()
    mkv = write_video(tmp_path / "full.mkv", moving_frames(30), [i / 10 for i in range(30)]).read_bytes()
    (scene / "video.mkv").write_bytes(mkv[: int(len(mkv) * 0.6)])
    m = run(IngestParams(query_every=0), scene_dir=scene, out_dir=tmp_path / "out").metrics
    assert m["video_truncated"] is True and 3 <= m["frames_in"] < 30 and "of the stated" in m["warnings"][0]

    (scene / "video.mkv").unlink()
    mp4 = write_video(tmp_path / "full.mp4", moving_frames(10), [i / 10 for i in range(10)]).read_bytes()
    (scene / "video.mp4").write_bytes(mp4[: len(mp4) // 2])
    with pytest.raises(StageError, match=r"video.mp4: cannot be opened as a video"):
        run(IngestParams(), scene_dir=scene, out_dir=tmp_path / "out2")
    assert_no_output(tmp_path / "out2")


def test_main_prints_one_error_line_and_returns_1(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  max_edge: 160\n")
    (tmp_path / "raw/empty/images").mkdir(parents=True)
    out = tmp_path / "ingest/empty"
    assert ingest.main(["--params", str(params), "--scene", str(tmp_path / "raw/empty"), "--out", str(out)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: ingest: ") and "has no input" in errors[0]
    assert_no_output(out)

    image_scene(tmp_path / "raw/ok", 3)
    assert ingest.main(["--params", str(params), "--scene", str(tmp_path / "raw/ok"), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["mapping_frames"] == 3


# ---------------------------------------------------------------------------------------- real scenes


@pytest.mark.slow
def test_real_apple_video(tmp_path):
    scene = real_scene("apple")
    res = run(IngestParams(max_edge=640), scene_dir=scene, out_dir=tmp_path / "out")
    m, df = res.metrics, res.manifest
    assert m["frames_in"] == 50 and m["video_fps"] == pytest.approx(10) and not m["video_truncated"]
    assert df["timestamp"].to_numpy() == pytest.approx(np.arange(50) / 10, abs=1e-6)
    assert 30 <= m["frames_kept"] <= 50 and m["camera_groups"] == 1 and m["gt_poses"] == 0
    assert m["sequence"] is True and m["frames_quarantined"] == 0
    assert (df["split"] == "skipped").sum() == m["frames_skipped"] and df["sharpness"].notna().all()
    cams = json.loads((tmp_path / "out/cameras.json").read_text())
    assert (cams["0"]["width"], cams["0"]["height"]) == (640, 356) and cams["0"]["intrinsics"] is None


@pytest.mark.slow
def test_real_sacre_coeur_mixed_cameras(tmp_path):
    scene = real_scene("sacre_coeur")
    res = run(IngestParams(max_edge=400), scene_dir=scene, out_dir=tmp_path / "out")
    m, df = res.metrics, res.manifest
    assert m["frames_in"] == 10 and m["frames_quarantined"] == 0 and m["camera_groups"] >= 5
    assert m["sequence"] is False  # Flickr ids, not a capture order
    for _, row in df.iterrows():
        with Image.open(scene / row["source"]) as im:
            w, h = ImageOps.exif_transpose(im).size
        assert (row["src_width"], row["src_height"]) == (w, h)
        assert max(row["width"], row["height"]) == 400
        assert (row["width"] > row["height"]) == (w > h)


@pytest.mark.slow
def test_real_kitti06_gt_and_intrinsics(tmp_path):
    scene = real_scene("kitti06")
    res = run(IngestParams(max_edge=613), scene_dir=scene, out_dir=tmp_path / "out")
    m, df = res.metrics, res.manifest.set_index("source")
    assert m["frames_in"] == 51 and m["frames_kept"] == 51 and m["gt_poses"] == 51 and m["metric"] is True
    assert m["query_frames"] == 5  # query_every=10 without queries/
    assert m["sequence"] is True and df["frame_index"].tolist() == list(range(51))
    cams = json.loads((tmp_path / "out/cameras.json").read_text())
    assert list(cams) == ["0"] and (cams["0"]["width"], cams["0"]["height"]) == (613, 185)
    expected = Intrinsics(1226, 370, 707.0912, 707.0912, 601.8873, 183.1104).scaled(613, 185)
    intr = cams["0"]["intrinsics"]
    assert (intr["fx"], intr["fy"], intr["cx"], intr["cy"]) == pytest.approx((expected.fx, expected.fy, expected.cx,
                                                                              expected.cy))
    # The ground-truth pose round-trips to the camera centre transforms.json states (~1.2 m per frame).
    tr = json.loads((scene / "transforms.json").read_text())["frames"][1]
    name = df.loc[tr["file_path"], "name"]
    cam_from_world = poses_from_table(df.reset_index(), GT_PREFIX, "name")[name]
    assert geo.camera_center(cam_from_world) == pytest.approx(np.asarray(tr["transform_matrix"])[:3, 3], abs=1e-6)


@pytest.mark.slow
def test_real_fox_queries_gt_and_scaled_intrinsics(tmp_path):
    scene = real_scene("fox")
    res = run(IngestParams(max_edge=480), scene_dir=scene, out_dir=tmp_path / "out")
    m, df = res.metrics, res.manifest
    assert m["mapping_frames"] == 50 and m["query_frames"] == 17 and m["frames_quarantined"] == 0
    assert m["sequence"] is True  # 0001.jpg .. 0067.jpg with the queries' numbers missing
    assert len(list((tmp_path / "out/queries").iterdir())) == 17
    assert df[pose_columns(GT_PREFIX)].notna().all().all() and m["metric"] is False
    cams = json.loads((tmp_path / "out/cameras.json").read_text())
    assert list(cams) == ["0"] and cams["0"]["n_images"] == 67
    intr = cams["0"]["intrinsics"]
    assert (cams["0"]["width"], cams["0"]["height"]) == (270, 480)
    assert intr["fx"] == pytest.approx(1375.52 / 4) and intr["fy"] == pytest.approx(1374.49 / 4)
    # COLMAP convention (pixel centres at +0.5): the principal point scales as c * s
    assert (intr["cx"], intr["cy"]) == pytest.approx((554.558 / 4, 965.268 / 4))
    assert intr["model"] == "OPENCV" and intr["k1"] == pytest.approx(0.0578421)
