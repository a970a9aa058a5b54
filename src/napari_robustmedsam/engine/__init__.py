"""Engine: preprocessing, embeddings and the prompt predictor (no Qt here; the device choice is ..device)."""
