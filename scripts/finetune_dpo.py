"""`hf-ivonpc dpo` as a file, for `python scripts/finetune_dpo.py ...` and `accelerate launch scripts/finetune_dpo.py ...`
(the workload lives in ``hf_ivonpc/tasks/dpo.py``; ``--help`` lists its arguments)."""

from hf_ivonpc.tasks.dpo import main

if __name__ == "__main__":
    main()
