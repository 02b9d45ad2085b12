"""
Benchmarks for the two hot spots of caopd.py, on one CPU thread, float32.

1. The loss. fused_linear_kl (chunked, never holds an (N, V) tensor) against linear_kl_reference
   (plain autograd), forward + backward, kind="reverse", at three shapes (N, d, V): the toy
   (4096, 128, 257), a 32k vocabulary (2048, 256, 32768) and Qwen's 152k one (1024, 512, 151936).
   Every run is a fresh subprocess, so peak memory is that run's alone: extra peak memory is
   ru_maxrss minus the resident size after the inputs exist. Time is the median of several
   forward + backward passes after a warm-up. Both are compared with their floors: memory =
   the gradients (N*d + V*d floats) + one chunk of logits; time = the 8*N*d*V FLOPs of the four
   GEMMs, timed with torch.mm at the fused path's own shapes and layouts in the same process.
   Accuracy: max abs error of the loss and of both gradients against a float64 reference,
   computed in row chunks in yet another subprocess.
2. The sampler. Tokens per second of caopd.sample with its KV cache, the same model without
   the cache (use_cache=False re-runs the whole sequence per token), and Hugging Face
   `generate` on a randomly initialised GPT-2 of the same size; interleaved, median of reps.
   The batch is training's: 16 distinct prompts x K=8 rollouts each.
3. Rollouts of a Hugging Face model (Qwen3-style, random weights, 32k vocabulary): caopd.sample's
   loop over the model's own KV cache against `generate`, greedy, prompts of several lengths
   (left-padded); they must agree token for token.

Prints markdown tables (for the README) and PASS/FAIL per target, and writes bench.json.

    python bench.py                 # everything: about 9 minutes (one busy core, peak ~4 GB RAM)
    python bench.py --quick         # first two loss shapes, short sampler config: about 2 minutes
    python bench.py --out=bench.json
    python bench.py --precision     # what bfloat16 weights lose under AdamW at real learning rates: ~1 minute
    python bench.py --memory        # a step's peak memory against prompts per step, micro-batches: ~5 minutes
    python bench.py --real          # Qwen3-0.6B's shapes on the CPU, and what fits on a GPU: ~25 minutes
    python bench.py --gpu           # the one device check (docs/gpu.md): Qwen3-0.6B, paper's shapes, <8 min
    python bench.py --fsdp          # 2 processes (gloo): peak memory per process, FSDP2 against DDP: ~3 minutes
    python bench.py --decode        # the decode step: operations and host reads per token, tok/s vs generate: ~12 min
    python bench.py --copies        # the decode step's copies and casts per token, eager and captured: ~9 min
    python bench.py --first_run     # the default run one method after the other against side by side: ~30 minutes

Timings on a shared machine are noisy: compare the ratios, which are measured side by side.
"""
import argparse
import functools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

import caopd
import captured
import hf
import memory
import models

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(4096, 128, 257), (2048, 256, 32768), (1024, 512, 151936)]  # (N, d, V)
SEED = 1337

# -----------------------------------------------------------------------------
# small helpers

def full_forward_decoder(model, prompts, max_new_tokens):
    """A decoder for caopd.sample without a KV cache (our GPT): the whole sequence again at every
    token, what the cache saves."""
    idx = torch.tensor(prompts, device=model.wte.weight.device)

    def decode(nxt):
        nonlocal idx
        if nxt is not None:
            idx = torch.cat([idx, nxt[:, None]], 1)
        return model(idx)[:, -1] @ model.wte.weight.T
    return decode

def whole_sequences(model, prompts, completions):
    """hf.completion_hidden without the shared prompt: every row's whole sequence."""
    return caopd.whole_sequences_hidden(lambda x: model.base_model(input_ids=x).last_hidden_state,
                                        caopd.output_weight(model).device, prompts, completions)

def rss_bytes():
    """Resident set size of this process now (second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

def default_chunk(N, V):
    """The chunk size fused_linear_kl picks on the CPU when chunk_size=None."""
    return caopd.loss_chunk(N, V, torch.device("cpu"))

def make_inputs(N, d, V, dtype=torch.float32):
    """Random student/teacher hiddens and unembeddings with a fixed seed. Weights are scaled so
    logits have std ~2 (a realistic spread: the softmax is neither flat nor one-hot); the teacher
    is a perturbed copy of the student, as an EMA teacher would be. Everything is made in place,
    in float32, so no transient copy inflates the process's peak before the baseline is read;
    the float64 reference casts these exact float32 values."""
    g = torch.Generator().manual_seed(SEED)
    hs = torch.randn(N, d, generator=g)
    ws = torch.randn(V, d, generator=g).mul_(2.0 / d ** 0.5)
    ht = torch.randn(N, d, generator=g).mul_(0.5).add_(hs)
    wt = torch.randn(V, d, generator=g).mul_(0.5 / d ** 0.5).add_(ws)
    return [t.to(dtype) for t in (hs, ws, ht, wt)]  # .to is a no-op for float32

def run_worker(**kw):
    """Run this file as a worker in a fresh process and return the JSON line it prints last."""
    cmd = [sys.executable, os.path.abspath(__file__)] + [f"--{k}={v}" for k, v in kw.items()]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd[2:])} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])

# -----------------------------------------------------------------------------
# loss workers (each runs in its own process)

def loss_worker(args):
    """--worker=fused|unfused: time forward+backward, measure extra peak memory, save the result
    (loss, both gradients) for the float64 comparison. The fused worker also times the GEMM floor."""
    torch.set_num_threads(1)
    N, d, V = args.N, args.d, args.V
    hs, ws, ht, wt = make_inputs(N, d, V)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    fused = args.worker == "fused"
    fn = caopd.fused_linear_kl if fused else caopd.linear_kl_reference
    chunk = default_chunk(N, V)
    if fused:
        # GEMM floor buffers, made (and touched) before the baseline so they do not count as the
        # loss's memory. They mirror the fused path: logits of a chunk, grad_h rows, grad_w.
        g_logits = torch.randn(chunk, V)
        g_h = torch.randn(chunk, d)
        g_w = torch.randn(V, d)
        h_chunk = torch.randn(chunk, d)
    base = rss_bytes()

    result = {}
    def step():
        result.clear()  # drop the previous pass's gradients first: they must not count in its peak
        hs.grad, ws.grad = None, None  # fresh gradients every pass: nothing accumulates
        loss = fn(hs, ws, ht, wt, kind="reverse")
        loss.backward()
        result.update(loss=loss.detach(), grad_h=hs.grad, grad_w=ws.grad)  # the last pass is checked

    def gemm_floor(rows=N):
        # The four GEMMs of the fused path, same shapes and layouts, over all N rows in chunks:
        # student and teacher logits (n,d)@(d,V), grad_h (n,V)@(V,d), grad_w += (V,n)@(n,d).
        # 4 * 2*N*d*V = 8*N*d*V FLOPs.
        for i in range(0, rows, chunk):
            n = min(chunk, N - i)
            lg = g_logits[:n]
            torch.mm(h_chunk[:n], ws.detach().T, out=lg)
            torch.mm(h_chunk[:n], wt.T, out=lg)
            torch.mm(lg, ws.detach(), out=g_h[:n])
            g_w.addmm_(lg.T, h_chunk[:n])

    def timed(f):
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    # warm-up (BLAS init, first-call allocations) on one chunk of rows: the same kernels and
    # shapes, without spending a whole pass (20 s at the largest shape) on it
    fn(hs.detach()[:chunk].clone().requires_grad_(True), ws, ht[:chunk], wt, kind="reverse").backward()
    ws.grad = None
    if fused:
        gemm_floor(chunk)
    times, floor_times = [], []
    for _ in range(args.reps):
        times.append(timed(step))
        if fused:  # interleaved with the fused passes, so noise from other processes hits both alike
            floor_times.append(timed(gemm_floor))
    peak = peak_rss_bytes()  # read before torch.save, which may allocate
    torch.save(result, args.save)  # the last pass's loss and gradients, for the float64 comparison
    out = {"impl": args.worker, "N": N, "d": d, "V": V, "chunk": chunk,
           "base_mb": base / 2**20, "peak_mb": peak / 2**20, "extra_mb": (peak - base) / 2**20,
           "times_s": times, "median_s": statistics.median(times)}
    if fused:
        t = statistics.median(floor_times)
        out.update(floor_times_s=floor_times, gemm_floor_s=t, gemm_gflops=8 * N * d * V / t / 1e9)
    print(json.dumps(out))

def reference_worker(args):
    """--worker=ref: the float64 loss and gradients, from the unfused formula applied to row
    chunks (the loss is a mean over rows, grad_h is per row, grad_w sums over rows), so no
    float64 (N, V) tensor is ever whole; then the max abs error of each saved float32 result."""
    torch.set_num_threads(1)
    N, d, V = args.N, args.d, args.V
    hs, ws, ht, wt = make_inputs(N, d, V, torch.float64)
    ws.requires_grad_(True)
    rows = max(1, (1 << 23) // V)  # ~64 MB per float64 (rows, V) tensor
    loss, grad_h = torch.zeros((), dtype=torch.float64), torch.empty_like(hs)
    for i in range(0, N, rows):
        h = hs[i:i + rows].clone().requires_grad_(True)
        part = caopd.linear_kl_reference(h, ws, ht[i:i + rows], wt, kind="reverse") * (len(h) / N)
        part.backward()  # accumulates this chunk's share into ws.grad
        loss += part.detach()
        grad_h[i:i + rows] = h.grad
    ref = {"loss": loss, "grad_h": grad_h, "grad_w": ws.grad}
    out = {"loss": loss.item(), "max_abs_grad_h": grad_h.abs().max().item(),
           "max_abs_grad_w": ws.grad.abs().max().item()}
    for name, path in zip(("unfused", "fused"), args.compare.split(",")):
        got = torch.load(path)
        out[name] = {k: (got[k].double() - ref[k]).abs().max().item() for k in ref}
        del got
    print(json.dumps(out))

# -----------------------------------------------------------------------------
# loss benchmark (driver)

def bench_loss(shapes, reps):
    """reps timed passes per shape (3 at the big shapes, where one pass takes seconds)."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for N, d, V in shapes:
            t0 = time.time()
            saved = {k: os.path.join(tmp, f"{k}.pt") for k in ("unfused", "fused")}
            r = {"N": N, "d": d, "V": V}
            for impl in ("unfused", "fused"):
                n_reps = reps if N * d * V < 2**32 else 3  # passes of the big shapes take seconds
                r[impl] = run_worker(worker=impl, N=N, d=d, V=V, reps=n_reps, save=saved[impl])
            r["errors"] = run_worker(worker="ref", N=N, d=d, V=V, compare=f"{saved['unfused']},{saved['fused']}")
            u, f = r["unfused"], r["fused"]
            # floors: the gradients plus one chunk of logits; the GEMMs at the measured FLOP/s
            r["mem_floor_mb"] = (4 * (N * d + V * d) + 4 * f["chunk"] * V) / 2**20
            r["mem_ratio"] = f["extra_mb"] / u["extra_mb"]
            r["time_ratio"] = f["median_s"] / u["median_s"]
            r["fused_vs_mem_floor"] = f["extra_mb"] / r["mem_floor_mb"]
            r["fused_vs_time_floor"] = f["median_s"] / f["gemm_floor_s"]
            r["wall_s"] = time.time() - t0
            print(f"  ({N}, {d}, {V}): unfused {u['extra_mb']:.0f} MB {u['median_s']:.3f} s | fused "
                  f"{f['extra_mb']:.0f} MB {f['median_s']:.3f} s | ratios mem {r['mem_ratio']:.3f} "
                  f"time {r['time_ratio']:.3f} | {r['wall_s']:.0f} s", flush=True)
            results.append(r)
    return results

# -----------------------------------------------------------------------------
# sampler benchmark (in this process, one thread)

def bench_sampler(configs):
    """configs: list of (batch, rollouts per prompt K, prompt_len, new_tokens, repetitions).
    Returns one dict per config."""
    try:  # optional (not in requirements.txt): without it the HF column is left out
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
        transformers.logging.set_verbosity_error()
    except ImportError:
        print("  transformers is not installed: no Hugging Face generate comparison")
        transformers = None
    torch.set_num_threads(1)
    V, block = 331, 128  # toy-sized vocabulary; block fits the longest config
    torch.manual_seed(SEED)
    ours = caopd.GPT(caopd.GPTConfig(vocab_size=V, block_size=block, n_layer=4, n_head=4, n_embd=128)).eval()
    # the same architecture in Hugging Face (GPT-2 adds biases; same sizes, same tied unembedding)
    if transformers:
        hf = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=128, vocab_size=V, n_positions=block,
                                        bos_token_id=None, eos_token_id=None, pad_token_id=None)).eval()
    end_id = V  # never sampled (logits cover 0..V-1): every row gets all max_new_tokens
    results = []
    for B, K, Tp, new, reps in configs:
        assert Tp + new <= block
        # B // K distinct prompts, each repeated K times in a row, as training's rollouts are
        # (caopd.sample runs each distinct prompt once; HF generate and the no-cache loop run all B)
        distinct = torch.randint(0, V, (B // K, Tp), generator=torch.Generator().manual_seed(SEED))
        prompts = distinct.repeat_interleave(K, 0)  # (B, Tp)
        plist = prompts.tolist()

        def run_ours(use_cache):
            def f():
                out = caopd.sample(ours, plist, new, end_id, temperature=1.0, top_k=0,
                                   decoder=caopd.gpt_decoder if use_cache else full_forward_decoder)
                return sum(map(len, out))  # tokens actually generated
            return f

        @torch.no_grad()
        def run_hf():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                              eos_token_id=None, pad_token_id=0)
            return (out.shape[1] - Tp) * B

        impls = {"cache": run_ours(True), "no_cache": run_ours(False)}
        if transformers:
            impls["hf"] = run_hf
        times = {k: [] for k in impls}
        first = not results  # one warm-up round, in the first config: the no-cache loop is slow
        for rep in range(0 if first else 1, reps + 1):  # rep 0 is the warm-up, not recorded
            for name, f in impls.items():  # interleaved: noise hits all three alike
                torch.manual_seed(SEED + rep)
                t0 = time.perf_counter()
                n = f()
                dt = time.perf_counter() - t0
                assert n == B * new, f"{name} generated {n} tokens, expected {B * new}"
                if rep:
                    times[name].append(dt)
        r = {"batch": B, "K": K, "prompt": Tp, "new_tokens": new, "reps": reps, "times_s": times}
        for name in impls:
            r[f"{name}_tok_s"] = B * new / statistics.median(times[name])
        r["cache_vs_no_cache"] = r["cache_tok_s"] / r["no_cache_tok_s"]
        r["cache_vs_hf"] = r["cache_tok_s"] / r["hf_tok_s"] if transformers else None
        # The cache's best case against the no-cache loop: the ratio of token positions the two
        # push through the model (no cache: every row's whole sequence every step; cache: each
        # distinct prompt once, then one token per row per step). The per-step work both share
        # (unembedding, sampling) keeps the real ratio below it.
        r["positions_ratio"] = B * sum(Tp + t for t in range(new)) / (B // K * Tp + B * (new - 1))
        print(f"  B={B} (K={K}) prompt={Tp} new={new}: cache {r['cache_tok_s']:.0f} tok/s, no cache "
              f"{r['no_cache_tok_s']:.0f} (x{r['cache_vs_no_cache']:.1f})" +
              (f", HF {r['hf_tok_s']:.0f} (x{r['cache_vs_hf']:.2f})" if transformers else ""), flush=True)
        results.append(r)
    return results

# -----------------------------------------------------------------------------
# rollouts of a Hugging Face model: caopd.sample (its own loop over the model's KV cache) vs generate

def bench_hf_sampler(rows, K, new, reps):
    """A randomly initialised Qwen3-style model (4 layers, d=256, V=32000; built from a config, no
    download), `rows` // K distinct prompts of 48 to 80 tokens (left-padded), K rollouts each,
    greedy on both sides so that they must produce the same tokens. Median seconds of `reps`."""
    import transformers
    from transformers import AutoModelForCausalLM, Qwen3Config
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    cfg = Qwen3Config(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(SEED)
    distinct = [torch.randint(3, 32000, (int(n),), generator=g).tolist()
                for n in torch.randint(48, 81, (rows // K,), generator=g)]
    prompts = [p for p in distinct for _ in range(K)]
    end_id = 0  # a token the random model might emit: both stop at it alike
    T = max(map(len, prompts))
    idx = torch.tensor([[end_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    outs = {}

    def ours():
        outs["ours"] = caopd.sample(model, prompts, new, end_id, temperature=0, decoder=hf.decoder)

    @torch.no_grad()
    def hf():
        out = model.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=end_id,
                             pad_token_id=end_id)[:, T:].tolist()
        outs["hf"] = [r[:r.index(end_id) + 1] if end_id in r else r for r in out]

    times = {"ours": [], "hf": []}
    for rep in range(reps + 1):  # rep 0 warms up
        for name, f in (("ours", ours), ("hf", hf)):  # interleaved
            t0 = time.perf_counter()
            f()
            if rep:
                times[name].append(time.perf_counter() - t0)
    n_tokens = sum(map(len, outs["ours"]))
    same = sum(a == b for a, b in zip(outs["ours"], outs["hf"])) / rows
    r = {"rows": rows, "K": K, "new_tokens": new, "reps": reps, "times_s": times, "tokens": n_tokens,
         "same_completions": same, "ours_tok_s": n_tokens / statistics.median(times["ours"]),
         "hf_tok_s": sum(map(len, outs["hf"])) / statistics.median(times["hf"])}
    r["ours_vs_hf"] = r["ours_tok_s"] / r["hf_tok_s"]
    print(f"  HF model rollouts, {rows} rows ({rows // K} prompts x K={K}), {new} new: caopd.sample "
          f"{r['ours_tok_s']:.0f} tok/s, generate {r['hf_tok_s']:.0f} tok/s (x{r['ours_vs_hf']:.2f}); "
          f"identical completions {same:.0%}", flush=True)
    return r

# -----------------------------------------------------------------------------
# real models, built from their configurations (no download): a tokenizer trained here on the
# fixtures, a randomly initialised model of the real shapes

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

def make_hf(path, config, chat_template=CHATML, dtype=torch.float32, seed=0):
    """A Hugging Face model of `config` with random weights, saved in dtype, and a byte-level BPE
    tokenizer (a few hundred tokens, trained on data/*/fixture.jsonl), in `path`. Returns the
    parameter count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    text = [line for task in ("science", "tooluse") for line in open(os.path.join(HERE, "data", task, "fixture.jsonl"))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(text + ["Confidence: 0.75 Answer: 0123"], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=chat_template)
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    config.vocab_size = max(config.vocab_size, len(tok))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())

def qwen3_config(size):
    """Qwen3's published shapes (their config.json files); the embedding is tied below 8B."""
    from transformers import Qwen3Config
    hidden, inter, layers, heads = {"0.6B": (1024, 3072, 28, 16), "1.7B": (2048, 6144, 28, 16),
                                    "4B": (2560, 9728, 36, 32), "8B": (4096, 12288, 36, 32)}[size]
    return Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=size != "8B")

def run_measured(cmd, env=None):
    """Run a command; returns (its output, its peak resident memory in MiB: its own, from wait4)."""
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed ({p.returncode}):\n{out[-3000:]}")
    return out, usage.ru_maxrss / 1024

def step_seconds(out, method="caopd"):
    """Seconds of each distillation step after the first, from train_small.py's step lines
    (--log_every=1: each line ends with the seconds since the stage began)."""
    t = [float(line.rsplit("|", 1)[1].strip().rstrip("s")) for line in out.splitlines()
         if line.startswith(f"{method} step") and "KL" in line]
    return [b - a for a, b in zip(t, t[1:])]

def train_small_step(model_dir, settings, threads):
    """One run of train_small.py on a model directory (CaOPD on the toy task, whose prompts are
    short: the model's shapes are what is measured). Returns (median seconds per step, peak MiB)."""
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, os.path.join(HERE, "train_small.py"), f"--init_from={model_dir}", "--task=arith",
               "--method=caopd", "--n_eval=2", "--log_every=1", "--ckpt_every=1000", f"--threads={threads}",
               f"--out_dir={out_dir}"] + [f"--{k}={v}" for k, v in settings.items()]
        out, peak = run_measured(cmd)
    steps = step_seconds(out)
    return statistics.median(steps), peak

def bench_memory():
    """The issue's measurement: a Llama of width 512 and 8 layers, one CaOPD step (K = 8, 64 new
    tokens), peak resident memory with 2 and 8 prompts per step, all at once or 16 sequences at a time."""
    from transformers import LlamaConfig
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_hf(tmp, LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048))
        for mb, rb in ((0, 0), (16, 0), (16, 16)):
            for prompts in (2, 8):
                s = {"prompts_per_step": prompts, "K": 8, "max_new_tokens": 64, "steps": 2, "micro_batch": mb,
                     "rollout_batch": rb}
                sec, peak = train_small_step(tmp, s, threads=1)
                rows.append({"micro_batch": mb, "rollout_batch": rb, "prompts": prompts, "peak_mib": peak, "s_per_step": sec})
                print(f"  micro_batch={mb} rollout_batch={rb} prompts={prompts} x K=8: peak {peak:.0f} MiB, "
                      f"{sec:.1f} s/step", flush=True)
    for mb, rb in ((0, 0), (16, 0), (16, 16)):
        a, b = (r["peak_mib"] for r in rows if (r["micro_batch"], r["rollout_batch"]) == (mb, rb))
        rows.append({"micro_batch": mb, "rollout_batch": rb, "ratio_8_over_2": b / a})
        print(f"  micro_batch={mb} rollout_batch={rb}: 8 prompts / 2 prompts = {b / a:.2f}x", flush=True)
    return rows

def bench_real(threads):
    """Qwen3-0.6B's shapes (28 layers, width 1024, 16 / 8 heads, vocabulary 151,936, tied),
    random weights saved in bfloat16 as Qwen's are, through train_small.py on the CPU: seconds per
    step and peak memory, float32 and bfloat16 compute, with and without micro-batches and
    gradient checkpointing. Also the extra memory per sequence in a micro-batch (from 8 and 16
    sequences at once), which the README's table of what fits extrapolates from."""
    rows = []
    base = {"prompts_per_step": 2, "K": 4, "max_new_tokens": 16, "steps": 3}
    runs = [(d, mb, ckpt, 2) for d in ("float32", "bfloat16") for mb, ckpt in ((0, False), (2, False), (0, True), (2, True))]
    runs += [("bfloat16", 0, False, 4), ("bfloat16", 0, True, 4)]  # twice the sequences: memory per sequence
    with tempfile.TemporaryDirectory() as tmp:
        params = make_hf(tmp, qwen3_config("0.6B"), dtype=torch.bfloat16)
        print(f"  Qwen3-0.6B-shaped model: {params / 1e6:.0f}M parameters", flush=True)
        for dtype, mb, ckpt, prompts in runs:
            s = {**base, "dtype": dtype, "micro_batch": mb, "rollout_batch": mb, "grad_checkpoint": ckpt,
                 "prompts_per_step": prompts}  # rollouts in the same chunks: the most memory-bound setting
            sec, peak = train_small_step(tmp, s, threads)
            rows.append({**s, "sequences": prompts * s["K"], "peak_mib": peak, "s_per_step": sec})
            print(f"  {dtype} micro_batch={mb} grad_checkpoint={ckpt} sequences={rows[-1]['sequences']}: "
                  f"peak {peak:.0f} MiB, {sec:.1f} s/step", flush=True)
        cache = bench_prompt_cache(tmp, threads)
        import tokenizer
        from transformers import AutoTokenizer
        from data import arith
        tok = AutoTokenizer.from_pretrained(tmp)  # the student's tokens per sequence in these runs
        tokens = len(tokenizer.render(tok, arith.split(0, 1)[0][0]["messages"], "default")) + base["max_new_tokens"]
    return {"params": params, "threads": threads, "rows": rows, "prompt_cache": cache, "tokens_per_sequence": tokens}

def bench_prompt_cache(model_dir, threads, questions=2, K=4, prompt=192, new=32, reps=3):
    """caopd.completion_hidden (each distinct prompt once, into the KV cache) against every row's
    whole sequence, at the model's real shapes: without gradients (the teacher) and forward +
    backward (the student). Median seconds, interleaved."""
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(SEED)
    distinct = [torch.randint(3, 500, (prompt + 8 * q,), generator=g).tolist() for q in range(questions)]
    prompts = [p for p in distinct for _ in range(K)]
    completions = [torch.randint(3, 500, (new - r % 3,), generator=g).tolist() for r in range(len(prompts))]
    times = {k: [] for k in ("shared, no grad", "whole, no grad", "shared, fwd+bwd", "whole, fwd+bwd")}
    for rep in range(reps + 1):
        for name in times:
            fn = hf.completion_hidden if name.startswith("shared") else whole_sequences
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            if "no grad" in name:
                with torch.no_grad():
                    fn(model, prompts, completions)
            else:
                fn(model, prompts, completions)[0].square().mean().backward()
            if rep:  # rep 0 warms up
                times[name].append(time.perf_counter() - t0)
    r = {"questions": questions, "K": K, "prompt": prompt, "new": new, "times_s": times,
         **{k: statistics.median(v) for k, v in times.items()}}
    print(f"  prompt cache, {questions} questions x K={K}, prompts ~{prompt} tokens, completions ~{new}: "
          + ", ".join(f"{k} {r[k]:.2f} s" for k in times), flush=True)
    return r

def bench_precision(steps=3):
    """Why the weights stay float32: a small Llama (width 256, 4 layers) built from a config, `steps`
    AdamW steps on the same random batches, its weights float32 (autocast for the compute, as
    train_small.py does) or bfloat16 (what loading a model in bfloat16 and training it in place does).
    Per learning rate: the share of weights that changed at all, and the total movement sum |w - w0|
    against float32's."""
    from transformers import LlamaConfig, AutoModelForCausalLM
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    g = torch.Generator().manual_seed(SEED)
    batches = [torch.randint(0, 2000, (8, 64), generator=g) for _ in range(steps)]
    rows = []
    for lr in (1e-6, 2e-5):
        moved = {}
        for weights in ("float32", "bfloat16"):
            torch.manual_seed(SEED)
            model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).float()  # start: bfloat16 values
            model = model.to(getattr(torch, weights))
            start = [p.detach().float().clone() for p in model.parameters()]
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
            for x in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=x, labels=x).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            changed = sum((p.detach().float() != s).sum().item() for p, s in zip(model.parameters(), start))
            total = sum(s.numel() for s in start)
            movement = sum((p.detach().float() - s).abs().sum().item() for p, s in zip(model.parameters(), start))
            moved[weights] = (changed / total, movement)
        rows.append({"lr": lr, "changed_float32": moved["float32"][0], "changed_bfloat16": moved["bfloat16"][0],
                     "movement_bfloat16_over_float32": moved["bfloat16"][1] / moved["float32"][1]})
        print(f"  lr {lr:g}, {steps} AdamW steps: weights changed {moved['float32'][0]:.1%} with float32 weights, "
              f"{moved['bfloat16'][0]:.1%} with bfloat16 weights; bfloat16's total movement "
              f"{rows[-1]['movement_bfloat16_over_float32']:.0%} of float32's", flush=True)
    return rows

def bench_gpu(tiny=False, out=None, budget_s=480):
    """The one prepared device check (python bench.py --gpu): Qwen3-0.6B's shapes at the paper's
    settings (8 prompts x K = 8 rollouts x 1,024 new tokens; random prompts of 300 tokens, the
    teacher's of 800), bfloat16 autocast over float32 weights, a frozen bfloat16 teacher. In order,
    each printed as it is measured and written to `out` (JSON) at once, so that a run cut short
    keeps what it measured:
      1. rollouts, eager then captured (whose first call compiles; its second is measured): tokens/s,
         peak memory against memory's bound (sampling_bytes x rows + decode_weight_bytes), and how
         many rows the two sampled alike (the same random numbers; bfloat16 rounding may differ);
      2. a 300-row evaluation (300 distinct prompts, a cache for 1,024 new tokens): tokens/s over 64
         greedy steps, eager then captured, peak memory against the bound;
      3. one distillation step's time split (rollouts, train_small.kl_backward, AdamW) and peak
         memory, fused loss and the unfused reference, all sequences at once and 16 at a time;
      4. the fused loss alone at 8,192 x 4,096 x 128,256, and its error against the plain loss
         (loss_precision), with the logits written in float32 straight from the product and rounded
         to bfloat16 first;
      5. our GPT's captured step against its eager one on the device (the toy's default there).
    A section that would start after budget_s seconds is skipped, and said. A random model never
    stops early: every completion is the full 1,024 tokens (the worst case). tiny=True: a small model
    and short sequences on any device, to check the script itself."""
    import cli
    import train_small as ts
    from transformers import AutoModelForCausalLM, Qwen3Config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not tiny:
        print("  no CUDA device: nothing measured (python bench.py --gpu on a machine with a GPU)")
        return None
    if tiny:
        config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
        questions, K, new, prompt, teacher_prompt, micro, eval_rows, eval_steps = 2, 2, 8, 12, 20, 2, 4, 4
    else:
        config = qwen3_config("0.6B")
        questions, K, new, prompt, teacher_prompt, micro = 8, 8, 1024, 300, 800, 16
        eval_rows, eval_steps = 300, 64
    t_start, on_gpu = time.perf_counter(), device == "cuda"
    torch.manual_seed(SEED)
    with torch.device(device):  # initialised where it runs: a 0.6B model's random init on a CPU takes a while
        model = AutoModelForCausalLM.from_config(config).to(device).eval()  # float32 master weights
    teacher = models.frozen_copy(model, torch.bfloat16)
    g = torch.Generator().manual_seed(SEED)
    distinct = [torch.randint(3, config.vocab_size, (prompt,), generator=g).tolist() for _ in range(questions)]
    prompts = [p for p in distinct for _ in range(K)]
    teacher_prompts = [torch.randint(3, config.vocab_size, (teacher_prompt,), generator=g).tolist()
                       for _ in range(questions) for _ in range(K)]
    eval_prompts = [torch.randint(3, config.vocab_size, (prompt,), generator=g).tolist()
                    for _ in range(eval_rows)]
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    cfg = ts.settings(init_from="bench", dtype="bfloat16", device=device)
    result = {"device": torch.cuda.get_device_name() if on_gpu else device, "torch": torch.__version__,
              "questions": questions, "K": K, "new_tokens": new, "prompt": prompt,
              "teacher_prompt": teacher_prompt,
              "eval_rows": eval_rows, "rollouts": {}, "eval": {}, "steps": [], "skipped": []}
    gib = lambda b: None if b is None else float(f"{b / 2**30:.3g}")

    def save():
        if out:
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"machine": machine_info(), "gpu": result}, f, indent=1)
            os.replace(tmp, out)

    def in_budget(section):
        if time.perf_counter() - t_start < budget_s:
            return True
        result["skipped"].append(section)
        print(f"  {section}: skipped (past the {budget_s} s budget)", flush=True)
        save()
        return False

    def measured(fn):
        """(fn()'s value, its seconds, the peak memory it allocated above what was allocated before)."""
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync()
        t0 = time.perf_counter()
        value = fn()
        sync()
        seconds = time.perf_counter() - t0
        return value, seconds, (torch.cuda.max_memory_allocated() - base if on_gpu else None)

    def bound(rows, prompt_len, captured_step):
        return rows * memory.sampling_bytes(model, prompt_len, new, torch.bfloat16, captured_step) + \
            memory.decode_weight_bytes(model, torch.bfloat16)

    completions = None
    decoders = (("eager", hf.decoder), ("captured", captured.decoder(model)))
    if in_budget("rollouts"):  # the paper's 64 rows x 1,024 tokens
        for name, decoder in decoders:
            try:
                for rep in range(2 if name == "captured" else 1):  # the captured step's first call compiles
                    with cli.autocast(cfg):
                        sampled, seconds, peak = measured(lambda: caopd.sample(
                            model, prompts, new, end_id=config.vocab_size, temperature=1.0,
                            generator=torch.Generator(device).manual_seed(SEED), decoder=decoder))
                r = {"tok_s": sum(map(len, sampled)) / seconds, "s": seconds, "peak_gib": gib(peak),
                     "bound_gib": gib(bound(len(prompts), prompt, name == "captured"))}
                r["covered"] = None if peak is None else r["peak_gib"] <= r["bound_gib"]
                if completions is not None:
                    r["rows_alike"] = sum(a == b for a, b in zip(sampled, completions)) / len(prompts)
                completions = completions or sampled
            except Exception as e:  # a device's failure is a figure too
                r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            result["rollouts"][name] = r
            print(f"  rollouts, {name} decode step: {json.dumps(r)}", flush=True)
            save()
        result["compile_s"] = captured.COMPILE_SECONDS[:]
    if in_budget("evaluation"):  # eval_rows distinct prompts, greedy, timed over eval_steps tokens
        for name, decoder in decoders:
            def run():
                decode = decoder(model, eval_prompts, new)
                nxt = decode(None).argmax(-1)
                sync()
                t0 = time.perf_counter()
                for _ in range(eval_steps):
                    nxt = decode(nxt).argmax(-1)
                sync()
                return time.perf_counter() - t0
            try:
                with torch.no_grad(), cli.autocast(cfg):
                    if name == "captured":
                        run()  # compiles for this shape
                    seconds, _, peak = measured(run)
                r = {"tok_s": eval_rows * eval_steps / seconds, "ms_per_token": 1000 * seconds / eval_steps,
                     "peak_gib": gib(peak), "bound_gib": gib(bound(eval_rows, prompt, name == "captured"))}
                r["covered"] = None if peak is None else r["peak_gib"] <= r["bound_gib"]
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            result["eval"][name] = r
            print(f"  {eval_rows}-row evaluation, {name} decode step: {json.dumps(r)}", flush=True)
            save()
    if completions is None:  # the rollouts were skipped: the step needs completions
        completions = [[3] * new for _ in prompts]
    unfused = lambda hs, ws, ht, wt, w, tokens: caopd.linear_kl_reference(hs, ws, ht, wt, w)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rollout_s = min((r["s"] for r in result["rollouts"].values() if "s" in r), default=None)
    for loss_name, estimator in (("fused", None), ("unfused", unfused)):
        for mb in (0, micro):
            if not in_budget(f"step, {loss_name} loss, micro_batch={mb}"):
                continue
            cfg = ts.settings(init_from="bench", dtype="bfloat16", device=device, micro_batch=mb)
            row = {"loss": loss_name, "micro_batch": mb}
            net = caopd.Distiller(model, teacher, **models.seams(model))
            try:
                for _ in range(2):  # the first step makes AdamW's state; the second is measured
                    opt.zero_grad(set_to_none=True)
                    _, backward_s, peak = measured(lambda: ts.kl_backward(cfg, net, prompts, completions,
                                                                          teacher_prompts, estimator))
                    _, update_s, _ = measured(opt.step)
                row.update(backward_s=backward_s, update_s=update_s, step_s=backward_s + update_s,
                           peak_gib=gib(peak))
                if rollout_s:  # the rollouts' share of a step (the faster decode step's)
                    row["rollout_s"] = rollout_s
                    row["rollout_share"] = rollout_s / (rollout_s + row["step_s"])
            except torch.OutOfMemoryError:
                row["peak_gib"] = "OOM"
            opt.zero_grad(set_to_none=True)
            result["steps"].append(row)
            print(f"  step, {loss_name} loss, micro_batch={mb}: {json.dumps(row)}", flush=True)
            save()
    del opt
    if in_budget("fused loss"):
        result["loss"] = bench_gpu_loss(device, (64, 32, 512) if tiny else (8192, 4096, 128256))
        save()
    if in_budget("loss precision"):
        result["loss_precision"] = loss_precision(device, (64, 32, 512) if tiny else (2048, 1024, 151936))
        save()
    if in_budget("our GPT's captured step"):
        result["gpt_captured"] = gpt_captured_check(device)
        save()
    result["elapsed_s"] = time.perf_counter() - t_start
    save()
    return result

def gpt_captured_check(device, rows=16, new=24):
    """The toy's GPT (train_small's shape, random weights), float32: greedy tokens and logits of its
    captured step against its eager one on `device` (on a GPU the CUDA graph path)."""
    import train_small as ts
    from data import arith
    torch.manual_seed(SEED)
    vocab = caopd.toy_tokenizer(arith.VOCAB_TEXT).n_vocab
    model = caopd.GPT(caopd.GPTConfig(vocab_size=vocab, block_size=ts.block_size)).to(device).eval()
    g = torch.Generator().manual_seed(SEED)
    prompts = [torch.randint(0, vocab, (16,), generator=g).tolist()] * rows
    outs, worst = [], 0.0
    with torch.no_grad():
        eager, capt = caopd.gpt_decoder(model, prompts, new), captured.gpt_decoder(model, prompts, new)
        a, b = eager(None), capt(None)
        for _ in range(new - 1):
            nxt = a.argmax(-1)
            a, b = eager(nxt), capt(nxt)
            worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
        for d in (caopd.gpt_decoder, captured.decoder(model)):
            outs.append(caopd.sample(model, prompts, new, end_id=vocab, temperature=0, decoder=d))
    r = {"worst_relative_logit_difference": worst, "same_greedy_tokens": outs[0] == outs[1]}
    print(f"  our GPT's captured step on {device}: {json.dumps(r)}", flush=True)
    return r

def loss_precision(device, shape):
    """The fused loss's error under bfloat16 autocast at (N, d, V), against the plain loss in float64
    of the same bfloat16-rounded operands (what the logits' own rounding adds) and of the float32
    inputs: the loss's absolute error and each gradient's largest error relative to its largest
    entry, with the logits rounded to bfloat16 before the float32 softmax ("rounded") and written in
    float32 straight from the product ("float32 out"). Where the device has no such product the
    second is emulated, said in the result: the bfloat16 operands multiplied in float32 (what the
    GPU kernel computes, but for the order of its sums)."""
    N, d, V = shape
    g = torch.Generator(device).manual_seed(SEED)
    hs = torch.randn(N, d, generator=g, device=device) / d ** 0.5
    ws = torch.randn(V, d, generator=g, device=device) * 2
    ht = hs + 0.5 * torch.randn(N, d, generator=g, device=device) / d ** 0.5
    wt = ws + 0.5 * torch.randn(V, d, generator=g, device=device)

    def reference(cast):
        h, w = (hs.to(cast).double().requires_grad_(), ws.to(cast).double().requires_grad_())
        loss = caopd.linear_kl_reference(h, w, ht.to(cast).double(), wt.to(cast).double())
        loss.backward()
        return loss.item(), h.grad, w.grad

    refs = {"bfloat16_operands": reference(torch.bfloat16), "float32_inputs": reference(torch.float32)}
    native = caopd._dtype_out("mm", torch.device(device).type)
    mm, addmm = torch.mm, torch.addmm

    def emulated_mm(a, b, out_dtype=None, out=None):
        return mm(a.to(out_dtype), b.to(out_dtype), out=out) if out_dtype else mm(a, b, out=out)

    def emulated_addmm(c, a, b, out_dtype=None, out=None):
        return addmm(c, a.to(out_dtype), b.to(out_dtype), out=out) if out_dtype else addmm(c, a, b, out=out)

    r = {"shape": shape, "float32_out": "native" if native else "emulated"}
    for path in ("rounded", "float32 out"):
        dtype_out = caopd._dtype_out
        caopd._dtype_out = lambda op, device_type: path == "float32 out"
        if path == "float32 out" and not native:
            torch.mm, torch.addmm = emulated_mm, emulated_addmm
        try:
            h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
            with torch.autocast(torch.device(device).type, torch.bfloat16):
                loss = caopd.fused_linear_kl(h, w, ht, wt)
            loss.backward()
        finally:
            caopd._dtype_out, torch.mm, torch.addmm = dtype_out, mm, addmm
        for name, (ref_loss, ref_h, ref_w) in refs.items():
            r[f"{path}, against {name}"] = {
                "loss": abs(loss.item() - ref_loss),
                "grad_h": ((h.grad.double() - ref_h).abs().max() / ref_h.abs().max()).item(),
                "grad_w": ((w.grad.double() - ref_w).abs().max() / ref_w.abs().max()).item()}
    print(f"  fused loss's error under bfloat16 autocast at N={N}, d={d}, V={V}: {json.dumps(r)}", flush=True)
    return r

def bench_gpu_loss(device, shape, reps=5):
    """fused_linear_kl forward + backward at (N, d, V) under bfloat16 autocast, float32 weights (a
    student's master weights and a frozen teacher's): median seconds of reps after a warm-up, peak
    memory above the inputs'. Liger-Kernel publishes ~61 ms and ~11 GB for its chunked JSD at 8,192 x
    4,096 x 128,256 on an H100 (with a 0.5 cross-entropy term this loss has not)."""
    N, d, V = shape
    g = torch.Generator(device).manual_seed(SEED)
    hs = (torch.randn(N, d, generator=g, device=device) / d ** 0.5).bfloat16().requires_grad_()
    ht = (torch.randn(N, d, generator=g, device=device) / d ** 0.5).bfloat16()
    ws = torch.nn.Parameter(torch.randn(V, d, generator=g, device=device) * 2)
    wt = (ws.detach() + 0.1 * torch.randn(V, d, generator=g, device=device)).bfloat16()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times, base = [], 0
    for rep in range(reps + 1):
        hs.grad = ws.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        with torch.autocast(torch.device(device).type, torch.bfloat16):
            loss = caopd.fused_linear_kl(hs, ws, ht, wt)
        loss.backward()
        sync()
        if rep:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else None
    r = {"shape": shape, "ms": 1000 * statistics.median(times), "peak_above_inputs_gib": peak,
         "chunk": memory.loss_chunk(N, V, torch.device(device))}
    print(f"  fused loss at N={N}, d={d}, V={V} (bfloat16 autocast, chunk {r['chunk']} rows): {r['ms']:.0f} ms, "
          f"peak {peak if peak is None else round(peak, 1)} GiB above the inputs", flush=True)
    return r

# -----------------------------------------------------------------------------
# the decode step: operations and host reads per token, tokens/s against generate, compile time

def llama(width, layers, vocab=32000):
    """A randomly initialised Llama (transformers' reference decoder), built from a config: width 64
    (4 heads of 16, 2 key/value heads) or 1024 (Qwen3-0.6B's: 16 heads of 64, 8 key/value heads)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    heads = 4 if width < 1024 else 16
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=width // heads,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(config).eval()

def decode_prompts(vocab, rows=64, K=8):
    """rows // K distinct prompts of 48 to 80 tokens, K rows each (training's shape)."""
    g = torch.Generator().manual_seed(SEED)
    distinct = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(48, 81, (rows // K,), generator=g)]
    return [p for p in distinct for _ in range(K)]

def count_per_step(sample, model, prompts):
    """Per decode step, counted by a dispatch mode over two calls of 16 and 32 new tokens (their
    difference / 16: the prefill cancels): aten operations, those that are not views, values read back
    by the host (each a wait for the device on a GPU), random draws. Greedy, then sampled (the
    draws)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    reads = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.item.default}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = {"ops": 0, "not_views": 0, "host_reads": 0, "random_draws": 0}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n["ops"] += 1
            self.n["not_views"] += not func.is_view
            self.n["host_reads"] += func in reads
            self.n["random_draws"] += func.__name__.startswith(("rand", "uniform", "normal"))
            return func(*args, **(kwargs or {}))

    out = {}
    for temperature in (0.0, 1.0):
        counts = []
        for new in (16, 32):
            with Count() as c:
                sample(model, prompts, new, end_id=model.config.vocab_size, temperature=temperature,
                       generator=torch.Generator().manual_seed(SEED))
            counts.append(c.n)
        out["greedy" if temperature == 0 else "sampled"] = {k: (counts[1][k] - counts[0][k]) / 16 for k in counts[0]}
    return out

def in_compiled(event):
    """Whether a profiler event ran inside a torch.compile'd region (its caller, or theirs, is one)."""
    while event.cpu_parent is not None:
        event = event.cpu_parent
        if event.name.startswith("Torch-Compiled Region"):
            return True
    return False

def compiled_launches_per_step(model, prompts):
    """The captured step's own work per token, warm: the library calls it makes (the aten operations
    the profiler records it calling, not those they call in turn, less its buffer allocations) and the
    kernels inductor generated for it."""
    from torch._inductor import metrics
    from torch.profiler import ProfilerActivity, profile
    metrics.reset()
    captured.COMPILED.clear()
    decoder = captured.decoder(model)
    caopd.sample(model, prompts, 4, end_id=model.config.vocab_size, temperature=0, decoder=decoder)
    kernels = metrics.generated_kernel_count
    counts = []
    for new in (16, 32):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            caopd.sample(model, prompts, new, end_id=model.config.vocab_size, temperature=0, decoder=decoder)
        counts.append(sum(e.name.startswith("aten::") and not e.name.startswith("aten::empty") and in_compiled(e)
                          and not e.cpu_parent.name.startswith("aten::") for e in prof.events()))
    return {"library_calls": (counts[1] - counts[0]) / 16, "generated_kernels": kernels}

# What the decode step copies per token: the operations that only move or cast data, and their bytes

MOVES = ("_to_copy", "clone", "copy_", "cat", "stack", "repeat", "repeat_interleave", "expand_copy")
WRITES = {"index_copy": 3, "index_copy_": 3, "index_put": 2, "index_put_": 2}  # cache writes: source arg

def _nbytes(x):
    leaves = torch.utils._pytree.tree_leaves(x)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))

class StepCounts:
    """Tallies of aten operations: all, those that are not views, those that only move or cast data
    (MOVES: each a copy of its output) with the bytes they write, among them the casts of the step's
    floating-point inputs (its weights, its cache: the same every token), and the bytes written into
    the KV cache (WRITES: the new entries, whatever the op returns; a compiled graph's index_copy
    returns the whole cache, which inductor writes in place)."""

    def __init__(self):
        self.ops = self.not_views = self.cache_write_bytes = self.input_casts = self.input_cast_bytes = 0
        self.moves, self.move_bytes = {}, {}

    def add(self, op, out, args, of_input=False):
        """of_input: whether args[0] is an input of the step (a weight, the cache), not one it computed."""
        name = op.overloadpacket.__name__
        self.ops += 1
        self.not_views += not op.is_view
        if name in MOVES:
            self.moves[name] = self.moves.get(name, 0) + 1
            self.move_bytes[name] = self.move_bytes.get(name, 0) + _nbytes(out)
            if name == "_to_copy" and of_input and args[0].is_floating_point():
                self.input_casts += 1
                self.input_cast_bytes += _nbytes(out)
        elif name in WRITES:
            self.cache_write_bytes += _nbytes(args[WRITES[name]])

    def per(self, n):
        return {"ops": self.ops / n, "not_views": self.not_views / n,
                "moves": {k: v / n for k, v in self.moves.items()},
                "move_bytes": sum(self.move_bytes.values()) / n,
                "move_bytes_by_op": {k: v / n for k, v in self.move_bytes.items()},
                "input_casts": self.input_casts / n, "input_cast_bytes": self.input_cast_bytes / n,
                "cache_write_bytes": self.cache_write_bytes / n}

def eager_step_counts(decode, nxt, steps=8):
    """StepCounts of decode(nxt) per call, by a dispatch mode over `steps` calls after one (autocast's
    casts of the weights are made at the first and cached for the call)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    counts = StepCounts()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            counts.add(func, out, args, of_input=bool(args) and isinstance(args[0], torch.nn.Parameter))
            return out
    decode(nxt)
    with Count():
        for _ in range(steps):
            decode(nxt)
    return counts.per(steps)

def graph_counter(graphs):
    """A torch.compile backend that appends the StepCounts of each forward graph it is given (the aten
    graph inductor would compile: one call of it is one decode step) to graphs, then runs the graph."""
    from torch._dynamo.backends.common import aot_autograd

    def forward(gm, example_inputs):
        counts = StepCounts()
        val = lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        for n in gm.graph.nodes:
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
                first = n.args[0] if n.args else None
                counts.add(n.target, val(n), [val(a) for a in n.args],
                           of_input=isinstance(first, torch.fx.Node) and first.op == "placeholder")
        graphs.append(counts.per(1))
        return gm
    return aot_autograd(fw_compiler=forward)

def copies_worker(args):
    """--worker=copies: the decode step of a Qwen3-0.6B-shaped model cut to --N layers (vocabulary
    151,936; 64 rows: 8 prompts of 320 tokens x K = 8; a cache for 1,024 new tokens; bfloat16 autocast
    over float32 weights, as on a GPU), eager (hf.decoder: eager_step_counts) and captured
    (captured.decoder: the graph its torch.compile is given, through graph_counter), with the caopd,
    hf and captured this process imported (bench_copies imports another checkout's first). Prints a
    JSON line."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    config = qwen3_config("0.6B")
    config.num_hidden_layers = args.N
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(SEED)
    distinct = [torch.randint(3, config.vocab_size, (320,), generator=g).tolist() for _ in range(8)]
    prompts = [p for p in distinct for _ in range(8)]
    graphs, compile_ = [], torch.compile
    torch.compile = lambda fn, mode=None, **kw: compile_(fn, backend=graph_counter(graphs), **kw)
    out = {"layers": args.N, "rows": len(prompts), "prompt": 320, "new": 1024}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        decode = hf.decoder(model, prompts, 1024)
        nxt = decode(None).argmax(-1)
        out["eager"] = eager_step_counts(decode, nxt, steps=2)
        decode = captured.decoder(model)(model, prompts, 1024)
        decode(None)
        decode(nxt)
        out["captured"] = graphs[-1]
    # the caches' lengths, as each checkout's decoders make them (the captured one's own, where it has one)
    lengths = {"eager": hf.cache_length(320, 1024),
               "captured": getattr(captured, "cache_length", hf.cache_length)(320, 1024)}
    print(json.dumps({**out, "cache_length": lengths}))

def bench_copies(before=None):
    """copies_worker at 1 and 2 layers, for this checkout and, given, the one in `before`; the
    per-layer difference scaled to Qwen3-0.6B's 28 layers (arithmetic: every layer is alike)."""
    results = {}
    for code in ("now",) + (("before",) if before else ()):
        for layers in (1, 2):
            if code == "now":
                r = run_worker(worker="copies", N=layers)
            else:  # this file's functions over the other checkout's modules
                src = (f"import sys, importlib.util; sys.path[:0] = [{before!r}]; "
                       f"spec = importlib.util.spec_from_file_location('bench_now', {HERE + '/bench.py'!r}); "
                       f"b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); "
                       f"b.copies_worker(b.SimpleNamespace(N={layers}))")
                p = subprocess.run([sys.executable, "-c", src], cwd=before, capture_output=True, text=True)
                if p.returncode != 0:
                    raise RuntimeError(f"the copies worker over {before} failed:\n{p.stderr[-3000:]}")
                r = json.loads(p.stdout.strip().splitlines()[-1])
            results.setdefault(code, {})[layers] = r
        for path in ("eager", "captured"):
            one, two = (results[code][n][path] for n in (1, 2))
            for r in (one, two):
                r["clone_bytes"] = r["move_bytes_by_op"].get("clone", 0)
            keys = ("not_views", "clone_bytes", "input_casts", "input_cast_bytes", "move_bytes",
                    "cache_write_bytes")
            at28 = {k: one[k] + 27 * (two[k] - one[k]) for k in keys}
            results[code].setdefault("at_28_layers", {})[path] = at28
            mib = lambda b: f"{b / 2**20:,.1f}"
            three = lambda k, f=lambda v: f"{v:.0f}": " / ".join(f(r[k]) for r in (one, two, at28))
            length = results[code][1]["cache_length"][path]
            print(f"  {code}, {path} (cache of {length}): per token at 1 / 2 / 28 layers: operations (not "
                  f"views) {three('not_views')}; clones {three('clone_bytes', mib)} MiB; casts of weights "
                  f"{three('input_casts')}, {three('input_cast_bytes', mib)} MiB; all copies and casts "
                  f"{three('move_bytes', mib)} MiB", flush=True)
    return results

def bench_decode(before=None, reps=3):
    """caopd.sample's decode step at 64 rows (8 prompts x K = 8, 48 to 80 tokens, left-padded) x 64
    new tokens, greedy, one thread, on Llamas of Qwen3-0.6B's depth at width 64 (each operation
    costs its overhead, as on a GPU) and of its width at 8 layers (the arithmetic counts): operations
    and host reads per step (the caopd.py in `before` too, when given: the code before this change),
    tokens/s of caopd.sample eager and captured against generate, interleaved, median of reps after a
    warm-up, and the compile time. A random model never stops early: every row takes all 64 tokens."""
    import importlib.util
    import torch._inductor.config
    import transformers
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch._inductor.config.force_disable_caches = True  # the compile time of a first run: no cached kernels
    old = None
    if before:
        spec = importlib.util.spec_from_file_location("caopd_before", os.path.join(before, "caopd.py"))
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    results = []
    for width, layers in ((64, 28), (1024, 8)):
        model, new = llama(width, layers), 64
        prompts = decode_prompts(model.config.vocab_size)
        r = {"width": width, "layers": layers, "vocab": model.config.vocab_size, "rows": len(prompts), "new": new}
        if width == 64:
            eager = functools.partial(caopd.sample, decoder=hf.decoder)
            r["per_step"] = {"eager": count_per_step(eager, model, prompts)}
            if old is not None:
                r["per_step"]["before"] = count_per_step(old.sample, model, prompts)
        captured.COMPILED.clear()
        captured.COMPILE_SECONDS.clear()
        T = max(map(len, prompts))
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        end, outs = model.config.vocab_size, {}
        runs = {"eager": lambda: caopd.sample(model, prompts, new, end, temperature=0, decoder=hf.decoder),
                "captured": lambda: caopd.sample(model, prompts, new, end, temperature=0,
                                                 decoder=captured.decoder(model)),
                "generate": lambda: model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                                   min_new_tokens=new, pad_token_id=0)[:, T:].tolist()}
        if old is not None:
            runs["before"] = lambda: old.sample(model, prompts, new, end, temperature=0)
        times = {k: [] for k in runs}
        for rep in range(reps + 1):  # rep 0 warms up (and compiles)
            for name, f in runs.items():
                t0 = time.perf_counter()
                with torch.no_grad():
                    outs[name] = f()
                if rep:
                    times[name].append(time.perf_counter() - t0)
        r["compile_s"] = captured.COMPILE_SECONDS[0]
        tokens = len(prompts) * new
        r["tok_s"] = {k: tokens / statistics.median(v) for k, v in times.items()}
        r["times_s"] = times
        ref = outs["generate"]
        r["changed_per_1000"] = {k: 1000 * sum(a != b for x, y in zip(o, ref) for a, b in zip(x, y)) / tokens
                                 for k, o in outs.items() if k != "generate"}
        if width == 64:
            r["per_step"]["captured"] = compiled_launches_per_step(model, prompts)
        results.append(r)
        line = ", ".join(f"{k} {v:.0f}" for k, v in r["tok_s"].items())
        print(f"  Llama {width} x {layers} layers, {len(prompts)} rows x {new} tokens: tok/s {line}; compile "
              f"{r['compile_s']:.0f} s; greedy tokens changed per 1,000 against generate {r['changed_per_1000']}",
              flush=True)
        if "per_step" in r:
            print(f"    per decode step: {json.dumps(r['per_step'])}", flush=True)
    for rows, new in ((64, 256), (256, 64)):  # what a sampling call holds, against fit_batches' bound
        m = run_worker(worker="sample_memory", N=rows, V=new, d=1024, layers=8, decoder="eager")
        results[-1].setdefault("memory", []).append(m)
        print(f"  one call of {rows} rows x {new} new tokens (width 1024 x 8 layers, float32): peak "
              f"{m['measured_mib']:.0f} MiB above the model, memory.sampling_bytes bounds it at {m['bound_mib']:.0f} "
              f"MiB", flush=True)
    return results

def sampling_memory_worker(args):
    """--worker=sample_memory: the peak resident memory one caopd.sample call adds (--N rows x --V new
    tokens, a Llama of width --d x --layers layers, sampled, float32) against memory.sampling_bytes's
    bound for it, printed as a JSON line. --decoder=captured: the captured step, whose first call
    compiles it; measured is a second call, of other prompts of the same lengths (the compiler's own
    memory is not the call's)."""
    import ctypes
    torch.set_num_threads(1)
    model = llama(args.d, args.layers)
    prompts = decode_prompts(model.config.vocab_size, rows=args.N)
    captured_step = args.decoder == "captured"
    decoder = captured.decoder(model) if captured_step else hf.decoder
    run = lambda ps, seed: caopd.sample(model, ps, args.V, end_id=model.config.vocab_size, temperature=1.0,
                                        generator=torch.Generator().manual_seed(seed), decoder=decoder)
    if captured_step:
        run(prompts, SEED)
        prompts = [[t + 1 for t in p] for p in prompts]
        try:  # what the first call freed, back to the system: the baseline is what stays allocated
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
    before = rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # the peak from here: a child starts with its parent's
        f.write("5")
    run(prompts, SEED + 1)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    prompt = max(map(len, prompts))
    bound = args.N * memory.sampling_bytes(model, prompt, args.V, torch.float32, captured_step)
    print(json.dumps({"rows": args.N, "new": args.V, "width": args.d, "layers": args.layers,
                      "decoder": args.decoder,
                      "measured_mib": (peak - before) / 2**20, "bound_mib": bound / 2**20}))

def markdown_decode(results):
    lines = ["| model (width x layers) | before | eager | captured | generate | captured / generate | compile |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        t = r["tok_s"]
        lines.append(f"| {r['width']} x {r['layers']} | {t['before']:.0f} | {t['eager']:.0f} | {t['captured']:.0f} | "
                     f"{t['generate']:.0f} | {t['captured'] / t['generate']:.2f}x | {r['compile_s']:.0f} s |"
                     if "before" in t else
                     f"| {r['width']} x {r['layers']} | | {t['eager']:.0f} | {t['captured']:.0f} | {t['generate']:.0f} | "
                     f"{t['captured'] / t['generate']:.2f}x | {r['compile_s']:.0f} s |")
    return "\n".join(lines)

GPUS = {24: "RTX 4090", 80: "A100, H100", 139: "H200"}  # memory as the device reports it

def fits_table(real):
    """What fits on one GPU at the paper's settings, from bench_real's measured constants.
    Memory = 18 bytes x parameters (float32 weights, gradients and AdamW's two moments, and a frozen
    bfloat16 teacher: exact arithmetic) + the larger of what training and sampling hold on top, never
    at once (a sampling call frees all it allocated when it returns, before the backward pass):
    training, the activations of one micro-batch (measured: Qwen3-0.6B's extra memory per sequence
    token under bfloat16 autocast, from 8 and 16 sequences at once on the CPU, scaled to other sizes by
    hidden size x layers), the fused loss's float32 gradient of the output layer (V x d x 4 bytes) and
    its buffers (~100 MB); sampling, memory.sampling_bytes's arithmetic for rollout_batch rows (the
    bfloat16 KV cache, layers x 2 x 8 KV heads x 128 x 2 bytes a position, of the captured step's
    longer cache; the step's working set and sample's logits) and a bfloat16 copy of the weights."""
    rows = {(r["grad_checkpoint"], r["sequences"]): r for r in real["rows"]
            if r["dtype"] == "bfloat16" and r["micro_batch"] == 0}
    tokens_per_seq = real["tokens_per_sequence"]  # the measurement's student prompt + new tokens
    per_token = {ck: (rows[(ck, 16)]["peak_mib"] - rows[(ck, 8)]["peak_mib"]) * 2**20 / (8 * tokens_per_seq)
                 for ck in (False, True)}  # bytes per token of a micro-batch, at 0.6B
    sizes = {"0.6B": (0.596e9, 1024, 28, 16, 3072), "1.7B": (1.72e9, 2048, 28, 16, 6144),
             "4B": (4.02e9, 2560, 36, 32, 9728), "8B": (8.19e9, 4096, 36, 32, 12288)}  # and heads, MLP
    prompt, new, V, rows_out = 300, 1024, 151936, []  # a ~300-token prompt and 1,024 new tokens
    length = captured.cache_length(prompt, new)
    for name, (P, d, layers, heads, mlp) in sizes.items():
        scale = d * layers / (1024 * 28)
        kv = layers * 2 * 8 * 128 * 2  # bytes a position
        per_row = (kv * length + prompt * (kv + (4 * d + 3 * mlp) * 2 + 4 * 8 * prompt)  # sampling_bytes
                   + 4 * heads * length + (4 * d + 3 * mlp + heads * 128) * 2 + 6 * V + 16 * V)
        for mb, ck, rb in ((64, False, 64), (16, False, 64), (16, True, 64), (4, True, 16)):
            training = per_token[ck] * scale * mb * (prompt + new) + V * d * 4 + 100e6
            sampling = 2 * P + rb * per_row
            gib = (18 * P + max(training, sampling)) / 2**30
            rows_out.append({"model": name, "micro_batch": mb, "grad_checkpoint": ck, "rollout_batch": rb, "gib": gib,
                             **{f"fits_{g}": gib < g * 0.93 for g in GPUS}})  # ~7% for CUDA's own
    return {"bytes_per_token_0.6B": per_token, "rows": rows_out}

def fsdp_fits_table(per_token_kib=(1528, 243)):
    """Per-GPU memory at the paper's settings (8 prompts x K = 8 rows, ~300-token prompts + 1,024
    new tokens, grad_checkpoint=True, micro_batch=4) on 1, 2, 4 and 8 GPUs: one GPU as fits_table
    (18 bytes a parameter with the bfloat16 frozen teacher), FSDP2 on several: 20 bytes a parameter
    shared by the N GPUs (float32 weights, gradients, AdamW's two moments and the float32 teacher's
    shards), plus what no GPU shares: the root's weights (embedding and output layer, of student and
    teacher, float32), and the larger of two working sets: rollouts (every student layer gathered in
    float32 and its bfloat16 autocast copy, the KV cache of 64 / N rows) or training (the root's
    gradient, the fused loss's float32 output gradient, two gathered layers, a micro-batch's
    activations, per_token_kib at 0.6B with checkpointing scaled by width x layers as fits_table)."""
    sizes = {"0.6B": (0.596e9, 1024, 28, True), "1.7B": (1.72e9, 2048, 28, True), "4B": (4.02e9, 2560, 36, True),
             "8B": (8.19e9, 4096, 36, False)}  # parameters, width, layers, tied embedding
    V, seq, mb, rows_out = 151936, 300 + 1024, 4, []
    for name, (P, d, layers, tied) in sizes.items():
        scale, root = d * layers / (1024 * 28), V * d * (1 if tied else 2)  # root: parameters no layer holds
        act = per_token_kib[1] * 1024 * scale * mb * seq
        for n in (1, 2, 4, 8):
            kv = layers * 2 * 8 * 128 * 2 * (64 // n) * seq
            if n == 1:
                gib = (18 * P + act + kv + V * d * 4 + 100e6) / 2**30
            else:
                layer = (P - root) / layers
                rollouts = (P - root) * (4 + 2) + kv
                training = root * 4 + V * d * 4 + 2 * layer * 4 + act
                gib = (20 * P / n + 2 * root * 4 + max(rollouts, training) + 100e6) / 2**30
            rows_out.append({"model": name, "gpus": n, "gib": gib, **{f"fits_{g}": gib < g * 0.93 for g in GPUS}})
    return rows_out

def markdown_fsdp_fits(rows):
    L = ["| model | GPUs | GiB per GPU | " + " | ".join(f"{GPUS[g]} ({g} GiB)" for g in GPUS) + " |", "|---|---:|---:|---|---|---|"]
    for r in rows:
        L.append(f"| {r['model']} | {r['gpus']}{'' if r['gpus'] == 1 else ' (FSDP2)'} | {r['gib']:.0f} | "
                 + " | ".join("yes" if r[f"fits_{g}"] else "no" for g in GPUS) + " |")
    return "\n".join(L)

# -----------------------------------------------------------------------------
# targets, report

def check_targets(loss, sampler):
    """(description, measured, limit, pass) for each target of the issue."""
    by_shape = {(r["N"], r["d"], r["V"]): r for r in loss}
    t = []
    if (r := by_shape.get((2048, 256, 32768))):
        t.append(("(2048, 256, 32768) fused/unfused memory <= 0.15", r["mem_ratio"], 0.15))
        t.append(("(2048, 256, 32768) fused/unfused time <= 0.8", r["time_ratio"], 0.8))
    if (r := by_shape.get((1024, 512, 151936))):
        t.append(("(1024, 512, 151936) fused/unfused memory <= 0.2", r["mem_ratio"], 0.2))
        t.append(("(1024, 512, 151936) fused time / GEMM floor <= 1.8", r["fused_vs_time_floor"], 1.8))
    out = [{"target": name, "value": v, "limit": lim, "pass": v <= lim} for name, v, lim in t]
    for r in sampler:
        cfg = f"B={r['batch']} prompt={r['prompt']} new={r['new_tokens']}"
        out.append({"target": f"{cfg} cache/no-cache >= 10", "value": r["cache_vs_no_cache"], "limit": 10,
                    "pass": r["cache_vs_no_cache"] >= 10})
        if r["cache_vs_hf"] is not None:
            out.append({"target": f"{cfg} cache/HF generate >= 1.2", "value": r["cache_vs_hf"], "limit": 1.2,
                        "pass": r["cache_vs_hf"] >= 1.2})
    return out

def markdown(loss, sampler, targets):
    L = ["| shape (N, d, V) | unfused MB | fused MB | mem fused/unfused | fused / mem floor "
         "| unfused s | fused s | time fused/unfused | fused / GEMM floor |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in loss:
        u, f = r["unfused"], r["fused"]
        L.append(f"| ({r['N']}, {r['d']}, {r['V']}) | {u['extra_mb']:.0f} | {f['extra_mb']:.0f} | "
                 f"{r['mem_ratio']:.3f} | {r['fused_vs_mem_floor']:.2f}x ({r['mem_floor_mb']:.0f} MB) | "
                 f"{u['median_s']:.3f} | {f['median_s']:.3f} | {r['time_ratio']:.3f} | "
                 f"{r['fused_vs_time_floor']:.2f}x ({f['gemm_floor_s']:.3f} s, {f['gemm_gflops']:.0f} GFLOP/s) |")
    L += ["", "Extra peak RSS over the inputs, median forward+backward seconds; 1 thread, float32. Floors: "
          "memory = gradients + one chunk of logits, time = the 8NdV GEMM FLOPs at the measured GEMM speed."]
    L += ["", "| shape (N, d, V) | max abs err vs float64: loss | grad_h | grad_w | "
          "(unfused, fused) |", "|---|---:|---:|---:|---|"]
    for r in loss:
        e = r["errors"]
        L.append(f"| ({r['N']}, {r['d']}, {r['V']}) | {e['unfused']['loss']:.1e}, {e['fused']['loss']:.1e} | "
                 f"{e['unfused']['grad_h']:.1e}, {e['fused']['grad_h']:.1e} | "
                 f"{e['unfused']['grad_w']:.1e}, {e['fused']['grad_w']:.1e} | "
                 f"loss {e['loss']:.3f}, max abs grad_h {e['max_abs_grad_h']:.1e}, grad_w {e['max_abs_grad_w']:.1e} |")
    if sampler:
        L += ["", "| sampler (batch = prompts x K, prompt, new) | KV cache tok/s | no cache tok/s | HF generate tok/s "
              "| cache / no cache (positions ratio) | cache / HF |", "|---|---:|---:|---:|---:|---:|"]
        for r in sampler:
            hf = (f"{r['hf_tok_s']:.0f}", f"{r['cache_vs_hf']:.2f}x") if r["cache_vs_hf"] else ("n/a", "n/a")
            L.append(f"| ({r['batch'] // r['K']} x {r['K']}, {r['prompt']}, {r['new_tokens']}) | {r['cache_tok_s']:.0f} | "
                     f"{r['no_cache_tok_s']:.0f} | {hf[0]} | {r['cache_vs_no_cache']:.1f}x "
                     f"({r['positions_ratio']:.1f}x) | {hf[1]} |")
        L += ["", "Positions ratio: token positions the no-cache loop runs through the model over those the "
              "cache runs (caopd.sample runs each distinct prompt once), the best the cache can do against it."]
    L += ["", "| target | measured | |", "|---|---:|---|"]
    L += [f"| {t['target']} | {t['value']:.3f} | {'PASS' if t['pass'] else 'FAIL'} |" for t in targets]
    return "\n".join(L)

def load_worker(model_dir, fsdp):
    """Under torchrun: load model_dir as train_small.py does; print this process's resident memory."""
    import parallel
    cfg = SimpleNamespace(init_from=model_dir, fsdp=fsdp == "True", device=parallel.init("cpu"), grad_checkpoint=False)
    import transformers  # noqa: F401  (its import is not the model's memory)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    before = rss_bytes()  # torch, transformers and the process group, before any weight
    model = models.load_model(cfg)[0]
    print(f"rank {parallel.RANK}: {rss_bytes() / 2**20:.0f} MiB resident, peak {peak_rss_bytes() / 2**20:.0f} MiB after "
          f"loading {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {before / 2**20:.0f} MiB before",
          flush=True)
    parallel.close()

def peak_per_rank(cmd, marker):
    """Run a torchrun command; returns {rank: peak resident MiB (VmHWM)} of its training processes
    (those whose command line holds `marker`), read from /proc while they run."""
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    peaks, lines = {}, []
    reader = __import__("threading").Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    while p.poll() is None:
        for pid in (d for d in os.listdir("/proc") if d.isdigit()):
            try:
                if marker.encode() not in open(f"/proc/{pid}/cmdline", "rb").read():
                    continue
                env = dict(kv.split(b"=", 1) for kv in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in kv)
                hwm = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM"))
            except (OSError, StopIteration):  # ended meanwhile
                continue
            if b"RANK" in env:
                rank = int(env[b"RANK"])
                peaks[rank] = max(peaks.get(rank, 0), hwm / 1024)
        time.sleep(0.2)
    reader.join()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{''.join(lines)[-3000:]}")
    return peaks, "".join(lines)

def bench_fsdp():
    """Each of 2 processes' peak resident memory (gloo, one thread each) while training a Llama of
    width 1024 and 8 layers (CaOPD, 2 steps on the toy task), under FSDP2 against DDP; and each
    process's memory right after loading the model (its files in bfloat16, as Qwen3's are).
    FSDP2's processes hold half of the weights, gradients, AdamW state and teacher; under DDP
    each holds all of them. Rank 0 also gathers the whole model and optimizer to write ckpt.pt."""
    from transformers import LlamaConfig
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        params = make_hf(tmp, LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2752, num_hidden_layers=8,
                                          num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048),
                         dtype=torch.bfloat16)
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        for fsdp in (False, True):
            out, _ = run_measured(run + [__file__, "--worker=load", f"--save={tmp}", f"--compare={fsdp}"],
                                  env={"OMP_NUM_THREADS": "1"})
            loaded = {int(line.split()[1][:-1]): (float(line.split()[6]), float(line.split()[-3])) for line in out.splitlines()
                      if line.startswith("rank ") and "resident" in line}  # rank -> (peak, before loading)
            with tempfile.TemporaryDirectory() as out_dir:
                cmd = run + [os.path.join(HERE, "train_small.py"), f"--init_from={tmp}", "--task=arith", "--method=caopd",
                             "--n_eval=4", "--steps=2", "--prompts_per_step=2", "--K=8", "--max_new_tokens=16",
                             "--ckpt_every=1000", f"--fsdp={fsdp}", f"--out_dir={out_dir}"]
                peaks, _ = peak_per_rank(cmd, out_dir)
            name = "fsdp" if fsdp else "ddp"
            rows[name] = {"train_peak_mib": peaks, "load_peak_mib": loaded}
            print(f"  {'FSDP2' if fsdp else 'DDP  '}: loading {loaded[0][0] - loaded[0][1]:.0f} / "
                  f"{loaded[1][0] - loaded[1][1]:.0f} MiB above the {loaded[0][1]:.0f} MiB before it (rank 0 / 1),"
                  f" peak of the run {peaks[0]:.0f} / {peaks[1]:.0f} MiB", flush=True)
    rows["params"] = params
    rows["ratio_rank1"] = rows["fsdp"]["train_peak_mib"][1] / rows["ddp"]["train_peak_mib"][1]
    print(f"  {params / 1e6:.0f}M parameters ({params * 4 / 2**20:.0f} MiB in float32); FSDP2 / DDP peak of rank 1: "
          f"{rows['ratio_rank1']:.2f}x", flush=True)
    return rows

def bench_first_run(reps):
    """`python train_small.py` as a newcomer runs it first (stage 0 trained, nothing cached), one
    method after the other (--workers=1, how it ran before) against the default (side by side on a
    machine with two cores), alternated, reps runs each, each alone in an empty out_dir: the wall
    seconds, their medians and ratio, and whether every run's results.json models and
    completions.jsonl are byte-identical to the first one-after-the-other run's. The runs stay in
    out/bench_first_run/."""
    times, outputs = {1: [], 0: []}, []
    for i in range(reps):
        for workers in (1, 0):
            out_dir = os.path.join(HERE, "out", "bench_first_run", f"workers{workers}-{i + 1}")  # kept: its curves
            shutil.rmtree(out_dir, ignore_errors=True)
            t0 = time.perf_counter()
            run_measured([sys.executable, os.path.join(HERE, "train_small.py"), f"--workers={workers}",
                          f"--out_dir={out_dir}"])
            times[workers].append(time.perf_counter() - t0)
            res = json.load(open(os.path.join(out_dir, "results.json")))
            outputs.append((json.dumps(res["models"]), open(os.path.join(out_dir, "completions.jsonl")).read()))
            print(f"  run {i + 1}, {'one after the other' if workers == 1 else 'the default (side by side)'}: "
                  f"{times[workers][-1]:.0f} s (stage 0 {res['seconds']['base']:.0f} s, opd "
                  f"{res['seconds']['opd']:.0f} s, caopd {res['seconds']['caopd']:.0f} s, evaluation "
                  f"{res['seconds']['eval']:.0f} s; workers={res['config']['workers']})", flush=True)
    same = all(o == outputs[0] for o in outputs)
    med = {w: statistics.median(t) for w, t in times.items()}
    print(f"  median {med[1]:.0f} s one after the other, {med[0]:.0f} s the default: {med[0] / med[1]:.2f}x; results and "
          f"completions of all {len(outputs)} runs byte-identical: {same}", flush=True)
    return {"seconds_one_after_the_other": times[1], "seconds_default": times[0], "median_ratio": med[0] / med[1],
            "byte_identical": same}

def machine_info():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    info = {"torch": torch.__version__, "threads": 1, "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info

def main_real_models(args):
    """--memory, --real, --gpu: the real-model measurements, each as asked."""
    t0, report = time.time(), {"machine": machine_info()}
    report["machine"]["threads"] = args.threads
    if args.precision:
        print("float32 against bfloat16 weights under AdamW (1 thread):", flush=True)
        report["precision"] = bench_precision()
    if args.memory:
        print("memory of a step, a Llama of width 512 and 8 layers (1 thread):", flush=True)
        report["memory"] = bench_memory()
    if args.real:
        print(f"Qwen3-0.6B's shapes through train_small.py on the CPU ({args.threads} threads):", flush=True)
        report["real"] = bench_real(args.threads)
        report["fits"] = fits_table(report["real"])
        print(markdown_real(report["real"], report["fits"]))
    if args.gpu:
        print("the paper's settings at Qwen3-0.6B's shapes on the GPU:", flush=True)
        report["gpu"] = bench_gpu(args.tiny, out=args.out)
    if args.first_run:
        print(f"python train_small.py from an empty out_dir, {args.reps} times each way, alternated:", flush=True)
        report["first_run"] = bench_first_run(args.reps)
    if args.fsdp:
        print("2 processes (gloo), a Llama of width 1024 and 8 layers: FSDP2 against DDP:", flush=True)
        report["fsdp"] = bench_fsdp()
        report["fsdp_fits"] = fsdp_fits_table()
        print(markdown_fsdp_fits(report["fsdp_fits"]))
    report["elapsed_s"] = time.time() - t0
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, args.out)
    print(f"took {report['elapsed_s']:.0f} s; wrote {args.out}")

def markdown_real(real, fits):
    L = ["| compute | micro_batch = rollout_batch | grad_checkpoint | sequences | peak RSS (GiB) | s / step |",
         "|---|---:|---|---:|---:|---:|"]
    for r in real["rows"]:
        L.append(f"| {r['dtype']} | {r['micro_batch']} | {r['grad_checkpoint']} | {r['sequences']} | "
                 f"{r['peak_mib'] / 1024:.1f} | {r['s_per_step']:.1f} |")
    c = real["prompt_cache"]
    L += ["", f"Prompt cache ({c['questions']} questions x K = {c['K']}, ~{c['prompt']}-token prompts, ~{c['new']} new "
          f"tokens): no grad {c['shared, no grad']:.2f} s shared vs {c['whole, no grad']:.2f} s whole; forward + "
          f"backward {c['shared, fwd+bwd']:.2f} s vs {c['whole, fwd+bwd']:.2f} s."]
    b = fits["bytes_per_token_0.6B"]
    L += ["", f"Measured at 0.6B: {b[False] / 2**10:.0f} KiB per token of a micro-batch, {b[True] / 2**10:.0f} KiB with "
          "gradient checkpointing (bfloat16 autocast).", "",
          "| model | micro_batch | grad_checkpoint | rollout_batch | GiB | " + " | ".join(f"{GPUS[g]} ({g} GiB)" for g in GPUS)
          + " |",
          "|---|---:|---|---:|---:|---|---|---|"]
    for r in fits["rows"]:
        L.append(f"| {r['model']} | {r['micro_batch']} | {r['grad_checkpoint']} | {r['rollout_batch']} | {r['gib']:.0f} | "
                 + " | ".join("yes" if r[f"fits_{g}"] else "no" for g in GPUS) + " |")
    return "\n".join(L)

def main(args):
    if args.copies:
        print("the decode step's copies and casts per token, eager and captured (Qwen3-0.6B's shapes, 1 and "
              "2 layers, 64 rows, a cache for 320 + 1,024 tokens, bfloat16 autocast; 1 thread)", flush=True)
        results = bench_copies(args.before)
        with open(args.out, "w") as f:
            json.dump({"machine": machine_info(), "copies": results}, f, indent=1)
        return print(f"wrote {args.out}")
    if args.decode:
        print("decode step: 64 rows x 64 new tokens, greedy, 1 thread", flush=True)
        results = bench_decode(args.before, args.reps)
        print()
        print(markdown_decode(results))
        with open(args.out, "w") as f:
            json.dump({"machine": machine_info(), "decode": results}, f, indent=1)
        return print(f"wrote {args.out}")
    if args.precision or args.memory or args.real or args.gpu or args.fsdp or args.first_run:
        return main_real_models(args)
    t0 = time.time()
    shapes = SHAPES[:2] if args.quick else SHAPES
    print(f"loss benchmark: {len(shapes)} shapes, float32, 1 thread", flush=True)
    loss = bench_loss(shapes, reps=3 if args.quick else 5)
    # (batch, K, prompt, new tokens, repetitions): training's shape (16 prompts x K=8 rollouts,
    # 15-token prompts, 12 new tokens; cheap, so more repetitions) and a longer one
    configs = [(128, 8, 15, 12, 7)] + ([] if args.quick else [(128, 8, 64, 64, 3)])
    print("sampler benchmark: 1 thread, median of the repetitions", flush=True)
    sampler = bench_sampler(configs)
    print("Hugging Face model rollouts: caopd.sample vs generate, 1 thread, greedy", flush=True)
    hf = bench_hf_sampler(32 if args.quick else 64, 8, 16 if args.quick else 32, 3)
    targets = check_targets(loss, sampler)
    print()
    print(markdown(loss, sampler, targets))
    print(f"\n| HF model rollouts (rows, new tokens) | caopd.sample tok/s | generate tok/s | ratio | identical completions |"
          f"\n|---|---:|---:|---:|---:|\n| ({hf['rows']}, {hf['new_tokens']}) | {hf['ours_tok_s']:.0f} | "
          f"{hf['hf_tok_s']:.0f} | {hf['ours_vs_hf']:.2f}x | {hf['same_completions']:.0%} |")
    elapsed = time.time() - t0
    print(f"\n{sum(t['pass'] for t in targets)}/{len(targets)} targets pass; took {elapsed:.0f} s")
    report = {"machine": machine_info(), "quick": args.quick, "elapsed_s": elapsed,
              "loss": loss, "sampler": sampler, "hf_sampler": hf, "targets": targets}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:  # write then rename: a reader never sees half a file
        json.dump(report, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="first two loss shapes, short sampler config")
    p.add_argument("--precision", action="store_true", help="share of weights AdamW moves at real learning rates, "
                   "float32 against bfloat16 weights: ~1 minute")
    p.add_argument("--memory", action="store_true", help="peak memory of a step against prompts per step (a Llama, "
                   "width 512, 8 layers), with and without micro-batches: ~5 minutes")
    p.add_argument("--real", action="store_true", help="Qwen3-0.6B's shapes through train_small.py on the CPU: "
                   "seconds and peak memory per step, float32 / bfloat16, micro-batches, checkpointing; the table "
                   "of what fits on a GPU: ~25 minutes and 20 GB of RAM")
    p.add_argument("--gpu", action="store_true", help="the one device check (docs/gpu.md), within 8 "
                   "minutes on a GPU: rollouts and a 300-row evaluation eager and captured, memory against "
                   "the bound, a step's time split, the fused loss; each figure printed and written to --out")
    p.add_argument("--fsdp", action="store_true", help="2 processes (gloo): peak memory per process of a Llama of "
                   "width 1024 x 8 layers under FSDP2 against DDP, and after loading: ~3 minutes")
    p.add_argument("--first_run", action="store_true", help="the default train_small.py run one method after the "
                   "other against side by side, --reps times each, alternated: ~10 minutes a pair on 2 cores")
    p.add_argument("--decode", action="store_true", help="the decode step: operations and host reads per token, "
                   "tokens/s of caopd.sample eager and captured against generate, compile time: ~10 minutes")
    p.add_argument("--copies", action="store_true", help="the decode step's copies and casts per token, "
                   "eager and captured, with their bytes (--before: another checkout's too): ~9 minutes")
    p.add_argument("--before", help="with --decode: a folder holding another caopd.py to measure beside this "
                   "one; with --copies: another checkout (git worktree add) measured the same way")
    p.add_argument("--tiny", action="store_true", help="with --gpu: a tiny model on any device (checks the script)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for --real")
    p.add_argument("--out", default=os.path.join(HERE, "bench.json"))
    # internal: the subprocess workers
    p.add_argument("--worker", choices=["fused", "unfused", "ref", "load", "sample_memory", "copies"],
                   help=argparse.SUPPRESS)
    p.add_argument("--N", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    p.add_argument("--V", type=int, help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--decoder", choices=["eager", "captured"], default="eager", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--compare", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "ref":
        reference_worker(args)
    elif args.worker == "load":
        load_worker(args.save, args.compare)
    elif args.worker == "sample_memory":
        sampling_memory_worker(args)
    elif args.worker == "copies":
        copies_worker(args)
    elif args.worker:
        loss_worker(args)
    else:
        main(args)
