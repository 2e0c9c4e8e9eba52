"""``python -m benchmarks.model_step``: the providers time the same computation (same weights,
same adapter, same loss at p=0, PEFT as the yardstick), the frozen floor trains nothing but
back-propagates through every layer, and the last line has its fixed form."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks import model_step as ms  # noqa: E402

LAST = re.compile(r"^model step: fastlora/peft (\d+\.\d+) \(p=0\.05\), (\d+\.\d+) \(p=0\); "
                  r"fastlora/frozen (\d+\.\d+), (\d+\.\d+)$")


def test_providers_compute_the_same_step():
    cfg = ms.QUICK
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=torch.Generator().manual_seed(1))
    ours = ms.build("fastlora", 0.0, cfg, "cpu", torch.float32)
    theirs = ms.build("peft", 0.0, cfg, "cpu", torch.float32)
    frozen = ms.build("frozen", 0.0, cfg, "cpu", torch.float32)
    ms.same_factors(theirs, ours)
    n_lora = sum(1 for n, _ in theirs.named_modules() if n.endswith("lora_A.default"))
    assert n_lora == 7 * cfg.layers and len(ms.fastlora.model.lora_layers(ours)) == n_lora
    assert not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        ref = theirs(input_ids=ids, labels=ids).loss
        assert frozen(input_ids=ids, labels=ids).loss != ref  # the adapter (B != 0) counts
    grads = {}
    for name, model in (("fastlora", ours), ("peft", theirs), ("frozen", frozen)):
        step = ms.step_fn(model, ids)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        loss = step()
        if name != "frozen":
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
            moved = [n for n, p in model.named_parameters() if p.requires_grad
                     and not torch.equal(p, before[n])]
            assert len(moved) == 2 * n_lora  # AdamW stepped every factor
        grads[name] = loss
    # the frozen step back-propagates to the input embeddings through every layer
    embed = frozen.get_input_embeddings()
    x = embed(ids).detach().requires_grad_(True)
    frozen(inputs_embeds=x, labels=ids).loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_quick_run_prints_the_last_line(capsys):
    assert ms.main(["--quick", "--rounds", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = LAST.match(lines[-1])
    assert m, lines[-1]
    assert all(0 < float(v) < 100 for v in m.groups())
