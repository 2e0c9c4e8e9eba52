"""One training step of a whole model: ``python -m benchmarks.model_step``.

A Llama-shaped model with random weights (transformers' ``LlamaForCausalLM``: hidden 1024,
intermediate 2816, 2 layers, 16 heads, vocabulary 1024), a batch of 4 x 256 tokens, float32 on
the CPU (bfloat16 on CUDA). Three providers, each its own copy of the same weights:

- ``frozen``: no trainable parameter; the input embeddings require grad, so the backward runs
  through every layer (every ``dx``) and computes no weight gradient: the floor;
- ``peft``: PEFT's LoRA, r=16, alpha 32, on all seven projections (q, k, v, o, gate, up, down);
- ``fastlora``: ``fastlora.apply_lora`` with the same arguments and factors.

A step is forward, causal-LM loss, backward and (for the LoRA providers) an AdamW step. The
providers run interleaved, once per round, in an order that rotates; a figure is the median
over rounds of the ratio within a round (``benchmarks.timing.paired_ratio``), so a neighbour
slowing the machine for a while slows both sides of a ratio alike. Lower is better. The last
line reads::

    model step: fastlora/peft <x> (p=0.05), <y> (p=0); fastlora/frozen <a>, <b>

(``<a>`` at p=0.05, ``<b>`` at p=0). ``--quick`` shrinks the model and the rounds (for tests).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

import fastlora
from benchmarks import timing
from benchmarks.run import busy_warning

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DROPOUTS = (0.05, 0.0)
PROVIDERS = ("frozen", "peft", "fastlora")


@dataclass(frozen=True)
class Config:
    hidden: int = 1024
    intermediate: int = 2816
    layers: int = 2
    heads: int = 16
    vocab: int = 1024
    batch: int = 4
    seq: int = 256
    r: int = 16
    rounds: int = 12


# the demo's size (python -m fastlora.demo, check 4): a few seconds a round on 2 cores
DEMO = Config(hidden=512, intermediate=1408, layers=2, heads=8, vocab=512, batch=2, seq=128,
              r=16, rounds=5)
QUICK = Config(hidden=128, intermediate=352, layers=2, heads=4, vocab=128, batch=2, seq=32, r=4,
               rounds=3)


def base_model(cfg: Config, device: str, dtype: torch.dtype) -> nn.Module:
    """The random-init Llama, the same weights on every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.heads, vocab_size=cfg.vocab,
                         max_position_embeddings=cfg.seq, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).requires_grad_(False).train()


def build(provider: str, p: float, cfg: Config, device: str, dtype: torch.dtype) -> nn.Module:
    model = base_model(cfg, device, dtype)
    lora = dict(r=cfg.r, lora_alpha=2 * cfg.r, lora_dropout=p)
    if provider == "fastlora":
        return fastlora.apply_lora(model, TARGETS, init_lora_weights=False, **lora)
    if provider == "peft":
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS,
                                                              init_lora_weights=False, **lora))
    return model


def same_factors(peft_model: nn.Module, ours: nn.Module) -> None:
    """PEFT's factors copied from fastlora's, so both start from one adapter."""
    with torch.no_grad():
        for name, layer in fastlora.model.lora_layers(ours).items():
            theirs = peft_model.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)


def step_fn(model: nn.Module, ids: torch.Tensor):
    """forward + loss + backward (+ AdamW on the trainable parameters); returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    embed = model.get_input_embeddings()

    def step(_state=None):
        x = embed(ids).detach().requires_grad_(True)  # backward through every layer
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return step


def run(cfg: Config, device: str = "cpu", rounds: int | None = None,
        progress: bool = True) -> dict:
    """Times every (provider, p); returns the per-job stats and the four ratios."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq),
                        generator=torch.Generator().manual_seed(1)).to(device)
    models = {("frozen", 0.0): build("frozen", 0.0, cfg, device, dtype)}
    for p in DROPOUTS:
        models[("fastlora", p)] = build("fastlora", p, cfg, device, dtype)
        models[("peft", p)] = build("peft", p, cfg, device, dtype)
        same_factors(models[("peft", p)], models[("fastlora", p)])
    steps = {key: step_fn(m, ids) for key, m in models.items()}
    rounds = rounds or cfg.rounds
    if device == "cuda":
        results = {key: timing.gpu_time(None, fn, []) for key, fn in steps.items()}
    else:
        for fn in steps.values():  # warm-up: allocator, thread pool, first-call work
            fn()
        samples: dict = {key: [] for key in steps}
        keys = list(steps)
        for rnd in tqdm(range(rounds), desc="model step rounds", unit="round",
                        disable=not progress, file=sys.stderr):
            for key in keys[rnd % len(keys):] + keys[: rnd % len(keys)]:  # rotating order
                t0 = time.perf_counter_ns()
                loss = steps[key]()
                samples[key].append((time.perf_counter_ns() - t0) / 1e6)
                del loss
        # per-round samples kept in round order: paired_ratio takes ratios within a round
        results = {key: {**timing._stats(ms), "rounds": ms} for key, ms in samples.items()}
    frozen = results[("frozen", 0.0)]
    ratios = {}
    for p in DROPOUTS:
        ratios[("peft", p)] = timing.paired_ratio(results[("fastlora", p)], results[("peft", p)])
        ratios[("frozen", p)] = timing.paired_ratio(results[("fastlora", p)], frozen)
    return {"results": results, "ratios": ratios, "rounds": rounds}


def last_line(ratios: dict) -> str:
    return (f"model step: fastlora/peft {ratios[('peft', 0.05)]:.3f} (p=0.05), "
            f"{ratios[('peft', 0.0)]:.3f} (p=0); fastlora/frozen {ratios[('frozen', 0.05)]:.3f}, "
            f"{ratios[('frozen', 0.0)]:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.model_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="a small model, 3 rounds (tests)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 12)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    cfg = QUICK if args.quick else Config()
    print(f"model step: Llama-shaped, hidden {cfg.hidden}, intermediate {cfg.intermediate}, "
          f"{cfg.layers} layers, batch {cfg.batch} x {cfg.seq} tokens, LoRA r={cfg.r} on "
          f"{', '.join(TARGETS)}; {args.device}, {platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, fastlora {fastlora.__version__}, "
          f"torch {torch.__version__}")
    busy = busy_warning()
    if busy:
        print(busy)
    t0 = time.monotonic()
    out = run(cfg, args.device, args.rounds)
    print(f"{out['rounds']} interleaved rounds in {time.monotonic() - t0:.0f} s; ms per step "
          "(median [20%-80%]); ratios: median over rounds of the ratio within a round")
    for (provider, p), r in out["results"].items():
        label = provider if provider == "frozen" else f"{provider} p={p}"
        print(f"  {label:<18}{r['median']:9.1f} ms  [{r['p20']:.1f}-{r['p80']:.1f}]")
    busy = busy or busy_warning()
    if busy:
        print(busy)
    print(last_line(out["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
