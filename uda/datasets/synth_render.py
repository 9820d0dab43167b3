"""Procedural pedestrians and camera scenes for the synthetic Market / Duke domains.

Everything that makes the two domains differ lives in `DomainStyle` (the first thing below), so the
domain shift can be calibrated in one place. The rest draws cheaply: a person is painted as a small
label map with PIL (one label per body part), the label map becomes colours through a per-image
look-up table, and camera effects (background, illumination, colour cast, blur, noise, JPEG) are a
few numpy operations. Every random choice comes from a numpy Generator the caller seeds, so an
image depends only on (seed, domain, identity, camera, image index).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class DomainStyle:
    """The knobs of one camera network. Palettes name colours of `COLOURS`; weights need not sum to 1."""

    name: str
    code: int                                   # mixed into every seed so the domains never share draws
    num_cameras: int
    height_range: tuple[int, int]               # image height in pixels (Market: fixed 128)
    aspect_range: tuple[float, float]           # width / height (Market: fixed 0.5)
    jpeg_quality: tuple[int, int]
    upper_palette: dict[str, float]
    lower_palette: dict[str, float]
    shoe_palette: dict[str, float]
    lower_kind_weights: tuple[float, float, float]      # trousers, shorts, skirt
    long_sleeve_p: float
    coat_p: float                               # upper garment reaching mid-thigh
    bag_weights: tuple[float, float, float, float]      # none, backpack, shoulder bag, handbag
    hat_p: float
    scarf_p: float
    glasses_p: float
    wall_palette: tuple[str, ...]
    floor_palette: tuple[str, ...]
    brightness: tuple[float, float]             # additive, in [0, 1] image units
    contrast: tuple[float, float]
    colour_cast: float                          # max relative per-channel gain deviation of a camera
    cast_bias: tuple[float, float, float]       # shared per-channel gain of the whole network
    blur_radius: tuple[float, float]            # gaussian defocus, pixels (per camera, per image jitter)
    motion_blur_p: float
    noise_sigma: tuple[float, float]            # sensor noise, 0..255 units
    occlusion_p: float


# Calibrated (generator v2) so that adaptation has something to recover: the two networks share
# clothing colours (at different frequencies) and scene materials, so that the source model's camera
# invariance carries over; with Duke-only walls and floors (v1) the target features grouped by camera
# (90% of nearest neighbours in the same camera) and clusters never joined cameras. The shift that
# remains is mostly global (winter palette, dimmer light, cold cast), which adaptation can undo.
MARKET = DomainStyle(
    name="market", code=1, num_cameras=6, height_range=(128, 128), aspect_range=(0.5, 0.5),
    jpeg_quality=(70, 90),
    upper_palette={"white": 3, "red": 2, "yellow": 1.5, "orange": 1, "pink": 1.5, "sky": 2, "blue": 1.5,
                   "green": 1.5, "lime": 1, "purple": 1, "grey": 1.5, "black": 1.5, "beige": 1,
                   "navy": 0.7, "maroon": 0.5, "teal": 0.5, "brown": 0.4, "olive": 0.4},
    lower_palette={"jeans": 3, "black": 2, "grey": 1.5, "khaki": 1.5, "white": 1, "navy": 1, "beige": 1,
                   "red": 0.3, "sky": 0.4, "charcoal": 0.5, "brown": 0.5},
    shoe_palette={"white": 3, "black": 2, "grey": 1, "red": 0.5, "sky": 0.5, "brown": 0.5},
    lower_kind_weights=(0.5, 0.38, 0.12), long_sleeve_p=0.2, coat_p=0.0,
    bag_weights=(0.55, 0.2, 0.15, 0.1), hat_p=0.12, scarf_p=0.0, glasses_p=0.15,
    wall_palette=("foliage", "sand", "pale", "concrete", "brick"),
    floor_palette=("pavement", "sand", "grass", "concrete"),
    brightness=(-0.03, 0.05), contrast=(1.0, 1.15), colour_cast=0.1, cast_bias=(1.03, 1.0, 0.94),
    blur_radius=(0.3, 0.9), motion_blur_p=0.15, noise_sigma=(3.0, 7.0), occlusion_p=0.15,
)

DUKE = DomainStyle(
    name="duke", code=2, num_cameras=8, height_range=(120, 220), aspect_range=(0.32, 0.41),
    jpeg_quality=(85, 95),
    upper_palette={"black": 1.5, "charcoal": 1, "navy": 1.2, "brown": 1, "olive": 1, "maroon": 1,
                   "forest": 1, "tan": 1, "grey": 1.5, "red": 1, "white": 1, "teal": 1, "blue": 1,
                   "sky": 0.6, "beige": 0.6, "green": 0.5, "yellow": 0.4, "purple": 0.5, "pink": 0.4, "orange": 0.3},
    lower_palette={"black": 2.5, "charcoal": 1.5, "jeans": 2, "navy": 1, "brown": 1, "grey": 1, "khaki": 1,
                   "beige": 0.4},
    shoe_palette={"black": 3, "brown": 2, "grey": 1, "white": 1, "tan": 0.5},
    lower_kind_weights=(0.9, 0.03, 0.07), long_sleeve_p=0.8, coat_p=0.3,
    bag_weights=(0.3, 0.4, 0.2, 0.1), hat_p=0.25, scarf_p=0.3, glasses_p=0.15,
    wall_palette=("brick", "concrete", "pale", "slate", "snow"),
    floor_palette=("concrete", "pavement", "asphalt", "snow"),
    brightness=(-0.05, 0.0), contrast=(0.9, 1.1), colour_cast=0.05, cast_bias=(0.94, 0.98, 1.07),
    blur_radius=(0.0, 0.6), motion_blur_p=0.05, noise_sigma=(1.5, 4.0), occlusion_p=0.2,
)

STYLES = {style.name: style for style in (MARKET, DUKE)}

COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 230), "red": (200, 35, 40), "yellow": (240, 210, 40), "orange": (240, 130, 30),
    "pink": (240, 140, 180), "sky": (110, 170, 230), "blue": (40, 80, 190), "green": (40, 150, 60),
    "lime": (150, 210, 60), "purple": (120, 60, 160), "grey": (140, 140, 140), "black": (30, 30, 32),
    "beige": (215, 195, 160), "jeans": (70, 95, 140), "khaki": (170, 150, 100), "navy": (30, 40, 80),
    "charcoal": (60, 62, 66), "brown": (95, 65, 40), "olive": (85, 90, 45), "maroon": (100, 25, 35),
    "forest": (30, 70, 45), "tan": (175, 140, 100), "teal": (30, 110, 115),
    # scene materials
    "foliage": (70, 120, 55), "sand": (200, 185, 150), "pale": (215, 210, 200), "concrete": (160, 158, 150),
    "brick": (140, 70, 55), "pavement": (175, 170, 160), "grass": (95, 150, 70), "slate": (85, 90, 100),
    "snow": (220, 225, 232), "glass": (70, 95, 115), "asphalt": (75, 75, 80), "slush": (135, 135, 140),
}
SKIN_TONES = ((240, 205, 180), (225, 180, 145), (195, 145, 105), (150, 100, 70), (100, 65, 45))
HAIR_COLOURS = ((20, 18, 18), (55, 35, 25), (110, 75, 45), (200, 170, 110), (150, 150, 150), (130, 60, 30))
VIEWS = ("front", "back", "left", "right")

# Labels of the painted label map; the LUT row of each label is its colour in this image.
BG, SKIN, HAIR, UPPER, UPPER2, LOWER, SHOES, BAG, HAT, SCARF, GLASSES = range(11)
NUM_LABELS = 11


@dataclass(frozen=True)
class Person:
    """The fixed appearance of one identity: what a re-id model should learn to recognise."""

    build: float                    # width scale of the body
    hip: float                      # hip height as a fraction of the person height (leg length)
    colours: np.ndarray             # (NUM_LABELS, 3) float32 base colour per label
    hair_length: int                # 0 bald/buzz, 1 short, 2 long
    pattern: str                    # plain / stripes / checks / logo
    pattern_period: float           # stripe / check size as a fraction of the person height
    long_sleeves: bool
    coat: bool
    lower_kind: str                 # trousers / shorts / skirt
    bag: str                        # none / backpack / shoulder / handbag
    bag_side: int                   # -1 left, +1 right
    hat: bool
    scarf: bool
    glasses: bool


@dataclass(frozen=True)
class Camera:
    """One camera of a network: its scene canvas and its imaging parameters."""

    canvas: np.ndarray              # (Hc, Wc, 3) float32 background to crop from
    brightness: float
    contrast: float
    gain: np.ndarray                # (3,) float32 colour cast
    blur: float
    noise: float
    view_weights: np.ndarray        # (4,) probabilities of front/back/left/right in this camera


def _pick(rng: np.random.Generator, palette: dict[str, float]) -> str:
    names = list(palette)
    weights = np.array([palette[n] for n in names], dtype=np.float64)
    return names[rng.choice(len(names), p=weights / weights.sum())]


def _jitter(rng: np.random.Generator, rgb, amount: float = 14.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def make_person(style: DomainStyle, rng: np.random.Generator) -> Person:
    """Draw one identity's attributes from the domain's clothing distribution."""
    colours = np.zeros((NUM_LABELS, 3), np.float32)
    colours[SKIN] = _jitter(rng, SKIN_TONES[rng.choice(len(SKIN_TONES), p=[0.3, 0.3, 0.2, 0.12, 0.08])], 8)
    colours[HAIR] = _jitter(rng, HAIR_COLOURS[rng.choice(len(HAIR_COLOURS), p=[0.45, 0.25, 0.12, 0.08, 0.06, 0.04])], 8)
    upper = _pick(rng, style.upper_palette)
    upper2 = upper
    while upper2 == upper:
        upper2 = _pick(rng, {**style.upper_palette, "white": 2.0, "black": 2.0})
    colours[UPPER] = _jitter(rng, COLOURS[upper])
    colours[UPPER2] = _jitter(rng, COLOURS[upper2])
    colours[LOWER] = _jitter(rng, COLOURS[_pick(rng, style.lower_palette)])
    colours[SHOES] = _jitter(rng, COLOURS[_pick(rng, style.shoe_palette)])
    colours[BAG] = _jitter(rng, COLOURS[_pick(rng, {"black": 3, "brown": 1.5, "navy": 1, "red": 0.7,
                                                    "grey": 1, "tan": 1, "sky": 0.5, "pink": 0.4})])
    colours[HAT] = _jitter(rng, COLOURS[_pick(rng, {"black": 2, "white": 1, "red": 1, "navy": 1,
                                                    "grey": 1, "beige": 1, "yellow": 0.5})])
    colours[SCARF] = _jitter(rng, COLOURS[_pick(rng, {"red": 2, "grey": 1, "maroon": 1, "beige": 1,
                                                      "teal": 1, "yellow": 0.5, "white": 0.7})])
    colours[GLASSES] = (25, 25, 28)
    hair_length = int(rng.choice(3, p=[0.1, 0.6, 0.3]))
    return Person(
        build=float(rng.uniform(0.85, 1.2)), hip=float(rng.uniform(0.48, 0.54)), colours=colours,
        hair_length=hair_length,
        pattern=str(rng.choice(["plain", "stripes", "checks", "logo"], p=[0.5, 0.2, 0.1, 0.2])),
        pattern_period=float(rng.uniform(0.025, 0.05)),
        long_sleeves=bool(rng.random() < style.long_sleeve_p), coat=bool(rng.random() < style.coat_p),
        lower_kind=str(rng.choice(["trousers", "shorts", "skirt"], p=np.array(style.lower_kind_weights)
                                  / sum(style.lower_kind_weights))),
        bag=str(rng.choice(["none", "backpack", "shoulder", "handbag"],
                           p=np.array(style.bag_weights) / sum(style.bag_weights))),
        bag_side=int(rng.choice([-1, 1])), hat=bool(rng.random() < style.hat_p),
        scarf=bool(rng.random() < style.scarf_p), glasses=bool(rng.random() < style.glasses_p),
    )


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(0, 255, cells).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.float32) / 127.5 - 1.0


def _wall(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 texture of the scene above the horizon."""
    base = _jitter(rng, COLOURS[kind], 12)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "brick":
        bh = int(rng.integers(5, 9))
        bw = bh * 3
        row = yy // bh
        mortar = (yy % bh == 0) | (((xx + (row % 2) * bw // 2) % bw) == 0)
        img[mortar] = img[mortar] * 0.6 + 80
    elif kind in ("glass", "pale", "concrete", "slate"):  # a facade with windows / panels
        pw, ph = int(rng.integers(18, 34)), int(rng.integers(16, 30))
        window = ((xx % pw) > pw * 0.25) & ((yy % ph) > ph * 0.3)
        img[window] = img[window] * float(rng.uniform(0.45, 0.75))
    elif kind == "foliage":
        leaves = _smooth_noise(rng, h, w, (h // 6, w // 6))
        img *= (1.0 + 0.35 * leaves)[..., None]
    elif kind in ("sand", "snow"):
        img *= (1.0 + 0.08 * _smooth_noise(rng, h, w, (4, 8)))[..., None]
    img *= (1.0 + 0.12 * _smooth_noise(rng, h, w, (3, 5)))[..., None]
    return img


def _floor(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 texture of the ground below the horizon."""
    base = _jitter(rng, COLOURS[kind], 12)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    yy, xx = np.mgrid[0:h, 0:w]
    if kind in ("pavement", "concrete"):
        tile = int(rng.integers(10, 20))
        joints = (yy % tile == 0) | ((xx + yy // 2) % (tile * 2) == 0)
        img[joints] *= 0.75
    elif kind == "grass":
        img *= (1.0 + 0.25 * _smooth_noise(rng, h, w, (max(2, h // 3), w // 3)))[..., None]
    elif kind in ("snow", "slush", "asphalt"):
        patches = _smooth_noise(rng, h, w, (max(2, h // 12), w // 12))
        img *= (1.0 + 0.15 * patches)[..., None]
        if kind == "slush":
            img[patches > 0.4] = COLOURS["snow"]
    img *= np.linspace(0.9, 1.05, h, dtype=np.float32)[:, None, None]
    return img


def make_camera(style: DomainStyle, rng: np.random.Generator) -> Camera:
    """Draw a camera: a scene canvas large enough to crop any image of the domain, and its optics."""
    hc = int(style.height_range[1] * 1.3)
    wc = int(style.height_range[1] * style.aspect_range[1] * 3)
    split = int(hc * rng.uniform(0.35, 0.6))                       # the horizon: wall above, floor below
    wall_kind = style.wall_palette[rng.integers(len(style.wall_palette))]
    floor_kind = style.floor_palette[rng.integers(len(style.floor_palette))]
    canvas = np.concatenate([_wall(rng, wall_kind, split, wc), _floor(rng, floor_kind, hc - split, wc)], 0)
    canvas *= np.linspace(float(rng.uniform(0.85, 1.1)), float(rng.uniform(0.85, 1.1)), wc,
                          dtype=np.float32)[None, :, None]          # light falls off across the scene
    gain = np.array(style.cast_bias, np.float32) * (1 + rng.uniform(-style.colour_cast, style.colour_cast, 3))
    view_weights = rng.dirichlet(np.full(4, 2.0))
    return Camera(canvas=np.clip(canvas, 0, 255).astype(np.float32),
                  brightness=float(rng.uniform(*style.brightness)), contrast=float(rng.uniform(*style.contrast)),
                  gain=gain.astype(np.float32), blur=float(rng.uniform(*style.blur_radius)),
                  noise=float(rng.uniform(*style.noise_sigma)), view_weights=view_weights)


@dataclass(frozen=True)
class Shot:
    """How one image frames a person: the per-image (or per-tracklet) nuisance factors."""

    view: str                       # front / back / left / right
    stride: float                   # walking phase in [-1, 1]: leg and arm swing
    scale: float                    # person height / image height
    dx: float                       # horizontal box offset, fraction of the image width
    dy: float                       # vertical box offset, fraction of the image height
    light: float                    # multiplicative local illumination of the person


def random_shot(rng: np.random.Generator, camera: Camera, view: str | None = None, junk: bool = False) -> Shot:
    """Per-image framing; `view` pins the tracklet's viewpoint, `junk` gives a badly cropped box."""
    if view is None:
        view = VIEWS[rng.choice(4, p=camera.view_weights)]
    if junk:
        return Shot(view=view, stride=float(rng.uniform(-1, 1)), scale=float(rng.uniform(1.3, 2.4)),
                    dx=float(rng.uniform(-0.6, 0.6)), dy=float(rng.uniform(-0.2, 0.7)), light=1.0)
    return Shot(view=view, stride=float(rng.uniform(-1, 1)), scale=float(rng.uniform(0.82, 0.97)),
                dx=float(rng.normal(0, 0.06)), dy=float(rng.normal(0, 0.03)), light=float(rng.uniform(0.85, 1.1)))


def _limb(draw: ImageDraw.ImageDraw, p0, p1, w0: float, w1: float, label: int) -> None:
    """A tapered segment from p0 (width w0) to p1 (width w1) with round ends."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    norm = max((dx * dx + dy * dy) ** 0.5, 1e-6)
    nx, ny = -dy / norm, dx / norm
    draw.polygon([(x0 + nx * w0 / 2, y0 + ny * w0 / 2), (x1 + nx * w1 / 2, y1 + ny * w1 / 2),
                  (x1 - nx * w1 / 2, y1 - ny * w1 / 2), (x0 - nx * w0 / 2, y0 - ny * w0 / 2)], fill=label)
    for (x, y), w in ((p0, w0), (p1, w1)):
        draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=label)


def paint_person(person: Person, shot: Shot, width: int, height: int) -> np.ndarray:
    """(height, width) uint8 label map of one person seen in `shot` (0 = background).

    Painter's order, back to front; a side view is drawn facing right and mirrored for "left".
    """
    canvas = Image.new("L", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    u = shot.scale * height                                   # person height in pixels
    feet = height * (0.985 + shot.dy) - (1 - shot.scale) * height * 0.25
    top = feet - u
    cx = width * (0.5 - shot.dx if shot.view == "left" else 0.5 + shot.dx)   # lands at 0.5 + dx once mirrored
    side = shot.view in ("left", "right")
    b = person.build

    def y(fraction: float) -> float:
        """A height fraction from the top of the head to pixels."""
        return top + fraction * u

    sh_y, hip_y, knee_y, ankle_y = y(0.19), y(person.hip), y(0.75), y(0.955)
    sw = (0.075 if side else 0.125) * u * b                   # half shoulder width
    hw = (0.07 if side else 0.1) * u * b                      # half hip width
    leg_w, arm_w = 0.085 * u * b, 0.055 * u * b
    s = shot.stride
    lower_leg_label = SKIN if person.lower_kind in ("shorts", "skirt") else LOWER
    thigh_label = SKIN if person.lower_kind == "skirt" else LOWER

    def arm(x_sh: float, hand: tuple[float, float]) -> None:
        elbow = ((x_sh + hand[0]) / 2, (sh_y + hand[1]) / 2 - 0.01 * u)
        _limb(draw, (x_sh, sh_y + 0.02 * u), elbow, arm_w, arm_w * 0.9, UPPER)
        _limb(draw, elbow, hand, arm_w * 0.9, arm_w * 0.75, UPPER if person.long_sleeves else SKIN)
        draw.ellipse([hand[0] - arm_w * 0.45, hand[1] - arm_w * 0.45, hand[0] + arm_w * 0.45,
                      hand[1] + arm_w * 0.45], fill=SKIN)

    def leg(hip_x: float, foot_x: float, foot_lift: float) -> None:
        knee = ((hip_x + foot_x) / 2 + (0.02 * u if side else 0), knee_y - foot_lift / 2)
        ankle = (foot_x, ankle_y - foot_lift)
        _limb(draw, (hip_x, hip_y), knee, leg_w, leg_w * 0.85, thigh_label)
        _limb(draw, knee, ankle, leg_w * 0.85, leg_w * 0.65, lower_leg_label)
        toe = 0.06 * u if side else 0.0
        draw.ellipse([ankle[0] - leg_w * 0.45, ankle[1] - 0.005 * u, ankle[0] + leg_w * 0.45 + toe,
                      ankle[1] + 0.04 * u], fill=SHOES)

    # Things behind the body.
    if side and person.bag == "backpack":
        draw.rounded_rectangle([cx - sw - 0.09 * u, sh_y + 0.02 * u, cx - sw * 0.2, hip_y - 0.06 * u],
                               radius=0.02 * u, fill=BAG)
    if person.hair_length == 2 and shot.view != "back":
        draw.rectangle([cx - 0.06 * u, y(0.06), cx + (0.02 if side else 0.06) * u, y(0.24)], fill=HAIR)
    if side:
        arm(cx - sw * 0.2, (cx + s * 0.1 * u, y(0.49)))       # far arm swings against the near one
        leg(cx, cx - s * 0.14 * u, 0.0)
        leg(cx, cx + s * 0.14 * u, 0.02 * u * max(s, 0))
    else:
        leg(cx - hw * 0.5, cx - hw * 0.55 - 0.015 * u * abs(s), 0.015 * u * max(s, 0))
        leg(cx + hw * 0.5, cx + hw * 0.55 + 0.015 * u * abs(s), 0.015 * u * max(-s, 0))
    # Lower garment over the legs.
    if person.lower_kind == "skirt":
        draw.polygon([(cx - hw, hip_y - 0.02 * u), (cx + hw, hip_y - 0.02 * u),
                      (cx + hw * 1.5, y(0.7)), (cx - hw * 1.5, y(0.7))], fill=LOWER)
    else:
        draw.rectangle([cx - hw, hip_y - 0.02 * u, cx + hw, hip_y + 0.06 * u], fill=LOWER)
    # Torso.
    bottom = y(0.7) if person.coat else hip_y + 0.03 * u
    flare = 1.25 if person.coat else 1.05
    draw.polygon([(cx - sw * 0.55, sh_y - 0.025 * u), (cx + sw * 0.55, sh_y - 0.025 * u), (cx + sw, sh_y + 0.01 * u),
                  (cx + hw * flare, bottom), (cx - hw * flare, bottom), (cx - sw, sh_y + 0.01 * u)], fill=UPPER)
    if person.pattern == "logo" and shot.view == "front":
        r = 0.035 * u * b
        draw.rectangle([cx - r, y(0.27), cx + r, y(0.27) + 1.4 * r], fill=UPPER2)
    if person.bag == "backpack":
        if shot.view == "back":
            draw.rounded_rectangle([cx - sw * 0.75, sh_y + 0.02 * u, cx + sw * 0.75, hip_y - 0.04 * u],
                                   radius=0.02 * u, fill=BAG)
        elif shot.view == "front":
            for sx in (-1, 1):
                draw.line([(cx + sx * sw * 0.55, sh_y), (cx + sx * sw * 0.6, y(0.36))], fill=BAG,
                          width=max(1, round(0.018 * u)))
        else:
            draw.line([(cx - sw * 0.2, sh_y), (cx - sw * 0.4, y(0.36))], fill=BAG, width=max(1, round(0.018 * u)))
    if person.bag == "shoulder":
        bx = cx + person.bag_side * (hw + 0.03 * u) * (0.5 if side else 1)
        if not side:
            draw.line([(cx - person.bag_side * sw * 0.6, sh_y), (bx, hip_y - 0.02 * u)], fill=BAG,
                      width=max(1, round(0.015 * u)))
        draw.rectangle([bx - 0.055 * u, hip_y - 0.04 * u, bx + 0.055 * u, hip_y + 0.05 * u], fill=BAG)
    if person.scarf:
        draw.rectangle([cx - sw * 0.6, y(0.14), cx + sw * 0.6, y(0.2)], fill=SCARF)
    # Near arm(s).
    if side:
        arm(cx + sw * 0.1, (cx - s * 0.12 * u, y(0.49)))
    else:
        arm(cx - sw * 0.95, (cx - sw - 0.03 * u, y(0.49) - 0.01 * u * s))
        arm(cx + sw * 0.95, (cx + sw + 0.03 * u, y(0.49) + 0.01 * u * s))
    if person.bag == "handbag":
        hx = cx + person.bag_side * (sw + 0.03 * u) * (0.3 if side else 1)
        draw.rectangle([hx - 0.04 * u, y(0.5), hx + 0.04 * u, y(0.58)], fill=BAG)
    # Head.
    hr_x, hr_y = 0.05 * u, 0.065 * u
    hcx, hcy = cx + (0.01 * u if side else 0), y(0.075)
    hair_pad = 0.006 * u if person.hair_length else 0.0
    draw.ellipse([hcx - hr_x - hair_pad, hcy - hr_y - hair_pad, hcx + hr_x + hair_pad, hcy + hr_y], fill=HAIR)
    if shot.view == "front":
        depth = (0.25, 0.35, 0.45)[person.hair_length]
        draw.ellipse([hcx - hr_x * 0.9, hcy - hr_y + depth * hr_y, hcx + hr_x * 0.9, hcy + hr_y], fill=SKIN)
    elif side:
        draw.ellipse([hcx - hr_x * 0.3, hcy - hr_y * 0.5, hcx + hr_x * 1.05, hcy + hr_y], fill=SKIN)
    if shot.view == "back" and person.hair_length == 2:
        draw.rectangle([hcx - hr_x, hcy, hcx + hr_x, y(0.25)], fill=HAIR)
    if person.glasses and shot.view != "back":
        gy = hcy + 0.1 * hr_y
        x0 = hcx - hr_x * 0.8 if not side else hcx + hr_x * 0.3
        draw.line([(x0, gy), (hcx + hr_x * (0.8 if not side else 1.05), gy)], fill=GLASSES,
                  width=max(1, round(0.012 * u)))
    if person.hat:
        draw.chord([hcx - hr_x * 1.1, hcy - hr_y * 1.25, hcx + hr_x * 1.1, hcy + hr_y * 0.2], 180, 360, fill=HAT)
        if side:
            draw.rectangle([hcx, hcy - hr_y * 0.5, hcx + hr_x * 1.6, hcy - hr_y * 0.38], fill=HAT)
    labels = np.asarray(canvas, np.uint8)
    if shot.view == "left":
        labels = labels[:, ::-1]
    return labels


def _apply_pattern(labels: np.ndarray, person: Person, height: float) -> np.ndarray:
    """Turn part of the upper garment into its second colour: stripes or checks (a periodic mask)."""
    if person.pattern not in ("stripes", "checks"):
        return labels
    period = max(2.0, person.pattern_period * height)
    yy = np.arange(labels.shape[0])[:, None]
    on = (yy // period).astype(np.int64) % 2 == 1
    if person.pattern == "checks":
        xx = np.arange(labels.shape[1])[None, :]
        on = on ^ ((xx // period).astype(np.int64) % 2 == 1)
    labels = labels.copy()
    labels[(labels == UPPER) & on] = UPPER2
    return labels


def render(person: Person | None, camera: Camera, shot: Shot, width: int, height: int,
           rng: np.random.Generator, style: DomainStyle) -> np.ndarray:
    """(height, width, 3) uint8 image of `person` (None: background only) seen by `camera`."""
    hc, wc = camera.canvas.shape[:2]
    y0 = int(rng.integers(0, hc - height + 1))
    x0 = int(rng.integers(0, wc - width + 1))
    image = camera.canvas[y0:y0 + height, x0:x0 + width].copy()
    if person is not None:
        labels = _apply_pattern(paint_person(person, shot, width, height), person, shot.scale * height)
        lut = person.colours * rng.uniform(0.93, 1.07, (NUM_LABELS, 1)).astype(np.float32) * shot.light
        cx = width * (0.5 + shot.dx)
        shade_x = 1.0 - 0.35 * np.clip(((np.arange(width) - cx) / (0.22 * shot.scale * height)) ** 2, 0, 1.3)
        shade_y = np.linspace(1.06, 0.86, height)
        shade = (shade_y[:, None] * shade_x[None, :]).astype(np.float32)
        mask = labels > 0
        image[mask] = lut[labels[mask]] * shade[mask][:, None]
    if rng.random() < style.occlusion_p:
        _occlude(image, rng)
    gain = camera.gain * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    image = ((image / 255.0 - 0.5) * camera.contrast + 0.5 + camera.brightness) * gain * 255.0
    out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    blur = camera.blur * float(rng.uniform(0.6, 1.4)) * height / 128
    if blur > 0.25:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    if rng.random() < style.motion_blur_p:
        out = out.filter(ImageFilter.Kernel((5, 5), [0] * 10 + [1] * 5 + [0] * 10))
    noisy = np.asarray(out, np.float32) + rng.standard_normal((height, width, 3), np.float32) * camera.noise
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _occlude(image: np.ndarray, rng: np.random.Generator) -> None:
    """Cover part of the box in place: a car/bench at the bottom, a pole or passer-by at a side."""
    h, w = image.shape[:2]
    colour = _jitter(rng, COLOURS[_pick(rng, {"grey": 2, "black": 2, "white": 1, "red": 0.5, "blue": 0.5,
                                              "brown": 1, "green": 0.5})], 25)
    kind = rng.integers(3)
    if kind == 0:
        y0 = int(h * rng.uniform(0.65, 0.85))
        image[y0:] = colour * np.linspace(1.1, 0.7, h - y0, dtype=np.float32)[:, None, None]
    elif kind == 1:
        bw = int(w * rng.uniform(0.12, 0.3))
        x0 = 0 if rng.random() < 0.5 else w - bw
        image[:, x0:x0 + bw] = colour * np.linspace(1.1, 0.8, h, dtype=np.float32)[:, None, None]
    else:
        bh, bw = int(h * rng.uniform(0.15, 0.3)), int(w * rng.uniform(0.3, 0.6))
        y0, x0 = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
        image[y0:y0 + bh, x0:x0 + bw] = colour


def jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    """Encode without metadata so the bytes depend only on the pixels and the quality."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality), optimize=False)
    return buffer.getvalue()


@lru_cache(maxsize=None)
def camera_of(style_name: str, seed: int, cam: int) -> Camera:
    """The camera `cam` (0-based) of a network, rebuilt identically in every worker process."""
    style = STYLES[style_name]
    return make_camera(style, np.random.default_rng(np.random.SeedSequence([seed, style.code, 4, cam])))


@lru_cache(maxsize=4096)
def person_of(style_name: str, seed: int, person_key: int) -> Person:
    """The identity `person_key` of a network, rebuilt identically in every worker process."""
    style = STYLES[style_name]
    return make_person(style, np.random.default_rng(np.random.SeedSequence([seed, style.code, 1, person_key])))
