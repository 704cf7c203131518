"""``hf-ivonpc posterior info|convert|evaluate``: inspect a posterior (a folder, a file or a Hub
repo id), convert the authors' published GPT-2 layout into the project's, or evaluate a finished
run's posterior predictive again (multiple-choice runs: the mean and the predictive over k draws
for several k, JSON plus a reliability diagram and a risk-coverage plot)."""

from __future__ import annotations

import argparse
import sys

from ..convert import convert_authors_gpt2
from ..posterior import Posterior


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-ivonpc posterior",
                                     description="Inspect or convert posterior files.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the summary of a posterior (folder, file or repo id)")
    info.add_argument("path")
    conv = sub.add_parser("convert", help="convert the authors' GPT-2 layout (pytorch_model.bin + "
                                          "optimizer_param_groups.pt) into ours")
    conv.add_argument("src", help="folder (or Hub repo id) with the authors' files")
    conv.add_argument("dst", help="new folder for model.safetensors + posterior.safetensors")
    conv.add_argument("--n-head", type=int, default=None,
                      help="attention heads when SRC has no config.json (default: n_embd // 64)")
    ev = sub.add_parser("evaluate", help="the mean and the predictive over k draws of a finished run, "
                                         "written as JSON + reliability and risk-coverage plots",
                        epilog="Other arguments override the run's saved workload arguments, e.g. "
                               "--max_eval_samples 50.")
    ev.add_argument("path", help="output folder of a finished run (adapter, posterior.safetensors, "
                                 "workload_args.json)")
    ev.add_argument("--task", required=True, choices=("mcqa",), help="the workload that produced the run")
    ev.add_argument("--n_samples", default="1,2,4,8", help="comma-separated draw counts (default 1,2,4,8)")
    ev.add_argument("--sigma_scale", type=float, default=1.0, help="sigma multiplied by this in every draw")
    ev.add_argument("--seed", type=int, default=0, help="seed of the draws")
    ev.add_argument("--batch_size", type=int, default=16, help="questions per forward")
    ev.add_argument("--output_dir", default=None, help="where to write (default PATH/evaluate)")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "evaluate":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "evaluate":
            from .mcqa import evaluate_saved, parse_n_samples

            report = evaluate_saved(args.path, parse_n_samples(args.n_samples), args.sigma_scale, args.seed,
                                    args.batch_size, args.output_dir, rest)
            mean = report["mean"]
            print(f"{args.path}: mean accuracy {mean['accuracy']:.3f}, NLL {mean['nll']:.4f}, ECE {mean['ece']:.4f}")
            for k, m in report["predictive_by_k"].items():
                print(f"  predictive, {k:>3} draws: accuracy {m['accuracy']:.3f}, NLL {m['nll']:.4f}, "
                      f"ECE {m['ece']:.4f}, epistemic {m['epistemic']:.2e}")
            print(f"{report['seconds_per_draw']:.2f} s per draw; wrote {args.output_dir or args.path + '/evaluate'}")
        elif args.command == "info":
            print(Posterior.from_pretrained(args.path).describe())
        else:
            post = convert_authors_gpt2(args.src, args.dst, n_head=args.n_head)
            print(f"wrote {args.dst}\n")
            print(post.describe())
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

