"""
Training curves from one or more runs' metrics.jsonl, side by side in one PNG: per method, the
stated confidence against the rollouts' accuracy and P_acc over the steps, and the held-out ECE
where it was evaluated (report.training_curves; train_small.py draws out_dir/curves.png itself).

    python curves.py out/metrics.jsonl                                  # -> curves.png
    python curves.py out/metrics.jsonl seed1/metrics.jsonl --out=both.png
"""
import sys

import cli
import metrics_log
import report

def main(argv):
    paths, out = [], "curves.png"
    for arg in argv:
        if arg in ("--help", "-h"):
            print(__doc__.strip())
            sys.exit(0)
        if arg.startswith("--out="):
            out = arg[len("--out="):]
        elif arg.startswith("-"):
            cli.die(f"unknown option {arg!r} (the arguments are metrics.jsonl files and --out=PNG)")
        else:
            paths.append(arg)
    if not paths:
        cli.die("no metrics.jsonl given: python curves.py out/metrics.jsonl [more ...] [--out=curves.png]")
    if not out.lower().endswith(".png"):  # what it draws is a PNG, whatever the name says
        cli.die(f"--out={out!r}: the curves are a PNG; name the file .png")
    runs = [(path, metrics_log.read_metrics(path)) for path in paths]  # every file checked before drawing
    try:
        report.training_curves(runs, out)
    except OSError as e:
        cli.die(f"--out={out!r} cannot be written: {e.strerror}")
    print(f"wrote {out}")

if __name__ == "__main__":
    main(sys.argv[1:])
