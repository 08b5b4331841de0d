"""Videos as frames: records with `<video>`, decoding and sampling, OneVision's pooling, and
a video sample through train, chat and eval."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from helpers import SMALL, run_cli
from PIL import Image
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from llava_tune.assembly.model import load_run
from llava_tune.config import load_config
from llava_tune.data.collate import Collator
from llava_tune.data.formats import read_conversations
from llava_tune.data.video import load_video, sample_indices
from llava_tune.errors import UserError
from llava_tune.models.anyres import ImageLayout, Media, pool_frames
from llava_tune.training import train
from llava_tune.training.setup import build_dataset, build_for_training

DEMO = Path(__file__).parent.parent / "configs" / "demo"
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}


def write_frames(folder: Path, colors: list[str], size: int = 32) -> Path:
    folder.mkdir(parents=True)
    for i, color in enumerate(colors):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        image.paste(COLORS[color], (8, 8, 24, 24))
        image.save(folder / f"frame_{i:03d}.png")
    return folder


def write_mp4(path: Path, colors: list[str], size: int = 32) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for color in colors:
            frame = np.full((size, size, 3), 255, np.uint8)
            frame[8:24, 8:24] = COLORS[color]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_markers_become_image_slots_in_order(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([
        {"id": "a", "image": "x.png", "video": "clip", "conversations": [
            {"from": "human", "value": "<video>\nThen <image>\nWhat changed?"},
            {"from": "gpt", "value": "The color."}]},
        {"id": "b", "video": "clip", "conversations": [
            {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "c", "conversations": [
            {"from": "human", "value": "<video>\nWhat color?"}, {"from": "gpt", "value": "Red."}]},
    ]))
    result = read_conversations(path)
    (record,) = result.records
    assert record["images"] == ["clip", "x.png"] and record["kinds"] == ["video", "image"]
    assert record["messages"][0]["content"] == "<image>\nThen <image>\nWhat changed?"
    problems = {p.record_id: p.message for p in result.problems}
    assert "0 <video> marker(s) but 1 video(s)" in problems["b"]
    assert "1 <video> marker(s) but 0 video(s)" in problems["c"]


def test_frames_are_sampled_evenly_from_folders_and_files(tmp_path):
    assert sample_indices(10, 4) == [0, 3, 6, 9] and sample_indices(5, 1) == [0]
    colors = ["red", "red", "blue", "blue", "green", "green"]
    folder = write_frames(tmp_path / "clip", colors)
    frames = load_video(folder, 3)
    assert [f.getpixel((16, 16)) for f in frames] == [COLORS["red"], COLORS["blue"],
                                                       COLORS["green"]]
    video = write_mp4(tmp_path / "clip.mp4", colors)
    decoded = load_video(video, 3)
    assert len(decoded) == 3 and decoded[0].size == (32, 32)
    for frame, color in zip(decoded, ["red", "blue", "green"], strict=True):
        assert np.abs(np.array(frame.getpixel((16, 16))) - COLORS[color]).max() < 40


def test_bad_videos_name_the_file(tmp_path):
    folder = write_frames(tmp_path / "short", ["red", "blue"])
    with pytest.raises(UserError, match=r"short has 2 frames, fewer than data.video_frames=4"):
        load_video(folder, 4)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video at all")
    with pytest.raises(UserError, match="broken.mp4 cannot be decoded"):
        load_video(broken, 2)
    with pytest.raises(UserError, match="missing.mp4 not found"):
        load_video(tmp_path / "missing.mp4", 2)


def test_pooling_matches_onevision():
    """Each frame's map pooled 2 x 2 bilinearly, frames in turn, one newline at the end:
    transformers' LlavaOnevision (apply_pooling, then the newline) on the same features."""
    layout = ImageLayout(tile=112, patches=7, grids=((1, 2),), video_frames=3)
    torch.manual_seed(0)
    features = torch.randn(3, 49, 6)
    newline = torch.randn(6)
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=112, patch_size=16))
    theirs = LlavaOnevisionModel.apply_pooling(SimpleNamespace(config=config), features)
    theirs = torch.cat([theirs.reshape(-1, 6), newline[None]])
    ours = pool_frames(features, layout, newline)
    assert ours.shape == (layout.video_tokens(), 6) == (3 * 16 + 1, 6)
    torch.testing.assert_close(ours, theirs)
    assert pool_frames(features, ImageLayout(112, 7, video_frames=3), None).shape == (48, 6)


@pytest.fixture(scope="module")
def video_data(tmp_path_factory) -> Path:
    """Clips of a square changing color, asked the last color; one clip is too short."""
    out = tmp_path_factory.mktemp("video")
    records = []
    for i in range(12):
        first, last = ["red", "blue", "green"][i % 3], ["blue", "green", "red"][i % 3]
        write_frames(out / "clips" / str(i), [first, first, last, last])
        records.append({"id": str(i), "video": f"clips/{i}", "conversations": [
            {"from": "human", "value": "<video>\nWhat color is the shape at the end?"},
            {"from": "gpt", "value": f"It is {last}."}]})
    write_frames(out / "clips" / "short", ["red"])
    records.append({"id": "short", "video": "clips/short", "conversations": [
        {"from": "human", "value": "<video>\nWhat color is the shape at the end?"},
        {"from": "gpt", "value": "It is red."}]})
    (out / "train.json").write_text(json.dumps(records))
    return out


def overrides(stage_overrides, data: Path, run: str, *extra: str) -> list[str]:
    return [*stage_overrides("finetune", run), *SMALL, "data.max_length=128", "init_from=null",
            f"data.train={data / 'train.json'}", f"data.image_folder={data}",
            "data.video_frames=4", *extra]


@pytest.mark.parametrize("aspect", ["pad", "anyres"])
def test_video_samples_count_pooled_frames_and_skip_bad_clips(stage_overrides, video_data,
                                                              aspect):
    config = load_config(DEMO / "finetune.yaml", overrides(
        stage_overrides, video_data, aspect, f"model.image_aspect={aspect}"))
    bundle, _ = build_for_training(config, device="cpu")
    layout = bundle.model.layout
    dataset = build_dataset(config, bundle, config.data.train)
    # 4 frames of 2 x 2 patches, each pooled to 1 x 1; anyres ends them with its newline.
    assert layout.video_tokens() == 4 + (aspect == "anyres")
    item = dataset[0]
    assert item["media"] == [Media("video", frames=4)]
    assert item["pixel_values"].shape == (4, 3, 32, 32)
    assert int((item["input_ids"] == -200).sum()) == layout.video_tokens()
    short = dataset[len(dataset) - 1]
    assert short["id"] == "short" and "fewer than data.video_frames=4" in short["error"]
    batch = Collator(bundle.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    assert [sid for sid, _ in batch.skipped] == ["short"]
    with torch.no_grad():
        out = bundle.model(**batch.model_inputs())
    assert torch.isfinite(out.loss_sum)


def test_a_video_run_chats_and_evaluates(stage_overrides, video_data, tmp_path, capsys):
    run = train(load_config(DEMO / "finetune.yaml", overrides(
        stage_overrides, video_data, "chat", "train.max_steps=2",
        "model.image_aspect=anyres"))).run_dir
    bundle = load_run(run, device="cpu")
    assert bundle.model.layout.video_frames == 4  # the run's own setting
    clip = video_data / "clips" / "0"
    code, out, err = run_cli(capsys, "chat", run, "--video", clip, "--question",
                             "What color is the shape at the end?", "--max-new-tokens", "4",
                             "--no-stream")
    assert code == 0, err
    assert out.strip()
    code, _, err = run_cli(capsys, "chat", run, "--video", video_data / "clips" / "short",
                           "--question", "What color?")
    assert code == 2 and "fewer than data.video_frames=4" in err
    results = tmp_path / "eval.jsonl"
    code, out, err = run_cli(capsys, "eval", run, "--data", video_data / "train.json",
                             "--image-folder", video_data, "--max-new-tokens", "4",
                             "--out", results)
    assert code == 0, err
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 12  # the short clip is skipped, named
    assert "short" in err and "fewer than data.video_frames=4" in err


def test_video_features_are_cached_per_frame(stage_overrides, video_data, tmp_path):
    """With the tower frozen, a clip's frames are encoded once into the feature cache."""
    cache = tmp_path / "features"
    config = load_config(DEMO / "finetune.yaml", overrides(
        stage_overrides, video_data, "cached", "train.max_steps=1", f"data.feature_cache={cache}"))
    train(config)
    entries = list(cache.rglob("*.safetensors"))
    assert len(entries) == 12  # every clip but the short one, whose frames cannot be read
    from safetensors.torch import load_file

    assert load_file(entries[0])["features"].shape == (4, 4, 64)  # frames x patches x width
