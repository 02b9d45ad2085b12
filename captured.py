"""
The captured decode step (--compile_decode): rollouts at a GPU's speed; nothing the method needs.

A decode step is one token per row through every layer: ~1,400 small operations (not counting
views) for a Llama of 28 layers, each a kernel launch of a few microseconds on a GPU, against a
few milliseconds of arithmetic for a 0.6B model. So the host, not the GPU, sets the pace, unless
the step is captured: compiled once (torch.compile) over shapes that never change (a KV cache
allocated for the whole call, positions that are tensors), and on a GPU recorded as one CUDA graph
at a call's first token and replayed at every other. decoder(model) gives caopd.sample such a
decoder, for our GPT or a Hugging Face model.

What a call allocates lives until it returns (memory.sampling_bytes counts it): its KV cache, the
CUDA graph's memory (the step's working set) and the copy of the model the step runs
(decode_copy). Nothing is kept for the next call, so nothing is held through a backward pass.
"""
import copy
import gc
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

import caopd
import hf

COMPILED, COMPILE_SECONDS = {}, []  # step function -> its compiled version; each compile's seconds

def compiled(fn):
    """fn under torch.compile (one per process, for every model and shape). A call that compiles (the
    first, and one per new shape: a model, a batch, a cache length) is timed and said."""
    from torch._dynamo.utils import counters
    if torch.__version__ < (2, 5):  # torch's default from 2.5: each call's step runs a new copy of the
        # model (decode_copy), whose parameters are then inputs of the compiled step, not its constants
        torch._dynamo.config.inline_inbuilt_nn_modules = True
    if fn not in COMPILED:
        COMPILED[fn] = torch.compile(fn, fullgraph=True)
    f = COMPILED[fn]

    def step(*args):
        graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
        out = f(*args)
        if counters["stats"]["unique_graphs"] != graphs:
            COMPILE_SECONDS.append(time.perf_counter() - t0)
            print(f"compiled the rollouts' decode step in {COMPILE_SECONDS[-1]:.0f}s ("
                  f"{'then one CUDA graph a call' if out.is_cuda else 'no CUDA graphs on a CPU'}; "
                  f"--compile_decode=false runs it eagerly)", flush=True)
        return out
    return step

def cache_length(prompt, new):
    """The captured step's cache length for prompts of up to `prompt` tokens and `new` new ones: a
    multiple of 64 with at most 3 significant bits (..., 1024, 1280, 1536, 1792, 2048, 2560, ...), so
    at most 4 lengths an octave, each at most a quarter longer than needed: each new shape compiles
    the step again (tens of seconds), and prompts of nearby lengths share one."""
    n = prompt + new
    step = max(64, 1 << max(0, (n - 1).bit_length() - 3))
    return -(-n // step) * step

def replayed(step, args, state=()):
    """A function of no arguments running step(*args), whose tensors the caller updates in place
    between calls. On a GPU step is recorded as one CUDA graph at the first call (after two runs that
    compile it and let its libraries allocate their workspaces) and replayed after: its inputs and
    output stay where they were recorded. state: the tensors step changes in place besides its output
    (its KV cache's writes are the same each time), restored after those two runs. Elsewhere step
    itself; and where a capture fails, step itself, said once."""
    if not any(torch.is_tensor(a) and a.is_cuda for a in args):
        run = lambda: step(*args)
        weakref.finalize(run, _collect_after_compiling, len(COMPILE_SECONDS))
        return run
    graph, out = None, None

    def run():
        nonlocal graph, out
        if graph is None:
            before = [t.clone() for t in state]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step(*args)
                    for t, b in zip(state, before):
                        t.copy_(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    out = step(*args)
            except RuntimeError as e:
                graph = False
                print(f"note: the decode step could not be recorded as a CUDA graph "
                      f"({str(e).splitlines()[0][:200]}); it runs compiled without one", flush=True)
        if graph is False:
            return step(*args)
        graph.replay()
        return out  # overwritten by the next replay: the caller reads it first
    weakref.finalize(run, _collect_after_compiling, len(COMPILE_SECONDS))
    return run

def _collect_after_compiling(compiles):
    """At the end of a call (its step function freed): if it compiled, the compiler left reference
    cycles holding the call's inputs (its KV cache, its copy of the model), which would otherwise
    stay allocated, through the backward pass, until Python's cyclic collector happened to run."""
    if len(COMPILE_SECONDS) > compiles:
        gc.collect()

def decode_copy(model):
    """(the model the captured step runs, its output weight (V, C)): model's modules over model's own
    tensors, except that under autocast (caopd.compute_dtype) every nn.Linear's weight and bias, and
    the output weight, are copies in autocast's dtype, made here once for the call. Inside a compiled
    step autocast would cast every weight again at every token (its cache of casts works only
    eagerly): 2 bytes a parameter written, 4 read, every token. The copies hold the values autocast's
    casts give, so the logits are the eager step's. A Hugging Face model's copy has its own config,
    naming hf.grouped_attention."""
    dtype = caopd.compute_dtype(caopd.output_weight(model).device)
    twin = copy.deepcopy(model, {id(t): t for t in [*model.parameters(), *model.buffers()]})
    casts = {}  # a tied weight is cast once

    def cast(t):
        if id(t) not in casts:
            casts[id(t)] = t.detach().to(dtype)
        return casts[id(t)]
    if dtype is not None:
        for m in twin.modules():
            if isinstance(m, nn.Linear):
                for name, p in list(m.named_parameters(recurse=False)):
                    if p.is_floating_point() and p.dtype != dtype:
                        setattr(m, name, nn.Parameter(cast(p), requires_grad=False))
    if not isinstance(model, caopd.GPT):
        hf.use_grouped_attention(twin)
    head = caopd.output_weight(twin)
    return twin, head if dtype is None else cast(head)

def gpt_step(model, head, cache, nxt, pos):
    """Our GPT's forward for token nxt (B,) at position pos (a 1-element tensor) -> logits (B, V):
    caopd.Block's attention over the whole cache, its unwritten part masked, so that the shapes
    never change from one token to the next. head: the output weight (decode_copy's)."""
    x = model.wte(nxt[:, None]) + model.wpe(pos)  # (B, 1, C)
    mask = (torch.arange(cache[0][0].shape[2], device=x.device) <= pos)[None]  # (1, L)
    B, T, C = x.shape
    for block, (K, V) in zip(model.blocks, cache):
        q, k, v = block.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, block.n_head, C // block.n_head).transpose(1, 2) for t in (q, k, v))
        K.index_copy_(2, pos, k), V.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, K, V, attn_mask=mask)
        x = x + block.c_proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + block.mlp(block.ln_2(x))
    return model.ln_f(x)[:, -1] @ head.T

def gpt_decoder(model, prompts, max_new_tokens):
    """caopd.gpt_decoder with the captured step, over a cache of cache_length positions."""
    Tp = len(prompts[0])
    h0, cache = caopd.prefill(model, prompts, cache_length(Tp, max_new_tokens))
    for k, v in cache:  # the step attends to the whole cache, its unwritten part masked: 0 x NaN would be NaN
        k[:, :, Tp:].zero_(), v[:, :, Tp:].zero_()
    twin, head = decode_copy(model)
    nxt = torch.zeros(len(prompts), dtype=torch.long, device=h0.device)
    pos = torch.tensor([Tp - 1], device=h0.device)
    run = replayed(compiled(gpt_step), (twin, head, cache, nxt, pos))

    def decode(token):
        if token is None:
            return h0 @ head.T
        nxt.copy_(token), pos.add_(1)
        return run()
    return decode

def hf_decoder(model, prompts, max_new_tokens):
    """hf.decoder with the captured step, over a static cache of cache_length positions."""
    length = cache_length(max(map(len, prompts)), max_new_tokens)
    h0, cache, mask, pos = hf.static_cache(model, prompts, length)
    twin, head = decode_copy(model)
    nxt = torch.zeros_like(pos)
    run = replayed(compiled(hf.decode_step), (twin, cache, mask, nxt, pos, head),
                   state=[layer.cumulative_length for layer in cache.layers])

    def decode(token):
        if token is None:
            return F.linear(h0, head).float()
        nxt.copy_(token)
        logits = run()
        pos.add_(1)
        return logits
    return decode

def decoder(model):
    """The captured decoder for model, our GPT or a Hugging Face causal LM."""
    return gpt_decoder if isinstance(model, caopd.GPT) else hf_decoder
