"""`mha-analyze`: what the heads of a trained model do (importance, confidence, entropy, similarity,
pruning curves, attention maps), on any checkpoint the plugin writes."""
