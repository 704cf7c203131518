"""``hf-ivonpc posterior info|convert``: inspect a posterior (a folder, a file or a Hub repo id)
or convert the authors' published GPT-2 layout into the project's."""

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
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(Posterior.from_pretrained(args.path).describe())
        else:
            post = convert_authors_gpt2(args.src, args.dst, n_head=args.n_head)
            print(f"wrote {args.dst}\n")
            print(post.describe())
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

