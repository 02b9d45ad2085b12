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
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # keep stderr for errors
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its load report: what is wrong is said below, in one line
    try:
        tok = AutoTokenizer.from_pretrained(cfg.init_from)
        # float32 master weights whatever the files hold (Qwen3's are bfloat16): see cli.autocast()
        model, info = (None, {}) if RANK != 0 and cfg.fsdp else AutoModelForCausalLM.from_pretrained(
            cfg.init_from, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
        config = AutoConfig.from_pretrained(cfg.init_from)
    except SafetensorError as e:
        cli.die(f"--init_from={cfg.init_from!r}: its .safetensors weights are truncated or corrupt "
                f"({cli.first_line(e)})")
    except (OSError, ValueError) as e:
        cli.die(f"--init_from={cfg.init_from!r} is neither 'scratch', 'resume' nor a loadable Hugging Face model "
            f"({cli.first_line(e)})")
    finally:
        logging.set_verbosity(verbosity)
    # either would be initialized at random, silently
    for keys, what in ((info.get("missing_keys"), "lack {} (incomplete files?)"),
                       (info.get("mismatched_keys"), "give {} another shape than its config")):
        if keys:
            keys = sorted(k if isinstance(k, str) else k[0] for k in keys)
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            cli.die(f"--init_from={cfg.init_from!r}: its weights {what.format(', '.join(keys[:3]) + more)}")
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

def export_hf(model, tok, path, dtype, state=None, run=None):
    """save_pretrained (safetensors) of a Hugging Face student and its tokenizer in dtype (the
    float32 master weights cast on the way out), with run.json (run: the run's identity), swapped
    in whole: at every instant `path` holds a complete model, or, between the two renames,
    path.old does (run_dir.clean_leftovers puts it back). state: the model's whole state dict where
    it is not model.state_dict() (FSDP2's shards, gathered). A write that fails is one line."""
    from safetensors import SafetensorError
    tmp, old, name = path + ".tmp", path + ".old", os.path.basename(path)
    state = model.state_dict() if state is None else state
    first = {}  # a tied weight's every name -> its first: one tensor under each (FSDP2 gathers two copies)
    names = {n: first.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)}
    cast = {}  # tensor -> its cast copy: tied weights stay one tensor, which save_pretrained writes once
    state = {k: cast.setdefault(id(state[names.get(k, k)]), state[names.get(k, k)].detach().to(getattr(torch, dtype)))
             for k in state}
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed export's
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        config = json.load(open(os.path.join(tmp, "config.json")))
        config["dtype"] = dtype  # save_pretrained writes the dtype of the model in memory
        with open(os.path.join(tmp, "config.json"), "w") as f:  # inside tmp: the folder is swapped in whole
            f.write(json.dumps(config, indent=2) + "\n")
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "run.json"), "w") as f:
            f.write(json.dumps({"run": run}) + "\n")
        cli.stop_at(f"export {name} written")
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)  # path is whole: an older copy a kill left is not needed
            os.replace(path, old)
            cli.stop_at(f"export {name} moved")
        os.replace(tmp, path)
        cli.stop_at(f"export {name} swapped")
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cli.cannot_write(path, e)

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
