#!/usr/bin/env python3
"""HF transformers + PEFT baseline for `coserve bench-finetune`: the same model file, the same
synthetic examples, the same LoRA shape, timed the same way.

Loads the GGUF through transformers' `gguf_file=` path (dequantized to f32, as coserve's
`--weights-dtype f32` does), wraps it with PEFT LoRA (r=16, alpha=32, no dropout, all seven
projections by default), and trains micro-batches of `--batch-size` x `--seq-len` tokens with
AdamW: one forward + backward over the whole micro-batch, then one optimizer step. Prints one
JSON object with forwarded tokens/s (median over the timed steps) and peak RSS.

Setup (outside the repository; only PyPI is needed):
    python3 -m venv /work/hfvenv
    /work/hfvenv/bin/pip install torch transformers peft gguf
    /work/hfvenv/bin/python benches/hf_peft_finetune.py --threads 2
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

ALL_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def default_model():
    home = os.environ.get("COSERVE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "coserve"
    )
    return os.path.join(home, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def synthetic_tokens(vocab, n, seed):
    """The generator of coserve's `bench_finetune::synthetic_tokens`, bit for bit."""
    x, out = seed, []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append((x >> 33) % vocab)
    return out


def peak_rss_mib():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=default_model(), help="GGUF file")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--target-modules", default=ALL_MODULES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(args.model)),
        gguf_file=os.path.basename(args.model),
        dtype=torch.float32,
        attn_implementation=args.attn_implementation,
    )
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=args.target_modules.split(","),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size

    total = args.warmup_steps + args.steps
    times, losses = [], []
    for step in range(total):
        # Examples step*batch .. as coserve's job sees them (seeds are 1-based indices).
        ids = [
            synthetic_tokens(vocab, args.seq_len, step * args.batch_size + b + 1)
            for b in range(args.batch_size)
        ]
        batch = torch.tensor(ids, dtype=torch.long)
        t0 = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [q for q in model.parameters() if q.requires_grad], 1.0
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(out.loss.item())
        print(f"step {step + 1}: {dt:.2f} s, loss {losses[-1]:.4f}", file=sys.stderr)
        if step >= args.warmup_steps:
            times.append(dt)

    tokens = args.batch_size * args.seq_len
    step_s = statistics.median(times)
    print(
        json.dumps(
            {
                "system": "hf-peft",
                "torch": torch.__version__,
                "threads": args.threads,
                "attn_implementation": args.attn_implementation,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "rank": args.rank,
                "alpha": args.alpha,
                "target_modules": args.target_modules.split(","),
                "timed_steps": len(times),
                "tokens_per_s": tokens / step_s,
                "step_seconds_median": step_s,
                "step_seconds": times,
                "final_loss": losses[-1],
                "peak_rss_mib": peak_rss_mib(),
            }
        )
    )


if __name__ == "__main__":
    main()
