"""`hf-ivonpc pretrain` as a file, for `python scripts/pretrain.py ...` and `accelerate launch scripts/pretrain.py ...`
(the workload lives in ``hf_ivonpc/tasks/pretrain.py``; ``--help`` lists its arguments)."""

from hf_ivonpc.tasks.pretrain import main

if __name__ == "__main__":
    main()
