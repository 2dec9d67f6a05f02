"""Synthetic text: seeded random strings rendered with the DejaVu fonts that ship with matplotlib.

Everything takes a `numpy.random.Generator`; the same seed gives the same strings, styles and pixels. Images are
RGB uint8 arrays (H, W, 3).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["FONTS", "ALPHABET", "font_path", "random_text", "LineStyle", "sample_style", "render_line",
           "render_page"]

FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
)

# Letters that are ambiguous in random strings without word context (O/0, I/l/1) are left out: a reader, human or
# model, cannot tell them apart in these fonts, and the ground truth would measure the font rather than the model.
_LOWER = string.ascii_lowercase.replace("l", "")
_UPPER = string.ascii_uppercase.replace("I", "").replace("O", "")
_PUNCT = ".,:;!?-()/%#&+"
ALPHABET = string.digits + _LOWER + _UPPER + _PUNCT + " "


@lru_cache(maxsize=None)
def font_path(name: str) -> Path:
    """Path of a font file shipped in matplotlib's mpl-data/fonts/ttf."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise FileNotFoundError(f"font {name!r} not found at {path}; is matplotlib installed completely?")
    return path


@lru_cache(maxsize=256)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(name)), size)


def _word(rng: np.random.Generator) -> str:
    kind = rng.integers(4)
    if kind == 0:  # lowercase word
        word = "".join(rng.choice(list(_LOWER), rng.integers(2, 8)))
    elif kind == 1:  # Capitalized word
        word = str(rng.choice(list(_UPPER))) + "".join(rng.choice(list(_LOWER), rng.integers(2, 7)))
    elif kind == 2:  # number
        word = "".join(rng.choice(list(string.digits), rng.integers(1, 6)))
    else:  # code like "K7R2"
        word = "".join(rng.choice(list(string.digits + _UPPER), rng.integers(2, 6)))
    if rng.random() < 0.3:
        word += str(rng.choice(list(_PUNCT)))
    return word


def random_text(rng: np.random.Generator, max_words: int = 3) -> str:
    """One to `max_words` random words (lowercase, Capitalized, numbers, codes), some followed by punctuation."""
    return " ".join(_word(rng) for _ in range(int(rng.integers(1, max_words + 1))))


@dataclass(frozen=True)
class LineStyle:
    font: str
    size: int
    fg: tuple[int, int, int]
    bg: tuple[int, int, int]
    margin_x: int
    margin_y: int


def sample_style(rng: np.random.Generator, sizes: tuple[int, int] = (24, 40)) -> LineStyle:
    """Dark text on a light, slightly tinted background, font size in [sizes[0], sizes[1]) px, small margins."""
    base = int(rng.integers(205, 256))
    bg = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, 3), 0, 255))
    fg = tuple(int(v) for v in rng.integers(0, 70, 3))
    return LineStyle(font=FONTS[int(rng.integers(len(FONTS)))], size=int(rng.integers(*sizes)), fg=fg, bg=bg,
                     margin_x=int(rng.integers(4, 12)), margin_y=int(rng.integers(4, 10)))


def render_line(text: str, style: LineStyle) -> np.ndarray:
    """A tight crop of one text line: the ink box of `text` plus the style's margins."""
    font = _font(style.font, style.size)
    left, top, right, bottom = font.getbbox(text)
    width = max(right - left, 1) + 2 * style.margin_x
    height = max(bottom - top, 1) + 2 * style.margin_y
    image = Image.new("RGB", (width, height), style.bg)
    ImageDraw.Draw(image).text((style.margin_x - left, style.margin_y - top), text, font=font, fill=style.fg)
    return np.asarray(image)


def render_page(rng: np.random.Generator, size: tuple[int, int] = (640, 640), sizes: tuple[int, int] = (16, 34),
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A light page with lines of text at random places, one or two segments per row.

    Returns (image (H, W, 3) uint8, line boxes (N, 4) float x1, y1, x2, y2 in pixels, texts). A line box spans the
    ink horizontally and the font's ascent + descent vertically, as a person would box a text line (the tight ink
    box of "aco" would be much flatter than that of "Hg"). Segments on one row are at least 3 font sizes apart, so a
    line-level detector should report each as its own box.
    """
    height, width = size
    base = int(rng.integers(215, 256))
    bg = tuple(int(v) for v in np.clip(base + rng.integers(-10, 11, 3), 0, 255))
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    texts: list[str] = []
    y = int(rng.integers(10, 40))
    while True:
        font_size = int(rng.integers(*sizes))
        font = _font(FONTS[int(rng.integers(len(FONTS)))], font_size)
        ascent, descent = font.getmetrics()
        line_height = ascent + descent
        fg = tuple(int(v) for v in rng.integers(0, 70, 3))
        x = int(rng.integers(10, width // 3))
        row_bottom = None
        for _ in range(2):
            text = random_text(rng)
            left, _, right, _ = draw.textbbox((x, y), text, font=font)
            box = (left, y, right, y + line_height)
            if box[2] > width - 10 or box[3] > height - 10:
                break
            draw.text((x, y), text, font=font, fill=fg)
            boxes.append(box)
            texts.append(text)
            row_bottom = max(row_bottom or 0, box[3])
            x = box[2] + int(rng.integers(3 * font_size, 6 * font_size))
            if rng.random() < 0.5:
                break
        if row_bottom is None:
            if y + font_size > height - 10:
                break
            row_bottom = y + font_size
        y = row_bottom + int(rng.integers(10, 40))
    return np.asarray(image), np.array(boxes, dtype=np.float64).reshape(-1, 4), texts
