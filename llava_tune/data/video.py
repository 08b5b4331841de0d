"""Videos as frames: a video file (decoded with PyAV) or a folder of frame images, sampled
uniformly to a fixed number of frames, as LLaVA-OneVision samples them."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from llava_tune.data.image import load_image
from llava_tune.errors import UserError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def sample_indices(total: int, frames: int) -> list[int]:
    """`frames` indices spread evenly over `total` frames, first and last included
    (numpy.linspace(0, total - 1, frames) truncated, as OneVision's loader does)."""
    if frames == 1:
        return [0]
    return [int(i * (total - 1) / (frames - 1)) for i in range(frames)]


def load_video(path: str | Path, frames: int) -> list[Image.Image]:
    """`frames` RGB frames of a video file or a folder of frames (sorted by name).

    Raises UserError naming the file when it does not decode or has fewer frames than asked
    (the sample is skipped and counted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        _check_count(path, len(files), frames)
        return [load_image(files[i]) for i in sample_indices(len(files), frames)]
    if not path.is_file():
        raise UserError(f"video {path} not found")
    try:
        import av
    except ImportError as err:
        raise UserError("reading video files needs PyAV: pip install av (or give a folder "
                        "of frames)") from err
    try:
        # Count first (the header's count, else the packets: no decoding), then decode only
        # up to the last frame wanted and keep the wanted ones: a long video never sits in
        # memory whole.
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        _check_count(path, total, frames)
        wanted = sample_indices(total, frames)
        kept: list[Image.Image] = []
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                kept += [frame.to_image().convert("RGB")] * wanted.count(index)
                if index >= wanted[-1]:
                    break
    except (av.error.FFmpegError, ValueError, IndexError) as err:
        raise UserError(f"video {path} cannot be decoded ({err}); replace or remove it") from err
    _check_count(path, len(kept), frames)
    return kept


def _check_count(path: Path, total: int, frames: int) -> None:
    if total < frames:
        raise UserError(f"video {path} has {total} frames, fewer than data.video_frames={frames}")
