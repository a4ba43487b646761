#!/usr/bin/env python3
"""HF transformers + PEFT baseline for `coserve bench-finetune`: the same model file, the same
synthetic examples, the same LoRA shape, timed the same way.

Loads the GGUF through transformers' `gguf_file=` path (dequantized to f32, as coserve's
`--weights-dtype f32` does), wraps it with PEFT LoRA (r=16, alpha=32, no dropout, all seven
projections by default), and trains micro-batches of `--batch-size` x `--seq-len` tokens with
AdamW: one forward + backward over the whole micro-batch, then one optimizer step. Prints one
JSON object with forwarded tokens/s (median over the timed steps) and peak RSS.

On a GPU: `--device cuda --dummy-shape llama-3-8b --seq-len 1024 --batch-size 1` builds a model
of that real shape with random bf16 weights directly on the device (no download), the
baseline for `coserve`'s GPU fine-tuning numbers; tokens/s then counts after a device sync.

Setup (outside the repository; only PyPI is needed):
    python3 -m venv ~/hfvenv
    ~/hfvenv/bin/pip install torch transformers peft gguf
    ~/hfvenv/bin/python benches/hf_peft_finetune.py --threads 2
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

ALL_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# The shapes of coserve's `--dummy-weights` (src/model/loader/dummy.rs), as config.json has them.
DUMMY_SHAPES = {
    "llama-3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, rope_theta=500000.0,
                                 max_position_embeddings=8192, tie_word_embeddings=False)),
    "llama-2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                 num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=32, rope_theta=10000.0,
                                 max_position_embeddings=4096, tie_word_embeddings=False)),
    "qwen2.5-14b": ("qwen2", dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                                  num_hidden_layers=48, num_attention_heads=40,
                                  num_key_value_heads=8, rope_theta=1000000.0,
                                  max_position_embeddings=32768, tie_word_embeddings=False)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, rope_theta=100000.0,
                                   max_position_embeddings=8192, tie_word_embeddings=True)),
}


def dummy_model(name, dtype, device, attn_implementation):
    """A model of a real shape with random weights, created on `device` in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    family, shape = DUMMY_SHAPES[name]
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    config = config_cls(**shape, attn_implementation=attn_implementation)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = model_cls(config)
    torch.set_default_dtype(torch.float32)
    return model


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
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="weights and activations (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--dummy-shape", choices=sorted(DUMMY_SHAPES),
                   help="random weights of this shape instead of --model")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype_name = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    dtype = getattr(torch, dtype_name)
    if args.dummy_shape:
        model = dummy_model(args.dummy_shape, dtype, args.device, args.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(args.model)),
            gguf_file=os.path.basename(args.model),
            dtype=dtype,
            attn_implementation=args.attn_implementation,
        ).to(args.device)
    on_gpu = args.device.startswith("cuda")
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
        batch = torch.tensor(ids, dtype=torch.long, device=args.device)
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [q for q in model.parameters() if q.requires_grad], 1.0
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
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
                "device": torch.cuda.get_device_name() if on_gpu else "cpu",
                "dtype": dtype_name,
                "model": args.dummy_shape and f"dummy {args.dummy_shape}" or args.model,
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
                "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
            }
        )
    )


if __name__ == "__main__":
    main()
