"""``shapes``: synthetic coloured shapes on textured backgrounds, with exact masks and captions.

Every image is a pure function of ``(seed, split, index)``: a local ``numpy.random.Generator`` seeded with those
three numbers draws the scene, so any item can be regenerated alone, in any order, in any process. The label is
the kind of the *main* object; optional distractors (``max_objects > 1``) are small objects of other kinds and
the main object is then medium or large, so it is always the largest. Objects never overlap (a distractor that
finds no free place in 20 tries is left out), so every object is fully visible. The same scenes serve
classification, segmentation (``return_mask=True``) and captioning (:meth:`Shapes.caption`,
:meth:`Shapes.objects`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ratelab.data.common import ImageDataset, resolve_split, sample_shift, shift
from ratelab.data.registry import register_dataset

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
# radius bands as a fraction of the image side; the main object's size word is drawn uniformly
SIZE_BANDS = {"small": (0.12, 0.16), "medium": (0.18, 0.23), "large": (0.25, 0.31)}
COLORS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.90, 0.20, 0.85),
    "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
}
_PALETTE = np.array(list(COLORS.values()))  # (n_colors, 3)
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_DEFAULT_SIZE = {"train": 2000, "val": 500, "test": 500}
# per-channel mean/std of the generator's images (measured on 2000 train images, seed 0, 32 px, one object)
_MEAN = (0.354, 0.346, 0.349)
_STD = (0.222, 0.204, 0.216)


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object. Coordinates are pixels, origin at the top-left corner, x to the right, y down."""

    shape: str
    class_id: int
    color: str
    rgb: tuple[float, float, float]
    size: str
    radius: float
    center: tuple[float, float]  # (x, y)
    position: str  # "top left", "top", "top right", "left", "center", ... (image thirds)

    def phrase(self) -> str:
        """E.g. ``"a large red circle in the top left"``."""
        if self.position == "center":
            where = "in the center"
        elif self.position in ("top", "bottom"):
            where = f"at the {self.position}"
        elif self.position in ("left", "right"):
            where = f"on the {self.position}"
        else:
            where = f"in the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where}"


def _position_word(cx: float, cy: float, side: int) -> str:
    row = ("top", "middle", "bottom")[min(int(3 * cy / side), 2)]
    col = ("left", "center", "right")[min(int(3 * cx / side), 2)]
    if row == "middle":
        return col
    return row if col == "center" else f"{row} {col}"


def shape_mask(shape: str, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    """Boolean ``(side, side)`` coverage of pixel centres by a shape of circumradius ``r`` centred at (cx, cy)."""
    c = np.arange(side) + 0.5
    dx = c[None, :] - cx
    dy = c[:, None] - cy
    d = np.hypot(dx, dy)
    if shape == "circle":
        return d <= r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if shape == "triangle":  # upright equilateral: apex (0, -r), base y = r/2
        return (dy <= 0.5 * r) & (np.sqrt(3.0) * np.abs(dx) <= dy + r)
    if shape == "cross":
        w = 0.33 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= 0.9 * r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= 0.9 * r))
    if shape == "star":  # five points; radius goes linearly in angle from r (tips) to 0.45 r (notches)
        theta = np.arctan2(dx, -dy)  # 0 points up
        t = np.mod(theta, 2 * np.pi / 5) / (2 * np.pi / 5)
        return d <= r * (0.45 + 0.55 * np.abs(2 * t - 1))
    if shape == "ring":
        return (d <= r) & (d >= 0.55 * r)
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _pick_color(rng: np.random.Generator, bg: np.ndarray, exclude: set[str]) -> str:
    # only colours far enough from the background mean, so every object stays visible
    dist = np.sqrt(((_PALETTE - bg) ** 2).sum(1)).tolist()
    cands = [(d, n) for d, n in zip(dist, COLORS) if n not in exclude]
    names = [n for d, n in cands if d > 0.45] or [max(cands)[1]]
    return names[int(rng.integers(len(names)))]


def render_scene(
    seed: int, split_code: int, index: int, side: int, max_objects: int
) -> tuple[np.ndarray, np.ndarray, list[ShapeObject]]:
    """Draw one scene.

    Returns:
        image: float32 ``(3, side, side)`` in [0, 1].
        instances: uint8 ``(side, side)``; 0 background, ``k + 1`` on object ``k``.
        objects: the drawn objects, main object first.
    """
    rng = np.random.default_rng([seed, split_code, index])
    main_cls = int(rng.integers(len(SHAPES)))  # first draw: Shapes.labels() relies on it
    n_obj = int(rng.integers(1, max_objects + 1))
    bg = rng.uniform(0.05, 0.6, size=3)

    objects: list[ShapeObject] = []
    used_colors: set[str] = set()
    for k in range(n_obj):
        if k == 0:  # with distractors around, the main object is medium or large so it is the largest
            sizes = ("small", "medium", "large") if n_obj == 1 else ("medium", "large")
            cls, size = main_cls, sizes[int(rng.integers(len(sizes)))]
        else:
            others = [c for c in range(len(SHAPES)) if c != main_cls]
            cls, size = others[int(rng.integers(len(others)))], "small"
        lo, hi = SIZE_BANDS[size]
        r = float(rng.uniform(lo, hi) * side)
        margin = r + 1.0  # keeps the border rows background, so replicate padding in augmentation stays clean
        for _ in range(20):  # objects never overlap (a gap of 1 px), so every mask is the whole shape
            cx, cy = (float(v) for v in rng.uniform(margin, side - margin, size=2))
            if all(np.hypot(cx - o.center[0], cy - o.center[1]) > r + o.radius + 1 for o in objects):
                break
        else:
            continue  # no room left for this distractor: leave it out
        color = _pick_color(rng, bg, used_colors)
        used_colors.add(color)
        rgb = tuple(float(v) for v in np.clip(np.array(COLORS[color]) + rng.uniform(-0.05, 0.05, 3), 0, 1))
        objects.append(ShapeObject(SHAPES[cls], cls, color, rgb, size, r, (cx, cy), _position_word(cx, cy, side)))

    c = (np.arange(side) + 0.5) / side - 0.5
    gx, gy = rng.uniform(-0.15, 0.15, size=2)
    image = bg[:, None, None] + gx * c[None, None, :] + gy * c[None, :, None] + rng.normal(0, 0.05, (3, side, side))
    instances = np.zeros((side, side), dtype=np.uint8)
    for k, o in enumerate(objects):
        m = shape_mask(o.shape, o.center[0], o.center[1], o.radius, side)
        image[:, m] = np.array(o.rgb)[:, None] + rng.normal(0, 0.03, (3, int(m.sum())))
        instances[m] = k + 1
    return np.clip(image, 0.0, 1.0).astype(np.float32), instances, objects


@register_dataset("shapes")
class Shapes(ImageDataset):
    """Synthetic shapes: 6 classes (circle, square, triangle, cross, star, ring), 3 channels, default 32 px.

    Splits ``"train"``, ``"val"``, ``"test"`` are independent streams (default sizes 2000 / 500 / 500).
    Items are ``(image, label)``, or ``(image, label, mask)`` with ``return_mask=True`` where ``mask`` is int64
    ``(H, W)``: 0 background, ``class_id + 1`` on object pixels (distractors included).

    Augmentation (train by default): random translation by up to ``max(1, img_size // 16)`` pixels (2 at 32 px),
    edge-replicated image and zero-padded mask, both shifted together. No flips, so captions' left/right stay
    true up to the shift. :meth:`caption`, :meth:`objects` and :meth:`instance_masks` describe the un-augmented
    image.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        root: ignored (synthetic).
        img_size: side length, default 32.
        seed: fixes the content of every split.
        augment: ``None`` = on for train only.
        size: number of images in the split (default by split, above).
        max_objects: objects per image drawn uniformly from ``1..max_objects`` (default 1: main object only).
        return_mask: add the semantic mask to each item.
        cache: keep rendered scenes in memory (per process) after first use.
    """

    name = "shapes"

    def __init__(
        self,
        split: str,
        *,
        root: str | None = None,
        img_size: int | None = None,
        seed: int = 0,
        augment: bool | None = None,
        size: int | None = None,
        max_objects: int = 1,
        return_mask: bool = False,
        cache: bool = True,
    ) -> None:
        self.split = resolve_split(self.name, split, tuple(_SPLIT_CODE))
        self.img_size = img_size or 32
        if self.img_size < 8:
            raise ValueError(f"shapes needs img_size >= 8, got {self.img_size}")
        self.size = _DEFAULT_SIZE[self.split] if size is None else size
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        self.seed, self.max_objects, self.return_mask = seed, max_objects, return_mask
        self.in_chans, self.num_classes, self.classes = 3, len(SHAPES), list(SHAPES)
        self.augment = (self.split == "train") if augment is None else augment
        self.max_shift = max(1, self.img_size // 16)
        self._set_norm(_MEAN, _STD)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, list[ShapeObject]]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.size

    def _scene(self, index: int) -> tuple[torch.Tensor, torch.Tensor, list[ShapeObject]]:
        index = self._check_index(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        img, inst, objs = render_scene(self.seed, _SPLIT_CODE[self.split], index, self.img_size, self.max_objects)
        out = (torch.from_numpy(img), torch.from_numpy(inst), objs)
        if self._cache is not None:
            self._cache[index] = out
        return out

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        img, _, objs = self._scene(index)
        return img, objs[0].class_id

    def _semantic(self, inst: torch.Tensor, objs: list[ShapeObject]) -> torch.Tensor:
        lut = torch.tensor([0] + [o.class_id + 1 for o in objs], dtype=torch.int64)
        return lut[inst.long()]

    def __getitem__(self, index: int):
        img, inst, objs = self._scene(index)
        label = objs[0].class_id
        mask = self._semantic(inst, objs) if self.return_mask else None
        if self.augment:
            dy, dx = sample_shift(self.max_shift)
            img = shift(img, dy, dx, mode="replicate")
            if mask is not None:
                mask = shift(mask, dy, dx, fill=0)
        img = self.normalize(img)
        return (img, label, mask) if self.return_mask else (img, label)

    def labels(self) -> torch.Tensor:
        """Labels without rendering: the main class is the scene generator's first draw."""
        code = _SPLIT_CODE[self.split]
        return torch.tensor(
            [int(np.random.default_rng([self.seed, code, i]).integers(len(SHAPES))) for i in range(len(self))],
            dtype=torch.int64,
        )

    def semantic_mask(self, index: int) -> torch.Tensor:
        """Un-augmented int64 ``(H, W)`` map: 0 background, ``class_id + 1`` on object pixels."""
        _, inst, objs = self._scene(index)
        return self._semantic(inst, objs)

    def instance_masks(self, index: int) -> torch.Tensor:
        """Un-augmented bool ``(K, H, W)``: pixels of each object, main object first."""
        _, inst, objs = self._scene(index)
        return inst.unsqueeze(0) == torch.arange(1, len(objs) + 1, dtype=inst.dtype).view(-1, 1, 1)

    def objects(self, index: int) -> list[ShapeObject]:
        """Attributes of every object in the scene, main object first."""
        return list(self._scene(index)[2])

    def caption(self, index: int) -> str:
        """E.g. ``"a large red circle in the top left and a small blue square at the bottom"``."""
        phrases = [o.phrase() for o in self._scene(index)[2]]
        return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# ---------------------------------------------------------------------------------------------- shapes_cluttered
TEXTURES = ("noise", "stripes", "checker", "gradient")
# Clutter kinds, none of them one of the six classes, so a distractor never makes the label ambiguous. (An earlier
# "dot" kind was a small disc: at 32 px it looked like a small member of the circle class.)
DISTRACTORS = ("bar", "corner", "ellipse")
# per-channel mean/std of shapes_cluttered (measured on 2000 train images, seed 0, 32 px, default options)
_CLUTTER_MEAN = (0.426, 0.416, 0.406)
_CLUTTER_STD = (0.254, 0.225, 0.242)


@dataclass(frozen=True)
class Distractor:
    """One clutter item, drawn behind the labelled objects: ``kind`` in :data:`DISTRACTORS`; pixels as ShapeObject."""

    kind: str
    rgb: tuple[float, float, float]
    center: tuple[float, float]  # (x, y)
    size: tuple[float, float]  # bar: (length, width); corner: (arm length, width); ellipse: (semi-major, semi-minor)
    angle: float  # radians, of the long axis from the x axis


def distractor_mask(d: Distractor, side: int) -> np.ndarray:
    """Boolean ``(side, side)`` coverage of pixel centres by a distractor."""
    c = np.arange(side) + 0.5
    dx = c[None, :] - d.center[0]
    dy = c[:, None] - d.center[1]
    u = np.cos(d.angle) * dx + np.sin(d.angle) * dy  # along the long axis
    v = -np.sin(d.angle) * dx + np.cos(d.angle) * dy
    a, b = d.size
    if d.kind == "bar":
        return (np.abs(u) <= a / 2) & (np.abs(v) <= b / 2)
    if d.kind == "corner":  # an L: two arms from the centre, along u and along v (a cross's arms would cross)
        return ((u >= 0) & (u <= a) & (np.abs(v) <= b / 2)) | ((v >= 0) & (v <= a) & (np.abs(u) <= b / 2))
    if d.kind == "ellipse":
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    raise ValueError(f"unknown distractor {d.kind!r}; valid: {', '.join(DISTRACTORS)}")


def _hat_matrix(side: int, g: int) -> np.ndarray:
    # (side, g) linear-interpolation weights from a g-point grid to pixel centres: noise = M @ low @ M.T
    pos = (np.arange(side) + 0.5) / side * (g - 1)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(g)[None, :]))


def texture(rng: np.random.Generator, kind: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background and its two colours: float ``(3, side, side)`` (before noise) and ``(2, 3)``."""
    base = rng.uniform(0.15, 0.6, size=3)
    alt = np.clip(base + rng.choice([-1.0, 1.0], size=3) * rng.uniform(0.12, 0.25, size=3), 0.0, 1.0)
    c = np.arange(side) + 0.5
    if kind == "stripes":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(0.12, 0.35) * side
        w = np.floor((np.cos(theta) * c[None, :] + np.sin(theta) * c[:, None]) / period) % 2
    elif kind == "checker":
        cell = int(rng.integers(max(2, side // 12), max(3, side // 5) + 1))
        off = rng.integers(cell, size=2)
        w = ((c[None, :] + off[0]) // cell + (c[:, None] + off[1]) // cell) % 2
    elif kind == "noise":
        g = int(rng.integers(3, 8))
        m = _hat_matrix(side, g)
        w = m @ rng.uniform(0, 1, (g, g)) @ m.T
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        t = np.cos(theta) * c[None, :] + np.sin(theta) * c[:, None]
        w = (t - t.min()) / (t.max() - t.min())
    else:
        raise ValueError(f"unknown texture {kind!r}; valid: {', '.join(TEXTURES)}")
    img = base[:, None, None] * (1 - w) + alt[:, None, None] * w
    return img, np.stack([base, alt])


def _far_colors(bg_colors: np.ndarray, exclude: set[str]) -> list[str]:
    # far from BOTH texture colours, so a labelled object never melts into its background
    dist = np.sqrt(((_PALETTE[:, None, :] - bg_colors[None]) ** 2).sum(-1)).min(1).tolist()
    cands = [(d, n) for d, n in zip(dist, COLORS) if n not in exclude]
    return [n for d, n in cands if d > 0.45] or [max(cands)[1]]


def render_cluttered_scene(
    seed: int, split_code: int, index: int, side: int, max_objects: int, max_distractors: int,
    textures: tuple[str, ...],
) -> tuple[np.ndarray, np.ndarray, list[ShapeObject], list[Distractor]]:
    """Draw one cluttered scene: texture, then distractors, then 1..``max_objects`` objects of one class on top.

    The class is ``(index + offset) % 6`` with ``offset`` fixed by (seed, split), so every run of 6 consecutive
    indices holds each class once (exact balance). Objects never overlap each other and are drawn last, so each
    object's mask is its whole shape and exactly the pixels its colour was written to; distractors may be hidden.

    Returns:
        image: float32 ``(3, side, side)`` in [0, 1].
        instances: uint8 ``(side, side)``; 0 background (texture and distractors), ``k + 1`` on object ``k``.
        objects: the labelled objects, largest first.
        distractors: the clutter, in drawing order.
    """
    offset = int(np.random.default_rng([seed, split_code]).integers(len(SHAPES)))
    cls = (index + offset) % len(SHAPES)
    rng = np.random.default_rng([seed, split_code, index, 1])  # the trailing 1 keeps it apart from `shapes`
    kind = textures[int(rng.integers(len(textures)))]
    image, bg_colors = texture(rng, kind, side)

    distractors: list[Distractor] = []
    for _ in range(int(rng.integers(0, max_distractors + 1))):
        dk = DISTRACTORS[int(rng.integers(len(DISTRACTORS)))]
        if dk == "bar":
            size = (float(rng.uniform(0.3, 0.6) * side), float(max(1.5, rng.uniform(0.04, 0.07) * side)))
        elif dk == "corner":
            size = (float(rng.uniform(0.15, 0.3) * side), float(max(1.5, rng.uniform(0.04, 0.07) * side)))
        else:
            a = float(rng.uniform(0.12, 0.2) * side)
            size = (a, float(max(1.0, a * rng.uniform(0.3, 0.45))))
        rgb = tuple(float(v) for v in np.clip(_PALETTE[int(rng.integers(len(_PALETTE)))] + rng.uniform(-0.1, 0.1, 3),
                                              0, 1))
        center = (float(rng.uniform(0, side)), float(rng.uniform(0, side)))
        distractors.append(Distractor(dk, rgb, center, size, float(rng.uniform(0, np.pi))))

    n_obj = int(rng.integers(1, max_objects + 1))
    radii = sorted((float(rng.uniform(*SIZE_BANDS[s]) * side)
                    for s in (("small", "medium", "large")[int(rng.integers(3))] if k == 0 else
                              ("small", "medium")[int(rng.integers(2))] for k in range(n_obj))), reverse=True)
    objects: list[ShapeObject] = []
    used_colors: set[str] = set()
    for r in radii:
        margin = r + 1.0  # border rows stay texture, so replicate padding in augmentation adds no object pixels
        for _ in range(20):
            cx, cy = (float(v) for v in rng.uniform(margin, side - margin, size=2))
            if all(np.hypot(cx - o.center[0], cy - o.center[1]) > r + o.radius + 1 for o in objects):
                break
        else:
            continue  # no room left: fewer objects
        names = _far_colors(bg_colors, used_colors)
        color = names[int(rng.integers(len(names)))]
        used_colors.add(color)
        rgb = tuple(float(v) for v in np.clip(np.array(COLORS[color]) + rng.uniform(-0.05, 0.05, 3), 0, 1))
        size_word = next(w for w, (lo, hi) in SIZE_BANDS.items() if r <= hi * side)
        objects.append(ShapeObject(SHAPES[cls], cls, color, rgb, size_word, r, (cx, cy),
                                   _position_word(cx, cy, side)))

    image = image + rng.normal(0, 0.04, image.shape)
    for d in distractors:
        m = distractor_mask(d, side)
        image[:, m] = np.array(d.rgb)[:, None]
    instances = np.zeros((side, side), dtype=np.uint8)
    for k, o in enumerate(objects):
        m = shape_mask(o.shape, o.center[0], o.center[1], o.radius, side)
        image[:, m] = np.array(o.rgb)[:, None] + rng.normal(0, 0.03, (3, int(m.sum())))
        instances[m] = k + 1
    return np.clip(image, 0.0, 1.0).astype(np.float32), instances, objects, distractors


@register_dataset("shapes_cluttered")
class ShapesCluttered(Shapes):
    """Cluttered shapes for emergent-segmentation studies: several objects of ONE class on a textured background,
    among distractors that belong to no class. 6 classes (as ``shapes``), 3 channels, default 32 px.

    Each image: a texture (seeded value noise, stripes, checkerboard or a two-colour gradient), 0..``max_distractors``
    clutter items (bars, L-shaped corners, flat ellipses: none of them a class) and 1..``max_objects``
    non-overlapping objects of the image's class drawn on top (see :func:`render_cluttered_scene`). Classes are
    exactly balanced (every 6 consecutive indices hold each class once). Deterministic per ``(seed, split, index)``;
    independent of ``shapes``.

    Items are ``(image, label)``, or ``(image, label, mask)`` with ``return_mask=True``: ``mask`` int64 ``(H, W)``,
    0 on background and distractors, ``label + 1`` on the labelled objects. :meth:`semantic_mask` and
    :meth:`instance_masks` (bool ``(K, H, W)``, largest object first) give the un-augmented masks,
    :meth:`distractors` the clutter. Augmentation as ``shapes`` (translation only).

    Args:
        split, root, img_size, seed, augment, size, return_mask, cache: as :class:`Shapes`.
        max_objects: labelled objects per image, uniform in ``1..max_objects`` (default 3; fewer when no room).
        max_distractors: clutter items per image, uniform in ``0..max_distractors`` (default 4).
        textures: background kinds to draw from (default all of :data:`TEXTURES`).
    """

    name = "shapes_cluttered"

    def __init__(
        self,
        split: str,
        *,
        root: str | None = None,
        img_size: int | None = None,
        seed: int = 0,
        augment: bool | None = None,
        size: int | None = None,
        max_objects: int = 3,
        max_distractors: int = 4,
        textures: tuple[str, ...] | list[str] = TEXTURES,
        return_mask: bool = False,
        cache: bool = True,
    ) -> None:
        super().__init__(split, root=root, img_size=img_size, seed=seed, augment=augment, size=size,
                         max_objects=max_objects, return_mask=return_mask, cache=cache)
        if max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {max_distractors}")
        textures = (textures,) if isinstance(textures, str) else tuple(textures)
        bad = [t for t in textures if t not in TEXTURES]
        if bad or not textures:
            raise ValueError(f"textures must be a non-empty subset of {', '.join(TEXTURES)}, got {textures!r}")
        self.max_distractors, self.textures = max_distractors, textures
        self._set_norm(_CLUTTER_MEAN, _CLUTTER_STD)
        self._clutter: dict[int, list[Distractor]] = {}

    def _scene(self, index: int) -> tuple[torch.Tensor, torch.Tensor, list[ShapeObject]]:
        index = self._check_index(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        img, inst, objs, dis = render_cluttered_scene(self.seed, _SPLIT_CODE[self.split], index, self.img_size,
                                                      self.max_objects, self.max_distractors, self.textures)
        out = (torch.from_numpy(img), torch.from_numpy(inst), objs)
        if self._cache is not None:
            self._cache[index] = out
            self._clutter[index] = dis
        return out

    def labels(self) -> torch.Tensor:
        """Labels without rendering (the class is a function of the index)."""
        offset = int(np.random.default_rng([self.seed, _SPLIT_CODE[self.split]]).integers(len(SHAPES)))
        return (torch.arange(len(self), dtype=torch.int64) + offset) % len(SHAPES)

    def distractors(self, index: int) -> list[Distractor]:
        """The clutter of the scene (not in any mask), in drawing order."""
        index = self._check_index(index)
        if index in self._clutter:
            return list(self._clutter[index])
        return render_cluttered_scene(self.seed, _SPLIT_CODE[self.split], index, self.img_size, self.max_objects,
                                      self.max_distractors, self.textures)[3]
