"""`hf-ivonpc vit` as a file, for `python scripts/finetune_vit.py ...` and `accelerate launch scripts/finetune_vit.py ...`
(the workload lives in ``hf_ivonpc/tasks/vit.py``; ``--help`` lists its arguments)."""

from hf_ivonpc.tasks.vit import main

if __name__ == "__main__":
    main()
