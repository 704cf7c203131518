"""The correction's variance measured per regime (window ratio with the mega-batch's error from
replicate mega-batches, the gradient-noise scale): ``python scripts/variance.py [--regimes lm,image,continual]``.
The protocol is in ``scripts/research/variance.py``."""

from research.variance import main

if __name__ == "__main__":
    main()
