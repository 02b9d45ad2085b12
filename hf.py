"""
Hugging Face causal LMs through caopd's two seams: a decoder for caopd.sample and a
completion_hidden for the loss (caopd.Distiller takes both). They do what caopd's versions do for
our GPT, over a transformers model and its own KV cache:

    prefill()            each distinct prompt once, left-padded, into the model's cache
    decoder()            rollouts: the prompts' cache copied into a static cache, one token a step
    grouped_attention()  the captured step's attention (captured.py)
    completion_hidden()  the loss: the completions on top of the prompts' cache

A reader of the method can skip this file; models.seams() picks it for a Hugging Face model.
"""
import functools
import inspect

import torch
import torch.nn.functional as F

import caopd

@functools.cache  # read once per model class: the decode step asks at every token
def _cache_argument(cls):
    # transformers 5 renamed the cache argument and output field "past_key_values" to "cache"
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"

def cache_name(model):
    return _cache_argument(type(model))

def prefill(model, prompts):
    """caopd.prefill for a Hugging Face model: each distinct prompt once, left-padded (the mask hides
    the padding, position ids start at each prompt's start), into the model's KV cache, then a
    copy for every row. Returns the last prompt token's hidden state (B, C), the cache, the
    attention mask (B, T) and each row's next position (B,)."""
    device = caopd.output_weight(model).device
    distinct, rows = caopd.distinct_prompts(prompts)
    rows = torch.tensor(rows, device=device)
    T = max(map(len, distinct))
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in distinct], device=device)  # (U, T)
    idx = torch.tensor([[0] * (T - len(p)) + p for p in distinct], device=device) * mask
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model.base_model(input_ids=idx, attention_mask=mask, position_ids=pos, use_cache=True)
    cache = out[cache_name(model)]
    cache.batch_select_indices(rows)
    h = out.last_hidden_state[:, -1].index_select(0, rows)  # (B, C)
    return h, cache, mask.index_select(0, rows), pos[:, -1].index_select(0, rows) + 1

def cache_length(prompt, new):
    """The static cache's length for prompts of up to `prompt` tokens and `new` new ones: rounded up
    to 64 (captured.cache_length rounds coarser, for fewer compiled steps)."""
    return -(-(prompt + new) // 64) * 64

def decode_step(model, cache, mask, nxt, pos, head=None):
    """One token per row through the model over its static cache -> logits (B, V), float32. The
    logits are F.linear(h, W), as the model's own head computes them: under autocast the bfloat16
    copy of a trainable weight is then made once and cached, where one of W.T (a view) would be
    made at every step. head: W where it is not the model's own (captured.py's bfloat16 copy)."""
    out = model.base_model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                           use_cache=True, **{cache_name(model): cache})
    head = caopd.output_weight(model) if head is None else head
    return F.linear(out.last_hidden_state[:, -1], head).float()

def static_cache(model, prompts, length):
    """The prompts through prefill(), copied into a static cache (transformers.StaticCache: allocated
    once for the call, in the compute dtype) of length(prompt, new) positions. Returns the last prompt
    token's hidden state (B, C), the cache, the attention mask over all its positions (B, L: the
    positions after the prompt are all visible, causality hides those not yet written) and each
    row's next position (B,)."""
    h0, dynamic, mask, pos = prefill(model, prompts)
    (B, T), dtype = mask.shape, dynamic.layers[0].values.dtype
    cache = _static_cache_class()(config=model.config, max_cache_len=length)
    heads, dims = zip(*(d.keys.shape[1::2] for d in dynamic.layers))
    cache.early_initialization(B, list(heads), list(dims), dtype, mask.device)
    for s, d in zip(cache.layers, dynamic.layers):
        s.keys[:, :, :T], s.values[:, :, :T] = d.keys, d.values
        s.cumulative_length.fill_(T)
    return h0, cache, torch.cat([mask, mask.new_ones(B, length - T)], 1), pos

@functools.cache  # one class: the compiled step's guards check the cache's class
def _static_cache_class():
    """transformers.StaticCache storing keys and values in its own dtype, the compute dtype: under
    autocast Qwen3's keys leave its (float32) norm and rotary embedding in float32 beside bfloat16
    values, and attention would cast the whole key cache at every step. A method, not a function
    stored on the cache: that would be a reference cycle, and the cache (gigabytes) would outlive its
    call until Python's cyclic collector ran."""
    from transformers import StaticCache

    class Cache(StaticCache):
        def update(self, key_states, value_states, *args, **kwargs):
            dtype = self.layers[0].keys.dtype
            return super().update(key_states.to(dtype), value_states.to(dtype), *args, **kwargs)
    return Cache

def decoder(model, prompts, max_new_tokens):
    """caopd.gpt_decoder's contract for a Hugging Face causal LM: the prompts' cache in a static
    cache (static_cache, cache_length), then one token per row per step (decode_step); captured.py
    runs the same step compiled."""
    W = caopd.output_weight(model)
    h0, cache, mask, pos = static_cache(model, prompts, cache_length(max(map(len, prompts)), max_new_tokens))

    def decode(nxt):
        nonlocal pos
        if nxt is None:
            return F.linear(h0, W).float()
        logits = decode_step(model, cache, mask, nxt, pos)
        pos = pos + 1
        return logits
    return decode

# The captured step's attention (captured.py registers it as transformers' ATTENTION for its copy of the
# model). transformers' own sdpa attention reads grouped key/value heads in place for one query token
# only when not compiled; under torch.compile it copies the keys and values of the whole cache to every
# query head (repeat_kv) at every token. Here the query heads of each key/value head become that head's
# query positions, so the keys and values are read where they are, compiled or not.
ATTENTION = "caopd_sdpa"

def grouped_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' attention-function contract (its sdpa_attention_forward's) -> (output (B, 1, H, D),
    None); anything but one query token over grouped heads, without extras, is sdpa_attention_forward's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    groups = getattr(module, "num_key_value_groups", 1)
    plain = all(kwargs.get(k) is None for k in ("softcap", "position_bias")) and not kwargs.get("dropout")
    one_mask = attention_mask is None or attention_mask.shape[1] == 1  # not one per head
    if query.shape[2] != 1 or groups == 1 or not plain or not one_mask:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    B, H, _, D = query.shape  # (B, H, 1, D) -> (B, H / groups, groups, D): one key/value head, its queries
    out = F.scaled_dot_product_attention(query.reshape(B, H // groups, groups, D), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, 1, H, value.shape[-1]), None

def use_grouped_attention(model):
    """Make model (captured.py's copy: its own config) run grouped_attention where it ran transformers'
    sdpa attention, with sdpa's mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register(ATTENTION, grouped_attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    if model.config._attn_implementation == "sdpa":
        model.config._attn_implementation = ATTENTION

def completion_hidden(model, prompts, completions):
    """caopd.completion_hidden for a Hugging Face model: the prompts through prefill(), then the
    completions on top of the cache. Except under its gradient checkpointing, whose layers drop a
    KV cache while they train: there every row runs its whole sequence."""
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # per layer
    if checkpointing and model.training and torch.is_grad_enabled():
        return caopd.whole_sequences_hidden(lambda x: model.base_model(input_ids=x).last_hidden_state,
                                            caopd.output_weight(model).device, prompts, completions)
    device, L = caopd.output_weight(model).device, max(map(len, completions))
    x = torch.tensor([c[:-1] + [0] * (L - len(c)) for c in completions], device=device)  # (B, L - 1)
    h0, cache, mask, start = prefill(model, prompts)
    if L > 1:  # the completions' right padding needs no mask: causal attention never looks ahead
        rest = model.base_model(input_ids=x, attention_mask=torch.cat([mask, torch.ones_like(x)], 1),
                                position_ids=start[:, None] + torch.arange(L - 1, device=device),
                                use_cache=True, **{cache_name(model): cache}).last_hidden_state
    else:
        rest = h0.new_zeros(len(prompts), 0, h0.shape[-1])
    return torch.cat([h0[:, None], rest], 1), [len(c) for c in completions]
