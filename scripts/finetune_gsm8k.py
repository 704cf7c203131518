"""`hf-ivonpc gsm8k` as a file, for `python scripts/finetune_gsm8k.py ...` and `accelerate launch scripts/finetune_gsm8k.py ...`
(the workload lives in ``hf_ivonpc/tasks/gsm8k.py``; ``--help`` lists its arguments)."""

from hf_ivonpc.tasks.gsm8k import main

if __name__ == "__main__":
    main()
