"""scripts/bench_data.py: the LLaVA-665K-like data it writes (streaming, a pool of images),
its target lines, and one end-to-end run (slow)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import bench_data
import pytest

from llava_tune.constants import IMAGE_TOKEN

# --------------------------------------------------------------------------- the data


def test_records_come_in_chunks_with_pool_images_and_unique_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_data, "CHUNK", 1000)  # 2,500 records: three chunks
    path = tmp_path / "mix.json"
    assert bench_data.write_records(path, bench_data.pool_records(2500, seed=0, pool=7)) == 2500
    records = json.loads(path.read_text())  # one valid JSON list
    assert len(records) == 2500
    assert len({r["id"] for r in records}) == 2500
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    text_only = [r for r in records if "image" not in r]
    assert abs(len(text_only) / 2500 - 1 / 3) < 0.01
    assert all(r["id"].endswith("-text") for r in text_only)
    for i, r in enumerate(records):
        assert r["id"].startswith(f"mix-{i:07d}-")
        if "image" in r:  # record i shows pool image i % pool
            assert r["image"] == f"{i % 7:06d}.jpg"
            assert r["conversations"][0]["value"].count(IMAGE_TOKEN) == 1
    assert {r["image"] for r in records if "image" in r} == {f"{k:06d}.jpg" for k in range(7)}
    turns = Counter(len(r["conversations"]) // 2 for r in records)
    assert set(turns) == set(range(1, 9))
    # The chunks are different draws, not one chunk repeated.
    assert records[0]["conversations"] != records[1000]["conversations"]


def test_data_is_deterministic_per_seed_and_reused(tmp_path):
    a, seconds = bench_data.ensure_data(tmp_path / "a", 300, seed=1, pool=5)
    b, _ = bench_data.ensure_data(tmp_path / "b", 300, seed=1, pool=5)
    c, _ = bench_data.ensure_data(tmp_path / "c", 300, seed=2, pool=5)
    assert seconds is not None and seconds < 5
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    again, seconds = bench_data.ensure_data(tmp_path / "a", 300, seed=1, pool=5)
    assert again == a and seconds is None  # present: not written again


def test_pool_images_are_written_once(tmp_path):
    folder = bench_data.ensure_pool(tmp_path, 3, seed=0)
    assert sorted(p.name for p in folder.glob("*.jpg")) == ["000000.jpg", "000001.jpg", "000002.jpg"]
    stamp = (folder / "000000.jpg").stat().st_mtime_ns
    assert bench_data.ensure_pool(tmp_path, 3, seed=0) == folder
    assert (folder / "000000.jpg").stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------- one run


FAKE_TRAINER = """
import json, pathlib, sys, time
metrics = pathlib.Path(sys.argv[1]) / "metrics.jsonl"
time.sleep(0.4)
metrics.parent.mkdir(parents=True)
out = open(metrics, "w")  # setup done: the file exists, empty
time.sleep(0.4)
for step, wait in ((1, 0.5), (2, 0.25)):
    out.write(json.dumps({"step": step, "data_seconds": wait}) + "\\n"); out.flush()
    time.sleep(0.4)
"""


def test_a_run_is_timed_from_outside(tmp_path):
    run_dir = tmp_path / "run"
    run = bench_data.run_once("fake", [sys.executable, "-c", FAKE_TRAINER, str(run_dir)],
                              dict(os.environ), run_dir, tmp_path / "logs" / "fake.log")
    assert 0.4 <= run["ready_s"] < run["first_step_s"] - 0.3
    assert run["first_step_s"] < run["wall_s"] - 0.5
    assert run["data_seconds"] == [0.5, 0.25] and run["data_s_per_step"] == 0.25
    assert 0 < run["setup_rss_mb"] <= run["peak_rss_mb"] and run["polls"] >= 10


def test_a_failed_run_raises_with_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('boom: the reason'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="(?s)exit 3.*boom: the reason"):
        bench_data.run_once("bad", command, dict(os.environ), tmp_path / "run",
                            tmp_path / "logs" / "bad.log")


# --------------------------------------------------------------------------- targets


def _row(n: int, cold_s: float, warm_s: float, added: float, data_s: float) -> bench_data.Row:
    run = {"first_step_s": cold_s, "setup_rss_added_mb": added, "rss_added_mb": added + 1000}
    return bench_data.Row(n=n, file="x", json_mb=1.0, generate_s=None, cold=run,
                          warm={**run, "first_step_s": warm_s}, data_s_per_step=data_s)


def test_targets_for_665k_and_the_data_time():
    checks = bench_data.check_targets([_row(1000, 10, 5, 0, 0.10),
                                       _row(665_000, 500, 70, 1500, 0.20)])
    met = {c["target"].split(",")[0].split(" at ")[0]: c["met"] for c in checks}
    assert met == {"cold start to the first step": True, "warm start to the first step": False,
                   "data RSS added": False,  # setup peaks met, whole-run peaks (2500) not
                   "data s/step": False}  # 0.20 > 0.10 + max(25%, 0.05 s)
    assert [c["met"] for c in checks if "RSS" in c["target"]] == [True, False]
    # Without N=665000 only the data time is judged; 0.05 s is the floor of the tolerance.
    checks = bench_data.check_targets([_row(1000, 10, 5, 0, 0.01), _row(3000, 10, 5, 9, 0.055)])
    assert len(checks) == 1 and checks[0]["met"] and checks[0]["limit"] == pytest.approx(0.06)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_data.main(["0"])
    assert "must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cold_and_warm_runs_are_measured(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert bench_data.main(["300", "--work", str(tmp_path / "work"), "--steps", "2",
                            "--pool", "20", "--share", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["n"] for row in result["rows"]] == [1000, 300]  # the baseline first
    assert result["settings"]["cpu_count"] >= 1 and result["settings"]["date"]
    for row in result["rows"]:
        assert row["json_mb"] > 0 and row["data_s_per_step"] > 0
        for phase in ("cold", "warm"):
            run = row[phase]
            assert 0 < run["ready_s"] <= run["first_step_s"] <= run["wall_s"]
            assert 0 < run["setup_rss_mb"] <= run["peak_rss_mb"]
            assert run["peak_anon_mb"] > 0 and run["peak_file_mb"] > 0
            assert run["tree_peak_rss_mb"] > 0
            assert len(run["data_seconds"]) == 2 and run["data_s_per_step"] > 0
            assert "rss_added_mb" in run and "setup_rss_added_mb" in run
    base = result["rows"][0]
    assert base["cold"]["rss_added_mb"] == base["warm"]["setup_rss_added_mb"] == 0
    # The warm run found the cold run's prepared data.
    assert list((tmp_path / "work" / "cache-300").glob("prepared-*/table/*.arrow"))
    # --share: of two processes on one cold cache, one prepared and the other mapped it.
    first, second = result["share"]
    assert (first["prepared_here"], second["prepared_here"]) == (True, False)
    assert first["samples"] == second["samples"] > 0
    printed = capsys.readouterr().out
    assert "(baseline)" in printed and "data s/step at N=1000" in printed
