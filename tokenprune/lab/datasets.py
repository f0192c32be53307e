"""Visual question answering data for `tokenprune ablate`: the built-in task, JSONL files, `datasets` folders.

Every source yields `Sample`s: an id, the images (PIL, RGB), the question and the accepted answers;
a video sample has its clips (lists of frames) in `videos` instead of images.

- `builtin:toy-vqa` and `builtin:toy-video-vqa`: generated on the fly (`tokenprune.builtin.toyvqa`,
  `tokenprune.builtin.toyvideo`), nothing read from disk.
- A JSONL file: one object per line with `image` (a path, or a list of paths, relative to the
  file's folder), `question`, and `answers` (a list) or `answer` (a string); `id` is optional.
  A config's relative dataset path is relative to the config file's folder (`resolve_source`).
- A folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict`): the same columns, images
  as an `Image` feature or paths. The `datasets` package is imported only for such a folder.

`contents_digest` hashes samples as loaded (a run's fingerprint and its cell keys hold it);
`preview` checks a source's first records without opening an image (`tokenprune.lab.checks`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from tokenprune.builtin.models import BUILTIN_DATASETS, builtin_dataset
from tokenprune.builtin.toyvideo import VideoSample
from tokenprune.builtin.toyvqa import VQASample
from tokenprune.errors import ConfigError, describe_errors

BUILTIN_PREFIX = "builtin:"
LMMS_EVAL_SOURCE = "lmms-eval"  # a grid over lmms-eval tasks (`tokenprune.lab.lmms_bench`): no samples


@dataclass
class Sample:
    """One question about one or more images (or videos: frame lists), with the answers counted correct."""

    id: str
    images: list[Image.Image]
    question: str
    answers: list[str]
    videos: list[list[Image.Image]] = field(default_factory=list)

    def pictures(self) -> list[Image.Image]:
        """The images, then every frame of every video: what a sample shows, in order."""
        return [*self.images, *(frame for video in self.videos for frame in video)]


class Record(BaseModel):
    """One JSONL line or `datasets` row; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    images: list[Any] = Field(validation_alias=AliasChoices("images", "image"), min_length=1)
    question: str
    answers: list[str] = Field(validation_alias=AliasChoices("answers", "answer"), min_length=1)

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> Any:
        """Ids of any JSON type, as text."""
        return None if value is None else str(value)

    @field_validator("images", "answers", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """A single image or answer as a list of one."""
        return value if isinstance(value, list | tuple) else [value]


def load_samples(source: str, split: str, limit: int | None, seed: int = 0) -> list[Sample]:
    """The first `limit` samples (all when None) of a built-in task, a JSONL file or a `datasets` folder."""
    if source.startswith(BUILTIN_PREFIX):
        return builtin_samples(source, split, limit, seed)
    if source == LMMS_EVAL_SOURCE:
        raise ConfigError(f"dataset {source!r}: its tasks are read by lmms-eval, not as samples")
    path = Path(source)
    if path.is_file():
        return jsonl_samples(path, limit)
    if path.is_dir():
        return saved_dataset_samples(path, split, limit)
    raise ConfigError(
        f"dataset {source!r}: not a builtin name ({', '.join(BUILTIN_DATASETS)}), an existing JSONL file, "
        "or a folder saved with datasets' save_to_disk"
    )


def builtin_samples(name: str, split: str, limit: int | None, seed: int = 0) -> list[Sample]:
    """`builtin:toy-vqa` or `builtin:toy-video-vqa`: `limit` generated samples of `split` (train or test)."""
    if limit is None:
        raise ConfigError(f"dataset {name!r} is generated: give `limit`, the number of samples")
    try:
        samples = builtin_dataset(name, split, limit, seed=seed)
    except ValueError as exc:
        raise ConfigError(f"dataset {name!r}: {exc}") from exc
    return [_builtin_sample(s) for s in samples]


def _builtin_sample(sample: VQASample | VideoSample) -> Sample:
    """A generated sample of a built-in task as a `Sample`: a clip as one video, else its image."""
    if isinstance(sample, VideoSample):
        return Sample(sample.id, [], sample.question, list(sample.answers), videos=[sample.frames])
    return Sample(sample.id, [sample.image], sample.question, list(sample.answers))


def jsonl_samples(path: Path, limit: int | None = None) -> list[Sample]:
    """Samples of a JSONL file; image paths are relative to the file's folder. Errors name file and line."""
    samples = [
        Sample(
            record.id or str(number),
            [_open_image(image, where) for image in images],
            record.question,
            record.answers,
        )
        for number, where, record, images in _jsonl_records(path, limit)
    ]
    if not samples:
        raise ConfigError(f"dataset {path} has no samples")
    return samples


def _jsonl_records(path: Path, limit: int | None) -> Iterator[tuple[int, str, Record, list[Path]]]:
    """(line number, `file line N`, record, image paths) of the first `limit` records of a JSONL file."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read dataset {path}: {exc}") from exc
    count = 0
    for number, line in enumerate(lines, start=1):
        if limit is not None and count == limit:
            return
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from exc
        record = _record(data, where)
        count += 1
        yield number, where, record, [path.parent / str(item) for item in record.images]


def saved_dataset_samples(path: Path, split: str, limit: int | None = None) -> list[Sample]:
    """Samples of a folder written by `save_to_disk`: `split` is picked from a `DatasetDict`."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"dataset {path} is a folder, read with the `datasets` package, which is not installed: "
            "pip install datasets (or convert it to JSONL)"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"dataset {path}: not a folder saved with save_to_disk ({exc})") from exc
    except IndexError:  # datasets cannot read back a split of 0 rows
        raise ConfigError(
            f"dataset {path} has no samples in a split (a save_to_disk split of 0 rows): "
            "save the dataset without the empty split"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"dataset {path} has no split {split!r}; splits: {', '.join(loaded)}")
        loaded = loaded[split]
    rows: Iterable[dict[str, Any]] = (
        loaded if limit is None else loaded.select(range(min(limit, len(loaded))))
    )
    samples = []
    for index, row in enumerate(rows):
        where = f"{path} row {index}"
        record = _record(row, where)
        images = [_image(item, path, where) for item in record.images]
        samples.append(Sample(record.id or str(index), images, record.question, record.answers))
    return samples


def _record(data: Any, where: str) -> Record:
    """A validated record of one line or row; ConfigError naming `where` otherwise."""
    try:
        return Record.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe_errors(exc)}") from None


def _image(item: Any, folder: Path, where: str) -> Image.Image:
    """A `datasets` image cell: a decoded PIL image, an undecoded {bytes, path} dict, or a path."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, dict) and item.get("bytes"):
        return Image.open(io.BytesIO(item["bytes"])).convert("RGB")
    if isinstance(item, dict):
        item = item.get("path")
    return _open_image(folder / str(item), where)


def _open_image(path: Path, where: str) -> Image.Image:
    """The image at `path` as RGB; ConfigError naming `where` when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot open image {path}: {exc}") from None


def resolve_source(source: str, folder: Path) -> str:
    """A dataset path relative to the config file's `folder` (builtins, lmms-eval, absolute: as given)."""
    if source.startswith(BUILTIN_PREFIX) or source == LMMS_EVAL_SOURCE:
        return source
    path = Path(source).expanduser()
    return str(path if path.is_absolute() else folder / path)


def contents_digest(samples: Sequence[Sample]) -> str:
    """A hash of the samples as loaded: ids, questions, answers, each image's (frame's) mode, size and pixels.

    Not the path: an edited answer or image changes it, a moved or re-encoded (same pixels) file does not.
    """
    hasher = hashlib.sha256()
    for sample in samples:
        hasher.update(json.dumps([sample.id, sample.question, sample.answers]).encode())
        for image in sample.pictures():
            hasher.update(f"{image.mode} {image.size}".encode())
            hasher.update(image.tobytes())
    return hasher.hexdigest()[:16]


def preview(source: str, split: str, limit: int | None, seed: int = 0, count: int = 8) -> list[int]:
    """Check the first `count` records of a source without decoding images: images (or frames) per record.

    Raises ConfigError naming the file and line (or row) of the first bad record, a missing path
    or image, or an unknown builtin.
    """
    count = count if limit is None else min(count, limit)
    if source.startswith(BUILTIN_PREFIX):
        return [len(sample.pictures()) for sample in builtin_samples(source, split, limit and count, seed)]
    path = Path(source)
    if path.is_dir():
        return [len(sample.images) for sample in saved_dataset_samples(path, split, count)]
    if not path.is_file():
        load_samples(source, split, limit, seed)  # raises, saying what a source may be
    counts = []
    for _, where, _, images in _jsonl_records(path, count):
        missing = [str(image) for image in images if not image.is_file()]
        if missing:
            raise ConfigError(f"{where}: no image file {', '.join(missing)}")
        counts.append(len(images))
    if not counts:
        raise ConfigError(f"dataset {path} has no samples")
    return counts
