"""The `builtin:toy-vqa` task: coloured shapes on a plain background, questions answered by one word.

Each 192 x 192 image is a 12 x 12 grid of 16-pixel patches (the toy LLaVA's 144 visual tokens).
One to four objects, each of a distinct colour and a distinct shape, are drawn one per patch on
a plain background, so every answer depends on 1 to 4 of the 144 visual tokens. Questions:
"what colour is the <shape>", "which shape is <colour>" and "how many objects", each ending on
the word that picks the tokens to read. Everything follows from (split, seed); the held-out split
is the scenes whose hash falls in one eighth, so no train image is ever a test image.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

PATCH_SIZE = 16
GRID = 12
IMAGE_SIZE = PATCH_SIZE * GRID
OBJECT_PATCHES = 1  # an object covers OBJECT_PATCHES x OBJECT_PATCHES patches
BACKGROUND = (128, 128, 128)
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "white": (250, 250, 250),
}
SHAPES = ("square", "circle", "triangle", "cross")
COUNTS = ("one", "two", "three", "four")
TEST_BUCKETS = 8  # one scene hash bucket in TEST_BUCKETS is held out

Split = Literal["train", "test"]


@dataclass(frozen=True)
class Shape:
    """One drawn object: its (top-left) patch, colour name and shape name."""

    row: int
    col: int
    colour: str
    shape: str

    def patches(self) -> list[int]:
        """The row-major indices of the visual tokens (patches) this object covers."""
        rows, cols = range(self.row, self.row + OBJECT_PATCHES), range(self.col, self.col + OBJECT_PATCHES)
        return [r * GRID + c for r in rows for c in cols]


@dataclass
class VQASample:
    """One question about one image, with its accepted answers (one word each) and the scene drawn."""

    id: str
    image: Image.Image
    question: str
    answers: list[str]
    objects: tuple[Shape, ...] = ()

    def object_patches(self) -> list[int]:
        """The row-major indices of the visual tokens (patches) that the objects cover."""
        return sorted(p for obj in self.objects for p in obj.patches())


def generate_samples(split: Split, n: int, seed: int = 0, max_objects: int = len(COUNTS)) -> list[VQASample]:
    """`n` samples of `split`, the same for the same arguments on every machine.

    `max_objects` below four gives easier scenes (a training curriculum); the held-out scores use four.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = random.Random(f"toy-vqa/{split}/{seed}")  # str seeds hash with sha512: stable across runs
    samples = []
    for i in range(n):
        scene = _scene(rng, split, max_objects)
        question, answer = _question(rng, scene)
        samples.append(VQASample(f"{split}-{seed}-{i}", render(scene), question, [answer], scene))
    return samples


def render(scene: tuple[Shape, ...]) -> Image.Image:
    """The RGB image of a scene: each object drawn inside its patches with a 2-pixel margin."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    side = OBJECT_PATCHES * PATCH_SIZE
    for obj in scene:
        x0, y0 = obj.col * PATCH_SIZE + 2, obj.row * PATCH_SIZE + 2
        draw_shape(draw, obj.shape, (x0, y0, x0 + side - 5, y0 + side - 5), COLOURS[obj.colour], bar=2)
    return image


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, ...], bar: int
) -> None:
    """Draw a square, circle, triangle or cross (bars `bar` pixels either side of the centre) in `box`;
    shared by the image and the video toys so their shapes look alike."""
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # cross
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        draw.rectangle((mx - bar, y0, mx + bar, y1), fill=fill)
        draw.rectangle((x0, my - bar, x1, my + bar), fill=fill)


def _scene(rng: random.Random, split: Split, max_objects: int) -> tuple[Shape, ...]:
    """A random scene of `split`: drawn again until its hash bucket belongs to the split."""
    while True:
        count = rng.randint(1, max_objects)
        colours = rng.sample(sorted(COLOURS), count)
        shapes = rng.sample(SHAPES, count)
        places = _places(rng, count)
        scene = tuple(Shape(r, c, col, sh) for (r, c), col, sh in zip(places, colours, shapes, strict=True))
        digest = hashlib.blake2b(repr(sorted(scene, key=repr)).encode(), digest_size=4).digest()
        if (digest[0] % TEST_BUCKETS == 0) == (split == "test"):
            return scene


def _places(rng: random.Random, count: int) -> list[tuple[int, int]]:
    """`count` top-left patches of objects that do not overlap on the grid."""
    last = GRID - OBJECT_PATCHES
    places: list[tuple[int, int]] = []
    while len(places) < count:
        r, c = rng.randint(0, last), rng.randint(0, last)
        if all(abs(r - pr) >= OBJECT_PATCHES or abs(c - pc) >= OBJECT_PATCHES for pr, pc in places):
            places.append((r, c))
    return places


def _question(rng: random.Random, scene: tuple[Shape, ...]) -> tuple[str, str]:
    """One of the three question kinds about `scene`, uniformly, and its answer."""
    kind = rng.randrange(3)
    obj = rng.choice(scene)
    return [*object_questions(obj), count_question(scene)][kind]


def object_questions(obj: Shape) -> list[tuple[str, str]]:
    """The (question, answer) pairs about one object: its colour, named by its shape, and vice versa."""
    return [
        (f"what colour is the {obj.shape}", obj.colour),
        (f"which shape is {obj.colour}", obj.shape),
    ]


def count_question(scene: tuple[Shape, ...]) -> tuple[str, str]:
    """The (question, answer) pair about the number of objects in `scene`."""
    return "how many objects", COUNTS[len(scene) - 1]


def vocabulary() -> list[str]:
    """Every word of every question and answer, in a fixed order (the tokenizer's word list)."""
    words = ["what", "colour", "is", "the", "which", "shape", "how", "many", "objects"]
    return [*words, *COLOURS, *SHAPES, *COUNTS]


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """An answer as VQA scoring compares it: lowercase, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())
