"""`hf-ivonpc mcqa` as a file, for `python scripts/finetune_mcqa.py ...` and `accelerate launch scripts/finetune_mcqa.py ...`
(the workload lives in ``hf_ivonpc/tasks/mcqa.py``; ``--help`` lists its arguments)."""

from hf_ivonpc.tasks.mcqa import main

if __name__ == "__main__":
    main()
