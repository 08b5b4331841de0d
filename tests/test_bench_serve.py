"""scripts/bench_serve.py on the tiny finetune run: the real `llava-tune serve` under 1 and 3
clients, every answer checked against chat's, and the table it prints."""

from __future__ import annotations

import json

import bench_serve


def test_bench_serve_on_a_tiny_run(tiny_finetune_run, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert bench_serve.main([str(tiny_finetune_run), "--clients", "1", "3", "--requests", "6",
                             "--max-tokens", "4", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| chat, one at a time |" in table and "| serve, 3 clients |" in table
    results = json.loads(out.read_text())
    assert [r["clients"] for r in results["serve"]] == [1, 3]
    for result in results["serve"]:
        assert len(result["latencies"]) == 6 and not result["wrong"] and not result["errors"]
    assert results["chat"]["requests_per_s"] > 0
