"""Entity sprites: RGBA images, transparent outside the drawing, that fill one object slot.

Squares are solid blocks; the 6 shapes are drawn exactly as the official shared/images.py draws
them (pixel for pixel: tests/test_data_synthetic.py checks them against the official vertex lists).
The 8 objects are drawn procedurally with PIL so that the datasets build offline (the official
Objects task uses stickpng thumbnails; a folder of `<object>.png` files can replace the drawings);
every object drawing reaches into each token cell of its slot at the registered geometries (1x1,
2x2 and 3x3 tokens). The official shapes need not (a triangle leaves its top corner cells of a
3x3 slot empty); an object's token region is its S x S slot either way, as in the official code.

Object coordinates are fractions of the sprite side, (0, 0) = top-left.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
Painter = Callable[["_Pen"], None]
CLEAR = (0, 0, 0, 0)


class _Pen:
    """Draws on a square RGBA sprite in fractional coordinates."""

    def __init__(self, size: int):
        self.size = size
        self.image = Image.new("RGBA", (size, size), CLEAR)
        self._draw = ImageDraw.Draw(self.image)

    def _xy(self, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * self.size, y * self.size) for x, y in points]

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill) -> None:
        self._draw.rectangle(self._box(x0, y0, x1, y1), fill=fill)

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, fill) -> None:
        self._draw.ellipse(self._box(x0, y0, x1, y1), fill=fill)

    def polygon(self, points: list[tuple[float, float]], fill) -> None:
        self._draw.polygon(self._xy(points), fill=fill)

    def line(self, points: list[tuple[float, float]], fill, width: float) -> None:
        self._draw.line(self._xy(points), fill=fill, width=max(1, round(width * self.size)))

    def _box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        # PIL boxes include their last pixel; keep at least one pixel for tiny sprites.
        s = self.size
        return [x0 * s, y0 * s, max(x0 * s, x1 * s - 1), max(y0 * s, y1 * s - 1)]


# ---------------------------------------------------------------- shapes (one colour each)

# The six shapes are drawn as the official shared/images.py draws them, in pixels of a sprite of
# side `size` (PIL boxes include their last pixel, hence the "- 1"s).

def _square(draw: ImageDraw.ImageDraw, size: int, colour: RGB) -> None:
    side = 0.8 * size
    start = (size - side) / 2
    draw.rectangle([start, start, start + side - 1, start + side - 1], fill=colour)


def _circle(draw: ImageDraw.ImageDraw, size: int, colour: RGB) -> None:
    side = 0.9 * size
    start = (size - side) / 2
    draw.ellipse([start, start, start + side - 1, start + side - 1], fill=colour)


def _triangle(draw: ImageDraw.ImageDraw, size: int, colour: RGB) -> None:
    # equilateral, apex at the top centre, base at height sqrt(3)/2 of the side
    base = size * math.sqrt(3) / 2
    draw.polygon([(size / 2, 0), (0, base), (size - 1, base)], fill=colour)


STAR_INNER_RADIUS = 0.381966  # inner / outer radius of the five-pointed star


def _star(draw: ImageDraw.ImageDraw, size: int, colour: RGB) -> None:
    # ten vertices from the top, alternating outer and inner radius; x is stretched so that the
    # widest points touch the sprite's sides, y keeps the unit radius
    centre = radius = (size - 1) / 2
    unit = [((1.0 if k % 2 == 0 else STAR_INNER_RADIUS) * math.cos(k * math.pi / 5 - math.pi / 2),
             (1.0 if k % 2 == 0 else STAR_INNER_RADIUS) * math.sin(k * math.pi / 5 - math.pi / 2)) for k in range(10)]
    stretch = 1.0 / max(abs(x) for x, _ in unit)
    draw.polygon([(centre + x * radius * stretch, centre + y * radius) for x, y in unit], fill=colour)


def _cross(draw: ImageDraw.ImageDraw, size: int, colour: RGB) -> None:
    bar = size // 3
    start = (size - bar) / 2
    draw.rectangle([start, 0, start + bar - 1, size - 1], fill=colour)
    draw.rectangle([0, start, size - 1, start + bar - 1], fill=colour)


HEART_SAMPLES = 100


def _heart(draw: ImageDraw.ImageDraw, size: int, colour: RGB) -> None:
    # the classic parametric heart, scaled to fill the sprite (y up in the curve, down in pixels)
    ts = [2 * math.pi * k / HEART_SAMPLES for k in range(HEART_SAMPLES)]
    xs = [16 * math.sin(t) ** 3 for t in ts]
    ys = [13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t) for t in ts]
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
    draw.polygon([((x - x_lo) / (x_hi - x_lo) * (size - 1), (1 - (y - y_lo) / (y_hi - y_lo)) * (size - 1))
                  for x, y in zip(xs, ys)], fill=colour)


SHAPE_PAINTERS: dict[str, Callable[[ImageDraw.ImageDraw, int, RGB], None]] = {
    "square": _square, "circle": _circle, "triangle": _triangle,
    "star": _star, "cross": _cross, "heart": _heart,
}


# ---------------------------------------------------------------- objects (fixed colours)

def _orange(pen: _Pen) -> None:
    pen.ellipse(0.03, 0.06, 0.97, 1.0, (255, 140, 0))
    for x, y in ((0.3, 0.4), (0.62, 0.35), (0.45, 0.62), (0.72, 0.66), (0.28, 0.75)):
        pen.ellipse(x - 0.025, y - 0.025, x + 0.025, y + 0.025, (225, 110, 0))
    pen.polygon([(0.5, 0.1), (0.62, 0.0), (0.8, 0.02), (0.66, 0.12)], (40, 140, 40))
    pen.rect(0.47, 0.04, 0.53, 0.12, (90, 60, 20))


def _apple(pen: _Pen) -> None:
    pen.ellipse(0.02, 0.16, 0.98, 1.0, (210, 20, 30))
    pen.ellipse(0.2, 0.3, 0.34, 0.5, (245, 120, 120))
    pen.line([(0.5, 0.3), (0.56, 0.04)], (100, 60, 20), 0.06)
    pen.polygon([(0.56, 0.14), (0.78, 0.02), (0.9, 0.08), (0.7, 0.2)], (50, 160, 40))


def _pot(pen: _Pen) -> None:
    body = (0, 140, 140)
    pen.ellipse(0.42, 0.02, 0.58, 0.16, (40, 40, 40))
    pen.polygon([(0.2, 0.28), (0.3, 0.14), (0.7, 0.14), (0.8, 0.28)], body)
    pen.rect(0.05, 0.26, 0.95, 0.35, (0, 110, 110))
    pen.rect(0.12, 0.35, 0.88, 0.85, body)
    pen.ellipse(0.12, 0.72, 0.88, 0.96, body)
    pen.rect(0.0, 0.4, 0.14, 0.5, (40, 40, 40))
    pen.rect(0.86, 0.4, 1.0, 0.5, (40, 40, 40))


def _bell(pen: _Pen) -> None:
    gold, red = (245, 200, 40), (200, 0, 0)
    pen.polygon([(0.5, 0.17), (0.06, 0.0), (0.02, 0.32)], red)
    pen.polygon([(0.5, 0.17), (0.94, 0.0), (0.98, 0.32)], red)
    pen.polygon([(0.38, 0.2), (0.62, 0.2), (0.74, 0.4), (0.8, 0.62), (0.9, 0.8),
                 (0.1, 0.8), (0.2, 0.62), (0.26, 0.4)], gold)
    pen.rect(0.02, 0.76, 0.98, 0.88, (215, 165, 20))
    pen.ellipse(0.42, 0.84, 0.58, 1.0, (110, 80, 20))
    pen.ellipse(0.43, 0.1, 0.57, 0.24, red)


def _hat(pen: _Pen) -> None:
    navy = (30, 40, 110)
    pen.polygon([(0.22, 0.0), (0.78, 0.0), (0.8, 0.78), (0.2, 0.78)], navy)
    pen.rect(0.2, 0.58, 0.8, 0.68, (200, 30, 30))
    pen.ellipse(0.0, 0.7, 1.0, 0.92, navy)


def _rose(pen: _Pen) -> None:
    green, bloom, dark = (40, 140, 40), (215, 20, 70), (140, 0, 40)
    pen.rect(0.47, 0.5, 0.53, 1.0, green)
    pen.polygon([(0.5, 0.72), (0.25, 0.56), (0.02, 0.6), (0.2, 0.78)], green)
    pen.polygon([(0.5, 0.8), (0.75, 0.62), (0.98, 0.68), (0.8, 0.86)], green)
    pen.ellipse(0.2, 0.1, 0.8, 0.6, bloom)
    for x in (0.2, 0.4, 0.6):  # scalloped petal tips
        pen.ellipse(x, 0.0, x + 0.2, 0.22, bloom)
    swirl = [(0.5 + 0.018 * t * math.cos(t), 0.33 + 0.016 * t * math.sin(t)) for t in (k / 4 for k in range(1, 44))]
    pen.line(swirl, dark, 0.035)


def _key(pen: _Pen) -> None:
    silver = (150, 150, 162)
    pen.ellipse(0.0, 0.18, 0.48, 0.82, silver)
    pen.ellipse(0.12, 0.36, 0.3, 0.64, CLEAR)
    pen.rect(0.44, 0.43, 1.0, 0.57, silver)
    for x0, x1, y0, y1 in ((0.72, 0.8, 0.2, 0.43), (0.86, 0.94, 0.28, 0.43),
                           (0.72, 0.8, 0.57, 0.8), (0.86, 0.94, 0.57, 0.72)):
        pen.rect(x0, y0, x1, y1, silver)


def _bomb(pen: _Pen) -> None:
    pen.ellipse(0.04, 0.18, 0.84, 0.98, (25, 25, 25))
    pen.polygon([(0.56, 0.2), (0.7, 0.1), (0.8, 0.24), (0.66, 0.34)], (70, 70, 70))
    pen.ellipse(0.18, 0.34, 0.3, 0.46, (120, 120, 120))
    pen.line([(0.74, 0.16), (0.82, 0.08), (0.9, 0.1)], (140, 90, 40), 0.04)
    spark = [(0.9 + (0.1 if k % 2 == 0 else 0.04) * math.cos(k * math.pi / 4),
              0.1 + (0.1 if k % 2 == 0 else 0.04) * math.sin(k * math.pi / 4)) for k in range(8)]
    pen.polygon(spark, (255, 210, 0))


OBJECT_PAINTERS: dict[str, Painter] = {
    "orange": _orange, "apple": _apple, "pot": _pot, "bell": _bell,
    "hat": _hat, "rose": _rose, "key": _key, "bomb": _bomb,
}


# ---------------------------------------------------------------- sprites by kind

@functools.lru_cache(maxsize=512)
def square_sprite(colour: RGB, size: int) -> Image.Image:
    """[size, size] RGBA block of one colour."""
    return Image.new("RGBA", (size, size), (*colour, 255))


@functools.lru_cache(maxsize=512)
def shape_sprite(shape: str, colour: RGB, size: int) -> Image.Image:
    """[size, size] RGBA drawing of one of SHAPE_PAINTERS in `colour`, as the official code draws it."""
    image = Image.new("RGBA", (size, size), CLEAR)
    SHAPE_PAINTERS[shape](ImageDraw.Draw(image), size, colour)
    return image


@functools.lru_cache(maxsize=512)
def object_sprite(name: str, size: int) -> Image.Image:
    """[size, size] RGBA drawing of one of OBJECT_PAINTERS."""
    pen = _Pen(size)
    OBJECT_PAINTERS[name](pen)
    return pen.image


@functools.lru_cache(maxsize=512)
def thumbnail_sprite(folder: Path, name: str, size: int) -> Image.Image:
    """`folder/<name>.png` as a [size, size] RGBA sprite (bicubic resize, like the official code)."""
    with Image.open(Path(folder) / f"{name}.png") as image:
        return image.convert("RGBA").resize((size, size), Image.Resampling.BICUBIC)
