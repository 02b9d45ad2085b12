"""
The toy task: arithmetic with graded difficulty and a programmatic verifier.

Half the questions are additions of 1-3 digit operands (a small model learns most of them),
half multiplications of 1-2 digit operands (2-digit x 2-digit stays hard). Operands are
zero-padded to three digits, so every prompt has the same number of tokens and a step's
rollouts go through the sampler as one batch. Addition alone saturates (a model that is
right 90% of the time is nearly calibrated by always saying 1.0): the hard multiplication
slice is what makes confidence worth learning.

Answers are zero-padded to four digits too ("Answer: 0322"): each answer digit then sits at a
fixed distance from the operand digits it depends on, which a small model learns far faster.
The verifier compares integer values, so "Answer: 322" is right as well.

An example: {"id": "017+305", "question": "Solve 017+305 and end with your confidence.",
             "messages": [{"role": "user", "content": <the question>}], "answer": 322,
             "reference": "Answer: 0322", "kind": "add"}
(messages is the question as a chat: the shape of every task's examples; see train_small.py)
The student answers "Answer: 0322\nConfidence: 0.7"; caopd.verify_arith checks the integer.
"""
import hashlib
import random

QUESTION = "Solve {a:03d}{op}{b:03d} and end with your confidence."
# The toy tokenizer's words, one token each (caopd.toy_tokenizer): the question, the answer and
# confidence lines, and the teacher contexts' words (caopd.TEMPLATES and NOTE as the toy was built
# with them). Written out here, so that a template added later changes no token of the toy, and
# with them the base model, its cache key and every number; its new words are spelled in bytes.
VOCAB_TEXT = (QUESTION + "\nAnswer: 1\nConfidence: 1.0"
              + "{question}\nThis is an example for a response to the question:\n{solution}\n{note}Now answer with a "
              "response of your own.\n {question}\nCorrect solution:\n{solution}\n{note}Correctly solve the original "
              "question.\nNote: The empirical confidence for this question is {p}. Output this exact value in the "
              "'Confidence:' field.\n")
DECIMALS = 1  # confidence is stated as 0.0, 0.1, ..., 1.0: one token each in the toy tokenizer

def make_example(rng, ops="+*", digits=None):
    """One random question; the operands' digit counts are drawn first, so short and long
    operands are equally common (that is what grades the difficulty).
    The defaults are the training task. experiments.py also asks for questions the model never
    trained on: ops="-" (subtraction, a >= b, 1-3 digit operands) and digits=n (operands of
    1..n digits, both written n wide: prompts of one length per n)."""
    op = rng.choice(ops)
    top = digits or (2 if op == "*" else 3)
    a, b = _operand(rng, top), _operand(rng, top)
    if op == "-":
        a, b = max(a, b), min(a, b)  # no negative answers
    answer = {"+": a + b, "*": a * b, "-": a - b}[op]
    width = max(3, top)
    q = QUESTION.replace(":03d", f":0{width}d").format(a=a, op=op, b=b)
    return {"id": f"{a:0{width}d}{op}{b:0{width}d}", "question": q, "messages": [{"role": "user", "content": q}],
            "answer": answer, "reference": f"Answer: {answer:04d}", "kind": KINDS[op]}

KINDS = {"+": "add", "*": "mul", "-": "sub"}

def _operand(rng, max_digits):
    d = rng.randint(1, max_digits)
    return rng.randrange(10 ** (d - 1) if d > 1 else 0, 10 ** d)

HELD_FRACTION = 0.2  # of every kind of question (op and operand digit counts): held out, never trained on

def is_held(data_seed, qid):
    """Whether question qid is held out: a hash of (data_seed, qid) in the lowest HELD_FRACTION of
    the hash space. sha256, not hash(): Python salts string hashes per process."""
    h = hashlib.sha256(f"{data_seed}/{qid}".encode()).digest()
    return int.from_bytes(h[:8], "big") < HELD_FRACTION * 2 ** 64

MAX_DRAWS = 2_000_000  # to find n_eval distinct held-out questions (~10 s); past it the mix has run out

def split(data_seed, n_eval, ops="+*", digits=None):
    """The held-out questions (deterministic in data_seed) and a sampler of training questions
    that never returns one of them. ops and digits as in make_example.
    A question is held out iff is_held: a fifth of every kind, so training sees the rest of every
    kind (excluding the evaluation questions themselves would take most of a small kind, such as
    the 100 one-digit products, out of training). The n_eval evaluation
    questions are distinct held-out questions, drawn from the training distribution: each is one
    independent outcome, so ECE's sampling floor falls as 1 / sqrt(n_eval). A small kind runs out
    of held-out questions (the one-digit products have ~28), so at n_eval = 4000 the mix is 27.5%
    multiplications where training's is 50% (the greedy answer to a repeated question would add
    weight but no information)."""
    rng = random.Random(data_seed)
    held_out, draws = {}, 0
    while len(held_out) < n_eval:
        ex = make_example(rng, ops, digits)
        if is_held(data_seed, ex["id"]):
            held_out.setdefault(ex["id"], ex)
        draws += 1
        if draws == MAX_DRAWS:  # say so in seconds, instead of drawing for hours (or forever)
            raise ValueError(f"n_eval={n_eval}: {MAX_DRAWS:,} questions of this mix ({ops}, digits "
                             f"{digits or 'default'}) hold {len(held_out)} distinct held-out ones; ask for at most that many")
    held = list(held_out.values())

    def sample_train(rng, n):
        out = []
        while len(out) < n:
            ex = make_example(rng, ops, digits)
            if not is_held(data_seed, ex["id"]):
                out.append(ex)
        return out
    return held, sample_train

if __name__ == "__main__":  # show a few questions and the difficulty mix
    held, sample_train = split(0, 1000)
    for ex in sample_train(random.Random(0), 5):
        print(ex)
    print(sum(e["kind"] == "mul" for e in held), "of", len(held), "held-out questions are multiplications")
