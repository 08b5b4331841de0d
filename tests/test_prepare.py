"""A data file prepared once (data/prepare.py): the streaming reader gives what reading the
whole file gave, errors included; a warm start reads no record; workers, processes and a
missing image that appears later all give the same table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llava_tune.data import formats, prepare
from llava_tune.data.datasets import ConversationDataset
from llava_tune.data.image import ImageProcessor
from llava_tune.data.template import INTERNLM2_CHAT
from llava_tune.errors import UserError
from llava_tune.models.anyres import ImageLayout

REPO = Path(__file__).resolve().parents[1]
LAYOUT = ImageLayout(tile=32, patches=2)
PROCESSOR = ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# --------------------------------------------------------------------------- the reader

FILES = {
    "records": '[{"a": 1}, {"b": [1, 2, {"c": "x,]"}]}, 3, "s", 12345678]',
    "spaces": '\n\n  [ \n{"a": 1}\n ,\n{"b": 2}\n ]  \n',
    "trailing comma": '[{"a": 1},\n {"b": 2},\n]',
    "missing comma": '[{"a": 1}\n {"b": 2}]',
    "bad value": '[{"a": 1},\n {"b": tru}]',
    "unterminated": '[{"a": 1},\n {"b": "abc',
    "extra data": '[{"a": 1}] x',
    "empty list": "[]",
    "empty": "  \n ",
    "jsonl with a bad line": '{"a": 1}\n\n{"b": 2\n{"c": 3}\n',
    "jsonl after blank lines": '\n\n{"a": 1}\n{"b": 2}\n',
    "one object on lines": '{\n "conversations": []\n}\n',
    "a wrapper": '{"data": [{"conversations": []}]}',
    "unicode": '[{"a": "\u00e9\u4e2d"}, {"b": "\U0001F600"}]',
    "long": "[" + ",".join('{"k": "%s"}' % ("x" * i) for i in range(60)) + "]",
}


def _whole(path: Path):
    try:
        raws, problems = formats.read_json_records(path)
    except UserError as err:
        return "error", str(err)
    return ([None if r is None else json.dumps(r) for r in raws],
            sorted((p.index, p.message) for p in problems))


def _streamed(path: Path):
    try:
        records = list(formats.iter_raw_records(path))
    except UserError as err:
        return "error", str(err)
    return ([None if r.text is None else json.dumps(json.loads(r.text)) for r in records],
            sorted((r.index, r.problem) for r in records if r.problem))


@pytest.mark.parametrize("chunk", [3, 7, 64, 1 << 20])
def test_streaming_reads_what_reading_whole_read(tmp_path, monkeypatch, chunk):
    """Chunks of 3 bytes cut every record, number, string and multi-byte character somewhere:
    the records, and every error's wording, line and column, are those of json.loads."""
    monkeypatch.setattr(formats, "CHUNK_BYTES", chunk)
    files = {name: text.encode() for name, text in FILES.items()}
    files["not utf-8"] = b'[{"a": 1},\n {"b": "\xff"}]'
    for name, data in files.items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(data)
        assert _streamed(path) == _whole(path), name


# --------------------------------------------------------------------------- the dataset


def _records(n: int, image: str = "train/000000.png") -> list[dict]:
    return [{"id": f"r{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the shape?"},
        {"from": "gpt", "value": "It is red." if i % 2 else "It is a rather blue circle."}]}
        for i in range(n)] + [{"id": "text", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]


def _dataset(file: Path, tok, shapes_data: Path, **kwargs) -> ConversationDataset:
    return ConversationDataset(file, tok, INTERNLM2_CHAT, 256, image_folder=shapes_data / "images",
                               image_processor=PROCESSOR, layout=LAYOUT, **kwargs)


def _rows(dataset: ConversationDataset) -> list:
    return [(item["id"], item["input_ids"].tolist(), item["labels"].tolist())
            for item in (dataset[i] for i in range(len(dataset)))]


def test_a_warm_start_reads_no_record(tmp_path, image_tok, shapes_data, monkeypatch):
    file = tmp_path / "d.json"
    file.write_text(json.dumps(_records(6)))
    first = _dataset(file, image_tok, shapes_data, cache_dir=tmp_path / "cache")
    assert first.prepared_here
    assert first.lengths() == [len(first[i]["input_ids"]) for i in range(len(first))]
    assert first.has_images() == [True] * 6 + [False]

    def nothing_read(*args, **kwargs):
        raise AssertionError("a warm start read the data file")

    monkeypatch.setattr(formats, "iter_raw_records", nothing_read)
    monkeypatch.setattr(prepare, "iter_raw_records", nothing_read)
    again = _dataset(file, image_tok, shapes_data, cache_dir=tmp_path / "cache")
    assert not again.prepared_here
    assert _rows(again) == _rows(first)
    assert again.report == first.report


def test_workers_give_the_same_table_and_report(tmp_path, image_tok, shapes_data):
    records = _records(40)
    records[3]["image"] = "nowhere.png"  # a bad record among them, counted the same
    file = tmp_path / "d.json"
    file.write_text(json.dumps(records))
    one = _dataset(file, image_tok, shapes_data, num_proc=1, max_bad_fraction=0.1)
    two = _dataset(file, image_tok, shapes_data, num_proc=2, max_bad_fraction=0.1)
    assert _rows(two) == _rows(one)
    assert two.report == one.report
    assert one.report.skipped == {"bad record": 1} and "nowhere.png" in one.report.examples[0]


def test_an_image_that_appears_later_is_looked_up_again(tmp_path, image_tok, shapes_data):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes((shapes_data / "images/train/000000.png").read_bytes())
    records = _records(30, image="a.png")
    records[0]["image"] = "late.png"
    file = tmp_path / "d.json"
    file.write_text(json.dumps(records))
    kwargs = dict(image_folder=folder, image_processor=PROCESSOR, layout=LAYOUT,
                  cache_dir=tmp_path / "cache", max_bad_fraction=0.1)
    before = ConversationDataset(file, image_tok, INTERNLM2_CHAT, 256, **kwargs)
    assert len(before) == 30 and before.report.skipped == {"bad record": 1}
    (folder / "late.png").write_bytes((folder / "a.png").read_bytes())
    after = ConversationDataset(file, image_tok, INTERNLM2_CHAT, 256, **kwargs)
    assert after.prepared_here and len(after) == 31 and not after.report.skipped


def test_too_many_bad_records_is_an_error_warm_too(tmp_path, image_tok, shapes_data):
    records = _records(4)
    records[1]["image"] = "nowhere.png"
    file = tmp_path / "d.json"
    file.write_text(json.dumps(records))
    for _ in range(2):  # cold, then from the cache: the same error
        with pytest.raises(UserError, match=r"1 of 5 records in .* cannot be used:\n.*record 1 "
                           r"\(id 'r1'\): image 'nowhere.png' not found"):
            _dataset(file, image_tok, shapes_data, cache_dir=tmp_path / "cache")
    assert len(_dataset(file, image_tok, shapes_data, cache_dir=tmp_path / "cache",
                        max_bad_fraction=0.5)) == 4


def test_two_processes_prepare_once_and_share(tmp_path, tiny_lm, shapes_data):
    """The ranks of a launch start together: one prepares, the other waits and reads it."""
    file = tmp_path / "d.json"
    file.write_text(json.dumps(_records(200)))
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from llava_tune.assembly.llm import load_tokenizer
        from llava_tune.data.template import add_image_token
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_prepare import _dataset, _rows
        from pathlib import Path
        tok = load_tokenizer({str(tiny_lm)!r})
        add_image_token(tok)
        ds = _dataset(Path({str(file)!r}), tok, Path({str(shapes_data)!r}),
                      cache_dir={str(tmp_path / "cache")!r})
        print(json.dumps({{"built": ds.prepared_here, "rows": _rows(ds)[:3], "n": len(ds)}}))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["rows"] == results[1]["rows"] and results[0]["n"] == 201
    prepared = list((tmp_path / "cache").glob("prepared-*"))
    assert len(prepared) == 1 and not list((tmp_path / "cache").glob(".prepared-*tmp*"))
