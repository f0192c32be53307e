"""The `builtin:toy-video-vqa` task: 8-frame clips of two shapes that appear, move and change colour.

Each 32 x 32 frame is a 4 x 4 grid of 8-pixel patches (the toy Video-LLaVA's 16 patch tokens per
frame, after the frame's class token). A clip shows two objects of distinct shapes in distinct
rows: each appears at its own frame (0 to 3) and stays; one of them moves one patch sideways once
or twice; one of them (the same or the other) changes colour at a frame after it appears. Every
question is about WHEN: "which shape appears first|last", "first|last colour of the <shape>",
"direction of the <shape>" (left, right or still), so an answer rests on the frames where the
event happens, and a reduction that drops or merges those frames loses it. Everything follows from
(split, seed); the held-out split is the clips whose hash falls in one eighth, so no train clip is
ever a test clip.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from tokenprune.builtin.toyvqa import BACKGROUND, Split, draw_shape

FRAMES = 8
PATCH_SIZE = 8
GRID = 4
FRAME_SIZE = PATCH_SIZE * GRID
LAST_APPEARANCE = 3  # both objects are on screen from frame LAST_APPEARANCE on
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 30),
}
SHAPES = ("square", "circle", "triangle", "cross")
DIRECTIONS = ("left", "right", "still")
TEST_BUCKETS = 8  # one clip hash bucket in TEST_BUCKETS is held out
QUESTION_KINDS = ("appears", "colour", "direction")


@dataclass(frozen=True)
class Track:
    """One object over the clip: its shape, row, first frame, colour before and after `change`, columns."""

    shape: str
    row: int
    appears: int
    colour: str
    new_colour: str
    change: int  # the first frame drawn in `new_colour` (FRAMES: never)
    columns: tuple[int, ...]  # its column in each frame

    def colour_at(self, frame: int) -> str:
        """The object's colour in `frame`."""
        return self.new_colour if frame >= self.change else self.colour

    def direction(self) -> str:
        """Where the object goes over the clip: left, right or still."""
        start, end = self.columns[0], self.columns[-1]
        return "still" if start == end else ("right" if end > start else "left")

    def patches(self, frame: int) -> list[int]:
        """The row-major patch index the object covers in `frame` (none before it appears)."""
        return [self.row * GRID + self.columns[frame]] if frame >= self.appears else []


@dataclass
class VideoSample:
    """One question about one clip (FRAMES RGB frames), its accepted answers and the tracks drawn."""

    id: str
    frames: list[Image.Image]
    question: str
    answers: list[str]
    tracks: tuple[Track, ...] = ()


def generate_samples(split: Split, n: int, seed: int = 0) -> list[VideoSample]:
    """`n` samples of `split`, the same for the same arguments on every machine."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = random.Random(f"toy-video-vqa/{split}/{seed}")  # str seeds hash with sha512: stable across runs
    samples = []
    for i in range(n):
        tracks = _clip(rng, split)
        question, answer = rng.choice(all_questions(tracks, rng.choice(QUESTION_KINDS)))
        samples.append(VideoSample(f"{split}-{seed}-{i}", render(tracks), question, [answer], tracks))
    return samples


def render(tracks: tuple[Track, ...]) -> list[Image.Image]:
    """The clip's frames: each visible object drawn inside its patch with a 1-pixel margin."""
    return [_frame(tracks, frame) for frame in range(FRAMES)]


def _frame(tracks: tuple[Track, ...], frame: int) -> Image.Image:
    """One frame of the clip."""
    image = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for track in tracks:
        if frame < track.appears:
            continue
        x0, y0 = track.columns[frame] * PATCH_SIZE + 1, track.row * PATCH_SIZE + 1
        box = (x0, y0, x0 + PATCH_SIZE - 3, y0 + PATCH_SIZE - 3)
        draw_shape(draw, track.shape, box, COLOURS[track.colour_at(frame)], bar=1)
    return image


def _clip(rng: random.Random, split: Split) -> tuple[Track, ...]:
    """Two random tracks of `split`: drawn again until the clip's hash bucket belongs to the split."""
    while True:
        shapes = rng.sample(SHAPES, 2)
        rows = rng.sample(range(GRID), 2)
        appears = rng.sample(range(LAST_APPEARANCE + 1), 2)  # never at the same frame
        mover, changer = rng.randrange(2), rng.randrange(2)
        tracks = tuple(
            _track(rng, shapes[k], rows[k], appears[k], k == mover, k == changer) for k in range(2)
        )
        digest = hashlib.blake2b(repr(tracks).encode(), digest_size=4).digest()
        if (digest[0] % TEST_BUCKETS == 0) == (split == "test"):
            return tracks


def _track(rng: random.Random, shape: str, row: int, appears: int, moves: bool, changes: bool) -> Track:
    """One object: a colour change after it appears when `changes`, one or two sideways steps when `moves`."""
    colour, new_colour = rng.sample(sorted(COLOURS), 2)
    change = rng.randint(appears + 1, FRAMES - 1) if changes else FRAMES
    return Track(shape, row, appears, colour, new_colour if changes else colour, change, _columns(rng, moves))


def _columns(rng: random.Random, moves: bool) -> tuple[int, ...]:
    """The column per frame: fixed, or stepping one patch left or right at one or two random frames."""
    if not moves:
        return (rng.randrange(GRID),) * FRAMES
    steps, step = rng.randint(1, 2), rng.choice((-1, 1))
    start = rng.randrange(GRID - steps) + (steps if step < 0 else 0)
    step_frames = set(rng.sample(range(1, FRAMES), steps))
    columns, column = [], start
    for frame in range(FRAMES):
        column += step if frame in step_frames else 0
        columns.append(column)
    return tuple(columns)


def all_questions(tracks: tuple[Track, ...], kind: str) -> list[tuple[str, str]]:
    """Every (question, answer) pair of one kind about the clip."""
    if kind == "appears":
        first, last = sorted(tracks, key=lambda track: track.appears)
        return [("which shape appears first", first.shape), ("which shape appears last", last.shape)]
    if kind == "colour":
        return [
            pair
            for track in tracks
            for pair in (
                (f"first colour of the {track.shape}", track.colour),
                (f"last colour of the {track.shape}", track.new_colour),
            )
        ]
    if kind == "direction":
        return [(f"direction of the {track.shape}", track.direction()) for track in tracks]
    raise ValueError(f"question kind must be one of {QUESTION_KINDS}, not {kind!r}")


def vocabulary() -> list[str]:
    """Every word of every question and answer, in a fixed order (the tokenizer's word list)."""
    words = ["which", "shape", "appears", "first", "last", "colour", "of", "the", "direction"]
    return [*words, *COLOURS, *SHAPES, *DIRECTIONS]
