"""Greedy decoding of a static batch straight on a ModelRunner, step by step, for tests that
compare two paths of the model's forward (kernels on and off) logit for logit."""

from __future__ import annotations

from typing import Any

import torch


def greedy_steps(runner: Any, prompts: list[list[int]], steps: int) -> tuple[list, torch.Tensor]:
    """Greedy tokens of each prompt (one prefill, then `steps - 1` decode steps) and the stacked
    float32 next-token logits of every step."""
    from sglang.bench_one_batch import BatchDriver

    driver = BatchDriver(runner)
    batch = driver.make_batch(prompts, steps)
    logits = []
    try:
        for step in range(steps):
            worker_batch = batch.prepare_for_extend() if step == 0 else batch.prepare_for_decode()
            out, fb = runner.forward(worker_batch)
            logits.append(out.next_token_logits.float().clone())
            for req, tok in zip(batch.reqs, runner.sample(out, fb).next_token_ids.tolist()):
                req.output_ids.append(tok)
        return [list(r.output_ids) for r in batch.reqs], torch.stack(logits)
    finally:
        driver.release(batch)
