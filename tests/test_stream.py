"""A folder of shards read as a stream (data/stream.py): every shard format gives the token ids
and pixels that the prepared file gives; the order is seeded; processes and workers read
disjoint shares whose union is the stream; packing keeps the samples; bad shards and records
are skipped and named; the run refuses what a stream cannot do and warns before the first
step when the stream is short; and a resumed run reads exactly what an uninterrupted one does."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import kill_launch, tiny_model

from llava_tune.config import check_paths, load_config
from llava_tune.data import stream as stream_module
from llava_tune.data.collate import Collator
from llava_tune.data.datasets import ConversationDataset
from llava_tune.data.image import ImageProcessor
from llava_tune.data.stream import BAD_SHARD, StreamDataset, StreamPosition
from llava_tune.data.template import INTERNLM2_CHAT
from llava_tune.errors import UserError
from llava_tune.models.anyres import ImageLayout
from llava_tune.training import events as ev
from llava_tune.training import train

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
LAYOUT = ImageLayout(tile=32, patches=2)
PROCESSOR = ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
ANYRES = ImageLayout(tile=32, patches=2, grids=((1, 2), (2, 1), (2, 2)))
ANYRES_PROCESSOR = ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), layout=ANYRES)
FORMATS = ("jsonl", "parquet", "arrow", "arrow-stream", "tar")


# --------------------------------------------------------------------------- data


def llava_records(shapes_data: Path) -> list[dict]:
    """16 image questions and 8 text-only conversations (LLaVA format), with ids."""
    images = json.loads((shapes_data / "finetune.json").read_text())[:16]
    text = json.loads((shapes_data / "text.json").read_text())[:8]
    return images + text


def openai_records(n: int = 6) -> list[dict]:
    return [{"id": f"oa-{i}", "messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"It is {2 * i}." + " Indeed." * (i % 3)}]}
        for i in range(n)]


def _table(records: list[dict]) -> pa.Table:
    """Records as a table: a column per key of any record, null where a record lacks it."""
    keys = list(dict.fromkeys(key for record in records for key in record))
    return pa.Table.from_pydict({key: [r.get(key) for r in records] for key in keys})


def write_shards(folder: Path, records: list[dict], kind: str, shards: int = 2,
                 images: Path | None = None) -> Path:
    """`records` cut into `shards` consecutive shards of one kind in `folder`; a .tar's
    samples hold their images (read from `images`)."""
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(records) // shards)
    for i in range(shards):
        part = records[i * size:(i + 1) * size]
        suffix = "arrow" if kind == "arrow-stream" else kind
        path = folder / f"part-{i:02d}.{suffix}"
        if kind == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
        elif kind == "parquet":
            pq.write_table(_table(part), path, row_group_size=5)
        elif kind in ("arrow", "arrow-stream"):
            table = _table(part)
            opener = pa.ipc.new_file if kind == "arrow" else pa.ipc.new_stream
            with opener(str(path), table.schema) as writer:
                writer.write_table(table, max_chunksize=4)
        else:
            with tarfile.open(path, "w") as tar:
                for j, record in enumerate(part):
                    key = f"{i:02d}-{j:04d}"
                    members = {f"{key}.json": json.dumps(record).encode()}
                    if "image" in record:
                        members[f"{key}.png"] = (images / record["image"]).read_bytes()
                    for name, data in members.items():
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return folder


def prepared(tmp_path: Path, records: list[dict], tok, images: Path, layout=LAYOUT,
             processor=PROCESSOR) -> dict[str, dict]:
    """The records prepared the normal way (one file per format), items by id."""
    by_format: dict[str, list[dict]] = {}
    for record in records:
        by_format.setdefault("messages" if "messages" in record else "llava", []).append(record)
    items = {}
    for name, part in by_format.items():
        file = tmp_path / f"prepared-{name}.json"
        file.write_text(json.dumps(part))
        dataset = ConversationDataset(file, tok, INTERNLM2_CHAT, 256, image_folder=images,
                                      image_processor=processor, layout=layout)
        items.update({item["id"]: item for item in (dataset[i] for i in range(len(dataset)))})
    return items


def stream(folder: Path, tok, images: Path | None = None, **kwargs) -> StreamDataset:
    kwargs.setdefault("image_processor", PROCESSOR)
    kwargs.setdefault("layout", LAYOUT)
    return StreamDataset(folder, tok, INTERNLM2_CHAT, kwargs.pop("max_length", 256),
                         image_folder=images, **kwargs)


def epoch(dataset: StreamDataset, number: int = 0, reader: int = 0) -> list[dict]:
    return list(dataset.iter_epoch(number, reader))


def ids(items: list[dict]) -> list[str]:
    return [i for item in items for i in item["id"].split("+")]


# --------------------------------------------------------------------------- same samples


@pytest.mark.parametrize("kind", FORMATS)
def test_every_shard_format_gives_the_prepared_samples(tmp_path, image_tok, shapes_data, kind):
    records = llava_records(shapes_data) + openai_records()
    images = shapes_data / "images"
    expected = prepared(tmp_path, records, image_tok, images)
    folder = write_shards(tmp_path / "shards", records, kind, shards=3, images=images)
    got = epoch(stream(folder, image_tok, images))
    assert sorted(ids(got)) == sorted(expected) and len(got) == len(records)
    for item in got:
        want = expected[item["id"]]
        assert item["input_ids"].tolist() == want["input_ids"].tolist(), item["id"]
        assert item["labels"].tolist() == want["labels"].tolist(), item["id"]
        assert ("pixel_values" in item) == ("pixel_values" in want), item["id"]
        if "pixel_values" in want:
            assert torch.equal(item["pixel_values"], want["pixel_values"]), item["id"]
            assert item["media"] == want["media"]


def test_a_tar_sample_with_its_images_in_anyres(tmp_path, image_tok, shapes_data):
    """anyres reads each image's size from its header: inside a .tar too."""
    records = llava_records(shapes_data)[:6]
    images = shapes_data / "images"
    expected = prepared(tmp_path, records, image_tok, images, ANYRES, ANYRES_PROCESSOR)
    folder = write_shards(tmp_path / "tar", records, "tar", images=images)
    got = epoch(stream(folder, image_tok, None, layout=ANYRES, image_processor=ANYRES_PROCESSOR))
    assert len(got) == 6
    for item in got:
        want = expected[item["id"]]
        assert item["input_ids"].tolist() == want["input_ids"].tolist()
        assert torch.equal(item["pixel_values"], want["pixel_values"])
        assert item["media"] == want["media"]


# --------------------------------------------------------------------------- order, split


@pytest.fixture
def jsonl_stream(tmp_path, tok):
    records = openai_records(40)
    folder = write_shards(tmp_path / "s", records, "jsonl", shards=4)
    return folder, [r["id"] for r in records]


def test_the_order_is_seeded(jsonl_stream, tok):
    folder, all_ids = jsonl_stream
    first = ids(epoch(stream(folder, tok, seed=0, shuffle_buffer=8)))
    assert first == ids(epoch(stream(folder, tok, seed=0, shuffle_buffer=8)))
    assert sorted(first) == sorted(all_ids) and first != all_ids
    assert ids(epoch(stream(folder, tok, seed=1, shuffle_buffer=8))) != first
    again = ids(epoch(stream(folder, tok, seed=0, shuffle_buffer=8), number=1))
    assert again != first and sorted(again) == sorted(all_ids)
    # A buffer of 1 keeps each shard's own order; only the shards' order is shuffled.
    plain = ids(epoch(stream(folder, tok, seed=0, shuffle_buffer=1)))
    shards = [plain[i:i + 10] for i in range(0, 40, 10)]
    assert sorted(shards) == [all_ids[i:i + 10] for i in range(0, 40, 10)]


@pytest.mark.parametrize("readers", [1, 2])
def test_processes_and_workers_read_disjoint_shares_of_the_whole(jsonl_stream, tok, readers):
    folder, all_ids = jsonl_stream
    shares = [ids(epoch(stream(folder, tok, rank=rank, world=2, readers=readers), reader=r))
              for rank in range(2) for r in range(readers)]
    seen = [i for share in shares for i in share]
    assert sorted(seen) == sorted(all_ids)  # disjoint (no id twice), and the whole stream
    assert all(len(share) == 40 // (2 * readers) for share in shares)


def test_packed_rows_hold_the_same_samples(tmp_path, image_tok, shapes_data, monkeypatch):
    """Packed, each window's samples go into rows best fit: every sample once, each row its
    samples laid end to end, and no more rows than filling them in arrival order takes."""
    monkeypatch.setattr(stream_module, "PACK_WINDOW", 7)  # windows of 7: 24 samples, 4 windows
    records = llava_records(shapes_data) + openai_records()
    images = shapes_data / "images"
    folder = write_shards(tmp_path / "s", records, "parquet", shards=3)
    plain = {item["id"]: item for item in epoch(stream(folder, image_tok, images))}
    rows = epoch(stream(folder, image_tok, images, pack=True, max_length=96))
    assert sorted(ids(rows)) == sorted(plain) and len(rows) < len(plain)
    for row in rows:
        assert len(row["input_ids"]) <= 96
        members = [plain[i] for i in row["id"].split("+")]
        assert torch.equal(row["input_ids"], torch.cat([m["input_ids"] for m in members]))
        assert torch.equal(row["labels"], torch.cat([m["labels"] for m in members]))
        assert row["position_ids"].tolist() == [
            p for m in members for p in range(len(m["input_ids"]))]
        pixels = [m["pixel_values"] for m in members if "pixel_values" in m]
        assert torch.equal(row["pixel_values"], torch.cat(pixels)) if pixels \
            else "pixel_values" not in row
    in_order, used = 0, 96  # rows filled in arrival order, a window at a time
    for start in range(0, len(plain), 7):
        used = 96
        for item in list(plain.values())[start:start + 7]:
            if used + len(item["input_ids"]) > 96:
                in_order, used = in_order + 1, 0
            used += len(item["input_ids"])
    assert len(rows) <= in_order


# --------------------------------------------------------------------------- resume


def _batches(dataset: StreamDataset, workers: int, n: int) -> list:
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=workers,
                                         collate_fn=Collator(0))
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("the stream ended")


@pytest.mark.parametrize(("workers", "pack"), [(0, False), (2, False), (2, True), (0, True)])
def test_a_position_resumes_the_same_sequence(jsonl_stream, tok, workers, pack, monkeypatch):
    """Through a DataLoader, its workers taking turns: the batches after a position are the
    same whether the stream went on or was started again there (across epochs too; packed,
    in the middle of a window too)."""
    folder, _ = jsonl_stream
    monkeypatch.setattr(stream_module, "PACK_WINDOW", 5)  # several windows an epoch

    def make():
        return stream(folder, tok, readers=workers, shuffle_buffer=8, pack=pack, max_length=64)

    whole = _batches(make(), workers, 30)
    position = StreamPosition.start(max(1, workers))
    for batch in whole[:13]:
        position.advance(batch.position)
    assert position.epoch >= 1 or not (pack and workers)  # two readers: half an epoch each
    assert not pack or any(rows for _, _, rows in position.readers)  # inside a window
    again = make()
    again.start = StreamPosition.from_list(position.as_list())
    resumed = _batches(again, workers, 17)
    assert [b.input_ids.tolist() for b in resumed] == [b.input_ids.tolist() for b in whole[13:]]


def test_a_checkpoint_from_before_packed_windows_resumes():
    """A checkpoint's positions without rows given (written before packed windows) start at
    the records taken, a window's first row."""
    assert StreamPosition.from_list([1, 0, 7, 2, 3], readers=2).readers == [(0, 7, 0),
                                                                           (2, 3, 0)]
    position = StreamPosition([(0, 7, 2), (2, 3, 0)], 1)
    assert StreamPosition.from_list(position.as_list(), readers=2) == position


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("pack", [False, True])
def test_bad_shards_and_records_are_skipped_named_and_counted(tmp_path, tok, pack,
                                                               monkeypatch):
    """Each left-out record reported once (packed: in windows of 3 samples, by the window's
    first row, or after the last item)."""
    monkeypatch.setattr(stream_module, "PACK_WINDOW", 3)
    records = openai_records(12)
    folder = write_shards(tmp_path / "s", records, "jsonl", shards=2)
    (folder / "broken.parquet").write_bytes(b"this is no parquet file")
    with open(folder / "part-00.jsonl", "a") as handle:
        handle.write('{"id": "cut", "messages": [\n')  # a line that does not parse
        handle.write('{"id": "nobody", "text": "no format"}\n')
    write_shards(tmp_path / "t", records[:2], "tar", shards=1)
    data = (tmp_path / "t" / "part-00.tar").read_bytes()
    (folder / "truncated.tar").write_bytes(data[:1600])  # its second sample cut short
    dataset = stream(folder, tok, image_processor=None, layout=None, pack=pack)
    # Known before the first step: the shard that does not open, named and counted.
    assert dataset.report.skipped == {BAD_SHARD: 1}
    assert "broken.parquet" in dataset.report.examples[0]
    assert "broken.parquet" in dataset.report.summary()
    items, rest = [], []
    sequence = dataset.iter_epoch(0)
    while True:
        try:
            items.append(next(sequence))
        except StopIteration as end:  # what was skipped after the last item comes back too
            rest = end.value[1]
            break
    skipped = [why for item in items for _, why in item["skipped"]] + [why for _, why in rest]
    assert sorted(ids(items)) == sorted([r["id"] for r in records] + ["oa-0"])
    assert any("broken.parquet" in why and BAD_SHARD in why for why in skipped), skipped
    assert any("truncated.tar" in why and BAD_SHARD in why for why in skipped), skipped
    assert any("line 7 is not valid JSON" in why for why in skipped), skipped
    assert any("match no known format" in why for why in skipped), skipped
    assert len(skipped) == 4


def test_what_a_stream_cannot_do_is_refused_before_anything_loads(tmp_path, tiny_lm):
    folder = write_shards(tmp_path / "s", openai_records(4), "jsonl")
    base = [f"model.llm={tiny_lm}", f"data.train={folder}", f"run_dir={tmp_path / 'run'}"]
    problems = check_paths(load_config(DEMO / "sft.yaml", base), needs_images=False)
    assert len(problems) == 1 and "set train.max_steps=N" in problems[0] and str(folder) in \
        problems[0]
    problems = check_paths(load_config(DEMO / "sft.yaml", [
        *base, "train.max_steps=2", "data.pack=false", "data.group_by_length=true"]), False)
    assert len(problems) == 1 and "data.group_by_length=false" in problems[0]
    with pytest.raises(UserError, match="set train.max_steps=N"):
        train(load_config(DEMO / "sft.yaml", base))
    assert not (tmp_path / "run").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.json").write_text("[]")
    with pytest.raises(UserError, match=r"no shards in it.*JSON lists: write them as JSONL"):
        train(load_config(DEMO / "sft.yaml", [*base, f"data.train={empty}",
                                              "train.max_steps=2"]))
    assert not (tmp_path / "run").exists()


def test_fewer_records_than_readers_is_an_error(tmp_path, tok):
    folder = write_shards(tmp_path / "s", openai_records(3), "jsonl", shards=1)
    with pytest.raises(UserError, match=r"holds 3 records, fewer than its 4 readers"):
        stream(folder, tok, world=2, readers=2)


# --------------------------------------------------------------------------- training


def sft_args(tiny_lm, folder, run_dir, *extra) -> list[str]:
    return [f"model.llm={tiny_lm}", f"data.train={folder}", f"run_dir={run_dir}",
            "train.lora.dropout=0", "train.log_every=1", "train.warmup_ratio=0",
            "data.max_length=128", "data.shuffle_buffer=6", "train.batch_size=2", *extra]


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa = load_file(a / "llm_adapter" / "adapter_model.safetensors")
    wb = load_file(b / "llm_adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-6, f"max weight difference {worst:.2e}"


class Crash(Exception):
    pass


@pytest.mark.parametrize("pack", [False, True])
def test_a_crashed_run_resumes_the_stream_exactly(tmp_path, tiny_lm, pack):
    """Two DataLoader workers, more than one epoch of a short stream, a crash after the
    checkpoint of step 9 (an odd number of batches: the second worker's batch is due next,
    and the first worker has finished its share of epoch 0): the resumed run trains on what
    the uninterrupted one did, step for step."""
    folder = write_shards(tmp_path / "s", openai_records(20), "jsonl", shards=3)
    extra = ["train.max_steps=14", "train.save_every=3", "data.num_workers=2", "train.lr=1e-3",
             f"data.pack={str(pack).lower()}", "data.max_length=48"]
    events: list = []
    straight = train(load_config(DEMO / "sft.yaml", sft_args(tiny_lm, folder, tmp_path / "a",
                                                             *extra)), on_event=events.append)
    assert isinstance(events[0], ev.Started) and "stream of 3 shards" in events[0].data.summary()
    assert json.loads((straight.run_dir / "metrics.jsonl").read_text().splitlines()[-1])[
        "epoch"] >= 1

    def crash_at_step_11(event):
        if isinstance(event, ev.Logged) and event.step == 11:
            raise Crash

    run = tmp_path / "b"
    with pytest.raises(Crash):
        train(load_config(DEMO / "sft.yaml", sft_args(tiny_lm, folder, run, *extra)),
              on_event=crash_at_step_11)
    state = json.loads((run / "checkpoints" / "step-0000009" / "state.json").read_text())
    assert state["stream"]["processes"] == 1 and state["stream"]["readers"] == 2
    assert state["stream"]["positions"][0][0] == 1  # the second reader's batch is next
    resumed = train(load_config(DEMO / "sft.yaml", sft_args(tiny_lm, folder, run, *extra,
                                                            "train.resume=true")))
    assert resumed.steps == 14
    assert losses(run) == pytest.approx(losses(straight.run_dir), abs=1e-6)
    assert_same_weights(straight.run_dir, run)


def test_a_short_stream_is_warned_about_before_the_first_step(tmp_path, tiny_lm):
    folder = write_shards(tmp_path / "s", openai_records(5), "jsonl", shards=1)
    events: list = []
    train(load_config(DEMO / "sft.yaml", sft_args(tiny_lm, folder, tmp_path / "run",
                                                  "train.max_steps=4", "data.pack=false")),
          on_event=events.append)
    assert isinstance(events[0], ev.Started)
    warnings = [n for n in events[0].notes if n.startswith("warning:")]
    assert warnings == ["warning: the stream holds 5 records, fewer than the 8 samples that "
                        "train.max_steps=4 takes (2 a batch x 1 accumulated x 1 processes): "
                        "it will be read again, each epoch in a new order; "
                        "train.max_steps=2 is one pass"]
    assert [e.step for e in events if isinstance(e, ev.Logged)] == [1, 2, 3, 4]
    # The stream went on into its second epoch.
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])[
        "epoch"] == 1


def _total_llm_flops(run_dir: Path) -> tuple[float, int]:
    """(LLM FLOPs, real tokens) of a run, added up over its metrics lines."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    return (sum(row["flops_per_token_llm"] * row["tokens"] for row in rows),
            sum(row["tokens"] for row in rows))


def test_a_packed_stream_counts_each_samples_flops(tmp_path, tiny_lm, tok):
    """metrics.jsonl of a run on a packed stream has the FLOPs keys (MFU too, given a peak),
    and the collator's per-sample lengths of its packed rows count attention sample by
    sample: one pass of the stream costs the FLOPs of one epoch of the same records unpacked
    from a file (a row's attention counted whole would cost more)."""
    records = openai_records(12)
    folder = write_shards(tmp_path / "s", records, "jsonl", shards=2)
    file = tmp_path / "all.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = epoch(stream(folder, tok, pack=True, max_length=128, shuffle_buffer=6))
    assert len(rows) < len(records)  # rows of several samples
    lengths = Collator(0)(rows).sample_lengths
    assert sorted(lengths) == sorted(
        len(item["input_ids"]) for item in epoch(stream(folder, tok, shuffle_buffer=6)))
    packed = train(load_config(DEMO / "sft.yaml", sft_args(
        tiny_lm, folder, tmp_path / "stream", "data.pack=true", "train.batch_size=1",
        f"train.max_steps={len(rows)}", "train.peak_tflops=1")))
    assert packed.steps == len(rows)
    lines = [json.loads(line) for line in (packed.run_dir / "metrics.jsonl").read_text()
             .splitlines()]
    assert lines and all(line["flops_per_token_llm"] > 0 and line["flops_per_token_vision"] == 0
                         and line["tflops"] > 0 and "mfu" in line for line in lines)
    plain = train(load_config(DEMO / "sft.yaml", sft_args(
        tiny_lm, file, tmp_path / "file", "data.pack=false", "train.batch_size=1",
        f"train.max_steps={len(records)}")))
    (stream_flops, stream_tokens), (file_flops, file_tokens) = (
        _total_llm_flops(packed.run_dir), _total_llm_flops(plain.run_dir))
    assert stream_tokens == file_tokens == sum(lengths)
    assert stream_flops == pytest.approx(file_flops, rel=1e-5)


def test_a_folder_is_a_stream_only_as_data_train_alone(tmp_path, tiny_lm):
    """A folder of shards inside a list or mixture, or as data.eval, is refused before
    anything loads, naming the item and saying that a stream cannot be a mixture's source."""
    folder = write_shards(tmp_path / "s", openai_records(4), "jsonl")
    file = tmp_path / "a.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in openai_records(4)))
    run = tmp_path / "run"
    for spec, where in ((f"[{file},{folder}]", "data.train[1]"),
                        (f"[{{path: {folder}, weight: 1}}, {file}]", "data.train[0]")):
        with pytest.raises(UserError) as err:
            train(load_config(DEMO / "sft.yaml", sft_args(tiny_lm, folder, run,
                                                          f"data.train={spec}",
                                                          "train.max_steps=2")))
        message = str(err.value)
        assert f"{where} {folder} is a folder; give a JSON/JSONL file" in message, message
        assert "a stream cannot be an item of a list or mixture" in message, message
    with pytest.raises(UserError) as err:
        train(load_config(DEMO / "sft.yaml", sft_args(tiny_lm, folder, run, f"data.eval={folder}",
                                                      "train.max_steps=2")))
    message = str(err.value)
    assert f"data.eval {folder} is a folder" in message and "only data.train" in message, message
    assert "data.train" not in message.replace("only data.train", ""), message  # the stream is fine
    assert not run.exists()


def test_finetune_on_a_tar_stream_with_images(tmp_path, tiny_lm, tiny_vision, shapes_data):
    images = shapes_data / "images"
    folder = write_shards(tmp_path / "s", llava_records(shapes_data), "tar", images=images)
    result = train(load_config(DEMO / "finetune.yaml", [
        *tiny_model(tiny_lm, tiny_vision), f"data.train={folder}", "data.image_folder=null",
        f"run_dir={tmp_path / 'run'}", "init_from=null", "train.max_steps=2",
        "train.batch_size=4", "data.max_length=64", "train.log_every=1",
        f"data.feature_cache={tmp_path / 'features'}"]))
    assert result.steps == 2 and (tmp_path / "run" / "COMPLETE").is_file()
    assert not result.skipped


# --------------------------------------------------------------------------- two processes


def torchrun(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", *args]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


@pytest.mark.slow
def test_two_processes_read_disjoint_shares_of_the_stream(tmp_path, tiny_lm):
    """Under torchrun, as the trainer sets it up: each process's loader (not accelerate's)
    reads its own share, and the two shares are the stream."""
    records = openai_records(30)
    folder = write_shards(tmp_path / "s", records, "jsonl", shards=3)
    script = tmp_path / "shares.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        from llava_tune.config import load_config
        from llava_tune.training.setup import setup
        config = load_config({str(DEMO / "sft.yaml")!r}, {sft_args(tiny_lm, folder,
                             tmp_path / "run", "train.max_steps=100")!r})
        run = setup(config)
        first = next(iter(run.loader))
        dataset = run.loader.dataset
        items = list(dataset.iter_epoch(0))
        out = {{"rank": run.accelerator.process_index,
               "ids": [i for item in items for i in item["id"].split("+")],
               "first": first.input_ids.tolist(),
               "expected": [i["input_ids"].tolist() for i in items[:2]],
               "loader": type(run.loader).__name__}}
        with open({str(tmp_path)!r} + f"/rank{{out['rank']}}.json", "w") as f:
            json.dump(out, f)
        run.close()
    """))
    proc = torchrun([str(script)])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    shares = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["rank"] for s in shares] == [0, 1]
    assert not set(shares[0]["ids"]) & set(shares[1]["ids"])
    assert sorted(shares[0]["ids"] + shares[1]["ids"]) == sorted(r["id"] for r in records)
    assert all(s["loader"] == "DataLoader" for s in shares)
    for share in shares:  # the loader's first batch is the first two of the share
        assert [row[:len(e)] for row, e in zip(share["first"], share["expected"],
                                               strict=True)] == share["expected"]


@pytest.mark.slow
def test_two_processes_resume_a_stream_after_kill(tmp_path, tiny_lm):
    """kill -9 after a checkpoint, resume: the same losses and weights as a run that was not
    killed (both with two processes: the share of each depends on their number)."""
    # Shards of 14, 14 and 12 records start at even places in every order, so the first
    # process reads the short records (even places: two a packed row, 10 rows an epoch) and
    # the second the long ones (one a row, 20): from step 5 on (2 rows a step) the first is
    # an epoch ahead, their positions differ, and each must get its own back.
    records = openai_records(40)
    for record in records[1::2]:
        record["messages"][1]["content"] += " It is the sum of the two numbers you gave." * 3
    folder = write_shards(tmp_path / "s", records, "jsonl", shards=3)
    extra = ["train.max_steps=40", "train.save_every=2", "data.pack=true", "data.max_length=100",
             "train.lr=1e-3"]
    straight = torchrun(["-m", "llava_tune", "--quiet", "train", str(DEMO / "sft.yaml"),
                         *sft_args(tiny_lm, folder, tmp_path / "straight", *extra)])
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]
    run = tmp_path / "killed"
    args = ["-m", "llava_tune", "--quiet", "train", str(DEMO / "sft.yaml"),
            *sft_args(tiny_lm, folder, run, *extra)]
    proc = torchrun(args)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-0000006").is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    kill_launch(proc)
    assert not (run / "COMPLETE").exists()
    newest = sorted((run / "checkpoints").iterdir())[-1]
    state = json.loads((newest / "state.json").read_text())
    assert state["step"] < 40
    first, second = state["stream"]["positions"]
    assert first != second, "the test needs positions that differ between the processes"
    again = torchrun([*args, "train.resume=true"])
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"step {state['step'] + 1}/40 " in err  # the resumed run trained the rest
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    assert losses(run) == pytest.approx(losses(tmp_path / "straight"), abs=2e-5)
    assert_same_weights(tmp_path / "straight", run)
