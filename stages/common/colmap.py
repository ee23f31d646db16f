"""COLMAP pieces shared by the stages that need features and matches (sfm now, localize next).

Swappable parts are named presets in plain dict registries (hloc's `confs` pattern): `FEATURES` (extractor,
its COLMAP options and the matcher that goes with it) and `PAIRS` (how image pairs are chosen). Options are
COLMAP's own names, merged into the pycolmap object they belong to; a caller's overrides are merged last, so a
user's value wins where the user set one, and `extract`/`match` return the values actually used.

Every function is deterministic for a given input and seed: image ids are renumbered in capture order
(COLMAP's extractor threads write them in the order they finish), pairs are sorted, RANSAC is seeded.
"""

from __future__ import annotations

import dataclasses
import math
import sqlite3
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pycolmap
from scipy.cluster.vq import kmeans2

from stages.common.errors import StageError

# Verified pairs need this many inlier matches to count as overlapping (COLMAP's min_num_inliers default).
MIN_PAIR_INLIERS = 15
# Retrieval (VLAD of an image set's own descriptors, nothing downloaded): descriptors sampled per image for
# the vocabulary (enough for k-means at ~50 samples per word on small sets, bounded on large ones) ...
VLAD_SAMPLES_PER_IMAGE = 300
# ... samples per visual word, and the vocabulary size bounds (few words on tiny sets; 64 x 128-d keeps the
# vectors small and discriminative, as in NetVLAD's 64 clusters).
VLAD_SAMPLES_PER_WORD = 50
VLAD_WORDS = (8, 64)
VLAD_KMEANS_ITERS = 10
# Sequential pairs also link frames 2^k ahead beyond the overlap, up to 2^QUADRATIC_MAX_EXP (COLMAP's
# quadratic overlap): cheap long-range constraints against drift.
QUADRATIC_MAX_EXP = 7


@dataclasses.dataclass(frozen=True)
class FeatureConf:
    """A feature preset: the extractor, its COLMAP options, and the matcher for its descriptors."""

    extractor: str
    """pycolmap.FeatureExtractorType name."""
    matcher: str
    """pycolmap.FeatureMatcherType name."""
    options: dict
    """FeatureExtractionOptions overrides that define the preset."""
    count_key: str
    """The options group whose `max_num_features` the ladder sets."""


FEATURES: dict[str, FeatureConf] = {
    # SIFT from the native resolution (first_octave 0): ~3x faster than COLMAP's upsampled default (-1), at no
    # accuracy cost measured on the default scene and kitti06; the ladder's `upsample` rung uses -1.
    "sift": FeatureConf("SIFT", "SIFT_BRUTEFORCE", {"sift": {"first_octave": 0}}, "sift"),
    # ALIKED + LightGlue: needs pycolmap's model files available offline.
    "aliked": FeatureConf("ALIKED_N16ROT", "ALIKED_LIGHTGLUE", {}, "aliked"),
}


def merge_options(opts: Any, overrides: dict, where: str) -> Any:
    """Merge a nested dict of COLMAP option names into a pycolmap options object; a bad key is a StageError."""
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise StageError(f"{where}: {key!r} is not a pycolmap option of {type(opts).__name__}")
        if isinstance(value, dict):
            merge_options(getattr(opts, key), value, f"{where}.{key}")
        else:
            try:
                setattr(opts, key, value)
            except (TypeError, ValueError) as exc:
                raise StageError(f"{where}.{key}: {value!r} is not accepted ({exc})") from None
    return opts


def colmap_device(pref: str) -> pycolmap.Device:
    """pycolmap's device for a resolved `device` value ("cuda" needs pycolmap's CUDA build)."""
    return pycolmap.Device.cuda if pref == "cuda" and pycolmap.has_cuda else pycolmap.Device.cpu


def quiet_colmap(verbose: bool) -> None:
    """COLMAP logs through glog: everything when asked for, else errors only (our own lines say what runs)."""
    pycolmap.logging.minloglevel = 0 if verbose else 3
    pycolmap.logging.verbose_level = 0


def camera_params(intr: dict) -> tuple[str, str]:
    """COLMAP camera model and params string for known intrinsics (fx, fy, cx, cy, optional k1 k2 p1 p2)."""
    k = [intr.get(n, 0.0) for n in ("k1", "k2", "p1", "p2")]
    if any(abs(v) > 0 for v in k):
        vals = [intr["fx"], intr["fy"], intr["cx"], intr["cy"], *k]
        return "OPENCV", ",".join(f"{v:.10g}" for v in vals)
    return "PINHOLE", ",".join(f"{intr[n]:.10g}" for n in ("fx", "fy", "cx", "cy"))


def extraction_options(features: str, max_num_features: int, upsample: bool, overrides: dict) -> Any:
    """FeatureExtractionOptions: the preset, then the ladder's values, then the user's overrides."""
    conf = FEATURES[features]
    opts = pycolmap.FeatureExtractionOptions()
    opts.type = getattr(pycolmap.FeatureExtractorType, conf.extractor)
    merge_options(opts, conf.options, f"preset {features}")
    getattr(opts, conf.count_key).max_num_features = max_num_features
    if upsample:
        opts.sift.first_octave = -1
    return merge_options(opts, overrides, "sfm.extraction")


def extract(db: Path, image_dir: Path, groups: dict[str, list[str]], intrinsics: dict[str, dict | None],
            order: list[str], *, features: str, max_num_features: int, upsample: bool, overrides: dict,
            camera_model: str, device: str) -> dict:
    """Extract features into a new database, one camera per camera group (known intrinsics where given).

    Image ids are renumbered in `order`. Returns the values used: {"max_num_features", "first_octave"}.
    """
    opts = extraction_options(features, max_num_features, upsample, overrides)
    for group, names in groups.items():
        reader = pycolmap.ImageReaderOptions()
        intr = intrinsics.get(group)
        if intr:
            reader.camera_model, reader.camera_params = camera_params(intr)
        else:
            reader.camera_model = camera_model
        try:
            pycolmap.extract_features(db, image_dir, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
                                      reader_options=reader, extraction_options=opts, device=colmap_device(device))
        except RuntimeError as exc:
            raise StageError(f"feature extraction ({features}) failed: {exc}; use features: sift") from None
    canonical_ids(db, order)
    return {"max_num_features": getattr(opts, FEATURES[features].count_key).max_num_features,
            "first_octave": opts.sift.first_octave}


def canonical_ids(db: Path, names: list[str]) -> None:
    """Renumber images (and their frames) in capture order.

    COLMAP's extractor threads write images in the order they finish, so image ids, pair ids and with them
    the mappers' results would change from run to run; capture-order ids make the run reproducible.
    """
    con = sqlite3.connect(db)
    try:
        ids = dict(con.execute("SELECT name, image_id FROM images"))
        order = [n for n in names if n in ids] + sorted(set(ids) - set(names))
        new = {ids[n]: i + 1 for i, n in enumerate(order)}
        if all(old == nid for old, nid in new.items()):
            return
        frame_new = {f: new[d] for f, d in con.execute("SELECT frame_id, data_id FROM frame_data") if d in new}
        off = 1 << 30  # move every id out of the way first, so no two rows share an id mid-update
        con.execute("CREATE TEMP TABLE idmap (old INTEGER PRIMARY KEY, new INTEGER)")
        con.execute("CREATE TEMP TABLE framemap (old INTEGER PRIMARY KEY, new INTEGER)")
        con.executemany("INSERT INTO idmap VALUES (?, ?)", new.items())
        con.executemany("INSERT INTO framemap VALUES (?, ?)", frame_new.items())
        for table, col, mapping in (("images", "image_id", "idmap"), ("keypoints", "image_id", "idmap"),
                                    ("descriptors", "image_id", "idmap"), ("frame_data", "data_id", "idmap"),
                                    ("frame_data", "frame_id", "framemap"), ("frames", "frame_id", "framemap")):
            con.execute(f"UPDATE {table} SET {col} = {col} + {off}")
            con.execute(f"UPDATE {table} SET {col} = (SELECT new FROM {mapping} WHERE old = {table}.{col} - {off})")
        con.commit()
    finally:
        con.close()


# ------------------------------------------------------------------------------------------------- pairs


def _descriptors(db: Path, names: list[str]) -> list[np.ndarray]:
    database = pycolmap.Database.open(str(db))
    try:
        by_name = {im.name: im.image_id for im in database.read_all_images()}
        return [np.asarray(database.read_descriptors(by_name[n]).data, np.float32) for n in names]
    finally:
        database.close()


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds of the rows of `x`: each next seed drawn with probability proportional to its squared
    distance from the nearest seed so far (scipy's minit="++" gives the same but costs ~5 s on 24k SIFT rows)."""
    chosen = [int(rng.integers(len(x)))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        chosen.append(i)
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return x[chosen]


def vlad_pairs(db: Path, names: list[str], k: int, min_gap: int, seed: int) -> set[tuple[str, str]]:
    """Retrieval pairs: each image with its `k` most similar images (VLAD of its own descriptors), skipping
    images within `min_gap` places of it in `names`.

    Images without features take part in no pair; with fewer than two such images there are no pairs.
    """
    descs = _descriptors(db, names)
    usable = [i for i, d in enumerate(descs) if len(d)]
    if len(usable) < 2:
        return set()
    rng = np.random.default_rng(seed)
    sample = np.concatenate([descs[i][rng.choice(len(descs[i]), min(len(descs[i]), VLAD_SAMPLES_PER_IMAGE),
                                                 replace=False)] for i in usable])
    sample /= np.linalg.norm(sample, axis=1, keepdims=True) + 1e-9
    n_words = int(min(VLAD_WORDS[1], max(VLAD_WORDS[0], len(sample) // VLAD_SAMPLES_PER_WORD), len(sample)))
    with warnings.catch_warnings():  # a centre left without samples keeps its seed, which is all VLAD needs
        warnings.simplefilter("ignore", UserWarning)
        centers, _ = kmeans2(sample, kmeans_pp(sample, n_words, rng), minit="matrix", iter=VLAD_KMEANS_ITERS)
    centers = centers.astype(np.float32)
    sq_centers = (centers**2).sum(1)
    vlad = np.zeros((len(names), n_words * sample.shape[1]), np.float32)
    for i in usable:
        d = descs[i] / (np.linalg.norm(descs[i], axis=1, keepdims=True) + 1e-9)
        word = np.argmin(sq_centers[None] - 2 * d @ centers.T, axis=1)  # nearest centre; |d|^2 is constant
        v = np.zeros((n_words, d.shape[1]), np.float32)
        np.add.at(v, word, d - centers[word])
        v = np.sign(v) * np.sqrt(np.abs(v))  # power normalisation against bursty features
        vlad[i] = (v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-9)).ravel()
    vlad /= np.linalg.norm(vlad, axis=1, keepdims=True) + 1e-9
    sim = vlad @ vlad.T
    pairs = set()
    usable_set = set(usable)
    for i in usable:
        order = [j for j in np.argsort(-sim[i], kind="stable") if abs(int(j) - i) > min_gap and int(j) in usable_set]
        for j in order[:k]:
            pairs.add(tuple(sorted((names[i], names[int(j)]))))
    return pairs


def sequential_pairs(names: list[str], overlap: int) -> set[tuple[str, str]]:
    """Each frame with the next `overlap` frames, plus frames 2^k ahead beyond them (COLMAP's quadratic overlap)."""
    steps = list(range(1, overlap + 1)) + [2**e for e in range(int(math.log2(overlap)) + 1, QUADRATIC_MAX_EXP + 1)]
    return {(a, names[i + s]) for i, a in enumerate(names) for s in steps if i + s < len(names)}


def exhaustive_pairs(names: list[str]) -> set[tuple[str, str]]:
    return {(a, b) for i, a in enumerate(names) for b in names[i + 1:]}


def _sequential(db: Path, names: list[str], *, overlap: int, neighbors: int, loop_neighbors: int,
                seed: int) -> set[tuple[str, str]]:
    pairs = sequential_pairs(names, overlap)
    if loop_neighbors and len(names) > 2 * overlap:  # loop closure: retrieval beyond the sequential overlap
        pairs |= vlad_pairs(db, names, loop_neighbors, overlap, seed)
    return pairs


# Pairing strategies, each called as PAIRS[name](db, names, overlap=, neighbors=, loop_neighbors=, seed=).
PAIRS: dict[str, Callable[..., set[tuple[str, str]]]] = {
    "sequential": _sequential,
    "exhaustive": lambda db, names, **_: exhaustive_pairs(names),
    "retrieval": lambda db, names, *, neighbors, seed, **_: vlad_pairs(db, names, neighbors, 0, seed),
}


# ------------------------------------------------------------------------------------------------ matching


def match(db: Path, pairs: set[tuple[str, str]], pairs_file: Path, *, features: str, max_num_features: int,
          matching: dict, verification: dict, seed: int, device: str) -> None:
    """Match and verify `pairs` (sorted; seeded RANSAC) into `db`; the user's overrides are merged last."""
    opts = pycolmap.FeatureMatchingOptions()
    opts.type = getattr(pycolmap.FeatureMatcherType, FEATURES[features].matcher)
    opts.max_num_matches = max(opts.max_num_matches, 2 * max_num_features)
    # Two matcher threads gave different matches on a few pairs from run to run when the machine was loaded
    # (29 of 3,496 pairs of a 320-frame street, all of one image, once in 4 builds); one thread gave the same
    # matches in every build, loaded or not, in the same time on 2 cores (31 s for those pairs either way).
    opts.num_threads = 1
    merge_options(opts, matching, "sfm.matching")
    geometry = pycolmap.TwoViewGeometryOptions()
    geometry.ransac.random_seed = seed
    merge_options(geometry, verification, "sfm.verification")
    pairs_file.write_text("".join(f"{a} {b}\n" for a, b in sorted(pairs)))
    if pairs:
        pairing = pycolmap.ImportedPairingOptions()
        pairing.match_list_path = str(pairs_file)
        pycolmap.match_image_pairs(db, matching_options=opts, pairing_options=pairing,
                                   verification_options=geometry, device=colmap_device(device))


def verified_pairs(db: Path) -> dict[tuple[str, str], Any]:
    """Verified two-view geometries by (name1, name2) in database order (H maps image 1 to image 2)."""
    database = pycolmap.Database.open(str(db))
    try:
        names = {im.image_id: im.name for im in database.read_all_images()}
        pair_ids, geoms = database.read_two_view_geometries()
    finally:
        database.close()
    cfg = pycolmap.TwoViewGeometryConfiguration
    out = {}
    for pid, g in zip(pair_ids, geoms):
        if g.config in (cfg.UNDEFINED, cfg.DEGENERATE, cfg.WATERMARK) or len(g.inlier_matches) < MIN_PAIR_INLIERS:
            continue
        a, b = pycolmap.pair_id_to_image_pair(pid)
        out[(names[a], names[b])] = g
    return out
