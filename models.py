"""
The model of a run: the toy GPT from scratch, or a Hugging Face causal LM and its tokenizer loaded,
copied (the teacher), exported (out_dir/hf); and the seams that run it inside caopd (seams()).
"""
import copy
import json
import os
import shutil

import torch

import caopd
import captured
import cli
import hf
import parallel
from data import arith
from parallel import RANK

def load_model(cfg, dtype=torch.float32):
    """(model, tokenizer, context length, dtype of the model's files): our GPT and the toy
    tokenizer, or a Hugging Face causal LM (float32 weights; tests ask for float64) and its
    tokenizer. Under FSDP2 (cfg.fsdp) only rank 0 reads the weights; the other processes build the
    model on the meta device (no memory), every decoder layer is sharded, and each process
    receives its part from rank 0: a node holds one model in host memory, not one per process."""
    if cfg.init_from == "scratch":
        enc = caopd.toy_tokenizer(arith.VOCAB_TEXT)
        gpt = caopd.GPTConfig(vocab_size=enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd)
        torch.manual_seed(cfg.seed)
        return caopd.GPT(gpt).to(cfg.device), enc, cfg.block_size, "float32"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # keep stderr for errors
    try:
        tok = AutoTokenizer.from_pretrained(cfg.init_from)
        # float32 master weights whatever the files hold (Qwen3's are bfloat16): see cli.autocast()
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=dtype) if RANK == 0 or not cfg.fsdp else None
        config = AutoConfig.from_pretrained(cfg.init_from)
    except (OSError, ValueError) as e:
        cli.die(f"--init_from={cfg.init_from!r} is neither 'scratch', 'resume' nor a loadable Hugging Face model "
            f"({str(e).strip().splitlines()[0][:200]})")
    if tok.eos_token_id is None:
        cli.die(f"--init_from={cfg.init_from!r}: the tokenizer has no eos token to end completions with")
    if cfg.fsdp:
        source, model = model, empty_like_model(cfg, config, dtype)
        if not parallel.decoder_layers(model):
            cli.die(f"--fsdp=True: {type(model).__name__} ({cfg.init_from}) names no decoder layers to shard "
                f"(_no_split_modules); run it without --fsdp")
        parallel.load_full_state(model, source.state_dict() if RANK == 0 else {}, broadcast=True)
        parallel.broadcast_buffers(model, source)  # rotary tables: not in a state dict
        del source
    if cfg.grad_checkpoint and not model.supports_gradient_checkpointing:
        cli.die(f"--grad_checkpoint=True: {type(model).__name__} ({cfg.init_from}) does not support gradient checkpointing")
    if not getattr(tok, "chat_template", None):
        print(f"{cfg.init_from}: no chat template, prompts are plain text")
    context = getattr(config, "max_position_embeddings", None) or 1 << 30
    files = config.dtype or torch.float32  # what the files hold
    return model.to(cfg.device), tok, context, str(files).removeprefix("torch.")

def empty_like_model(cfg, model_or_config, dtype=None):
    """A Hugging Face model of the same config, decoder layers sharded (FSDP2), memory on cfg.device
    left uninitialized: built on the meta device, so no process ever holds a whole unsharded copy."""
    from transformers import AutoModelForCausalLM
    config = getattr(model_or_config, "config", model_or_config)
    dtype = dtype or next(model_or_config.parameters()).dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    parallel.shard_layers(model)
    model.to_empty(device=cfg.device)  # new tensors, one per module: a tied output layer is untied ...
    model.tie_weights()  # ... and tied again
    return model

def frozen_copy(model, dtype):
    """A copy of model without gradients, its parameters in dtype: a frozen teacher needs no float32
    master weights. Made parameter by parameter (no second float32 copy); tied weights stay tied."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).requires_grad_(False)

def set_grad_checkpoint(model, on):
    """Gradient checkpointing on or off: per block for our GPT, the model's own for Hugging Face's."""
    if isinstance(model, caopd.GPT):
        model.grad_checkpoint = on
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()

def export_hf(model, tok, path, dtype, state=None):
    """save_pretrained (safetensors) of a Hugging Face student and its tokenizer in dtype (the
    float32 master weights cast on the way out), swapped in whole: `path` always holds a complete
    model. state: the model's whole state dict where it is not model.state_dict() (FSDP2's shards,
    gathered)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    state = model.state_dict() if state is None else state
    first = {}  # a tied weight's every name -> its first: one tensor under each (FSDP2 gathers two copies)
    names = {n: first.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)}
    cast = {}  # tensor -> its cast copy: tied weights stay one tensor, which save_pretrained writes once
    state = {k: cast.setdefault(id(state[names.get(k, k)]), state[names.get(k, k)].detach().to(getattr(torch, dtype)))
             for k in state}
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    config = json.load(open(os.path.join(tmp, "config.json")))
    config["dtype"] = dtype  # save_pretrained writes the dtype of the model in memory
    with open(os.path.join(tmp, "config.json"), "w") as f:  # inside tmp: the folder is swapped in whole
        f.write(json.dumps(config, indent=2) + "\n")
    tok.save_pretrained(tmp)
    shutil.rmtree(old, ignore_errors=True)  # a kill during the last export's clean-up left it
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)

def captures(cfg):
    """Whether sampling runs the captured decode step (captured.py): --compile_decode; "auto" where
    the host would set the pace, a GPU (not under FSDP2, whose hooks a captured step cannot hold), for
    our GPT only: a Hugging Face model's captured step has no measured gain yet (docs/gpu.md)."""
    if cfg.compile_decode == "auto":
        return cfg.init_from == "scratch" and "cuda" in cli.resolve_device(cfg.device) and not cfg.fsdp
    return cfg.compile_decode == "true"

def seams(model, captured_step=False):
    """How caopd runs model, as caopd.Distiller's hidden and decoder: caopd's own functions for our
    GPT, hf.py's for a Hugging Face model; captured_step: the decoder of captured.py."""
    ours = isinstance(model, caopd.GPT)
    decoder = captured.decoder(model) if captured_step else caopd.gpt_decoder if ours else hf.decoder
    return dict(hidden=caopd.completion_hidden if ours else hf.completion_hidden, decoder=decoder)
