"""What a backbone is, answered without building it: timm's answers cached per timm and torch version, so that
`recipe validate` on a backbone seen before imports neither timm nor torch - and a damaged cache changes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from framework import api, backbones
from framework.errors import RecipeError
from tests.conftest import REPO, tiny_recipe

PROBE = ("import runpy, sys\n"
         "sys.argv = ['recipe', 'validate', sys.argv[1]]\n"
         "try:\n    runpy.run_module('framework.cli', run_name='__main__')\n"
         "except SystemExit as e:\n    code = e.code\n"
         "print('imported:', sorted(m for m in ('torch', 'timm') if m in sys.modules), 'exit', code)\n")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))
    backbones._MEMO.clear()
    yield backbones.cache_file()
    backbones._MEMO.clear()


def _validate_in_a_fresh_process(recipe, cache_dir) -> str:
    env = {**os.environ, "RECIPE_CACHE": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", PROBE, str(recipe)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    return done.stdout


@pytest.mark.slow  # two fresh processes, the first a miss (~7 s)
def test_validate_on_a_backbone_seen_before_imports_neither_timm_nor_torch(tmp_path, cache):
    recipe = REPO / "recipes" / "quickstart.yaml"
    first = _validate_in_a_fresh_process(recipe, cache.parents[1])
    assert "imported: ['timm', 'torch'] exit 0" in first, first  # a miss: timm answers, once
    import timm

    facts = json.loads(cache.read_text())["facts"]["resnet10t"]
    cfg = timm.get_pretrained_cfg("resnet10t")  # what timm says, kept as plain values
    assert facts["input_size"] == list(cfg.input_size[1:]) and facts["mean"] == list(cfg.mean)
    second = _validate_in_a_fresh_process(recipe, cache.parents[1])
    assert "ok: " in second and "imported: [] exit 0" in second, second


def test_a_damaged_or_edited_cache_is_a_miss_and_is_written_again(tmp_path, cache):
    cache.parent.mkdir(parents=True)
    path = tiny_recipe(tmp_path)
    for damage in ("{not json", "[1, 2]", json.dumps({"facts": {"test_resnet": {"input_size": "big"}},
                                                      "sizes": {}}), "[" * 100_000):
        cache.write_text(damage)
        backbones._MEMO.clear()
        assert api.validate(path).image_size == (32, 32)
        facts = json.loads(cache.read_text())["facts"]["test_resnet"]
        assert backbones._sound_facts(facts)


def test_a_cached_refusal_is_the_same_located_error(tmp_path, cache):
    path = tiny_recipe(tmp_path)
    messages = []
    for _ in range(2):
        backbones._MEMO.clear()
        with pytest.raises(RecipeError) as e:
            api.validate(path, ["model.backbone=inception_v3"])
        messages.append(e.value.format())
    assert messages[0] == messages[1] and "inception_v3 cannot take 32x32 images" in messages[0]
    assert any(isinstance(v, str) for v in json.loads(cache.read_text())["sizes"].values())


def test_an_unknown_backbone_is_asked_of_timm_every_time(tmp_path, cache):
    with pytest.raises(RecipeError, match="unknown backbone 'resnet1OOt'.*resnet10t"):
        api.validate(tiny_recipe(tmp_path), ["model.backbone=resnet1OOt"])
    assert not cache.exists() or "resnet1OOt" not in json.loads(cache.read_text()).get("facts", {})
