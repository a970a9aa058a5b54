"""Engine: preprocessing, device choice, embeddings and the prompt predictor (no Qt here)."""
