"""
Tokens: the toy's tiktoken encoding (caopd.toy_tokenizer) or a Hugging Face tokenizer and its chat
template; the student's prompt (the question) and the teacher's (the question in its privileged
context, caopd.teacher_prompt).
"""
import tiktoken

import caopd
from data import arith

def is_toy(tok):
    return isinstance(tok, tiktoken.Encoding)

def end_id(tok):
    return tok.eot_token if is_toy(tok) else tok.eos_token_id

def decimals(tok):
    """Digits of a stated confidence: the toy's one token per value (0.0 ... 1.0), else the paper's X.XX."""
    return arith.DECIMALS if is_toy(tok) else 2

def encode(tok, text):
    return tok.encode(text) if is_toy(tok) else tok(text, add_special_tokens=False)["input_ids"]

def decode(tok, ids):
    end = end_id(tok)
    return tok.decode([t for t in ids if t != end])

def template_reads(tok, name):
    """Whether tok's chat template uses the variable `name`: a look at its Jinja source (the text of
    all its templates when it has several). The toy tokenizer has no template."""
    return name in str(getattr(tok, "chat_template", None) or "")

def render(tok, messages, enable_thinking):
    """A chat -> prompt tokens: the tokenizer's chat template where it has one, else each
    message's text on its own lines (the toy: "question\n"). enable_thinking ("default", "true",
    "false", the setting) goes to the template as its variable of that name, unless "default";
    a template that never reads it is unchanged by it."""
    if getattr(tok, "chat_template", None):
        options = {} if enable_thinking == "default" else {"enable_thinking": enable_thinking == "true"}
        return encode(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options))
    return encode(tok, "".join(m["content"].rstrip("\n") + "\n" for m in messages))

def student_tokens(tok, ex, enable_thinking):
    return render(tok, ex["messages"], enable_thinking)

def teacher_tokens(tok, ex, context, enable_thinking):
    """The student's chat with the privileged context (caopd.teacher_prompt's fields: template,
    solution, confidence, note) around the question of its last user turn. A system message stays
    as it is: rebuilding the teacher prompt from the system turn would lose the question (a bug of
    the authors' release)."""
    messages = [dict(m) for m in ex["messages"]]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = caopd.teacher_prompt(messages[last]["content"], decimals(tok), **context)
    return render(tok, messages, enable_thinking)

def confidence_value_ids(tok):
    """The toy's stated confidences 0.0, 0.1, ..., 1.0: one token each (see caopd.toy_tokenizer)."""
    return [t for v in range(11) for t in encode(tok, f" {v / 10:.1f}")]
