"""Seeded synthetic panorama dataset in QuIC-360 format: the embedded default that needs no download.

Each image is an equirectangular panorama (ERP, 2:1) of a simple world: a sky gradient above the horizon,
textured ground below, and 2–4 flat-coloured objects (disc, square, triangle) drawn *on the sphere* at a
known yaw/pitch. Every ERP pixel is turned into its viewing ray, the ray is projected gnomonically into the
tangent plane of each object's centre and the shape is tested there, so the objects are distorted in the
ERP exactly as a real object would be and may straddle tile seams and the ±180° ERP seam.

Angle conventions are those of ``py360convert.e2p``: yaw (``u``) is positive to the right with yaw 0 at
the centre column of the ERP; pitch (``v``) is positive up. Column ``x`` has yaw ``(x+0.5)/W·360 − 180``
and row ``y`` has pitch ``90 − (y+0.5)/H·180``.

Queries and answers are derived from the scene with a small templated vocabulary, so a tiny model can
learn the task, and answering needs the whole 360° (objects behind the viewer matter as much as those in
front). Layout written by :func:`generate_synthetic`::

    out_dir/images/{train,valid,test}/NNNNNN.png
    out_dir/{train,valid,test}.csv      # url,query,annotation; url relative to out_dir
    out_dir/scenes.jsonl                # ground truth per image (objects, queries)
    out_dir/summary.json, README.txt    # generation parameters and counts

Determinism: every image has its own random generator seeded from ``(seed, split, index)``, PNGs are
written by PIL with fixed parameters and no metadata, and text files use ``\\n`` line endings, so the same
seed and parameters give byte-identical files (on the same zlib), and changing ``n_train`` does not change
the valid/test images.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from panobench.errors import ConfigError, InputError
from panobench.utils.io import atomic_dir

logger = logging.getLogger(__name__)

GENERATOR = "panobench.data.synthetic"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}

# Clearly distinct flat colours (none close to the sky blues or the brown ground).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 215),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("disc", "square", "triangle")

# 8 yaw sectors of 45° centred on 0°, 45°, ...: (short name, phrase used in answers).
DIRECTIONS = (
    ("front", "in front of you"),
    ("front right", "in front of you on the right"),
    ("right", "to your right"),
    ("back right", "behind you on the right"),
    ("back", "behind you"),
    ("back left", "behind you on the left"),
    ("left", "to your left"),
    ("front left", "in front of you on the left"),
)
ELEVATION_THRESHOLD_DEG = 10.0
ELEVATIONS = {"above": "above the horizon", "at": "at the horizon", "below": "below the horizon"}

SCENE_QUERY = "all objects"
OBJECT_TEMPLATES = (
    "the {obj} is {dir}, {elev}.",
    "there is {a_obj} {dir}, {elev}.",
    "{dir}, {elev}, there is {a_obj}.",
    "{a_obj} can be seen {dir}, {elev}.",
    "you can find the {obj} {dir}, {elev}.",
    "the {obj} sits {elev}, {dir}.",
)
SCENE_TEMPLATES = (
    "there are {n} objects: {items}.",
    "{n} objects surround you: {items}.",
    "the scene contains {n} objects: {items}.",
    "you can see {n} objects: {items}.",
    "around you are {n} objects: {items}.",
    "this panorama shows {n} objects: {items}.",
)
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

# Yaw of the seams between the 4 tiles of the overlap-0 tiling (tile centres at 0, ±90, 180).
TILE_SEAMS_DEG = (-135.0, -45.0, 45.0, 135.0)
# Yaws at which forced-seam objects are centred: the ERP seam (weighted twice) and the tile seams.
_FORCED_SEAM_YAWS = (180.0, 180.0, -135.0, -45.0, 45.0, 135.0)

_SKY_HORIZON = np.array([190.0, 215.0, 240.0])
_SKY_ZENITH = np.array([100.0, 150.0, 220.0])
_GROUND = np.array([125.0, 105.0, 85.0])


@dataclass(frozen=True)
class SceneObject:
    """One object on the sphere.

    Attributes:
        colour: Palette name (key of :data:`PALETTE`).
        shape: One of :data:`SHAPES`.
        yaw: Yaw of the centre in degrees, in [-180, 180), positive to the right.
        pitch: Pitch of the centre in degrees, positive up.
        size: Angular radius in degrees of the cap that bounds the shape (disc radius, square and
            triangle circumradius).
    """

    colour: str
    shape: str
    yaw: float
    pitch: float
    size: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def direction(self) -> str:
        return DIRECTIONS[direction_sector(self.yaw)][0]

    @property
    def elevation(self) -> str:
        return elevation_class(self.pitch)


@dataclass(frozen=True)
class SceneQuery:
    """One (query, references) group of an image; the fact behind every reference is the same."""

    query: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class Scene:
    """Ground truth of one synthetic image."""

    split: str
    index: int
    url: str
    objects: tuple[SceneObject, ...]
    queries: tuple[SceneQuery, ...] = ()
    erp_seam: bool = False  # some object covers both the first and the last ERP column
    tile_seam: bool = False  # some object spans one of TILE_SEAMS_DEG

    def to_record(self) -> dict:
        """JSON-serialisable record (one line of ``scenes.jsonl``)."""
        return {
            "split": self.split,
            "index": self.index,
            "url": self.url,
            "erp_seam": self.erp_seam,
            "tile_seam": self.tile_seam,
            "objects": [
                {**asdict(o), "rgb": list(PALETTE[o.colour]), "direction": o.direction, "elevation": o.elevation}
                for o in self.objects
            ],
            "queries": [{"query": q.query, "references": list(q.references)} for q in self.queries],
        }


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`generate_synthetic` wrote (also stored as ``summary.json``, minus ``out_dir``)."""

    out_dir: Path
    seed: int
    width: int
    height: int
    images: dict[str, int] = field(default_factory=dict)  # split -> images
    rows: dict[str, int] = field(default_factory=dict)  # split -> CSV rows
    groups: dict[str, int] = field(default_factory=dict)  # split -> (image, query) groups
    erp_seam_images: int = 0  # images with an object across the ±180° ERP seam
    tile_seam_images: int = 0  # images with an object across a 4-tile seam (±45°, ±135°)

    @property
    def total_images(self) -> int:
        return sum(self.images.values())


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers


def erp_yaw_pitch_grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Yaw and pitch in degrees of every ERP pixel centre.

    Returns:
        ``(yaw, pitch)``, each float64 ``[H, W]``; yaw in (-180, 180), positive right; pitch in (-90, 90),
        positive up (py360convert's e2p convention).
    """
    yaw = (np.arange(width, dtype=np.float64) + 0.5) / width * 360.0 - 180.0
    pitch = 90.0 - (np.arange(height, dtype=np.float64) + 0.5) / height * 180.0
    return np.broadcast_to(yaw[None, :], (height, width)), np.broadcast_to(pitch[:, None], (height, width))


def direction_from_angles(yaw_deg: np.ndarray | float, pitch_deg: np.ndarray | float) -> np.ndarray:
    """Unit ray ``(..., 3)`` for yaw/pitch in degrees: x right, y up, z forward (yaw 0, pitch 0)."""
    yaw = np.deg2rad(yaw_deg)
    pitch = np.deg2rad(pitch_deg)
    cp = np.cos(pitch)
    return np.stack(np.broadcast_arrays(cp * np.sin(yaw), np.sin(pitch), cp * np.cos(yaw)), axis=-1)


def erp_direction_grid(width: int, height: int) -> np.ndarray:
    """Unit viewing ray of every ERP pixel centre.

    Returns:
        float64 ``[H, W, 3]`` with axes x right, y up, z forward (see :func:`direction_from_angles`).
    """
    yaw, pitch = erp_yaw_pitch_grid(width, height)
    return direction_from_angles(yaw, pitch)


def angular_distance_deg(yaw1: float, pitch1: float, yaw2: float, pitch2: float) -> float:
    """Great-circle distance in degrees between two directions."""
    d1 = direction_from_angles(yaw1, pitch1)
    d2 = direction_from_angles(yaw2, pitch2)
    return math.degrees(math.acos(float(np.clip(np.dot(d1, d2), -1.0, 1.0))))


def direction_sector(yaw_deg: float) -> int:
    """Index into :data:`DIRECTIONS` of the 45° sector containing ``yaw_deg``."""
    return int(((yaw_deg + 22.5) % 360.0) // 45.0)


def elevation_class(pitch_deg: float) -> str:
    """``above``/``at``/``below`` the horizon, with a ±10° band counted as *at*."""
    if pitch_deg > ELEVATION_THRESHOLD_DEG:
        return "above"
    if pitch_deg < -ELEVATION_THRESHOLD_DEG:
        return "below"
    return "at"


def object_mask(obj: SceneObject, directions: np.ndarray) -> np.ndarray:
    """Boolean ``[H, W]`` mask of the ERP pixels covered by ``obj``.

    The pixel rays are projected gnomonically onto the plane tangent to the sphere at the object's centre
    (local axes: east = increasing yaw, north = towards the zenith) and the shape is tested in that plane.

    Args:
        obj: The object.
        directions: Pixel rays, float ``[H, W, 3]`` from :func:`erp_direction_grid`.
    """
    height = directions.shape[0]
    # The shape lies inside the cap of radius `size`, i.e. within pitch ± size: only test those rows.
    row_pitch = 90.0 - (np.arange(height) + 0.5) / height * 180.0
    rows = np.nonzero(np.abs(row_pitch - obj.pitch) <= obj.size + 180.0 / height)[0]
    mask = np.zeros(directions.shape[:2], dtype=bool)
    if rows.size == 0:
        return mask
    band = directions[rows[0] : rows[-1] + 1]
    yaw, pitch = math.radians(obj.yaw), math.radians(obj.pitch)
    centre = direction_from_angles(obj.yaw, obj.pitch)
    east = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    north = np.array([-math.sin(pitch) * math.sin(yaw), math.cos(pitch), -math.sin(pitch) * math.cos(yaw)])
    dot = band @ centre
    # Only the front hemisphere has a gnomonic image; the cap test below bounds the shape anyway.
    front = dot > math.cos(math.radians(min(obj.size + 1.0, 89.0)))
    safe = np.where(front, dot, 1.0)
    x = (band @ east) / safe
    y = (band @ north) / safe
    t = math.tan(math.radians(obj.size))
    if obj.shape == "disc":
        inside = x * x + y * y <= t * t
    elif obj.shape == "square":
        # Inscribed in the bounding circle, so the whole square lies inside the cap of radius `size`.
        half = t / math.sqrt(2.0)
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif obj.shape == "triangle":
        # Equilateral, apex towards the zenith, circumradius t.
        inside = (y >= -t / 2.0) & (y <= t - math.sqrt(3.0) * np.abs(x))
    else:  # pragma: no cover - SceneObject values come from SHAPES
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    mask[rows[0] : rows[-1] + 1] = front & inside
    return mask


# ----------------------------------------------------------------------------------------------------------
# Scenes, rendering and captions


def sample_objects(
    rng: np.random.Generator,
    *,
    force_seam: bool,
    objects: tuple[int, int] = (2, 4),
    size_range: tuple[float, float] = (10.0, 20.0),
    max_abs_pitch: float = 30.0,
    min_gap_deg: float = 4.0,
) -> tuple[SceneObject, ...]:
    """Draw between ``objects[0]`` and ``objects[1]`` (inclusive) non-overlapping objects with distinct colours.

    Two objects are kept apart by at least ``min_gap_deg`` between their bounding caps, so their shapes
    never touch. With ``force_seam`` the first object is centred within ±3° of a seam yaw (ERP ±180° seam
    or a 4-tile seam), so it straddles that seam.
    """
    n = int(rng.integers(objects[0], objects[1] + 1))
    colours = [list(PALETTE)[i] for i in rng.choice(len(PALETTE), size=n, replace=False)]
    objects: list[SceneObject] = []
    for k, colour in enumerate(colours):
        for _attempt in range(500):
            if k == 0 and force_seam:
                yaw = _FORCED_SEAM_YAWS[int(rng.integers(len(_FORCED_SEAM_YAWS)))] + rng.uniform(-3.0, 3.0)
            else:
                yaw = rng.uniform(-180.0, 180.0)
            yaw = (yaw + 180.0) % 360.0 - 180.0
            # Rounded so that scenes.jsonl holds exactly the values that were rendered.
            cand = SceneObject(
                colour=colour,
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                yaw=round(yaw, 2),
                pitch=round(rng.uniform(-max_abs_pitch, max_abs_pitch), 2),
                size=round(rng.uniform(*size_range), 2),
            )
            if all(
                angular_distance_deg(cand.yaw, cand.pitch, o.yaw, o.pitch) > cand.size + o.size + min_gap_deg
                for o in objects
            ):
                objects.append(cand)
                break
        else:  # pragma: no cover - 4 caps of ≤20° always fit; keep what was placed rather than loop forever
            break
    return tuple(objects)


def render_background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Sky gradient above the horizon, textured ground below: uint8 ``[H, W, 3]``.

    The ground texture is a product of a yaw and a pitch sinusoid (separable, so cheap); its integer yaw
    frequency keeps it continuous across the ±180° seam.
    """
    yaw, pitch = erp_yaw_pitch_grid(width, height)
    yaw_r, pitch_d = np.radians(yaw[0]), pitch[:, 0]  # [W], [H]
    k_yaw = int(rng.integers(3, 9))
    k_pitch = float(rng.uniform(4.0, 10.0))
    phase = rng.uniform(0.0, 2.0 * math.pi, size=2)
    img = np.empty((height, width, 3), dtype=np.uint8)
    is_sky = pitch_d >= 0.0
    up = (pitch_d[is_sky] / 90.0)[:, None]
    img[is_sky] = np.rint(_SKY_HORIZON * (1.0 - up) + _SKY_ZENITH * up).astype(np.uint8)[:, None, :]
    g_pitch = pitch_d[~is_sky]
    texture = 12.0 * np.cos(k_pitch * np.radians(g_pitch) + phase[1])[:, None] * np.sin(k_yaw * yaw_r + phase[0])
    ground = (_GROUND * (1.0 + 0.3 * g_pitch[:, None] / 90.0))[:, None, :] + texture[..., None]  # [H/2, W, 3]
    # Stays within [60, 140]: no clipping needed.
    img[~is_sky] = np.rint(ground).astype(np.uint8)
    return img


def render_scene(
    objects: tuple[SceneObject, ...], directions: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render the ERP of a scene.

    Args:
        objects: Objects to draw (non-overlapping).
        directions: Pixel rays, float ``[H, W, 3]`` from :func:`erp_direction_grid`.
        rng: Generator for the ground texture (per image).

    Returns:
        ``(image, masks)``: uint8 ``[H, W, 3]`` RGB image and one boolean ``[H, W]`` mask per object.
    """
    height, width = directions.shape[:2]
    img = render_background(width, height, rng)
    masks = [object_mask(obj, directions) for obj in objects]
    for obj, mask in zip(objects, masks, strict=True):
        img[mask] = PALETTE[obj.colour]
    return img, masks


def with_article(noun_phrase: str) -> str:
    """``"an orange disc"``, ``"a red square"``."""
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def object_phrase(obj: SceneObject, template: str) -> str:
    """Answer to a colour/shape query with one paraphrase template."""
    return template.format(
        obj=obj.name,
        a_obj=with_article(obj.name),
        dir=DIRECTIONS[direction_sector(obj.yaw)][1],
        elev=ELEVATIONS[elevation_class(obj.pitch)],
    )


def scene_phrase(objects: tuple[SceneObject, ...], template: str) -> str:
    """Answer to the scene query: every object, in yaw order starting in front and turning right."""
    ordered = sorted(objects, key=lambda o: o.yaw % 360.0)
    items = [f"{with_article(o.name)} {DIRECTIONS[direction_sector(o.yaw)][1]}" for o in ordered]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return template.format(n=_NUMBER_WORDS[len(objects)], items=listed)


def make_queries(objects: tuple[SceneObject, ...], rng: np.random.Generator, n_refs: tuple[int, int]) -> tuple:
    """One colour/shape query (always) and the scene query (half of the images), each with references.

    ``n_refs = (lo, hi)``: each group gets between lo and hi (inclusive) references, all with different
    paraphrase templates of the same fact.
    """
    target = objects[int(rng.integers(len(objects)))]
    queries = [(target.name, lambda t: object_phrase(target, t), OBJECT_TEMPLATES)]
    if rng.random() < 0.5:
        queries.append((SCENE_QUERY, lambda t: scene_phrase(objects, t), SCENE_TEMPLATES))
    out = []
    for query, phrase, templates in queries:
        k = int(rng.integers(n_refs[0], n_refs[1] + 1))
        picks = rng.choice(len(templates), size=k, replace=False)
        out.append(SceneQuery(query=query, references=tuple(phrase(templates[int(i)]) for i in picks)))
    return tuple(out)


def _straddles(mask: np.ndarray, seam_yaw: float) -> bool:
    """Whether a mask ``[H, W]`` covers both pixel columns on either side of the seam at ``seam_yaw``."""
    width = mask.shape[1]
    right = int(round((seam_yaw + 180.0) / 360.0 * width)) % width
    return bool((mask[:, right - 1] & mask[:, right]).any())  # right = 0 wraps to the ERP seam


def build_scene(split: str, index: int, *, seed: int, directions: np.ndarray, seam_fraction: float,
                objects: tuple[int, int] = (2, 4)) -> tuple:
    """Sample, render and caption one image. Returns ``(scene, image uint8 [H, W, 3])``."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    # Exactly a `seam_fraction` share of the images get a forced seam object (spread evenly over indices).
    force = math.floor((index + 1) * seam_fraction) > math.floor(index * seam_fraction)
    placed = sample_objects(rng, force_seam=force, objects=objects)
    image, masks = render_scene(placed, directions, rng)
    n_refs = (4, 6) if split == "test" else (1, 1)
    queries = make_queries(placed, rng, n_refs)
    scene = Scene(
        split=split,
        index=index,
        url=f"images/{split}/{index:06d}.png",
        objects=placed,
        queries=queries,
        erp_seam=any(_straddles(m, 180.0) for m in masks),
        tile_seam=any(_straddles(m, s) for m in masks for s in TILE_SEAMS_DEG),
    )
    return scene, image


# ----------------------------------------------------------------------------------------------------------
# Writing


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Fixed parameters and no metadata chunks: identical pixels give identical bytes.
    Image.fromarray(image).save(buf, format="PNG", compress_level=3, optimize=False)
    return buf.getvalue()


def _csv_text(rows: list[tuple[str, str, str]]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(("url", "query", "annotation"))
    writer.writerows(rows)
    return buf.getvalue()


def _check_params(seed: int, counts: dict[str, int], width: int, height: int, seam_fraction: float,
                  objects: tuple[int, int] = (2, 4)) -> None:
    lo, hi = objects
    most = min(len(PALETTE), max(_NUMBER_WORDS))  # one colour each, and a number word for the scene answer
    if not 1 <= lo <= hi <= most:
        raise ConfigError(f"synthetic objects per scene must satisfy 1 <= min <= max <= {most} (one colour each, "
                          f"counted in words), got {list(objects)}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"synthetic seed must be a non-negative integer, got {seed!r}")
    for split, n in counts.items():
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"synthetic n_{split} must be a positive integer, got {n!r}")
    if height < 16 or width != 2 * height:
        raise ConfigError(f"synthetic image size must be 2:1 with height >= 16, got width={width} height={height}")
    if not 0.0 <= seam_fraction <= 1.0:
        raise ConfigError(f"synthetic seam_fraction must be in [0, 1], got {seam_fraction!r}")


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a directory that is not a previous synthetic dataset (it would be deleted)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError(f"synthetic output {out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    summary = out_dir / "summary.json"
    try:
        ours = json.loads(summary.read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise InputError(
            f"synthetic output {out_dir} exists and is not a panobench synthetic dataset (no {summary.name} "
            "from this generator); refusing to replace it — choose an empty or new directory"
        )


def generate_synthetic(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 320,
    n_valid: int = 40,
    n_test: int = 60,
    width: int = 512,
    height: int = 256,
    seam_fraction: float = 0.3,
    objects: tuple[int, int] = (2, 4),
) -> SyntheticSummary:
    """Generate the synthetic dataset into ``out_dir`` (atomically replacing a previous one).

    Args:
        out_dir: Destination directory; must be new, empty, or an earlier output of this generator.
        seed: Base seed; image ``i`` of split ``s`` uses the generator seeded by ``(seed, s, i)``.
        n_train: Number of train images (one CSV row per (image, query)).
        n_valid: Number of valid images (one CSV row per (image, query)).
        n_test: Number of test images (4–6 CSV rows per (image, query), different paraphrases).
        width: ERP width in pixels (must be ``2 * height``).
        height: ERP height in pixels.
        seam_fraction: Share of images whose first object is forced onto a seam (ERP or 4-tile seam).
        objects: (min, max) objects per scene, drawn uniformly; each has its own colour.

    Returns:
        Counts of what was written.
    """
    out_dir = Path(out_dir)
    counts = {"train": n_train, "valid": n_valid, "test": n_test}
    objects = (int(objects[0]), int(objects[1]))
    _check_params(seed, counts, width, height, seam_fraction, objects)
    _check_out_dir(out_dir)
    directions = erp_direction_grid(width, height)
    rows: dict[str, int] = {}
    groups: dict[str, int] = {}
    erp_seam = tile_seam = 0
    with atomic_dir(out_dir) as tmp:
        scene_lines = []
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            csv_rows: list[tuple[str, str, str]] = []
            for index in range(counts[split]):
                scene, image = build_scene(split, index, seed=seed, directions=directions,
                                           seam_fraction=seam_fraction, objects=objects)
                (tmp / scene.url).write_bytes(_png_bytes(image))
                csv_rows.extend((scene.url, q.query, ref) for q in scene.queries for ref in q.references)
                groups[split] = groups.get(split, 0) + len(scene.queries)
                erp_seam += scene.erp_seam
                tile_seam += scene.tile_seam
                scene_lines.append(json.dumps(scene.to_record(), sort_keys=True))
            (tmp / f"{split}.csv").write_bytes(_csv_text(csv_rows).encode("utf-8"))
            rows[split] = len(csv_rows)
        (tmp / "scenes.jsonl").write_bytes(("\n".join(scene_lines) + "\n").encode("utf-8"))
        summary = SyntheticSummary(out_dir=out_dir, seed=seed, width=width, height=height, images=counts,
                                   rows=rows, groups=groups, erp_seam_images=erp_seam, tile_seam_images=tile_seam)
        record = {
            "generator": GENERATOR,
            "format_version": FORMAT_VERSION,
            "parameters": {"seed": seed, "n_train": n_train, "n_valid": n_valid, "n_test": n_test,
                           "width": width, "height": height, "seam_fraction": seam_fraction,
                           "objects": list(objects)},
            "images": counts,
            "rows": rows,
            "groups": groups,
            "erp_seam_images": erp_seam,
            "tile_seam_images": tile_seam,
            "palette": {k: list(v) for k, v in PALETTE.items()},
            "shapes": list(SHAPES),
            "directions": [d[0] for d in DIRECTIONS],
            "scene_query": SCENE_QUERY,
        }
        (tmp / "summary.json").write_bytes((json.dumps(record, indent=2) + "\n").encode("utf-8"))
        (tmp / "README.txt").write_bytes(_readme(record).encode("utf-8"))
    logger.info(
        "synthetic dataset %s: %d images (train %d, valid %d, test %d), CSV rows %s, %d images with an object "
        "across the ERP seam, %d across a 4-tile seam",
        out_dir, summary.total_images, n_train, n_valid, n_test, rows, erp_seam, tile_seam,
    )
    return summary


def _readme(record: dict) -> str:
    p = record["parameters"]
    return (
        "panobench synthetic panorama dataset (QuIC-360 CSV format)\n"
        f"generator: {GENERATOR} format {FORMAT_VERSION}\n"
        f"parameters: seed={p['seed']} n_train={p['n_train']} n_valid={p['n_valid']} n_test={p['n_test']} "
        f"size={p['width']}x{p['height']} seam_fraction={p['seam_fraction']} objects={p['objects']}\n"
        "\n"
        "images/<split>/NNNNNN.png  equirectangular RGB, yaw 0 at the centre column, yaw positive to the right,\n"
        "                           pitch positive up (py360convert e2p convention)\n"
        "<split>.csv                url,query,annotation (UTF-8, LF); url relative to this directory;\n"
        "                           train/valid: one reference per (url, query); test: 4-6 paraphrases\n"
        "scenes.jsonl               ground truth per image: objects (colour, shape, yaw, pitch, size in degrees)\n"
        "                           and the queries with their references\n"
        "summary.json               parameters and counts\n"
        "\n"
        f"Queries: '<colour> <shape>' (answered with its direction and elevation) and '{SCENE_QUERY}' (every\n"
        "object in yaw order, starting in front and turning right). Directions: 8 sectors of 45 degrees;\n"
        f"elevation: above/at/below the horizon with a +-{ELEVATION_THRESHOLD_DEG:g} degree band for 'at'.\n"
    )
