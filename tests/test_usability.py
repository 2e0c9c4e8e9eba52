"""What a newcomer meets first: short error messages, save errors that name the target,
a warning when a PEFT adapter loaded for inference is converted, the benchmarks' fresh output
directory. The docs' snippets run in tests/test_docs.py."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn

import fastlora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tiny(nn.Module):
    """Two blocks with q/v projections and an MLP: 8 linear layers, 4 distinct leaf names."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8),
                           "up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})
            for _ in range(2)
        )

    def forward(self, x):
        for b in self.blocks:
            x = b["down"](torch.relu(b["up"](b["q_proj"](x) + b["v_proj"](x))))
        return x


@pytest.mark.parametrize("target", [["query", "value"], "blocks\\.\\d+\\.query"], ids=["list", "regex"])
def test_no_match_error_is_one_line_with_the_leaf_names(target):
    with pytest.raises(ValueError) as info:
        fastlora.apply_lora(Tiny(), target)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.endswith("its 8 nn.Linear layers are named (last part): down, q_proj, up, v_proj")
    assert "blocks.0" not in msg  # no full names
    assert len(msg) < 200


def test_save_adapter_into_a_file_path_names_the_target(tmp_path):
    model = fastlora.apply_lora(Tiny(), ["q_proj"], r=2)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    target = blocker / "adapter"
    with pytest.raises(OSError, match=re.escape(f"save_adapter: cannot write the adapter to {str(target)!r}")):
        fastlora.save_adapter(model, target)


def test_save_adapter_safetensors_error_is_wrapped(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: /tmp/.tmpXYZ: I/O error")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    model = fastlora.apply_lora(Tiny(), ["q_proj"], r=2)
    with pytest.raises(OSError, match=r"cannot write the adapter to '.*out'.*SafetensorError") as info:
        fastlora.save_adapter(model, tmp_path / "out")
    assert isinstance(info.value.__cause__, safetensors.SafetensorError)


def test_save_adapter_other_errors_pass_through(tmp_path, monkeypatch):
    import safetensors.torch

    def bug(*args, **kwargs):
        raise KeyError("not an I/O problem")

    monkeypatch.setattr(safetensors.torch, "save_file", bug)
    with pytest.raises(KeyError):
        fastlora.save_adapter(fastlora.apply_lora(Tiny(), ["q_proj"], r=2), tmp_path / "out")


def _peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Tiny()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)
    peft.get_peft_model(base, cfg).save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    return peft, Tiny()  # the same base weights again


def test_from_peft_warns_on_an_inference_mode_adapter(tmp_path):
    peft, base = _peft_adapter(tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path))  # is_trainable=False
    with pytest.warns(UserWarning, match=r"4 of 4 layers are frozen \(the adapter was loaded with "
                                         r"inference_mode=True.*is_trainable=True"):
        model = fastlora.from_peft(loaded)
    assert fastlora.trainable_parameters(model)[0] == 0


def test_from_peft_trainable_adapter_gives_no_warning(tmp_path, recwarn):
    peft, base = _peft_adapter(tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path), is_trainable=True)
    x = torch.randn(5, 8)
    expected = loaded(x).detach()
    model = fastlora.from_peft(loaded)
    assert not [w for w in recwarn if "frozen" in str(w.message)]
    assert fastlora.trainable_parameters(model)[0] == 4 * 2 * (2 * 8)
    # docs/models.md's wording: equal up to float32 rounding (summation order), not bitwise
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_benchmarks_default_out_is_a_fresh_directory(tmp_path, monkeypatch):
    """``python -m benchmarks`` without --out never touches the committed benchmarks/results/."""
    from benchmarks import run

    committed = os.path.join(ROOT, "benchmarks", "results", "results_cpu.json")
    before = os.path.getmtime(committed) if os.path.exists(committed) else None
    monkeypatch.chdir(tmp_path)
    argv = ["--device", "cpu", "--shapes", "32x48", "--m", "8", "--r", "4", "--dropout", "0",
            "--reps", "2", "--providers", "linear,fastlora_torch", "--no-plots"]
    assert run.parse_args(argv).out is None
    run.main(argv)
    run.main(argv)  # a second run in the same second gets its own directory
    runs = sorted(os.listdir(tmp_path / "benchmarks" / "runs"))
    assert len(runs) == 2 and all(r.startswith("cpu-") for r in runs)
    for r in runs:
        assert (tmp_path / "benchmarks" / "runs" / r / "results_cpu.json").is_file()
    if before is not None:
        assert os.path.getmtime(committed) == before


def test_benchmark_ratios_pair_the_rounds():
    """A CPU ratio is the median over rounds of the two times of one round, so a stretch
    where the shared machine is slow cancels; GPU results (no rounds) divide the medians."""
    from benchmarks.timing import cpu_interleaved, paired_ratio

    a = {"median": 4.0, "rounds": [2.0, 4.0, 6.0]}
    b = {"median": 4.0, "rounds": [1.0, 4.0, 5.0]}
    assert paired_ratio(a, b) == 1.2  # per round 2.0, 1.0, 1.2; the medians would say 1.0
    assert paired_ratio({"median": 3.0}, {"median": 2.0}) == 1.5
    ticks = iter(range(100))
    stats = cpu_interleaved({("a", "fwd"): (lambda: None, lambda _: next(ticks))}, reps=3,
                            warmup=0)
    assert len(stats[("a", "fwd")]["rounds"]) == 3
