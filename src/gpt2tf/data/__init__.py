"""Training data: reading documents, encoding them to token ids (.npz), sampling windows."""
