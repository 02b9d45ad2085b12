"""
Calibration-Aware On-Policy Distillation (CaOPD), in one file.

On-policy self-distillation (OPD) trains a student on its own samples toward a teacher that is
the same network (a frozen copy, or an EMA of the student) shown privileged context: a worked
demonstration or a verified correct solution. The student learns the answers, and also the
teacher's certainty: its stated `Confidence:` goes to 1.0 whether it is right or not. CaOPD
changes one thing, the confidence target:

  1. For each prompt, sample K completions from the student.        -> sample()
  2. Verify each one; P_acc = (number correct) / K.                  -> verify_arith(), empirical_confidence()
  3. Put P_acc where the confidence goes, in three places:           -> distillation_targets()
       a. the student completion's `Confidence:` line,
       b. the confidence of the teacher's demonstrated solution,
       c. a Note line in the teacher prompt asking for exactly that value.
  4. Distill as before: per completion token, the full-vocabulary
     reverse KL(student || teacher), gradient through the student.  -> Distiller, fused_linear_kl()

Without step 3 this file is plain OPD: distillation_targets() is the whole difference, and the
comment above it says why it works. The file reads top to bottom in the method's order:
tokenizer -> model (with KV cache) -> rollouts -> verifier -> empirical confidence -> teacher
context -> the change -> loss -> metrics. train_small.py runs it.

It holds the method and nothing for speed or scale. Those reach it from beside it through two
functions Distiller is given: how to decode a token (sample()'s `decoder`) and how to run a model
over prompt + completion (`hidden`). Ours are here for the toy GPT; hf.py has a Hugging Face
model's, captured.py a compiled decoder for GPUs, and parallel.py wraps Distiller for several GPUs.
"""
import functools
import math
import re
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Tokenizer

# The toy tokenizer is a real tiktoken.Encoding, built here from a word list instead of being
# downloaded. Text is cut into pieces by PIECES (a confidence value like " 0.7", a single digit,
# a word, a punctuation mark, a whitespace character); tiktoken looks a whole piece up first, so
# every piece we list is one token, and anything else still encodes, byte by byte. A digit is
# always its own token, never " 7": "1" means the same wherever it stands in a number.
# Why confidence values are single tokens: spelled as digits ("0", ".", "7"), reverse KL at this
# scale collapsed the stated confidence onto the shared leading "0" (a student that cannot yet
# tell questions apart puts its mass on the token every value starts with), in OPD and CaOPD alike.
PIECES = r" ?\d\.\d|\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]|\s"
END = "<|endoftext|>"  # ends every completion (tiktoken calls it eot_token)

def toy_tokenizer(text):
    """A tiktoken.Encoding whose vocabulary is the 256 bytes (digits among them), every piece of
    `text` (the toy's words: data/arith.py) and the confidence values 0.0 ... 1.0; then END."""
    words = set(re.findall(PIECES, text))
    words |= {f"{s}{i / 10:.1f}" for s in ("", " ") for i in range(11)}
    ranks = {bytes([i]): i for i in range(256)}
    for w in sorted(w.encode() for w in words if len(w.encode()) > 1):
        ranks[w] = len(ranks)
    return tiktoken.Encoding(name="caopd-toy", pat_str=PIECES, mergeable_ranks=ranks,
                             special_tokens={END: len(ranks)})

# -----------------------------------------------------------------------------
# Model: a small GPT (nanoGPT-like) with a KV cache for sampling

@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 128  # longest prompt + completion
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False))

    def forward(self, x, kv=None, pos=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        # (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv is not None:  # write this call's keys/values at pos, attend to everything so far
            kv[0][:, :, pos:pos + T], kv[1][:, :, pos:pos + T] = k, v
            k, v = kv[0][:, :, :pos + T], kv[1][:, :, :pos + T]
        # causal: the T new tokens sit at positions pos .. pos + T - 1 and see everything before them
        mask = None if T == 1 or pos == 0 else \
            torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)  # (T, pos + T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and pos == 0)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # also the output projection (tied)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.grad_checkpoint = False  # recompute activations in the backward pass instead of keeping them
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init, residual projections scaled down by depth
                residual = name.endswith(("c_proj.weight", "mlp.2.weight"))
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if residual else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, cache=None, pos=0):
        """idx (B, T) token ids -> final hidden states (B, T, C). Logits are hidden @ wte.weight.T
        (output_weight); the loss never forms them for all positions at once (see fused_linear_kl)."""
        T = idx.shape[1]
        assert pos + T <= self.cfg.block_size, f"{pos + T} tokens > block_size {self.cfg.block_size}"
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device) + pos)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else cache[i]
            # keep each block's input only, recompute the rest
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, kv, pos, use_reentrant=False)
            else:
                x = block(x, kv, pos)
        return self.ln_f(x)

    def get_output_embeddings(self):
        return self.wte  # tied: the name a Hugging Face model gives its output layer, so one output_weight()

    def new_cache(self, batch, length, dtype=None):
        """Keys and values of every block, (batch, n_head, length, head size) each, unfilled."""
        c = self.cfg
        shape = (batch, c.n_head, length, c.n_embd // c.n_head)
        w = self.wte.weight
        return [(w.new_empty(shape, dtype=dtype), w.new_empty(shape, dtype=dtype)) for _ in range(c.n_layer)]

def output_weight(model):
    """The output projection (V, C): our tied wte, or a Hugging Face model's lm_head (tied or not)."""
    return model.get_output_embeddings().weight

# -----------------------------------------------------------------------------
# Rollouts: K completions per prompt, all prompts of a step in one batched call

def distinct_prompts(prompts):
    """(each distinct prompt once, in order of first appearance; (B,) each row's index among them)."""
    first = {}
    for p in prompts:
        first.setdefault(tuple(p), len(first))
    return [list(p) for p in first], [first[tuple(p)] for p in prompts]

def prefill(model, prompts, length):
    """Run each distinct prompt once into a KV cache with room for `length` positions, then give
    every row its own copy: the K rollouts of a question share its prompt, so this does K times
    less prompt work. Returns the last prompt token's hidden state (B, C) and the cache."""
    device = model.wte.weight.device
    distinct, rows = distinct_prompts(prompts)
    rows = torch.tensor(rows, device=device)
    cache = model.new_cache(len(distinct), length, compute_dtype(device))  # keys/values as computed
    h = model(torch.tensor(distinct, device=device), cache)[:, -1]  # (U, C)
    # (B, C), (B, nh, length, hs) per layer
    return h.index_select(0, rows), [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in cache]

def compute_dtype(device):
    """The dtype activations are computed in on `device`: autocast's, else None (the weights')."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None

def gpt_decoder(model, prompts, max_new_tokens):
    """Our GPT's decoder for sample(): the prompts through prefill(), then one token per row per
    call. Returns decode: decode(None) -> the logits (B, V) of the first new token, decode(tokens
    (B,)) -> those of the next one. A Hugging Face model has its own (hf.decoder)."""
    assert len({len(p) for p in prompts}) == 1, "our GPT's prompts have one length (the toy pads them)"
    t = len(prompts[0])  # the position of the next token
    h, cache = prefill(model, prompts, t + max_new_tokens)  # (B, C) state of the last prompt token

    def decode(nxt):
        nonlocal h, t
        if nxt is not None:
            h = model(nxt[:, None], cache, t)[:, -1]  # (B, C)
            t += 1
        return h @ model.wte.weight.T  # (B, V)
    return decode

CHECK_EVERY = 8  # tokens between reads of "has every row finished?": on a GPU each read waits for it

@torch.no_grad()
def sample(model, prompts, max_new_tokens, end_id, temperature=1.0, top_k=0, generator=None,
           decoder=gpt_decoder, uniforms=None):
    """Sample a completion for each prompt (a list of token lists) with a KV cache. Returns one
    token list per prompt: the completion, ending in end_id unless it ran out of max_new_tokens.
    temperature 0 is greedy. decoder(model, prompts, max_new_tokens) -> decode (gpt_decoder's
    contract); uniforms (max_new_tokens, B, 1): the random numbers of the call, one per row and
    token (default: drawn from generator, on its device, at once).
    Inverse-CDF sampling needs one uniform per row and token, where torch.multinomial draws one
    per vocabulary entry; drawing them all up front keeps every row's sample its own whatever the
    batch around it (train_small slices one draw of a whole step across calls and processes)."""
    B = len(prompts)
    decode = decoder(model, prompts, max_new_tokens)
    logits = decode(None)
    device = logits.device
    if temperature:  # (max_new_tokens, B, 1): one uniform per token and row
        if uniforms is None:
            uniforms = torch.rand(max_new_tokens, B, 1, generator=generator,
                                  device=generator.device if generator else device)
        uniforms = uniforms.to(device)
    out = torch.full((B, max_new_tokens), end_id, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            cdf = F.softmax(logits, -1).cumsum_(-1)  # (B, V); a row's token: the first whose CDF passes u
            nxt = torch.searchsorted(cdf, uniforms[t] * cdf[:, -1:], right=True)[:, 0]
            nxt = nxt.clamp_(max=cdf.shape[1] - 1)  # (B,)
        nxt = nxt.masked_fill(done, end_id)  # finished rows keep emitting END (cut off below)
        out[:, t] = nxt
        done |= nxt == end_id
        if t == max_new_tokens - 1 or (t % CHECK_EVERY == CHECK_EVERY - 1 and done.all()):
            break
        logits = decode(nxt)
    completions = []
    for row in out.tolist():
        completions.append(row[:row.index(end_id) + 1] if end_id in row else row)
    return completions

# -----------------------------------------------------------------------------
# Verifier and confidence parser (pure functions, shared by training and evaluation)

# The confidence label as models write it, one rule for every place that reads or replaces it:
# "Confidence:" in any letter case, with markdown emphasis (up to three * or _) around the label
# and/or the number, as chat models write markdown: "**Confidence:** 0.9", "**Confidence**: 0.9",
# "Confidence: **0.9**", "__confidence__: 0.9". The number is optional in the pattern so that a
# label without one ("Confidence: high") is still found, and replaced, by split_confidence.
CONFIDENCE = re.compile(r"[*_]{0,3}confidence[*_]{0,3}:[*_]{0,3}\s*[*_]{0,3}(?:(-?[0-9]*\.?[0-9]+)\s*(%?))?",
                        re.IGNORECASE)

def parse_confidence(text, clip=True):
    """The stated confidence, one rule for training and evaluation: the number after the LAST
    confidence label in text that has one (spellings: CONFIDENCE above); trailing punctuation
    ("0.9.") and emphasis after it are ignored; `85%` reads as 0.85; a value outside [0, 1] is clipped
    into it (clip=False returns it as written, for counting). None when no label is followed by a
    number ("Confidence:" alone, "Confidence: high"): the metrics count that as 0 (and report the
    share of answers that state one, format_rate)."""
    m = [(v, pct) for v, pct in CONFIDENCE.findall(text) if v]
    if not m:
        return None
    value, percent = m[-1]
    value = float(value) / (100 if percent else 1)
    return min(1.0, max(0.0, value)) if clip else value

def split_confidence(text):
    """(text before its FIRST confidence label, the rest from that label on, emphasis before the
    label included): the answer, and what CaOPD replaces. A text without a label is all answer.
    The first label, where parse_confidence reads the last: everything from the first one on is
    replaced, so no second label survives a replacement; a model that mentions its confidence
    before the end still states the one it ends with."""
    m = CONFIDENCE.search(text)
    return (text, "") if m is None else (text[:m.start()], text[m.start():])

ANSWER = re.compile(r"Answer:\s*(-?\d+)")

def verify_arith(answer, text):
    """Toy task verifier: is the first integer after `Answer:` (before the confidence label) the
    right one? Never raises; unparseable output is simply wrong."""
    m = ANSWER.search(split_confidence(text)[0])
    return m is not None and int(m.group(1)) == answer

# The paper's two tasks have their verifiers beside their data: data/tasks.py.

# -----------------------------------------------------------------------------
# Empirical confidence: the student's own measured success rate on a question

def empirical_confidence(correct, smoothed=False):
    """P_acc of one question from the verdicts of its K rollouts: c / K for c correct, or with
    smoothed=True (c + 1) / (K + 2) (Laplace's rule of succession: never exactly 0 or 1 from a few
    rollouts). Another estimator (a Beta(a, b) prior: (c + a) / (K + a + b)) is a line here.
    What the student is trained to state is this value ROUNDED to `decimals` digits (set_confidence,
    below; half to even):
    the toy's one decimal (a token per value, see toy_tokenizer), real models' two (the paper's
    X.XX). So an estimator's change smaller than half the last digit changes no target, and nearby
    counts can share one: with K = 8 and one decimal, Beta(2, 2) gives c = 0 -> 2/12 and c = 1 ->
    3/12, both written 0.2 (a test checks this; --smoke shows an estimator's targets in seconds)."""
    k = len(correct)
    return (sum(correct) + 1) / (k + 2) if smoothed else sum(correct) / k

def set_confidence(completion, p, decimals):
    """Strip everything from the first confidence label on (any spelling parse_confidence reads:
    "**confidence:** 0.9" is replaced, not followed by a second line) and append `Confidence: p`.
    A completion without one keeps all its text and gets the line appended."""
    body = split_confidence(completion)[0]
    if body and not body.endswith("\n"):
        body += "\n"
    return f"{body}Confidence: {p:.{decimals}f}"

# -----------------------------------------------------------------------------
# Teacher context: the privileged information the student never sees

# A teacher context is a template and its fields: {question}, {solution} (a response, its
# confidence line set to the shown confidence) and {note} (empty, or the Note line below with a
# value). `demo` shows the reference answer, as self-distillation fine-tuning (SDFT) does;
# `correct_solution` one of the student's own verified correct rollouts for the same prompt (the
# reference when none is correct), as self-distilled policy optimization (SDPO) does.
# The teacher's weights are a frozen copy of the student's start by default; with ema_rate > 0 an
# exponential moving average (EMA) of the student's: teacher = (1 - a) * teacher + a * student
# after every step (ema_update).
TEMPLATES = {
    "demo": "{question}\nThis is an example for a response to the question:\n{solution}\n"
            "{note}Now answer with a response of your own.\n",
    "correct_solution": "{question}\nCorrect solution:\n{solution}\n"
                        "{note}Correctly solve the original question.\n",
}
NOTE = ("Note: The empirical confidence for this question is {p}. "
        "Output this exact value in the 'Confidence:' field.\n")

def teacher_prompt(question, decimals, template, solution, confidence, note, **fields):
    """The teacher's prompt: the question inside template (a TEMPLATES name) with its fields.
    solution: a response text, its confidence line set to `confidence`; note: None (no Note line)
    or the value the Note asks for; fields: those of a template that has more (from
    distillation_targets)."""
    return TEMPLATES[template].format(
        question=question, solution=set_confidence(solution, confidence, decimals),
        note="" if note is None else NOTE.format(p=f"{note:.{decimals}f}"), **fields)

@torch.no_grad()
def ema_update(teacher, student, rate):
    """teacher <- (1 - rate) * teacher + rate * student. rate = 0 keeps the teacher frozen."""
    if rate == 0:
        return  # frozen: skip a pass over every parameter on each step
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s, rate)

# -----------------------------------------------------------------------------
# CaOPD's one change: P_acc where the confidence goes
#
# Why it works. The teacher's certainty comes from its context: shown a solution that ends in
# "Confidence: 1.0", it says 1.0 whether or not the student could get the question right, and
# OPD distills exactly that, so its student learns to say 1.0 to everything. CaOPD makes the
# teacher's target at the confidence position the student's own success rate: (b) the solution
# it is shown states P_acc instead of 1.0, and (c) a Note asks it to output that value. The
# student never sees either. For questions it cannot tell apart (their prompts and its answers
# look alike to it) its distribution at that position is one and the same, and reverse KL toward
# their teachers is minimised by their normalised geometric mean, s(v) ~ exp(mean log t_i(v)),
# which peaks at their mean P_acc when each teacher's log-probabilities are a parabola around the
# value it is shown, i.e. a Gaussian (a pretrained model's roughly are; the toy's base is trained
# so, of width base_conf_sigma: toy_base.soft_confidence_loss). So the student states the success
# rate of the questions that look like this one: calibration. (a) Rewriting the student's own
# stated value to P_acc sets no target at the value's first token: the student's
# distribution there depends only on the tokens before it, never on what is written there. It
# does shape the positions after that token: the end token (now after P_acc) and, where a value
# takes several tokens (a real model's "0.85" is "0", ".", "85" or similar), the later digits,
# which see the first. It also keeps one confidence line in the format.
# Which of the three carry the calibration is measured: python experiments.py replacements.

def distillation_targets(method, rollouts, correct, reference, template, decimals, smoothed=False,
                         parts="abc"):
    """The whole difference between OPD and CaOPD, for one question. rollouts: the texts of its K
    rollouts; correct: their verdicts; reference: the reference answer; template: the teacher
    context's name. Returns (the K completions to train on, the teacher's context as
    teacher_prompt's fields, P_acc). OPD (method "opd") trains on the rollouts as sampled toward a
    teacher shown certainty: confidence 1.0, no Note. CaOPD puts P_acc in the three places (parts:
    which of them, "abc" all; for ablations). A completion whose text is the rollout's trains on
    the sampled tokens themselves; a rewritten one is encoded anew (train_small.targets)."""
    p_acc = empirical_confidence(correct, smoothed)
    solution = reference
    if template == "correct_solution":  # the first verified rollout of this question, else the reference
        solution = next((r for r, ok in zip(rollouts, correct) if ok), reference)
    completions = list(rollouts)
    context = dict(template=template, solution=solution, confidence=1.0, note=None)
    if method == "caopd":
        if "a" in parts:  # a. the completion's stated confidence
            completions = [set_confidence(r, p_acc, decimals) for r in rollouts]
        if "b" in parts:  # b. the shown solution's confidence
            context["confidence"] = p_acc
        if "c" in parts:  # c. the Note
            context["note"] = p_acc
    return completions, context, p_acc

# -----------------------------------------------------------------------------
# Loss: per-token divergence between student and teacher over the full vocabulary

def completion_hidden(model, prompts, completions):
    """Run our GPT on each prompt + completion and return the hidden states that predict the
    completion tokens, (B, L, C), with the completions' lengths. h[i, j] is the state after
    prompts[i] + completions[i][:j]; it predicts completions[i][j].
    The K rollouts of a question share its prompt, so the prompt runs once into a KV cache
    (prefill) and the completions run on top of it: K times less prompt work. (A Hugging Face
    model's: hf.completion_hidden, given to Distiller.)"""
    if len({len(p) for p in prompts}) > 1:  # prompts of several lengths (the toy base's rows)
        return whole_sequences_hidden(model, model.wte.weight.device, prompts, completions)
    L, Tp = max(map(len, completions)), len(prompts[0])
    x = torch.tensor([c[:-1] + [0] * (L - len(c)) for c in completions], device=model.wte.weight.device)
    # x (B, L - 1): the completions but their last token, right-padded
    h0, cache = prefill(model, prompts, Tp + L - 1)  # h0 (B, C) predicts token 0
    rest = model(x, cache, Tp) if L > 1 else h0.new_zeros(len(prompts), 0, h0.shape[-1])  # (B, L - 1, C)
    return torch.cat([h0[:, None], rest], 1), [len(c) for c in completions]

def whole_sequences_hidden(forward, device, prompts, completions):
    """completion_hidden without a shared prompt: each row's prompt + completion, right-padded,
    through forward(ids (B, T)) -> hidden states (B, T, C)."""
    L = max(map(len, completions))
    seqs = [p + c[:-1] for p, c in zip(prompts, completions)]
    T = max(map(len, seqs))
    h = forward(torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=device))  # (B, T, C)
    # right padding needs no mask: causal attention never looks ahead
    start = torch.tensor([len(p) - 1 for p in prompts], device=device)  # the state that predicts token 0
    pos = (start[:, None] + torch.arange(L, device=device)).clamp(max=T - 1)  # (B, L)
    return h.gather(1, pos[:, :, None].expand(-1, -1, h.shape[-1])), [len(c) for c in completions]

# Reverse KL(p_s || p_t) is the default: it is an expectation under the student's own
# distribution, so the student is pushed off tokens the teacher finds unlikely (mode seeking),
# exactly on the states the student itself visits. Forward KL and the generalized JSD are options,
# the JSD in the convention of the authors' release (SalesforceAIResearch/CaOPD):
# m = beta * p_t + (1 - beta) * p_s, JSD = beta KL(p_t||m) + (1 - beta) KL(p_s||m), and beta = 0 / 1
# meaning forward / reverse KL.

DIVERGENCES = ("reverse", "forward", "jsd")  # kl_divergence's: a new one is a name here and its formula there

def _endpoint(kind, beta):
    """The JSD at beta = 0 or 1 is forward or reverse KL (its mixture m would be one side)."""
    return ("forward" if beta == 0.0 else "reverse") if kind == "jsd" and beta in (0.0, 1.0) else kind

def kl_divergence(logp_s, logp_t, kind="reverse", beta=0.5):
    """Per-position divergence from log-probabilities (..., V) -> (...), in plain autograd."""
    kind = _endpoint(kind, beta)
    if kind == "reverse":
        return (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    if kind == "forward":
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    if kind == "jsd":
        logm = torch.logaddexp(logp_s + math.log(1 - beta), logp_t + math.log(beta))
        return (beta * (logp_t.exp() * (logp_t - logm)).sum(-1)
                + (1 - beta) * (logp_s.exp() * (logp_s - logm)).sum(-1))
    raise ValueError(f"unknown divergence {kind!r}: one of {DIVERGENCES}")

def linear_kl_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None,
                        kind="reverse", beta=0.5):
    """The loss, written plainly: the mean over positions (mask: which count, or their weights) of
    the divergence between softmax(student_hidden @ student_weight.T) and the teacher's, gradient
    through the student only. It holds several (N, V) tensors; fused_linear_kl below computes the
    same without them (--fused=True), for the divergences whose gradients it derives."""
    logp_s = F.log_softmax(student_hidden @ student_weight.T, -1)  # (N, V)
    logp_t = F.log_softmax(teacher_hidden @ teacher_weight.T, -1).detach()
    w = torch.ones_like(logp_s[:, 0]) if mask is None else mask.to(logp_s.dtype)
    return (kl_divergence(logp_s, logp_t, kind, beta) * w).sum() / w.sum().clamp(min=1e-30)

class Distiller(nn.Module):
    """The student and its teacher, and a forward that returns the loss, as nanoGPT's model(x, y)
    returns its loss: the data-parallel engines (DistributedDataParallel, FSDP2) average the
    gradient of what happens inside the forward of the module they wrap, so the loss must be there.
    hidden and decoder are how the loss and sample() run the models: completion_hidden and
    gpt_decoder for our GPT (a Hugging Face model's: hf.py; the captured decode step: captured.py);
    chunk(n, vocab, device): the fused loss's rows per chunk (loss_chunk; on a GPU memory.py's)."""

    def __init__(self, student, teacher, kind="reverse", beta=0.5, fused=True, hidden=completion_hidden,
                 decoder=gpt_decoder, chunk=None):
        super().__init__()
        self.student, self.teacher, self.kind, self.beta, self.fused = student, teacher, kind, beta, fused
        self.hidden, self.decoder, self.chunk = hidden, decoder, chunk or loss_chunk

    def forward(self, prompts, completions, teacher_prompts, weight, estimator=None):
        """weight (B, L): each completion position's share of the loss (0 = not counted) -> the
        weighted mean divergence over the positions. estimator: None (the loss above) or another
        function of fused_linear_kl's arguments plus the completion tokens (experiments.py)."""
        hs, _ = self.hidden(self.student, prompts, completions)  # (B, L', C)
        with torch.no_grad():  # the same completion tokens after the teacher's prompt
            ht, _ = self.hidden(self.teacher, teacher_prompts, completions)
        w = weight[:, :hs.shape[1]]  # (B, L'): L' is these rows' longest completion
        args = (hs.flatten(0, 1), output_weight(self.student), ht.flatten(0, 1), output_weight(self.teacher),
                w.flatten())
        if estimator is not None:
            tokens = torch.tensor([c + [0] * (hs.shape[1] - len(c)) for c in completions], device=hs.device)
            return estimator(*args, tokens.flatten())
        if not self.fused:
            return linear_kl_reference(*args, kind=self.kind, beta=self.beta)
        chunk = self.chunk(args[0].shape[0], args[1].shape[0], hs.device)  # rows per chunk
        return fused_linear_kl(*args, kind=self.kind, beta=self.beta, chunk_size=chunk)

    def sample(self, prompts, *args, **kwargs):
        """sample() from the student with this Distiller's decoder (FSDP2 runs it like forward)."""
        return sample(self.student, prompts, *args, decoder=self.decoder, **kwargs)

# The fused kernel: the same loss, chunk by chunk over the positions, computing the gradients in
# its forward pass. A (tokens x vocabulary) logit tensor at a real vocabulary (150k) is gigabytes;
# here only three (chunk, V) buffers are alive, and backward only rescales what forward computed.

FUSED = ("reverse", "forward", "jsd")  # the divergences whose gradients are derived by hand below

def fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None,
                    kind="reverse", beta=0.5, chunk_size=None):
    """Mean per-position divergence between softmax(student_hidden @ student_weight.T) and
    softmax(teacher_hidden @ teacher_weight.T), never holding an (N, V) tensor.
    student_hidden (N, d_s), student_weight (V, d_s), teacher_hidden (N, d_t), teacher_weight
    (V, d_t); mask (N,): bool (positions that count) or float weights (the mean is weighted).
    Gradients flow to student_hidden and student_weight only."""
    hs, ws, ht, wt = student_hidden, student_weight, teacher_hidden, teacher_weight
    mask = torch.ones(hs.shape[0], device=hs.device) if mask is None and torch.is_tensor(hs) else mask
    names = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "mask")
    shapes = ", ".join(f"{n} {tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', type(t).__name__)}"
                       for n, t in zip(names, (hs, ws, ht, wt, mask)))
    if not all(torch.is_tensor(t) and t.is_floating_point() and t.dim() == 2 for t in (hs, ws, ht, wt)) or \
            hs.shape[0] != ht.shape[0] or ws.shape[0] != wt.shape[0] or hs.shape[1] != ws.shape[1] or \
            ht.shape[1] != wt.shape[1] or not torch.is_tensor(mask) or mask.shape != (hs.shape[0],):
        raise ValueError(f"want 2-D floating hidden (N, d) and weights (V, d), mask (N,): got {shapes}")
    if kind not in FUSED:
        raise ValueError(f"kind must be one of {FUSED} (the others: linear_kl_reference), got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    kind = _endpoint(kind, beta)
    if chunk_size is None:
        chunk_size = loss_chunk(hs.shape[0], ws.shape[0], hs.device)
    w = mask.detach().to(torch.promote_types(hs.dtype, torch.float32))
    if not w.any():
        return (hs.sum() + ws.sum()) * 0.0  # nothing counts: zero loss, zero gradients
    device = hs.device.type
    mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None  # see forward
    with torch.autocast(device, enabled=False):  # its products are cast explicitly
        return _FusedLinearKL.apply(hs, ws, ht.detach(), wt.detach(), w, kind, float(beta), int(chunk_size),
                                    mm)

class _FusedLinearKL(torch.autograd.Function):
    """Forward computes the loss AND its gradients chunk by chunk; backward only rescales them.
    No (N, V) tensor is ever alive: just three chunk buffers of (chunk_size, V)."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, w, kind, beta, chunk_size, mm):
        acc = w.dtype  # softmax math in fp32 at least (fp64 when the inputs are)
        # mm: the dtype of the four matrix products (bfloat16 under autocast, else the inputs'); the
        # softmax math and both gradients' sums stay in acc
        ws_mm, wt_mm = (ws, wt) if mm is None else (ws.to(mm), wt.to(mm))
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hs) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if need_w else None
        rows = w.nonzero()[:, 0]  # positions that count; padding is never computed
        w = w / w.sum()  # each position's share of the mean
        loss = torch.zeros((), dtype=acc, device=hs.device)
        bufs = torch.empty(3, min(chunk_size, len(rows)), ws.shape[0], dtype=acc, device=hs.device)  # reused
        for i in range(0, len(rows), chunk_size):
            r = rows[i:i + chunk_size]
            n, h_s, h_t = len(r), hs[r], ht[r]
            if mm is not None:
                h_s, h_t = h_s.to(mm), h_t.to(mm)
            a, b, x = bufs[0, :n], bufs[1, :n], bufs[2, :n]  # (n, V) views
            _logits_into(a, h_s, ws_mm)  # student logits z_s
            _logits_into(b, h_t, wt_mm)  # teacher logits z_t
            _log_softmax_(a, x)  # log p_s
            _log_softmax_(b, x)  # log p_t
            if kind == "reverse":
                # KL_row = sum_v p_s (log p_s - log p_t); dKL/dz_s = p_s * (log p_s - log p_t - KL_row)
                torch.sub(a, b, out=b)  # b = log p_s - log p_t
                a.exp_()  # a = p_s
                # (n,) product then sum: a dot product loses precision at V = 152k
                kl = torch.mul(a, b, out=x).sum(-1)
                g = b.sub_(kl[:, None]).mul_(a)  # (n, V) dKL/dz_s
            elif kind == "forward":
                # KL_row = sum_v p_t (log p_t - log p_s); dKL/dz_s = p_s - p_t
                torch.sub(b, a, out=x)  # x = log p_t - log p_s
                b.exp_()  # b = p_t
                kl = x.mul_(b).sum(-1)
                g = a.exp_().sub_(b)
            else:
                # m = beta p_t + (1 - beta) p_s; J = beta KL(p_t||m) + (1 - beta) KL(p_s||m).
                # dJ/dp_s(v) = (1 - beta)(log p_s(v) - log m(v)) + a constant (the p_t/m terms cancel),
                # so through the softmax: dJ/dz_s = (1 - beta) p_s * ((log p_s - log m) - KL(p_s||m))
                torch.logaddexp(a + math.log(1 - beta), b + math.log(beta), out=x)  # x = log m
                kl_tm = (b.exp() * (b - x)).sum(-1)  # KL(p_t||m)
                torch.sub(a, x, out=x)  # x = log p_s - log m
                a.exp_()  # a = p_s
                kl_sm = torch.mul(a, x, out=b).sum(-1)  # KL(p_s||m)
                kl = beta * kl_tm + (1 - beta) * kl_sm
                g = x.sub_(kl_sm[:, None]).mul_(a).mul_(1 - beta)
            loss += (kl * w[r]).sum()
            g.mul_(w[r][:, None])  # d(mean)/dz_s for this chunk
            if need_h:
                grad_h[r] = (g.to(ws_mm.dtype) @ ws_mm).to(hs.dtype)  # (n, d_s) = (n, V) @ (V, d_s)
            if need_w and mm is None:
                grad_w.addmm_(g.T, h_s.to(acc))  # (V, d_s) += (V, n) @ (n, d_s), in place
            elif need_w and _dtype_out("addmm", ws.device.type):  # bfloat16 products, float32 sum, in place
                torch.addmm(grad_w, g.T.to(mm), h_s, out_dtype=acc, out=grad_w)
            elif need_w:  # the product in bfloat16, a (V, d_s) temporary, the sum in float32
                grad_w += g.T.to(mm) @ h_s
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(ws.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # scale in place: grad_w * grad_out would allocate a second (V, d) gradient (300 MB at V = 152k)
        # just to multiply by 1. A second backward (retain_graph) then fails loudly on the version check.
        return (None if grad_h is None else grad_h.mul_(grad_out),
                None if grad_w is None else grad_w.mul_(grad_out),
                None, None, None, None, None, None, None)

def _log_softmax_(z, scratch):
    """z (n, V) <- log_softmax(z) in place, with exp written to scratch: torch.logsumexp would
    allocate one more (n, V) temporary per call."""
    z -= z.amax(-1, keepdim=True)
    z -= torch.exp(z, out=scratch).sum(-1, keepdim=True).log_()

def _logits_into(buf, h, weight):
    """buf (n, V) <- h @ weight.T, computed in the inputs' dtype (bfloat16 under autocast), written in buf's
    (float32): straight from the product where the device can (_dtype_out), else rounded to the inputs'
    dtype in an (n, V) temporary first."""
    if h.dtype == buf.dtype:
        torch.mm(h, weight.T, out=buf)
    elif _dtype_out("mm", h.device.type):
        torch.mm(h, weight.T, out_dtype=buf.dtype, out=buf)
    else:
        buf.copy_(h @ weight.T)

def loss_chunk(n, vocab, device):
    """fused_linear_kl's rows per chunk for n rows: about 2^23 logits (32 MB in float32) per chunk
    buffer, where larger chunks gain nothing on a CPU (a GPU's: memory.loss_chunk)."""
    return max(1, min(n, (1 << 23) // vocab))

@functools.cache
def _dtype_out(op, device_type):
    """Whether torch.mm / torch.addmm ("mm", "addmm") write a float32 `out` from bfloat16 operands on this
    device type, tried once on a tiny product (at first use, not at import). Torch before 2.8 has no
    such overload (a TypeError), the CPU has no kernel for it, and torch 2.8-2.9's CUDA kernel refuses a
    float32 out from bfloat16 operands: each is a RuntimeError, and the plain product is used."""
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
    out = torch.zeros(2, 2, device=device_type)
    try:
        if op == "mm":
            torch.mm(a, a, out_dtype=torch.float32, out=out)
        else:
            torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
    except (RuntimeError, TypeError):
        return False
    return bool((out == 2).all())

# -----------------------------------------------------------------------------
# Metrics: one answer per question, its verdict and its stated confidence

def confidence_bin(c):
    """Index 0..9 of the equal-width bin of each confidence in c (a float tensor); 1.0 falls in the
    last bin. The + 1e-9 puts 0.3 (0.3 * 10 = 2.9999...) in bin 3, not 2."""
    return (c * 10 + 1e-9).floor().clamp(0, 9).long()

def calibration_metrics(correct, confidence):
    """correct: 0/1 per question; confidence: stated confidence in [0, 1] (0 where unparseable).
    accuracy, mean_confidence, their difference OCG (the overconfidence gap: > 0 overconfident),
    Brier (the mean squared error of the confidence against the verdict), ECE (the expected
    calibration error: |mean confidence - accuracy| per bin, weighted by the bin's share), SPR and
    AUROC (how well confidence ranks right answers above wrong ones).
    ECE uses 10 equal-width bins (0 falls in the first, 1 in the last). SPR is strict: over all
    (correct, incorrect) pairs, the fraction where the correct one is strictly more confident;
    ties earn nothing, and it is 0 when either class is empty. AUROC counts ties as half and is
    0.5 when either class is empty (nothing to rank). AURC: the mean error rate of the k most confident
    answers over k = 1..n, tied answers in every order equally likely (calibration.py has the curve)."""
    y = torch.as_tensor(correct, dtype=torch.float64)
    c = torch.as_tensor(confidence, dtype=torch.float64)
    n = len(y)
    assert n == len(c) and n > 0, "calibration_metrics needs equally long, non-empty inputs"
    bins = confidence_bin(c)
    # every sum in float64: an integer count / n is float32 in torch (an error of ~5e-9 in ECE)
    ece = sum((bins == b).double().sum() / n * (c[bins == b].mean() - y[bins == b].mean()).abs()
              for b in range(10) if (bins == b).any())
    pos, neg = c[y == 1], c[y == 0]
    if len(pos) and len(neg):
        diff = pos[:, None] - neg[None, :]  # (n_correct, n_incorrect)
        spr = (diff > 0).double().mean().item()
        auroc = spr + 0.5 * (diff == 0).double().mean().item()
    else:
        spr, auroc = 0.0, 0.5
    # AURC, selective prediction's price: answer the most confident first. Giving every answer its tie
    # group's error rate is the expectation over the orders of the ties (each is wrong at that rate)
    conf, order = c.sort(descending=True)
    _, group, size = conf.unique_consecutive(return_inverse=True, return_counts=True)
    group_err = torch.zeros(len(size), dtype=torch.float64).index_add_(0, group, 1 - y[order]) / size
    aurc = (group_err[group].cumsum(0) / torch.arange(1, n + 1, dtype=torch.float64)).mean().item()
    return {"accuracy": y.mean().item(), "mean_confidence": c.mean().item(), "ece": float(ece),
            "brier": ((c - y) ** 2).mean().item(), "ocg": (c.mean() - y.mean()).item(),
            "spr": spr, "auroc": auroc, "aurc": aurc, "n": n}
