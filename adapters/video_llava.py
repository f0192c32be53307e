"""Video-LLaVA (`VideoLlavaForConditionalGeneration`): images and videos in one prompt.

Candidates: every image placeholder (`image_token_id`) and every video placeholder
(`video_token_id`). A video of T frames fills T * (1 + H * W) placeholders, frame after frame; each
frame's run starts with the vision tower's class token (the model keeps it for videos whatever
`vision_feature_select_strategy` says), then its H x W patch grid, row-major.

Segments, numbered per sample in prompt order:
- a video is two segments: its patch volume, extent (T, H, W) with coords (t, row, col), t the frame
  index within the video; and its class-token column, extent (T, 1, 1) with coords (t, 0, 0).
  One segment spans the whole video so that `uniform` strides over frames as well as rows and columns;
- an image is its H x W patch grid, extent (1, H, W); with `vision_feature_select_strategy="full"`
  its leading class token is a one-cell segment of its own, extent (1, 1, 1).

The i-th image (video) of the batch fills the i-th run of image (video) placeholders. `generate`
encodes the media first and passes only `mm_encoder_outputs`: images are then counted from the
encoded features, and the frames per video (the same for every video of a batch, as the model's
`pixel_values_videos` [videos, T, C, H, W] requires) are the largest count that divides every
contiguous run of video placeholders. Videos placed back to back with nothing between them read
as one longer video there only when every run holds the same number of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tokenprune.contracts.adapter import VisionTower
from tokenprune.contracts.layout import Segment, VisualLayout, grid_coords, placeholder_runs, run_lengths
from tokenprune.errors import InputError

from .llava import LlavaAdapter


class VideoLlavaAdapter(LlavaAdapter):
    """Adapter for Video-LLaVA models: one patch volume and one class-token column per video."""

    name = "video_llava"
    model_types = ("video_llava",)

    def vision_towers(self) -> tuple[VisionTower, ...]:
        """The image tower (class token dropped unless "full") and the video tower (frames keep theirs)."""
        config, model = self.model.config, self.base_model()
        full = config.vision_feature_select_strategy == "full"
        towers = (
            self.clip_tower(model.image_tower, config.image_token_id, keeps_prefix=full),
            self.clip_tower(model.video_tower, config.video_token_id, keeps_prefix=True, modality="video"),
        )
        return tuple(tower for tower in towers if tower is not None)

    def visual_layout(self, inputs: dict[str, Any]) -> VisualLayout | None:
        inputs = _renamed_image_pixels(inputs)
        images, videos = self.has_images(inputs), self.has_videos(inputs)
        if not (images or videos):
            return None  # a decode step, or text only: a generated placeholder id is text
        input_ids = self.input_ids(inputs)
        segments = self._image_layout(inputs, input_ids) if images else []
        if videos:
            segments += self._video_layout(inputs, input_ids)
        return VisualLayout.from_segments(*input_ids.shape, _in_prompt_order(segments), input_ids.device)

    @staticmethod
    def has_videos(inputs: dict[str, Any]) -> bool:
        """Whether this forward carries videos (pixels, or features pre-encoded by `generate`)."""
        encoded = inputs.get("mm_encoder_outputs") or {}
        return inputs.get("pixel_values_videos") is not None or encoded.get("video") is not None

    def image_segments(
        self, inputs: dict[str, Any], image: int, sample: int, positions: Tensor
    ) -> list[Segment]:
        side = self.patch_side()
        grid = positions[-side * side :]
        segments = [Segment(sample, grid, grid_coords(side, side), (1, side, side))]
        if len(positions) == side * side + 1:  # "full": the class token leads the image
            segments.insert(0, Segment(sample, positions[:1], grid_coords(1, 1), (1, 1, 1)))
        elif len(positions) != side * side:
            raise InputError(f"an image has {len(positions)} tokens, its {side}x{side} patch grid {side**2}")
        return segments

    def video_segments(self, sample: int, positions: Tensor, frames: int) -> list[Segment]:
        """The patch volume and the class-token column of one video whose placeholders sit at `positions`."""
        side = self.patch_side()
        per_frame = positions.view(frames, 1 + side * side)
        volume = torch.cat([grid_coords(side, side, frame=t) for t in range(frames)])
        return [
            Segment(sample, per_frame[:, 0], _column_coords(frames), (frames, 1, 1)),
            Segment(sample, per_frame[:, 1:].reshape(-1), volume, (frames, side, side)),
        ]

    def frames_per_video(self, inputs: dict[str, Any], placeholders: Tensor) -> list[int]:
        """Frame count of each video of the batch, in order."""
        pixels = inputs.get("pixel_values_videos")
        if pixels is not None:
            return [pixels.shape[1]] * pixels.shape[0]
        encoded = inputs["mm_encoder_outputs"]["video"].pooler_output  # [videos * T, tokens per frame, D]
        per_frame = self.tokens_per_frame()
        runs = run_lengths(placeholders)
        if encoded.shape[1] != per_frame or not runs or any(n % per_frame for n in runs):
            raise InputError(
                f"video placeholder runs of {runs} tokens are not whole frames of {per_frame} tokens "
                f"(encoded frames: {encoded.shape[1]} tokens)"
            )
        frames = math.gcd(*(n // per_frame for n in runs))
        return [frames] * (encoded.shape[0] // frames)

    def tokens_per_frame(self) -> int:
        """Placeholders of one video frame: the class token and the patch grid."""
        return 1 + self.patch_side() ** 2

    def _image_layout(self, inputs: dict[str, Any], input_ids: Tensor) -> list[Segment]:
        placeholders = input_ids == self.model.config.image_token_id
        runs = placeholder_runs(placeholders, self.tokens_per_image(inputs, placeholders))
        return [
            segment
            for image, (sample, positions) in enumerate(runs)
            for segment in self.image_segments(inputs, image, sample, positions)
        ]

    def _video_layout(self, inputs: dict[str, Any], input_ids: Tensor) -> list[Segment]:
        placeholders = input_ids == self.model.config.video_token_id
        frames = self.frames_per_video(inputs, placeholders)
        runs = placeholder_runs(placeholders, [t * self.tokens_per_frame() for t in frames])
        return [
            segment
            for (sample, positions), t in zip(runs, frames, strict=True)
            for segment in self.video_segments(sample, positions, t)
        ]


def _renamed_image_pixels(inputs: dict[str, Any]) -> dict[str, Any]:
    """The images under `pixel_values`, also when given by their deprecated name `pixel_values_images`."""
    if inputs.get("pixel_values") is None and inputs.get("pixel_values_images") is not None:
        return {**inputs, "pixel_values": inputs["pixel_values_images"]}
    return inputs


def _column_coords(frames: int) -> Tensor:
    """[T, 3] coords (t, 0, 0) of one token per frame."""
    coords = torch.zeros(frames, 3, dtype=torch.long)
    coords[:, 0] = torch.arange(frames)
    return coords


def _in_prompt_order(segments: list[Segment]) -> list[Segment]:
    """Segments sorted by sample, then by their first token: images and videos numbered as they appear."""
    if not segments:
        return segments
    starts = torch.stack([seg.positions[0] for seg in segments]).tolist()  # one host sync
    order = sorted(range(len(segments)), key=lambda i: (segments[i].sample, starts[i]))
    return [segments[i] for i in order]
