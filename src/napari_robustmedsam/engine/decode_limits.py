"""Bounds on the memory one decoder call holds, shared by the torch predictor and the exported decoder."""

#: Objects (prompt sets) decoded per model call. The decoder's activations grow with the batch, so any number
#: of prompts is decoded this many at a time (docs/embeddings.md, "Many prompts, large images").
DEFAULT_DECODE_CHUNK = 8
#: Float32 bytes at the original resolution held at once while logits become full-size boolean masks.
FULL_RES_BUDGET_BYTES = 64 * 2**20
