"""``hf-ivonpc COMMAND [--config NAME] [--field value ...]`` (also ``python -m hf_ivonpc``, and
``accelerate launch -m hf_ivonpc COMMAND ...`` on several GPUs).

Commands: the paper's five workloads, data preparation and the posterior tools. Each workload
reads a YAML config (its offline default when ``--config`` is absent; see ``hf-ivonpc configs``)
and every ``PCTrainingArguments`` field as a flag; ``hf-ivonpc COMMAND --help`` lists them.
"""

from __future__ import annotations

import importlib
import sys

#: command -> (module, what it runs)
COMMANDS = {
    "pretrain": ("hf_ivonpc.tasks.pretrain", "GPT-2 pretraining from scratch (Sec. 4.3)"),
    "continual": ("hf_ivonpc.tasks.continual", "continual pretraining of a causal LM (Sec. 4.4)"),
    "xsum": ("hf_ivonpc.tasks.xsum", "summarization fine-tuning, ROUGE (App. D.4)"),
    "gsm8k": ("hf_ivonpc.tasks.gsm8k", "LoRA fine-tuning on math word problems, exact match (App. D.4)"),
    "vit": ("hf_ivonpc.tasks.vit", "CLIP ViT fine-tuning for image classification (App. D.4)"),
    "dpo": ("hf_ivonpc.tasks.dpo", "DPO with LoRA on preference pairs: reward accuracy, preference loss"),
    "mcqa": ("hf_ivonpc.tasks.mcqa", "LoRA fine-tuning on multiple-choice questions: calibration, mean vs predictive"),
    "prepare": ("hf_ivonpc.data.prepare", "tokenize a corpus into train.bin / val.bin memmaps"),
    "posterior": ("hf_ivonpc.tasks.posterior", "inspect or convert a posterior"),
    "configs": ("hf_ivonpc.tasks.cli", "list the shipped configs"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    return f"usage: hf-ivonpc COMMAND [ARGS ...]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"hf-ivonpc: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from .tasks import cli
    cli.PROG = f"hf-ivonpc {argv[0]}"   # errors name the command as the user typed it
    module = importlib.import_module(COMMANDS[argv[0]][0])
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
