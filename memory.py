"""
How much a device holds: the rows a sampling call can take (fit_batches, before anything is
trained or written) and, on a GPU, the fused loss's rows per chunk. Nothing here changes a number
of a run: fewer rows a call give the same rollouts (each row's random numbers are its own).
"""
import math

import torch

import caopd
import captured as captured_step
import cli
import hf
import models
import tokenizer
from parallel import WORLD

EVAL_CAP = 500  # eval_batch = 0: at most this many questions a call (fewer where they do not fit)

def free_memory(device):
    """Bytes this process can still allocate on device: CUDA's free memory plus what torch's
    allocator holds unused; on the CPU Linux's MemAvailable; None where neither is known."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_free(device)
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None

def cuda_free(device):
    """Bytes this process can still allocate on a CUDA device: the driver's free memory plus what
    torch's allocator holds unused."""
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
        torch.cuda.memory_allocated(device)

def loss_chunk(n, vocab, device):
    """caopd.fused_linear_kl's rows per chunk (Distiller's `chunk`). On a GPU a chunk costs its
    launches and a (V, d) gradient update whatever its size, so as many rows as its three float32
    (rows, V) buffers fit in an eighth of the free memory; elsewhere caopd.loss_chunk."""
    if device.type != "cuda":
        return caopd.loss_chunk(n, vocab, device)
    return max(1, min(n, cuda_free(device) // 8 // (3 * 4 * vocab)))

def model_shape(model):
    """(layers, key/value heads, head size, hidden size, MLP size, vocabulary, query heads) of our GPT
    or of a Hugging Face model's config."""
    if isinstance(model, caopd.GPT):
        c = model.cfg
        return c.n_layer, c.n_head, c.n_embd // c.n_head, c.n_embd, 4 * c.n_embd, c.vocab_size, c.n_head
    c = model.config.get_text_config()
    heads = c.num_attention_heads
    head = getattr(c, "head_dim", None) or c.hidden_size // heads
    return (c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or heads, head, c.hidden_size,
            c.intermediate_size, c.vocab_size, heads)

def kv_bytes(model, dtype):
    """Bytes of KV cache per row and position: keys and values of every layer, in dtype."""
    layers, kv_heads, head, *_ = model_shape(model)
    return 2 * layers * kv_heads * head * (torch.finfo(dtype).bits // 8)

def sampling_bytes(model, prompt, new, dtype, captured=False):
    """An upper bound on the bytes one row of a sampling call (caopd.sample) holds at once, for a
    prompt of `prompt` tokens and `new` new ones, activations in dtype: its static KV cache (of
    hf.cache_length positions, captured.cache_length's for the captured step), during the prefill
    the prompt's own cache and activations (the residual stream, the MLP, one layer's attention
    scores), at every step the step's working set (one layer's activations and float32 attention
    scores over the whole cache, the logits in dtype and in float32: on a GPU the captured step's
    CUDA graph holds them for the call), and sample's float32 logits, softmax and CDF.
    decode_weight_bytes: what a call holds whatever its rows."""
    _, kv_heads, head, hidden, mlp, vocab, heads = model_shape(model)
    size = torch.finfo(dtype).bits // 8
    length = (captured_step.cache_length if captured else hf.cache_length)(prompt, new)  # as allocated
    kv = kv_bytes(model, dtype)
    prefill = prompt * (kv + (4 * hidden + 3 * mlp) * size + 4 * kv_heads * prompt)
    step = 4 * heads * length + (4 * hidden + 3 * mlp + heads * head) * size + (size + 4) * vocab
    return kv * length + prefill + step + 4 * 4 * vocab

def decode_weight_bytes(model, dtype):
    """Bytes a sampling call holds whatever its rows: under bfloat16 autocast over float32 weights, a
    bfloat16 copy of the weights (autocast's cache of casts eagerly, captured.decode_copy captured;
    every parameter counted, an upper bound on those of the matrix products)."""
    weights = [p for p in model.parameters() if p.dtype == torch.float32]
    return 2 * sum(p.numel() for p in weights) if dtype == torch.bfloat16 else 0

def fit_batches(cfg, model, tok, held):
    """cfg.eval_batch and cfg.rollout_batch in rows that fit in the device's free memory, before
    anything is trained or written. 0 (the default) becomes the most that is asked (EVAL_CAP
    questions, all of a step's rollouts), lowered with a note where fewer fit; a number that does
    not fit is an error that says the largest that does. What stage 1 still allocates is set aside
    first: the teacher (a copy of the student) and the student's float32 gradient and AdamW's two
    moments. Fewer rows a call change no rollout: each row's random numbers are its own
    (caopd.sample). The prompts are sized by the held-out questions' longest."""
    free = free_memory(cfg.device)
    want = {"eval_batch": min(EVAL_CAP, -(-len(held) // WORLD)),
            "rollout_batch": cfg.prompts_per_step // WORLD * cfg.K}
    fits, where = math.inf, ""
    if free is None:
        print(f"note: the free memory of {cfg.device} is unknown here: eval_batch and rollout_batch are not "
              f"checked against it")
    else:
        params = sum(p.numel() for p in model.parameters())
        teacher = 2 if teacher_in_bfloat16(cfg) else 4  # bytes a parameter
        reserved = (12 + teacher) * params // (WORLD if cfg.fsdp else 1)
        if cfg.fsdp:  # sampling gathers the student's layers: its whole float32 weights on every process
            reserved += 4 * params * (WORLD - 1) // WORLD
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        budget = 0.9 * (free - reserved - decode_weight_bytes(model, dtype))
        prompt = max(len(tokenizer.student_tokens(tok, ex, cfg.enable_thinking)) for ex in held)
        per_row = sampling_bytes(model, prompt, cfg.max_new_tokens, dtype, models.captures(cfg))
        fits = int(budget // per_row)
        size = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
        where = (f"{size(per_row)} per row for a prompt of up to {prompt} + {cfg.max_new_tokens} tokens, "
                 f"{size(max(budget, 0))} of {cfg.device}'s memory free for it")
        if fits < 1:
            cli.die(f"a sampling call of one row does not fit: {where}; lower --max_new_tokens or use a larger "
                f"device")
    for k, n in want.items():
        given = getattr(cfg, k)
        if given > fits:
            cli.die(f"--{k}={given}: does not fit in memory ({where}): the largest that fits is {fits}")
        if not given and n > fits:
            print(f"note: {k} lowered to {fits} rows a call, the most that fit ({where})")
        setattr(cfg, k, given or min(n, fits))

def teacher_in_bfloat16(cfg):
    """Whether stage 1's teacher is a bfloat16 copy (train_small.distiller): a frozen teacher under
    bfloat16 compute needs no float32 master weights; an EMA one does, and FSDP2's shards it like the
    student, in float32."""
    return cfg.dtype == "bfloat16" and cfg.ema_rate == 0 and not cfg.fsdp
