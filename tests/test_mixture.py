"""Several files and mixtures as data.train (data/sources.py): a list is the concatenation, a
glob its sorted files, first:N / random:N / weights draw the documented counts (seeded), the
report has a line per source, every mistake is named at once, and a run trains on a
two-source mixture whose config.yaml reads back the same."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import LOGGED, run_cli, tiny_model

from llava_tune.config import (
    SourceConfig,
    absolute_paths,
    config_from_dict,
    config_to_yaml,
    load_config,
)
from llava_tune.data.datasets import ConversationDataset, PackedDataset
from llava_tune.data.image import ImageProcessor, load_image
from llava_tune.data.sampler import LengthGroupedSampler
from llava_tune.data.sources import resolve_sources, weighted_counts
from llava_tune.data.template import INTERNLM2_CHAT
from llava_tune.errors import UserError
from llava_tune.models.anyres import ImageLayout
from llava_tune.rundir import read_run_config

REPO = Path(__file__).resolve().parents[1]
LAYOUT = ImageLayout(tile=32, patches=2)
PROCESSOR = ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
REQUIRED = ["model.llm=/m", "run_dir=r"]


def _records(prefix: str, n: int, text_every: int = 3) -> list[dict]:
    """n records named prefix-i; every `text_every`-th is text-only, the others see image i."""
    records = []
    for i in range(n):
        record = {"id": f"{prefix}-{i}", "conversations": [
            {"from": "human", "value": f"What is shape {i}?"},
            {"from": "gpt", "value": f"It is shape number {i} of {prefix}." + " Yes." * (i % 4)}]}
        if i % text_every:
            record["image"] = f"train/{i % 64:06d}.png"
            record["conversations"][0]["value"] = "<image>\n" + record["conversations"][0]["value"]
        records.append(record)
    return records


def _write(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return str(path)


def _dataset(spec, tok, shapes_data: Path, seed: int = 0, **kwargs) -> ConversationDataset:
    sources = resolve_sources(spec, str(shapes_data / "images"))
    return ConversationDataset(sources, tok, INTERNLM2_CHAT, 256, image_processor=PROCESSOR,
                               layout=LAYOUT, seed=seed, **kwargs)


def _ids(dataset: ConversationDataset) -> list[str]:
    return [dataset[i]["id"] for i in range(len(dataset))]


def _rows(dataset: ConversationDataset) -> list:
    return [(item["id"], item["input_ids"].tolist(), item["labels"].tolist(),
             item["pixel_values"].tolist() if "pixel_values" in item else None)
            for item in (dataset[i] for i in range(len(dataset)))]


@pytest.fixture
def two_files(tmp_path) -> tuple[str, str]:
    return (_write(tmp_path / "a.json", _records("a", 10)),
            _write(tmp_path / "b.json", _records("b", 4)))


# --------------------------------------------------------------------------- what is drawn


def test_a_list_of_files_is_their_concatenation(tmp_path, two_files, image_tok, shapes_data):
    a, b = two_files
    both = _write(tmp_path / "both.json", _records("a", 10) + _records("b", 4))
    listed = _dataset([a, b], image_tok, shapes_data)
    one = _dataset(both, image_tok, shapes_data)
    assert len(listed) == 14
    assert _rows(listed) == _rows(one)
    assert listed.lengths() == one.lengths()
    assert listed.has_images() == one.has_images() and sum(listed.has_images()) == 6 + 2
    assert listed.image_paths() == one.image_paths()
    assert (listed.report.total, listed.report.kept) == (14, 14)
    assert [(s.name, s.kept, s.selected, s.rule) for s in listed.report.sources] == [
        (a, 10, 10, "all"), (b, 4, 4, "all")]
    # One file alone reports as it always did: no source lines.
    assert one.report.sources == [] and "source" not in one.report.summary()


def test_a_glob_is_its_files_sorted_as_one_source(tmp_path, image_tok, shapes_data):
    for name, n in (("part-2", 3), ("part-0", 5), ("part-1", 2)):
        _write(tmp_path / "shards" / f"{name}.json", _records(name, n))
    _write(tmp_path / "shards" / "other.json", _records("other", 2))
    globbed = _dataset(str(tmp_path / "shards" / "part-*.json"), image_tok, shapes_data)
    listed = _dataset([str(tmp_path / "shards" / f"part-{k}.json") for k in range(3)],
                      image_tok, shapes_data)
    assert _ids(globbed) == _ids(listed)
    assert _ids(globbed)[:2] == ["part-0-0", "part-0-1"] and len(globbed) == 10
    (source,) = globbed.report.sources
    assert (source.files, source.total, source.selected) == (3, 10, 10)
    assert "(3 files): 10 of 10 kept, all: 10 samples" in globbed.report.summary()


def test_first_and_random_draw_seeded_counts(two_files, image_tok, shapes_data):
    a, b = two_files
    spec = [{"path": a, "samples": "first:3"}, {"path": b, "samples": "random:2"}]
    mixture = [SourceConfig(**entry) for entry in spec]
    ds = _dataset(mixture, image_tok, shapes_data, seed=1)
    ids = _ids(ds)
    assert ids[:3] == ["a-0", "a-1", "a-2"]
    drawn = ids[3:]
    assert len(drawn) == 2 == len(set(drawn)) and all(i.startswith("b-") for i in drawn)
    assert _ids(_dataset(mixture, image_tok, shapes_data, seed=1)) == ids  # seeded
    others = {tuple(_ids(_dataset(mixture, image_tok, shapes_data, seed=s))[3:])
              for s in range(2, 8)}
    assert others - {tuple(drawn)}  # other seeds draw other pairs (6 of them tried)
    # A percentage of the usable samples, rounded up; random over a source draws each once.
    pct = [SourceConfig(a, samples="first:25%"), SourceConfig(a, samples="random:100%")]
    ids = _ids(_dataset(pct, image_tok, shapes_data))
    assert ids[:3] == ["a-0", "a-1", "a-2"] and sorted(ids[3:]) == sorted(f"a-{i}" for i in
                                                                          range(10))


def test_asking_for_more_than_a_source_has_takes_all_with_a_warning(two_files, image_tok,
                                                                     shapes_data):
    a, b = two_files
    ds = _dataset([SourceConfig(a, samples="all"), SourceConfig(b, samples="random:9")],
                  image_tok, shapes_data)
    assert len(ds) == 14 and sorted(_ids(ds)[10:]) == ["b-0", "b-1", "b-2", "b-3"]
    summary = ds.report.summary()
    assert "14 samples drawn from 2 sources:" in summary
    assert (f"{b}: 4 of 4 kept, random:9: 4 samples (warning: random:9 asks for 9 samples, "
            "it has 4 usable: all taken)") in summary


def test_weights_share_the_weighted_samples(two_files, image_tok, shapes_data):
    a, b = two_files
    ds = _dataset([SourceConfig(a, weight=1), SourceConfig(b, weight=3)], image_tok,
                  shapes_data, seed=3)
    # 14 samples shared 1 : 3 -> 3.5 and 10.5; the tie of remainders goes to the earlier.
    counts = Counter(i.split("-")[0] for i in _ids(ds))
    assert counts == {"a": 4, "b": 10}
    a_ids = [i for i in _ids(ds) if i.startswith("a-")]
    assert len(set(a_ids)) == 4  # below its size: without replacement
    per_b = Counter(i for i in _ids(ds) if i.startswith("b-"))
    assert sorted(per_b.values()) == [2, 2, 3, 3]  # 10 of 4: each twice, 2 more once more
    assert [(s.rule, s.selected) for s in ds.report.sources] == [("weight 1", 4),
                                                                 ("weight 3", 10)]
    assert _ids(_dataset([SourceConfig(a, weight=1), SourceConfig(b, weight=3)], image_tok,
                         shapes_data, seed=3)) == _ids(ds)


def test_weighted_counts_add_up_and_follow_the_weights():
    assert weighted_counts([10, 4], [1, 3]) == [4, 10]
    assert weighted_counts([100, 100, 100], [1, 1, 1]) == [100, 100, 100]
    assert weighted_counts([7, 0, 3], [2, 1, 1]) == [5, 3, 2]  # 5, 2.5, 2.5: tie to the earlier
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(1, 1000, size=4).tolist()
        weights = rng.uniform(0.01, 5, size=4).tolist()
        counts = weighted_counts(sizes, weights)
        assert sum(counts) == sum(sizes)
        exact = [sum(sizes) * w / sum(weights) for w in weights]
        assert all(abs(c - e) < 1 for c, e in zip(counts, exact, strict=True))


def test_sources_with_own_image_folders_and_a_shared_file(tmp_path, two_files, image_tok,
                                                          shapes_data):
    """Each source reads its images from its own folder; a file named twice is prepared
    once and counted once in the totals."""
    a, _ = two_files
    folder = tmp_path / "other-images"
    shutil.copytree(shapes_data / "images" / "train", folder / "train")
    # A different picture under the same name: the folder a sample reads from shows.
    shutil.copy(shapes_data / "images" / "train" / "000005.png", folder / "train" / "000001.png")
    mixture = [SourceConfig(a), SourceConfig(a, samples="first:2"),
               SourceConfig(a, image_folder=str(folder), samples="first:2")]
    ds = _dataset(mixture, image_tok, shapes_data, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("prepared-*"))) == 2  # a, and a with folder
    assert (ds.report.total, ds.report.kept, len(ds)) == (20, 20, 14)
    assert [s.total for s in ds.report.sources] == [10, 10, 10]
    default, own = ds[11], ds[13]  # a-1 from the first two sources, then from the third
    assert default["id"] == own["id"] == "a-1"
    assert (default["pixel_values"] == PROCESSOR(load_image(
        shapes_data / "images" / "train" / "000001.png"))).all()
    assert (own["pixel_values"] == PROCESSOR(load_image(folder / "train" / "000001.png"))).all()
    paths = ds.image_paths()
    assert (folder / "train" / "000001.png", "image") in paths
    assert (shapes_data / "images" / "train" / "000001.png", "image") in paths
    assert len(paths) == 6 + 1  # a's 6 images; a-1's under the other folder (a-0 has none)
    again = _dataset(mixture, image_tok, shapes_data, cache_dir=tmp_path / "cache")
    assert not again.prepared_here and _rows(again) == _rows(ds)


def test_packing_and_length_grouping_take_the_drawn_samples(two_files, image_tok, shapes_data):
    a, b = two_files
    ds = _dataset([SourceConfig(a, samples="first:5"), SourceConfig(b, weight=2)],
                  image_tok, shapes_data)
    assert len(ds) == 9 and len(ds.lengths()) == len(ds.has_images()) == 9
    assert ds.lengths() == [len(ds[i]["input_ids"]) for i in range(len(ds))]
    packed = PackedDataset(ds, 256, seed=0)
    assert sorted(i for group in packed.groups for i in group) == list(range(9))
    assert sum(len(packed[k]["input_ids"]) for k in range(len(packed))) == sum(ds.lengths())
    sampler = LengthGroupedSampler(ds.lengths(), ds.has_images(), 2, seed=0)
    assert sorted(sampler) == list(range(9))


# --------------------------------------------------------------------------- the config


MIXTURE_YAML = """\
stage: finetune
model: {llm: /m}
run_dir: r
data:
  train:
    - data/a.json
    - path: data/shards/*.json
      weight: 2.5
    - path: data/b.jsonl
      image_folder: images/b
      samples: random:10%
"""


def test_the_forms_load_override_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(MIXTURE_YAML)
    config = load_config(path)
    assert config.data.train == ["data/a.json", SourceConfig("data/shards/*.json", weight=2.5),
                                 SourceConfig("data/b.jsonl", "images/b", samples="random:10%")]
    # Back from the run dir's config.yaml (paths made absolute first, as a run saves them).
    saved = absolute_paths(config)
    again = config_from_dict(yaml.safe_load(config_to_yaml(saved)))
    assert again == saved
    assert again.data.train[1].path == str(Path("data/shards").resolve() / "*.json")
    # key=value: a file, a list, a mixture in YAML's flow style.
    assert load_config(None, [*REQUIRED, "data.train=a.json"]).data.train == "a.json"
    assert load_config(None, [*REQUIRED, "data.train=[a.json, 's/*.json']"]).data.train == [
        "a.json", "s/*.json"]
    flow = load_config(None, [*REQUIRED, "data.train=[{path: a.json, samples: 'first:5'}]",
                              "data.eval=[x.json, y.json]"])
    assert flow.data.train == [SourceConfig("a.json", samples="first:5")]
    assert flow.data.eval == ["x.json", "y.json"]


def test_every_value_problem_is_named_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("""\
model: {llm: /m}
run_dir: r
data:
  train:
    - {path: a.json, wieght: 2}
    - {path: b.json, weight: 0}
    - {path: c.json, weight: 1, samples: all}
    - {path: d.json, samples: sometimes}
    - {path: e.json, samples: "random:0"}
    - {path: f.json, samples: "first:150%"}
    - {image_folder: imgs}
    - 7
  eval: [{path: g.json, weight: -1}]
""")
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    for part in (
            "unknown key data.train[0].wieght (did you mean data.train[0].weight?)",
            "data.train[1] (b.json): weight=0 must be above 0",
            "data.train[2] (c.json): weight and samples are both set; give one",
            "data.train[3] (d.json): samples='sometimes': use all, first:N or random:N",
            "data.train[4] (e.json): samples='random:0': the count 0 must be at least 1",
            "data.train[5] (f.json): samples='first:150%': the percentage 150% must be above 0%",
            "data.train[6].path is not set",
            "data.train[7]=7 is not of type str | SourceConfig",
            "data.eval[0] (g.json): weight=-1 must be above 0"):
        assert part in message, f"{part!r} not in:\n{message}"


def test_every_file_problem_is_named_before_training(tmp_path, capsys, tiny_lm, tiny_vision,
                                                     shapes_data):
    a = _write(tmp_path / "a.json", _records("a", 4))
    (tmp_path / "folder").mkdir()
    (tmp_path / "not-a-folder").write_text("x")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": [
        a, str(tmp_path / "nothing-*.json"), str(tmp_path / "missing.json"),
        {"path": str(tmp_path / "folder")},
        {"path": a, "image_folder": str(tmp_path / "not-a-folder")},
        {"path": a, "image_folder": str(tmp_path / "no-such-folder")}],
        "eval": str(tmp_path / "eval-*.json")}}))
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", config, *tiny_model(tiny_lm, tiny_vision),
                             f"data.image_folder={shapes_data / 'images'}", f"run_dir={run}",
                             *LOGGED)
    assert code == 2 and err.startswith("error: cannot start training:") and \
        "Traceback" not in err
    for part in (f"data.train[1] glob {tmp_path / 'nothing-*.json'} matches no file",
                 f"data.train[2] file {tmp_path / 'missing.json'} not found",
                 f"data.train[3] {tmp_path / 'folder'} is a folder; give a JSON/JSONL file",
                 f"data.train[4] ({a}): image_folder {tmp_path / 'not-a-folder'} is not a folder",
                 f"data.train[5] ({a}): image_folder {tmp_path / 'no-such-folder'} not found",
                 f"data.eval glob {tmp_path / 'eval-*.json'} matches no file"):
        assert part in err, f"{part!r} not in:\n{err}"
    assert "data.train[0]" not in err and not run.exists()


# --------------------------------------------------------------------------- training


def test_a_run_trains_on_a_two_source_mixture(tmp_path, capsys, tiny_lm, tiny_vision,
                                              shapes_data):
    records = json.loads((shapes_data / "finetune.json").read_text())
    qa = _write(tmp_path / "qa.json", records[:24])
    text = _write(tmp_path / "text.json", json.loads((shapes_data / "text.json").read_text())[:8])
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "train": [{"path": qa, "samples": "random:12"}, {"path": text, "weight": 1}],
        "eval": [str(tmp_path / "q*.json"), text]}}))
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys, "train", config, "stage=finetune", *tiny_model(tiny_lm, tiny_vision),
        "model.quantization=4bit", "train.llm=lora", f"data.image_folder={shapes_data / 'images'}",
        f"run_dir={run}", *LOGGED, "data.max_length=128", "train.max_steps=2",
        "data.group_by_length=true")
    assert code == 0, err
    assert "20 samples drawn from 2 sources:" in err
    assert f"{qa}: 24 of 24 kept, random:12: 12 samples" in err
    assert f"{text}: 8 of 8 kept, weight 1: 8 samples" in err
    assert "eval data: 32 of 32 samples kept" in err
    saved = read_run_config(run)
    assert saved.data.train == [SourceConfig(qa, samples="random:12"),
                                SourceConfig(text, weight=1.0)]
    assert saved.data.eval == [str(tmp_path / "q*.json"), text]
    assert load_config(run / "config.yaml") == saved  # what train.resume=true reads
