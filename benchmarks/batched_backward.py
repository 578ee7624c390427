"""One vmapped backward for the C - 1 combined logits against one backward each, on MiniLM's top 3 blocks.

The summed eNTK of a fitted head over C classes takes one backward pass per combined logit
(``freeshap_dq.ntk.summed_logits``), each with respect to the factored layers' outputs, as
``freeshap_dq.ntk.factors.FactorStore.collect`` does. This measures whether stacking those passes into one
``torch.autograd.grad(..., is_grads_batched=True)`` is faster on this machine. The baseline, measured in the same
run on the same batch: one ``autograd.grad`` per logit with ``retain_graph``. Both include the forward. Reports the
least time per batch of each way, their ratio, and the largest difference between their gradients.

Usage:  python benchmarks/batched_backward.py [--logits 4] [--batch 16] [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(variable, "1")


def main() -> None:
    import torch
    from transformers import AutoModel

    from freeshap_dq.ntk.models import resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logits", type=int, default=4, help="combined logits: C - 1 (4 for 5 classes)")
    parser.add_argument("--batch", type=int, default=16, help="examples per batch (the sketch's default)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(resolve_model_path("minilm"), attn_implementation="eager").eval()
    blocks = model.encoder.layer[-3:]
    outputs: list[torch.Tensor] = []
    for module in blocks.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, out: outputs.append(out))
    for p in blocks.parameters():
        p.requires_grad_(True)
    hidden = torch.randn(args.batch, args.tokens, model.config.hidden_size)
    head = torch.randn(args.logits, model.config.hidden_size)
    mask = torch.zeros(args.batch, 1, 1, args.tokens)

    def forward() -> torch.Tensor:
        outputs.clear()
        h = hidden
        for block in blocks:
            h = block(h, attention_mask=mask)
            h = h[0] if isinstance(h, tuple) else h
        return h.mean(1) @ head.T

    def one_each() -> list[torch.Tensor]:
        logits = forward()
        per_logit = [torch.autograd.grad(logits[:, c].sum(), outputs, retain_graph=True) for c in range(args.logits)]
        return [torch.stack([g[i] for g in per_logit]) for i in range(len(outputs))]

    def batched() -> list[torch.Tensor]:
        logits = forward()
        cotangents = torch.eye(args.logits)[:, None, :].expand(args.logits, args.batch, args.logits).contiguous()
        return list(torch.autograd.grad(logits, outputs, grad_outputs=cotangents, is_grads_batched=True))

    seconds = {one_each: [], batched: []}
    for _ in range(args.repeats):
        for way in (one_each, batched):
            started = time.perf_counter()
            way()
            seconds[way].append(time.perf_counter() - started)
    difference = max(float((a - b).abs().max()) for a, b in zip(one_each(), batched(), strict=True))
    base, stacked = min(seconds[one_each]), min(seconds[batched])
    print(f"| {args.logits} | {args.batch} x {args.tokens} | {torch.get_num_threads()} | {base:.3f} s | "
          f"{stacked:.3f} s | {base / stacked:.2f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
