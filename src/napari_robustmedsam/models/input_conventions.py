"""The image preprocessing conventions of the SAM family, by name (what each does: engine.preprocessing).

A name travels with every checkpoint and every cache signature; it lives here, in the lowest layer and without
torch, so that checkpoints, the engine and the command-line parser read the same list.
"""

PREPROCESSINGS = ("sam", "medsam", "litemedsam")
