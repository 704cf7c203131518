"""`hf-ivonpc continual` as a file, for `python scripts/continual_pretrain.py ...` and `accelerate launch scripts/continual_pretrain.py ...`
(the workload lives in ``hf_ivonpc/tasks/continual.py``; ``--help`` lists its arguments)."""

from hf_ivonpc.tasks.continual import main

if __name__ == "__main__":
    main()
