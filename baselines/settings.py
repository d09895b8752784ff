"""The utility baseline's CPU-sized defaults as plain data: the command line's help quotes them
without loading torch (``baselines.utility`` re-exports them)."""

# CPU-sized defaults of `ncbench baseline utility`: phantom images carry finding labels; 128 px
# with 8 px patches gives P = 256 tokens as at full size; encoder width 256.
DEFAULTS = {"n_train": 1200, "n_test": 400, "width": 256, "image_size": 128, "epochs": 8}
