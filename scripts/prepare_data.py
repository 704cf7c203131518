"""Tokenize a corpus once into nanoGPT-style memmaps: ``train.bin`` / ``val.bin`` (uint16 GPT-2
token ids, documents separated by <|endoftext|>) and ``meta.json``. Deterministic: the same corpus
and tokenizer give the same bytes (the SHA-256 of each file is in ``meta.json``).

    python scripts/prepare_data.py                                  # Shakespeare, offline
    python scripts/prepare_data.py --dataset aclsum --out data/aclsum
    python scripts/prepare_data.py --dataset openwebtext --out data/owt --val_fraction 0.0005
    python scripts/prepare_data.py --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT

``scripts/pretrain.py`` prepares its data set by itself on first use; this script is for doing it
ahead of time (e.g. once, before a multi-GPU run).
"""

from __future__ import annotations

import argparse
import json
import sys

from hf_ivonpc.tasks.lm import load_tokenizer, prepared_data


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="shakespeare",
                    help="shakespeare | aclsum (offline), a local .txt/.jsonl/folder, or a Hub data set")
    ap.add_argument("--dataset_config", default=None, help="configuration of a Hub data set")
    ap.add_argument("--text_field", default="text", help="text column of a .jsonl or Hub data set")
    ap.add_argument("--tokenizer_name", default=None, help="tokenizer path or id (default: offline GPT-2)")
    ap.add_argument("--out", default=None, help="output folder (default: a folder of the data cache)")
    ap.add_argument("--val_fraction", type=float, default=0.1,
                    help="share of documents held out when the corpus has no validation split, in (0, 1)")
    a = ap.parse_args(argv)
    tok = load_tokenizer(a.tokenizer_name)
    out, meta = prepared_data(a.dataset, a.out, tokenizer=tok, tokenizer_name=a.tokenizer_name,
                              val_fraction=a.val_fraction, text_field=a.text_field,
                              dataset_config=a.dataset_config)
    print(f"{out}: " + json.dumps({k: meta[k] for k in ("documents", "tokens")}))
    return meta


if __name__ == "__main__":
    main()
    sys.exit(0)
