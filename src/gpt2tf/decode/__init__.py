"""Generation: the decode loop over a model's graph, the loaded `Generator`, and text out."""
