"""Metrics per data source: a model trained on several sources is scored on each (the run output, metrics.jsonl,
TensorBoard via the flat metric names, and the compare sheet)."""
from __future__ import annotations

import json

import pytest

from framework import api
from framework.review.compare import sheet
from tests.conftest import tiny_manifest, tiny_recipe


@pytest.mark.slow
def test_validation_is_broken_down_by_source(tmp_path):
    tiny_manifest(tmp_path / "chandrikadeb7.csv", per_class=10, dataset="chandrikadeb7_mask2")
    recipe = tiny_recipe(tmp_path, train={"epochs": 3, "batch_size": 8, "num_workers": 0})
    import yaml
    data = yaml.safe_load(recipe.read_text())
    data["data"]["sources"].append({"type": "csv", "allow_outside_root": True, "name": "chandrikadeb7",
                                    "manifest": "chandrikadeb7.csv", "group_column": "group"})
    data["checkpoint"] = {"monitor": "val/source/maskon/macro_f1"}  # keep the epoch that is best on one source
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    lines = []
    run = api.run(recipe, name="two", log=lines.append)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    mine = [r["val"]["sources"]["maskon"]["macro_f1"] for r in records]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_metric"] == "val/source/maskon/macro_f1"
    assert summary["best_value"] == max(mine) and summary["best_epoch"] == mine.index(max(mine)) + 1
    record = records[summary["best_epoch"] - 1]  # the kept epoch: what the compare sheet reports
    sources = record["val"]["sources"]
    assert set(sources) == {"maskon", "chandrikadeb7"}
    with open(run / "split.csv", encoding="utf-8") as f:
        val = [ln for ln in f.read().splitlines()[1:] if ln.endswith(",val") or ",val," in ln]
    assert sum(s["images"] for s in sources.values()) == len(val)
    assert set(sources["chandrikadeb7"]["class_f1"]) <= {"wear", "not_wear"}  # classes it has
    assert any("[by source: " in ln and "chandrikadeb7" in ln for ln in lines)
    cols, rows = sheet([run])
    assert "val/source/chandrikadeb7/macro_f1" in cols
    assert rows[0]["val/source/maskon/macro_f1"] == sources["maskon"]["macro_f1"]
