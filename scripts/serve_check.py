#!/usr/bin/env python3
"""`coserve serve` end to end on a device, against HF transformers on the same small model.

Makes a small random Llama or Qwen2 (Hugging Face layout, byte-level BPE tokenizer trained on
the spot: no download) and a random PEFT LoRA adapter for it, starts
`coserve serve --model DIR --device DEVICE --lora-modules tuned=ADAPTER`, sends greedy requests
concurrently over HTTP (every other one through the adapter; prompts as token ids, generated
ids back through `return_tokens_as_token_ids`), then scores every generated token with
transformers (and PEFT for the adapter's) in f32, teacher-forced on the same ids: each must be
the reference's most likely token or within --max-gap nats of it (bf16 on a GPU rounds; a
wrong position, cache block, row or adapter slot would cost nats). Also checks /metrics and that a fine-tuning request gets an OpenAI-shaped error (a GPU
server refuses it). Prints one JSON object; exits non-zero on any failure.

    python3 scripts/serve_check.py --bin target/release/coserve --device cuda

Needs torch, transformers, tokenizers and peft; runs on a CPU too (--device cpu).
"""

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "def main():",
    "Paged attention keeps the KV cache in blocks",
    "a",
]
NEW_TOKENS = 16
ADAPTER = "tuned"


def make_model(d, seed, arch="llama"):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    corpus = [p * 3 for p in PROMPTS] + [
        "the cat sat on the mat and the dog ran in the park " * 4,
        "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?()[]{}<>=+-*/ ",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": None,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)

    torch.manual_seed(seed)
    # Wide initial weights: clear logit margins, so bf16 rounding rarely flips a greedy choice.
    config, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = config(
        vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, initializer_range=0.08,
        eos_token_id=tok.token_to_id("<|endoftext|>"), bos_token_id=None,
    )
    model = model_class(cfg).float().eval()
    if arch == "qwen2":
        # Qwen2's q/k/v biases start at zero: make them count.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.uniform_(-0.5, 0.5)
    model.save_pretrained(d, safe_serialization=True)
    return tok, model


def make_adapter(model, d, seed):
    """A PEFT LoRA adapter (r 8, every projection) for `model`, saved to `d`; B is random, not
    PEFT's zeros, so that it changes the outputs. Returns the adapted model (a copy)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tuned = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.uniform_(-0.1, 0.1)
    tuned.save_pretrained(d)
    return tuned.eval()


def gaps(model, prompt_ids, generated):
    """Per generated token: the reference's best log-probability minus the token's, f32,
    teacher-forced on prompt + generated."""
    import torch

    x = torch.tensor([prompt_ids + generated])
    with torch.no_grad():
        lp = torch.log_softmax(model(x).logits[0].float(), dim=-1)
    n = len(prompt_ids)
    return [float(lp[n + i - 1].max() - lp[n + i - 1, t]) for i, t in enumerate(generated)]


def ranks(model, prompt_ids, generated):
    """Per generated token: its rank (0 = most likely) under the reference, f32,
    teacher-forced on prompt + generated."""
    import torch

    x = torch.tensor([prompt_ids + generated])
    with torch.no_grad():
        logits = model(x).logits[0].float()
    n = len(prompt_ids)
    return [int((logits[n + i - 1] > logits[n + i - 1, t]).sum()) for i, t in enumerate(generated)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def serve(args, model_dir, home):
    port = free_port()
    env = dict(os.environ, COSERVE_HOME=home, RUST_LOG=os.environ.get("RUST_LOG", "info"))
    name = f"serve-{args.device.replace(':', '-')}-{args.arch}.log"
    log = open(os.path.join(args.out, name), "w")
    cmd = [args.bin, "serve", "--model", model_dir, "--device", args.device, "--port", str(port),
           "--data-dir", os.path.join(home, "data"), "--kv-cache-memory", "256MiB",
           "--lora-modules", f"{ADAPTER}={os.path.join(home, 'adapter')}"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log.name}")
        try:
            if request(base + "/health", timeout=2)[0] == 200:
                return proc, base
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health in {args.start_timeout} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/coserve")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2"],
                    help="qwen2: with q/k/v biases")
    ap.add_argument("--out", default=".")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--max-gap", type=float, default=None,
                    help="nats a chosen token may trail the reference's best (default: 1e-3 "
                         "on the CPU, which computes in f32; 0.25 elsewhere, in bf16)")
    ap.add_argument("--start-timeout", type=float, default=180)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    # A timeout's SIGTERM must still stop the server (the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))

    result = {"device": args.device, "arch": args.arch, "prompts": len(PROMPTS),
              "new_tokens": NEW_TOKENS}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        os.makedirs(model_dir)
        tok, model = make_model(model_dir, args.seed, args.arch)
        tuned = make_adapter(model, os.path.join(tmp, "adapter"), args.seed)
        prompt_ids = [tok.encode(p).ids for p in PROMPTS]
        # Every other prompt goes through the adapter, in the same batches as the base model's.
        use_adapter = [i % 2 == 1 for i in range(len(PROMPTS))]
        max_gap = args.max_gap if args.max_gap is not None else (
            1e-3 if args.device == "cpu" else 0.25)
        t0 = time.time()
        proc, base = serve(args, model_dir, tmp)
        result["startup_s"] = round(time.time() - t0, 2)
        try:
            status, models = request(base + "/v1/models")
            body_model = models["data"][0]["id"] if status == 200 else "model"
            t0 = time.time()
            with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
                def complete(job):
                    ids, adapted = job
                    body = {"model": ADAPTER if adapted else body_model, "prompt": ids,
                            "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
                            "logprobs": 0, "return_tokens_as_token_ids": True}
                    return request(base + "/v1/completions", body)
                answers = list(pool.map(complete, zip(prompt_ids, use_adapter)))
            result["concurrent_s"] = round(time.time() - t0, 3)
            worst, per_prompt, base_gap = 0.0, [], 0.0
            for ids, adapted, (status, body) in zip(prompt_ids, use_adapter, answers):
                if status != 200:
                    ok = False
                    per_prompt.append({"error": f"HTTP {status}: {body}"})
                    continue
                names = body["choices"][0]["logprobs"]["tokens"]
                generated = [int(n.removeprefix("token_id:")) for n in names]
                g = gaps(tuned if adapted else model, ids, generated)
                if adapted:
                    # Scored by the base model instead, the adapter's tokens must trail it.
                    off = max(gaps(model, ids, generated), default=0.0)
                    base_gap = max(base_gap, off)
                worst = max([worst] + g)
                per_prompt.append({"adapter": adapted, "tokens": len(generated),
                                   "max_gap": round(max(g, default=0), 5),
                                   "text": body["choices"][0]["text"]})
                ok = ok and len(generated) == NEW_TOKENS
            result["max_gap_nats"] = round(worst, 5)
            # That the adapter is applied at all: the base model disagrees with its tokens.
            result["adapter_tokens_gap_under_base_nats"] = round(base_gap, 3)
            ok = ok and base_gap > 1.0
            result["max_gap_bound"] = max_gap
            result["per_prompt"] = per_prompt
            ok = ok and worst <= max_gap

            # Sampled with top-k and top-p (on the device unless it is the CPU): the same
            # seed gives the same tokens, and every token is among the reference's top k
            # (two places of slack for bf16 near the cut).
            top_k = 5
            body = {"model": body_model, "prompt": prompt_ids[0], "max_tokens": NEW_TOKENS,
                    "temperature": 0.8, "top_k": top_k, "top_p": 0.95, "seed": 11,
                    "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True}
            sampled = [request(base + "/v1/completions", body) for _ in range(2)]
            if all(st == 200 for st, _ in sampled):
                names = [b["choices"][0]["logprobs"]["tokens"] for _, b in sampled]
                generated = [int(n.removeprefix("token_id:")) for n in names[0]]
                r = ranks(model, prompt_ids[0], generated)
                result["sampled_same_with_seed"] = names[0] == names[1]
                result["sampled_worst_rank"] = max(r, default=0)
                ok = ok and names[0] == names[1] and max(r, default=0) < top_k + 2
            else:
                ok = False
                result["sampled_error"] = [b for st, b in sampled if st != 200]

            # Fine-tuning is accepted on every device: this request fails only for its
            # missing file.
            status, body = request(base + "/v1/fine_tuning/jobs",
                                   {"model": body_model, "training_file": "file-none"})
            result["fine_tuning_status"] = status
            result["fine_tuning_error"] = (body or {}).get("error", {}).get("message")
            ok = ok and status in (400, 404) and result["fine_tuning_error"] is not None

            status, metrics = 0, ""
            with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
                status, metrics = r.status, r.read().decode()
            result["metrics_ok"] = status == 200 and "coserve_generation_tokens_total" in metrics
            ok = ok and result["metrics_ok"]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    result["passed"] = ok
    print(json.dumps(result, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
