"""`hf-ivonpc xsum` as a file, for `python scripts/finetune_xsum.py ...` and `accelerate launch scripts/finetune_xsum.py ...`
(the workload lives in ``hf_ivonpc/tasks/xsum.py``; ``--help`` lists its arguments)."""

from hf_ivonpc.tasks.xsum import main

if __name__ == "__main__":
    main()
