"""Reading conversation files, the dataset's checks and truncation, images, the collator.

(Over 400 lines: one file per module under test, llava_tune/data/.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_tune.assembly.llm import load_tokenizer
from llava_tune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_tune.data.collate import Collator
from llava_tune.data.datasets import ConversationDataset
from llava_tune.data.formats import read_conversations
from llava_tune.data.image import ImageProcessor, expand_to_square, load_image
from llava_tune.data.template import INTERNLM2_CHAT
from llava_tune.errors import UserError
from llava_tune.models.anyres import ImageLayout

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
N_IMG = 4  # image slots per image
LAYOUT = ImageLayout(tile=32, patches=2)  # pad: N_IMG slots per image


@pytest.fixture(scope="module")
def processor():
    return ImageProcessor(32, MEAN, STD)


def rec(rid, human="<image>\nWhat color is the shape?", gpt="It is red.",
        image="train/000000.png", **extra):
    record = {"id": rid, "conversations": [{"from": "human", "value": human},
                                           {"from": "gpt", "value": gpt}], **extra}
    if image is not None:
        record["image"] = image
    return record


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def dataset(file, tok, processor, shapes_data, **kwargs):
    kwargs.setdefault("max_length", 256)
    return ConversationDataset(file, tok, INTERNLM2_CHAT, image_folder=shapes_data / "images",
                               image_processor=processor, layout=LAYOUT, **kwargs)


# --------------------------------------------------------------------------- formats


def test_read_shapes_finetune(shapes_data):
    result = read_conversations(shapes_data / "finetune.json")
    assert result.problems == []
    assert len(result.records) == 128
    raw = json.loads((shapes_data / "finetune.json").read_text())[0]
    first = result.records[0]
    assert first == {
        "id": raw["id"], "images": [raw["image"]], "kinds": ["image"],
        "messages": [{"role": "user", "content": raw["conversations"][0]["value"]},
                     {"role": "assistant", "content": raw["conversations"][1]["value"]}],
    }


def test_read_text_records_and_roles(tmp_path):
    path = write_json(tmp_path / "t.json", [
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "a"}, {"from": "user", "value": "q2"},
                           {"from": "assistant", "value": "a2"}]},
        {"id": 7, "image": ["x.png", "y.png"],
         "conversations": [{"from": "human", "value": "<image><image> two"},
                           {"from": "gpt", "value": "ok"}]},
    ])
    result = read_conversations(path)
    assert result.problems == []
    first, second = result.records
    assert first["id"] == "0" and first["images"] == []  # id defaults to the index
    assert [m["role"] for m in first["messages"]] == [
        "system", "user", "assistant", "user", "assistant"]
    assert second["id"] == "7" and second["images"] == ["x.png", "y.png"]


BAD_RECORDS = [
    (rec("speaker", human="hi", image=None) | {"conversations": [
        {"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
     "unknown speaker 'bot'; use human or gpt"),
    (rec("no-gpt", human="hi", image=None) | {"conversations": [{"from": "human", "value": "hi"}]},
     "has no assistant (gpt) turn"),
    (rec("too-many", human="<image>\n<image>\nhi"),
     "has 2 <image> marker(s) but 1 image(s); put one <image> in the text per image"),
    (rec("too-few", human="hi"),
     "has 0 <image> marker(s) but 1 image(s); put one <image> in the text per image"),
    (rec("order", image=None) | {"conversations": [{"from": "gpt", "value": "a"},
                                                   {"from": "human", "value": "q"}]},
     "message 0 has role 'assistant' where 'user' was expected"),
    (rec("no-conv", image=None) | {"conversations": []}, "has no 'conversations' list"),
    (rec("bad-turn", image=None) | {"conversations": [{"from": "human"}]},
     "a turn is not {'from': ..., 'value': ...}"),
]


def test_every_bad_record_is_named_with_file_index_id_and_fix(tmp_path):
    good = rec("good", image=None, human="q")
    records = [good]
    for record, _ in BAD_RECORDS:
        records += [record, good]
    records.append(["not", "an", "object"])
    path = write_json(tmp_path / "mixed.json", records)
    result = read_conversations(path)
    assert len(result.records) == len(BAD_RECORDS) + 1
    assert len(result.problems) == len(BAD_RECORDS) + 1
    assert result.indices == list(range(0, len(records) - 1, 2))  # file positions of the good
    for k, ((record, fix), problem) in enumerate(zip(BAD_RECORDS, result.problems, strict=False)):
        index = 2 * k + 1
        assert (problem.index, problem.record_id) == (index, record["id"])
        assert str(problem) == f"{path} record {index} (id {record['id']!r}): {problem.message}"
        assert fix in problem.message
    last = result.problems[-1]
    assert str(last) == f"{path} record {len(records) - 1}: is not a JSON object"


def test_jsonl_bad_line_is_its_own_problem(tmp_path):
    lines = [json.dumps(rec("a", image=None, human="q")), "", "{\"id\": \"b\", oops",
             json.dumps(rec("c", image=None, human="q"))]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = read_conversations(path)
    assert [r["id"] for r in result.records] == ["a", "c"]
    (problem,) = result.problems
    assert problem.index == 1 and problem.record_id is None
    assert str(problem).startswith(f"{path} record 1: line 3 is not valid JSON")


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(f"data file {path} is empty")):
        read_conversations(path)


def test_invalid_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"id": "a",\n  "conversations": []\n ,\n')
    with pytest.raises(UserError) as err:
        read_conversations(path)
    message = str(err.value)
    assert message.startswith(f"{path} is not valid JSON (line ")
    assert "write it as JSONL" in message


def test_missing_data_file(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"data file {tmp_path / 'x.json'} not found")):
        read_conversations(tmp_path / "x.json")


# --------------------------------------------------------------------------- dataset


def test_shapes_items(shapes_data, image_tok, sp, processor):
    ds = dataset(shapes_data / "finetune.json", image_tok, processor, shapes_data)
    assert len(ds) == 128
    assert (ds.report.total, ds.report.kept, ds.report.truncated) == (128, 128, 0)
    assert not ds.report.skipped
    raw = json.loads((shapes_data / "finetune.json").read_text())
    for index in (0, 5):
        item = ds[index]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert item["id"] == raw[index]["id"]
        slots = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
        # "<s><|im_start|>user\n" then the image's N slots, contiguous.
        start = [sp.bos_id(), sp.piece_to_id("<|im_start|>"), *sp.encode("user\n")]
        assert ids[: len(start)] == start
        assert slots == list(range(len(start), len(start) + N_IMG))
        assert all(labels[i] == IGNORE_INDEX for i in slots)
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert image_tok.decode(trained) == raw[index]["conversations"][1]["value"] + "<|im_end|>"
        # Outside the slots, the ids are the plain template encoding.
        messages = [{"role": "user", "content": raw[index]["conversations"][0]["value"]},
                    {"role": "assistant", "content": raw[index]["conversations"][1]["value"]}]
        plain, plain_labels = INTERNLM2_CHAT.encode(messages, image_tok)
        image_id = image_tok.convert_tokens_to_ids("<image>")
        assert plain.count(image_id) == 1
        at = plain.index(image_id)
        assert ids == plain[:at] + [IMAGE_TOKEN_INDEX] * N_IMG + plain[at + 1:]
        assert labels == plain_labels[:at] + [IGNORE_INDEX] * N_IMG + plain_labels[at + 1:]
        expected_pixels = processor(load_image(shapes_data / "images" / raw[index]["image"]))
        assert item["pixel_values"].shape == (1, 3, 32, 32)
        assert torch.equal(item["pixel_values"], expected_pixels)
    assert ds.lengths()[0] == len(ds[0]["input_ids"])


def test_text_only_dataset_without_vision(shapes_data, tiny_lm):
    tok = load_tokenizer(tiny_lm)
    vocab = tok.get_vocab()
    ds = ConversationDataset(shapes_data / "text.json", tok, INTERNLM2_CHAT, max_length=512)
    assert len(ds) == 200
    item = ds[0]
    assert set(item) == {"id", "input_ids", "labels"}
    assert IMAGE_TOKEN_INDEX not in item["input_ids"].tolist()
    assert tok.get_vocab() == vocab  # the dataset leaves the tokenizer as it was


def many_records(n: int) -> list[dict]:
    return [rec(f"ok-{i}", image=f"train/{i % 64:06d}.png") for i in range(n)]


def test_few_bad_records_are_skipped_and_counted(tmp_path, shapes_data, image_tok, processor):
    records = many_records(100)
    records[10] = rec("speaker") | {"conversations": [{"from": "robot", "value": "x"}]}
    records[20] = rec("lost", image="train/missing.png")
    path = write_json(tmp_path / "data.json", records)
    ds = dataset(path, image_tok, processor, shapes_data, max_bad_fraction=0.05)
    assert len(ds) == 98
    assert (ds.report.total, ds.report.kept) == (100, 98)
    assert ds.report.skipped == {"bad record": 2}
    ids = list(ds.table["id"])
    assert "lost" not in ids and "speaker" not in ids and ids[10] == "ok-11"
    examples = "\n".join(ds.report.examples)
    assert f"{path} record 10 (id 'speaker'): unknown speaker 'robot'" in examples
    assert (f"{path} record 20 (id 'lost'): image 'train/missing.png' not found under image "
            f"folder {shapes_data / 'images'}") in examples
    assert "98 of 100 samples kept" in ds.report.summary()


def test_too_many_bad_records_raise_listing_them(tmp_path, shapes_data, image_tok, processor):
    records = many_records(100)
    records[3] = rec("lost", image="train/missing.png")
    records[7] = rec("no-answer") | {"conversations": [{"from": "human", "value": "<image>"}]}
    path = write_json(tmp_path / "data.json", records)
    with pytest.raises(UserError) as err:
        dataset(path, image_tok, processor, shapes_data, max_bad_fraction=0.01)
    message = str(err.value)
    assert f"2 of 100 records in {path} cannot be used" in message
    assert f"{path} record 7 (id 'no-answer'): has no assistant (gpt) turn" in message
    assert f"{path} record 3 (id 'lost'): image 'train/missing.png' not found" in message
    assert "check data.image_folder" in message
    assert "up to 1% bad records are skipped" in message


def test_image_record_without_vision_is_a_problem(tmp_path, shapes_data, image_tok):
    path = write_json(tmp_path / "d.json", [rec("img")] + [rec(f"t{i}", image=None, human="q")
                                                           for i in range(3)])
    with pytest.raises(UserError, match="record 0 \\(id 'img'\\): has an image, but this stage"):
        ConversationDataset(path, image_tok, INTERNLM2_CHAT, max_length=64)


def test_max_length_truncates_text_and_drops_cut_images(tmp_path, shapes_data, image_tok,
                                                        processor):
    long_answer = " ".join(["It is a red circle."] * 8)
    records = [
        rec("short"),
        rec("long-answer", gpt=long_answer),
        rec("late-image", human="a red circle " * 12 + "<image>"),
        rec("long-question", human="a red circle " * 16, gpt="Red.", image=None),
    ]
    path = write_json(tmp_path / "d.json", records)
    full = dataset(path, image_tok, processor, shapes_data, max_length=1024)
    lengths = dict(zip(full.table["id"], full.lengths(), strict=True))
    assert full.report.truncated == 0 and len(full) == 4
    max_length = lengths["short"] + 4
    # The fixtures must make the cases what their names say.
    assert lengths["long-answer"] > max_length and lengths["late-image"] > max_length
    late = full[2]["input_ids"].tolist()
    assert late.index(IMAGE_TOKEN_INDEX) + N_IMG > max_length
    long_q = full[3]
    first_label = next(i for i, t in enumerate(long_q["labels"].tolist()) if t != IGNORE_INDEX)
    assert first_label >= max_length

    ds = dataset(path, image_tok, processor, shapes_data, max_length=max_length)
    assert list(ds.table["id"]) == ["short", "long-answer"]
    assert ds.report.truncated == 1
    assert ds.report.skipped == {"an image does not fit in max_length": 1,
                                 "no answer within max_length": 1}
    assert (ds.report.total, ds.report.kept) == (4, 2)
    cut = ds[1]
    assert len(cut["input_ids"]) == max_length
    assert cut["input_ids"].tolist() == full[1]["input_ids"].tolist()[:max_length]
    assert cut["labels"].tolist() == full[1]["labels"].tolist()[:max_length]
    assert (cut["input_ids"] == IMAGE_TOKEN_INDEX).sum() == N_IMG
    assert ds.lengths() == [lengths["short"], max_length]
    assert any("late-image" in e for e in ds.report.examples)


def test_nothing_usable_is_an_error(tmp_path, shapes_data, image_tok, processor):
    path = write_json(tmp_path / "d.json", [rec("late", human="a red circle " * 8 + "<image>")])
    with pytest.raises(UserError, match=re.escape(f"no usable samples in {path}")):
        dataset(path, image_tok, processor, shapes_data, max_length=16)


# --------------------------------------------------------------------------- collator


def test_collator_pads_right_and_stacks_images(tmp_path, shapes_data, image_tok, processor):
    records = [rec("a"), rec("b", gpt="It is a red circle, a nice one.", image="train/000001.png"),
               rec("c", human="no image here", image=None)]
    path = write_json(tmp_path / "d.json", records)
    ds = dataset(path, image_tok, processor, shapes_data)
    items = [ds[0], ds[1], ds[2]]
    batch = Collator(pad_token_id=image_tok.pad_token_id)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch.skipped == []
    assert batch.input_ids.shape == (3, max(lengths))
    assert batch.input_ids.dtype == torch.long
    for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
        assert torch.equal(batch.input_ids[row, :n], item["input_ids"])
        assert torch.equal(batch.labels[row, :n], item["labels"])
        assert (batch.input_ids[row, n:] == image_tok.pad_token_id).all()
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (max(lengths) - n)
    assert batch.num_tokens == sum(lengths)
    # Label tokens as the causal shift counts them: position 0 never carries one.
    assert batch.num_label_tokens == sum(int((item["labels"][1:] != IGNORE_INDEX).sum())
                                         for item in items)
    assert batch.pixel_values.shape == (2, 3, 32, 32)
    assert torch.equal(batch.pixel_values[0], items[0]["pixel_values"][0])
    assert torch.equal(batch.pixel_values[1], items[1]["pixel_values"][0])
    text_only = Collator(image_tok.pad_token_id)([ds[2]])
    assert text_only.pixel_values is None


def test_unreadable_image_becomes_a_skipped_entry(tmp_path, shapes_data, image_tok, processor):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "good.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    path = write_json(tmp_path / "d.json", [rec("good", image="good.png"),
                                            rec("bad", image="corrupt.png")])
    ds = ConversationDataset(path, image_tok, INTERNLM2_CHAT, 256, image_folder=folder,
                             image_processor=processor, layout=LAYOUT)
    assert len(ds) == 2  # the file exists, so it only fails when decoded
    bad = ds[1]
    assert set(bad) == {"id", "error"} and bad["id"] == "bad"
    assert str(folder / "corrupt.png") in bad["error"] and "cannot be read" in bad["error"]
    batch = Collator(image_tok.pad_token_id)([ds[0], bad])
    assert batch.skipped == [("bad", bad["error"])]
    assert batch.input_ids.shape[0] == 1 and batch.pixel_values.shape[0] == 1
    assert torch.equal(batch.input_ids[0], ds[0]["input_ids"])
    # A batch whose every sample failed still has a row (one token, no loss), so that every
    # process of a multi-process run runs the same forward and backward.
    alone = Collator(image_tok.pad_token_id)([bad])
    assert alone.skipped == [("bad", bad["error"])]
    assert alone.input_ids.shape == (1, 1) and alone.num_tokens == 0
    assert alone.num_label_tokens == 0 and (alone.labels == IGNORE_INDEX).all()
    assert alone.pixel_values is None


# --------------------------------------------------------------------------- images


def test_expand_to_square_pads_with_fill_and_centers():
    red, fill = (200, 10, 10), (1, 2, 3)
    wide = Image.new("RGB", (5, 2), red)
    square = expand_to_square(wide, fill)
    assert square.size == (5, 5)
    rows = [[square.getpixel((x, y)) for x in range(5)] for y in range(5)]
    assert rows[0] == [fill] * 5
    assert rows[1] == rows[2] == [red] * 5
    assert rows[3] == rows[4] == [fill] * 5

    tall = Image.new("RGB", (2, 6), red)
    square = expand_to_square(tall, fill)
    assert square.size == (6, 6)
    cols = [[square.getpixel((x, y)) for y in range(6)] for x in range(6)]
    assert cols[0] == cols[1] == cols[4] == cols[5] == [fill] * 6
    assert cols[2] == cols[3] == [red] * 6

    same = Image.new("RGB", (3, 3), red)
    assert expand_to_square(same, fill) is same


def test_image_processor_normalizes_and_pads_with_mean():
    proc = ImageProcessor(4, MEAN, STD)
    # Truncated, as LLaVA's expand2square and transformers' LlavaImageProcessor do.
    assert proc.fill == tuple(int(255 * m) for m in MEAN)
    white = Image.new("RGB", (4, 2), (255, 255, 255))
    out = proc(white)[0]  # one square: [1, 3, S, S]
    assert out.shape == (3, 4, 4) and out.dtype == torch.float32
    mean, std = torch.tensor(MEAN)[:, None], torch.tensor(STD)[:, None]
    padded = (torch.tensor(proc.fill, dtype=torch.float32)[:, None] / 255 - mean) / std
    inside = (1 - mean) / std
    for row in (0, 3):
        torch.testing.assert_close(out[:, row], padded.expand(3, 4), atol=1e-5, rtol=0)
        assert out[:, row].abs().max() < 1 / 255 / min(STD)  # the mean color: about zero
    for row in (1, 2):
        torch.testing.assert_close(out[:, row], inside.expand(3, 4), atol=1e-5, rtol=0)
    # Grayscale input becomes RGB; resizing keeps a solid color solid.
    gray = proc(Image.new("L", (8, 8), 255))[0]
    torch.testing.assert_close(gray, inside[:, :, None].expand(3, 4, 4), atol=1e-5, rtol=0)


def test_load_image_errors(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"image {tmp_path / 'none.png'} not found")):
        load_image(tmp_path / "none.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(UserError, match=re.escape(f"image {bad} cannot be read")):
        load_image(bad)
