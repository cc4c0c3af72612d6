"""Run by test_train.py under torchrun: RoseTrainer with DDP (gloo) for a few steps; each rank writes
its final parameters and kept fractions to OUT/rank<k>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from rose_kernels.train import RoseTrainer
from rose_kernels.train import data as data_mod


def main(model_dir: str, train_file: str, out: str, mode: str) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    rows = data_mod.read_table(train_file)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            encoded = tokenizer(rows[i][0], truncation=True, max_length=24)
            return {**encoded, "labels": int(rows[i][2])}

    args = transformers.TrainingArguments(output_dir=str(Path(out) / "hf"), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_steps=1, seed=3, ddp_backend="gloo")
    trainer = RoseTrainer(model=model, args=args, train_dataset=Rows(),
                          data_collator=transformers.DataCollatorWithPadding(tokenizer), rose_mode=mode,
                          rose_granularity="element", rose_upper=50.0)
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    result = {"world": dist.get_world_size(), "kept": optimizer.mask_stats(),
              "params": {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters()}}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
