"""Tokenize a corpus once into nanoGPT-style memmaps (``train.bin``, ``val.bin``, ``meta.json``).

    python scripts/prepare_data.py --help
    python scripts/prepare_data.py --dataset Skylion007/openwebtext --num_proc 16 --out data/owt

The implementation is :mod:`hf_ivonpc.data.prepare` (also ``python -m hf_ivonpc.data.prepare``).
"""

from hf_ivonpc.data.prepare import main

if __name__ == "__main__":
    main()
