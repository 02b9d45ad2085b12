"""
The captured decode step (--compile_decode): rollouts at a GPU's speed; nothing the method needs.

A decode step is one token per row through every layer: ~1,400 small operations (not counting
views) for a Llama of 28 layers, each a kernel launch of a few microseconds on a GPU, against a
few milliseconds of arithmetic for a 0.6B model. So the host, not the GPU, sets the pace, unless
the step is captured: compiled once (torch.compile) over shapes that never change (a KV cache
allocated for the whole call, a position that is a tensor), and on a GPU replayed as one CUDA graph
per token. decoder(model) gives caopd.sample such a decoder, for our GPT or a Hugging Face model.
"""
import functools
import time
import weakref

import torch
import torch.nn.functional as F

import caopd
import hf

COMPILED, COMPILE_SECONDS = {}, []  # step function -> its compiled version; each compile's seconds

def compiled(fn):
    """fn under torch.compile (one per process, for every model and shape). A call that compiles (the
    first, and one per new shape: a model, a batch, a cache length) is timed and said."""
    from torch._dynamo.utils import counters
    on_gpu = torch.cuda.is_available()
    if fn not in COMPILED:
        COMPILED[fn] = torch.compile(fn, mode="reduce-overhead" if on_gpu else None, fullgraph=True)
    f = COMPILED[fn]

    def step(*args):
        graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
        out = f(*args)
        if counters["stats"]["unique_graphs"] != graphs:
            COMPILE_SECONDS.append(time.perf_counter() - t0)
            print(f"compiled the rollouts' decode step in {COMPILE_SECONDS[-1]:.0f}s ("
                  f"{'CUDA graphs' if on_gpu else 'no CUDA graphs on a CPU'}; --compile_decode=false runs it "
                  f"eagerly)", flush=True)
        return out
    return step

# A CUDA graph reads its inputs where it was recorded: a captured step given a new KV cache at every
# call would be recorded again each time (and after enough times not replayed at all). So the
# captured step keeps its cache (one per model, the last shape) and each call writes its prompts
# into it, as transformers' generate keeps its static cache.
KEPT = weakref.WeakKeyDictionary()  # model -> (shape, its KV cache)

def kept_cache(model, shape, make):
    """The KV cache kept for model if it has this shape, else a new one from make(), kept instead."""
    if model not in KEPT or KEPT[model][0] != shape:
        KEPT.pop(model, None)  # the old one's memory first
        KEPT[model] = (shape, make())
    return KEPT[model][1]

def gpt_step(model, cache, nxt, pos):
    """Our GPT's forward for token nxt (B,) at position pos (a 1-element tensor) -> logits (B, V):
    caopd.Block's attention over the whole cache, its unwritten part masked, so that the shapes
    never change from one token to the next."""
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
    return model.ln_f(x)[:, -1] @ model.wte.weight.T

def gpt_decoder(model, prompts, max_new_tokens):
    """caopd.gpt_decoder with the captured step, over the cache kept for model (made with zeros: the
    step attends to the whole cache, its unwritten part masked, and 0 x NaN would be NaN)."""
    Tp = len(prompts[0])
    h0, cache = caopd.prefill(model, prompts, Tp + max_new_tokens)

    def make():
        kept = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in cache]
        for k, v in kept:
            torch._dynamo.mark_static_address(k), torch._dynamo.mark_static_address(v)
        return kept
    kept = kept_cache(model, (cache[0][0].shape, cache[0][0].dtype), make)
    for (K, V), (k, v) in zip(kept, cache):
        K[:, :, :Tp], V[:, :, :Tp] = k[:, :, :Tp], v[:, :, :Tp]
    step, pos = compiled(gpt_step), torch.tensor([Tp - 1], device=h0.device)

    def decode(nxt):
        if nxt is None:
            return h0 @ model.wte.weight.T
        return step(model, kept, nxt, pos.add_(1))
    return decode

def decoder(model):
    """The captured decoder for model, our GPT or a Hugging Face causal LM."""
    if isinstance(model, caopd.GPT):
        return gpt_decoder
    return functools.partial(hf.decoder, step=compiled(hf.decode_step), keep=kept_cache)
