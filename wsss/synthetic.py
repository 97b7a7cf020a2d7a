"""A deterministic synthetic dataset in VOC layout: the embedded default, since VOC itself cannot be
downloaded everywhere.

Each image shows 1-3 shapes (the classes) on a textured, cluttered background. Texture is drawn per
object independently of the class; colour follows a per-class hue only with probability
`class_colour`. Measured at 64x64 with 800 training images, timm `test_resnet` from scratch: with
no colour cue (even solid shapes on clean backgrounds) val mAP stays near 0.4-0.6 (shape alone
needs far more data); with 0.9 it reaches ~0.87 in 15-25 epochs, and the random-colour objects
keep shape in play. Clutter (lines, soft blobs, small marks) is never one of the shapes; objects
overlap, touch and sometimes barely stand out from the background, so CAMs come out imperfect as
on real data. Masks carry a thin 255 band on object borders, like VOC's ignore outlines.
"""

from __future__ import annotations

import colorsys
import functools
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.errors import UserError
from wsss.files import atomic_write_bytes, save_palette_png

_ShapeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Below this fraction of its full area (or a few pixels of mask interior), an object is left out of
# the scene altogether, image and mask alike, so image-level labels never name an invisible object.
_MIN_VISIBLE_FRACTION = 0.25
_MIN_INTERIOR_PX = 6
_JPEG_QUALITY = 90
_LOW_CONTRAST_P = 0.06
_BG_DESATURATE = 0.5
_OTHER_RANDOM_P = 0.25
_GOLDEN = 0.618034  # hue step between classes: any first K classes get well-spread hues
_FADE = 0.5  # share of the class hue in the body of an object whose part shows it fully


def _star_polygon(u: np.ndarray, v: np.ndarray, n: int, outer: float, inner: float) -> np.ndarray:
    """Inside a star with n points at radius `outer` and notches at `inner`; with
    inner = outer*cos(pi/n) it is the regular n-gon. Folding the angle onto one edge keeps it
    vectorised."""
    rho = np.hypot(u, v)
    sector = 2 * np.pi / n
    alpha = np.mod(np.arctan2(v, u), sector)
    beta = np.minimum(alpha, sector - alpha)  # angle from the nearest point
    # The edge from (outer, 0) to the notch (px, py): normal (py, outer - px), offset py * outer.
    px, py = inner * np.cos(np.pi / n), inner * np.sin(np.pi / n)
    return rho * (py * np.cos(beta) + (outer - px) * np.sin(beta)) <= py * outer


def _regular(n: int, outer: float) -> _ShapeFn:
    return lambda u, v: _star_polygon(u, v, n, outer, outer * np.cos(np.pi / n))


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The classic implicit heart (x^2 + y^2 - 1)^3 <= x^2 y^3, y pointing up."""
    x, y = 1.15 * u, -1.15 * v
    return (x * x + y * y - 1) ** 3 <= x * x * y**3


def _shapes() -> dict[str, _ShapeFn]:
    """Shape indicators in object coordinates (u, v), roughly filling the unit disc."""
    return {
        "circle": lambda u, v: u * u + v * v <= 1.0,
        "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.82,
        "triangle": _regular(3, 1.15),
        "star": lambda u, v: _star_polygon(u, v, 5, 1.15, 0.5),
        "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0))
        | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0)),
        "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.55**2),
        "diamond": lambda u, v: np.abs(u) / 0.62 + np.abs(v) / 1.05 <= 1.0,
        "hexagon": _regular(6, 1.0),
        "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.75**2),
        "heart": _heart,
        "arrow": lambda u, v: ((np.abs(v) <= 0.22) & (u >= -1.0) & (u <= 0.15))
        | ((u >= 0.1) & (u <= 1.0) & (np.abs(v) <= 0.7 * (1.0 - u) / 0.9)),
        "ellipse": lambda u, v: (u / 1.1) ** 2 + (v / 0.5) ** 2 <= 1.0,
    }


_SHAPE_FNS = _shapes()
SHAPES: tuple[str, ...] = tuple(_SHAPE_FNS)


@functools.cache
def _unit_area(name: str) -> float:
    """Area of a shape at scale 1: an object's full area is known even where it leaves the image."""
    t = np.linspace(-1.5, 1.5, 301)
    u, v = np.meshgrid(t, t)
    return float(_SHAPE_FNS[name](u, v).mean() * 9.0)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a coarse g x g x C grid to size x size x C: smooth noise."""
    g = grid.shape[0]
    t = np.linspace(0.0, g - 1.0, size)
    i0 = np.minimum(t.astype(np.int64), g - 2)
    f = (t - i0)[:, None, None]
    rows = grid[i0] * (1 - f) + grid[i0 + 1] * f
    f = f.transpose(1, 0, 2)
    return rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f


def _segment_distance(xs: np.ndarray, ys: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    d = q - p
    t = np.clip(((xs - p[0]) * d[0] + (ys - p[1]) * d[1]) / max(float(d @ d), 1e-6), 0.0, 1.0)
    return np.hypot(xs - p[0] - t * d[0], ys - p[1] - t * d[1])


def _blend(canvas: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    canvas += alpha[..., None] * (colour - canvas)


def _background(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Gradient, smooth noise and clutter (lines, soft blobs, small marks): no class shapes."""
    size = xs.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    t = ((xs * np.cos(angle) + ys * np.sin(angle)) / size + 1.0) / 2.0
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    canvas = c0 + (c1 - c0) * t[..., None]
    g = int(rng.integers(3, 7))
    canvas += _upsample(rng.normal(0, rng.uniform(10, 35), (g, g, 3)), size)
    for _ in range(rng.integers(0, 4)):  # lines across the image
        p, q = rng.uniform(-0.1, 1.1, (2, 2)) * size
        width = rng.uniform(0.5, 1.6) * max(1.0, size / 64)
        alpha = np.clip(width + 0.5 - _segment_distance(xs, ys, p, q), 0, 1) * rng.uniform(0.4, 1)
        _blend(canvas, rng.uniform(0, 255, 3), alpha)
    for _ in range(rng.integers(0, 4)):  # soft blobs: no hard edge, so not a circle or ellipse
        centre = rng.uniform(0, size, 2)
        sigma = rng.uniform(0.04, 0.12) * size
        d2 = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2
        _blend(canvas, rng.uniform(0, 255, 3), rng.uniform(0.3, 0.8) * np.exp(-d2 / (2 * sigma**2)))
    for _ in range(rng.integers(0, 6)):  # small marks: short strokes, far below object size
        p = rng.uniform(0, size, 2)
        q = p + rng.normal(0, 0.04 * size, 2)
        width = rng.uniform(0.4, 1.2) * max(1.0, size / 64)
        alpha = np.clip(width + 0.5 - _segment_distance(xs, ys, p, q), 0, 1)
        _blend(canvas, rng.uniform(0, 255, 3), alpha)
    grey = canvas.mean(axis=-1, keepdims=True)
    return grey + (canvas - grey) * (1.0 - _BG_DESATURATE)


def _object_colour(
    rng: np.random.Generator, class_id: int, covered: np.ndarray, class_colour: float
) -> np.ndarray:
    """Near the class's own hue with probability `class_colour` (real classes have typical colours),
    else random; a few objects take the colour of the background they cover (low contrast)."""
    draw = rng.random()
    if draw < _LOW_CONTRAST_P:
        return covered + rng.normal(0, 25, 3)
    if draw < _LOW_CONTRAST_P + (1 - _LOW_CONTRAST_P) * class_colour:
        hue = (_class_hue(class_id) + rng.normal(0, 0.03)) % 1.0
        return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1), rng.uniform(0.45, 1))) * 255
    return rng.uniform(0, 255, 3)


def _texture(
    rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, base: np.ndarray, size: int
) -> np.ndarray:
    """Colours (N x 3) for an object's pixels at (xs, ys): solid, stripes, checker or noise, with a
    shading ramp; chosen independently of the class. The second colour of stripes and checkers is
    mostly a darker shade of the base, so a class hue survives the texture."""
    kind = rng.integers(0, 4)
    if rng.random() < _OTHER_RANDOM_P:
        other = rng.uniform(0, 255, 3)
    else:
        other = base * rng.uniform(0.3, 0.7)
    period = rng.uniform(3.0, 8.0) * max(1.0, size / 64)
    angle = rng.uniform(0, np.pi)
    along = xs * np.cos(angle) + ys * np.sin(angle)
    across = -xs * np.sin(angle) + ys * np.cos(angle)
    colour = np.broadcast_to(base, xs.shape + (3,))
    if kind == 1:  # stripes
        colour = np.where((np.sin(2 * np.pi * along / period) > 0)[..., None], other, colour)
    elif kind == 2:  # checker
        checker = (np.floor(along / period) + np.floor(across / period)) % 2 == 1
        colour = np.where(checker[..., None], other, colour)
    elif kind == 3:  # noise
        colour = colour + rng.normal(0, rng.uniform(12, 35), colour.shape)
    shade_angle = rng.uniform(0, 2 * np.pi)
    ramp = (xs * np.cos(shade_angle) + ys * np.sin(shade_angle)) / size
    return colour * (1.0 + rng.uniform(0.0, 0.35) * (ramp - ramp.mean()))[..., None]


def _object_count(rng: np.random.Generator, max_objects: int) -> int:
    """1-3 objects in the measured default mix; with more allowed, uniform over 1..max."""
    if max_objects == 3:
        return int(rng.choice(3, p=[0.4, 0.35, 0.25])) + 1
    return int(rng.integers(1, max_objects + 1))


def _draw_objects(
    rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, classes: int, max_objects: int,
    scale: float,
) -> list[tuple[int, np.ndarray, float]]:
    """Objects as (class id, mask, full area in pixels); later ones lie on top. Some are placed
    against an earlier one so that touching and occlusion are common."""
    size = xs.shape[0]
    objects: list[tuple[int, np.ndarray, float]] = []
    centres: list[tuple[np.ndarray, float]] = []
    for _ in range(_object_count(rng, max_objects)):
        class_id = int(rng.integers(1, classes + 1))
        radius = rng.uniform(0.14, 0.30) * size * scale
        if centres and rng.random() < 0.4:
            near, near_radius = centres[int(rng.integers(len(centres)))]
            direction = rng.uniform(0, 2 * np.pi)
            distance = (near_radius + radius) * rng.uniform(0.45, 1.0)
            centre = near + distance * np.array([np.cos(direction), np.sin(direction)])
        else:
            centre = rng.uniform(0.12, 0.88, 2) * size
        aspect = np.exp(rng.uniform(-0.1, 0.1))
        theta = rng.uniform(0, 2 * np.pi)
        dx, dy = xs - centre[0], ys - centre[1]
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / (radius * aspect)
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) * aspect / radius
        name = SHAPES[class_id - 1]
        objects.append((class_id, _SHAPE_FNS[name](u, v), _unit_area(name) * radius**2))
        centres.append((centre, radius))
    return objects


def _border_band(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels with a smaller label within `width` (Chebyshev): the outer rim of each object, one
    band thick, like VOC's ignore outlines. The image edge is not a border."""
    h, w = labels.shape
    padded = np.pad(labels, width, mode="edge")
    band = np.zeros(labels.shape, bool)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if dy or dx:
                band |= padded[width + dy : width + dy + h, width + dx : width + dx + w] < labels
    return band


def _compose(
    objects: list[tuple[int, np.ndarray, float]], width: int
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Drop objects that are too hidden (repeating, since dropping one reveals those below it) and
    return the kept indices, the instance map (-1 = background) and the label map with borders."""
    kept = list(range(len(objects)))
    while True:
        instance = np.full(objects[0][1].shape, -1, np.int64)
        labels = np.zeros(objects[0][1].shape, np.uint8)
        for k in kept:
            class_id, mask, _ = objects[k]
            instance[mask] = k
            labels[mask] = class_id
        band = _border_band(labels, width)
        visible = np.bincount(instance.ravel() + 1, minlength=len(objects) + 1)[1:]
        interior = np.bincount(instance[~band] + 1, minlength=len(objects) + 1)[1:]
        hidden = [
            k
            for k in kept
            if visible[k] < _MIN_VISIBLE_FRACTION * objects[k][2] or interior[k] < _MIN_INTERIOR_PX
        ]
        if not hidden:
            labels[band] = 255
            return kept, instance, labels
        kept = [k for k in kept if k not in hidden]
        if not kept:
            return kept, instance, labels


def _class_hue(class_id: int) -> float:
    return ((class_id - 1) * _GOLDEN) % 1.0


def _context(rng: np.random.Generator, canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray,
             class_id: int, mask: np.ndarray) -> None:
    """A soft halo in the class's context hue (opposite its own) around an object: background
    that co-occurs with the class, which a classifier learns to lean on (as boats and water)."""
    cy, cx = ys[mask].mean(), xs[mask].mean()
    sigma = np.sqrt(mask.sum() / np.pi) * rng.uniform(1.3, 2.0)
    hue = (_class_hue(class_id) + 0.5) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1), rng.uniform(0.5, 1))) * 255
    d2 = (xs - cx) ** 2 + (ys - cy) ** 2
    _blend(canvas, colour, rng.uniform(0.6, 0.9) * np.exp(-d2 / (2 * sigma**2)))


def _part(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A small disc inside an object (about a quarter of its area): the only place that shows
    the class hue, so CAMs peak on this most discriminative part, not the whole object."""
    inside = np.flatnonzero(mask)
    centre = inside[int(rng.integers(inside.size))]
    radius = np.sqrt(mask.sum() / np.pi) * rng.uniform(0.4, 0.55)
    d2 = (xs - xs.flat[centre]) ** 2 + (ys - ys.flat[centre]) ** 2
    return mask & (d2 <= radius**2)


def _render(
    rng: np.random.Generator, size: int, classes: int, class_colour: float, max_objects: int,
    scale: float, part_colour: float, context: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 HxWx3) and its label map (uint8 HxW, 255 borders). The hard options
    (`part_colour`, `context`) draw from the stream only when on, so the default data is
    unchanged by their existence."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    canvas = _background(rng, xs, ys)
    width = max(1, size // 64)
    while True:  # re-draw until at least one object stays visible
        objects = _draw_objects(rng, xs, ys, classes, max_objects, scale)
        kept, instance, labels = _compose(objects, width)
        if kept:
            break
    if context > 0:
        for k in kept:
            if rng.random() < context:
                _context(rng, canvas, xs, ys, objects[k][0], instance == k)
    for k in kept:
        mask = instance == k
        class_id = objects[k][0]
        if part_colour > 0 and rng.random() < part_colour:
            # the part in the class hue; the body only a faded mix of it: weaker evidence
            part = _part(rng, xs, ys, mask)
            body = mask & ~part
            hue = _object_colour(rng, class_id, canvas[part].mean(axis=0), 1.0)
            faded = _FADE * hue + (1 - _FADE) * rng.uniform(0, 255, 3)
            canvas[body] = _texture(rng, xs[body], ys[body], faded, size)
            canvas[part] = _texture(rng, xs[part], ys[part], hue, size)
            continue
        base = _object_colour(rng, class_id, canvas[mask].mean(axis=0), class_colour)
        canvas[mask] = _texture(rng, xs[mask], ys[mask], base, size)
    canvas += rng.normal(0, rng.uniform(2, 10), canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), labels


def generate(
    out: str | Path,
    *,
    n_train: int,
    n_val: int,
    size: int = 64,
    classes: int = 5,
    seed: int = 0,
    class_colour: float = 0.9,
    max_objects: int = 3,
    scale: float = 1.0,
    part_colour: float = 0.0,
    context: float = 0.0,
) -> Path:
    """Write a synthetic dataset in VOC layout under `out` and return that root.

    `class_colour` (0..1) is the probability that an object takes its class's hue: lower is
    harder. The pathologies that make the thresholds matter on VOC are options: up to
    `max_objects` objects per image, `scale` on their size, `part_colour` (the probability that
    only a small part of an object shows its class hue: CAMs cover the discriminative part) and
    `context` (the probability of a class-specific halo around an object: background the
    classifier leans on). The same arguments give byte-identical files (on the same
    numpy/Pillow): image i is drawn from the i-th child of `SeedSequence(seed)`, so adding images
    never changes earlier ones.
    """
    if not 1 <= classes <= len(SHAPES):
        raise UserError(f"classes must be between 1 and {len(SHAPES)}, got {classes}")
    if not 0.0 <= class_colour <= 1.0:
        raise UserError(f"class_colour must be between 0 and 1, got {class_colour}")
    if n_train < 1:
        raise UserError(f"n_train must be at least 1, got {n_train}")
    if n_val < 0:
        raise UserError(f"n_val must be at least 0, got {n_val}")
    if size < 16:
        raise UserError(f"size must be at least 16 pixels, got {size}")
    if max_objects < 1:
        raise UserError(f"max_objects must be at least 1, got {max_objects}")
    if not 0.2 <= scale <= 2.0:
        raise UserError(f"scale must be between 0.2 and 2, got {scale}")
    for name, p in (("part_colour", part_colour), ("context", context)):
        if not 0.0 <= p <= 1.0:
            raise UserError(f"{name} must be between 0 and 1, got {p}")
    root = Path(out)
    images, masks = root / "JPEGImages", root / "SegmentationClass"
    splits = root / "ImageSets" / "Segmentation"
    for folder in (images, masks, splits):
        folder.mkdir(parents=True, exist_ok=True)
    ids = [f"syn_{i:06d}" for i in range(n_train + n_val)]
    for image_id, child in zip(ids, np.random.SeedSequence(seed).spawn(len(ids))):
        rgb, labels = _render(np.random.default_rng(child), size, classes, class_colour,
                              max_objects, scale, part_colour, context)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=_JPEG_QUALITY)
        atomic_write_bytes(images / f"{image_id}.jpg", buffer.getvalue())
        save_palette_png(masks / f"{image_id}.png", labels)
    atomic_write_bytes(splits / "train.txt", "".join(f"{i}\n" for i in ids[:n_train]).encode())
    atomic_write_bytes(splits / "val.txt", "".join(f"{i}\n" for i in ids[n_train:]).encode())
    names = ("background", *SHAPES[:classes])
    atomic_write_bytes(root / "classes.txt", "".join(f"{n}\n" for n in names).encode())
    return root
