"""Evaluating saved models: lm-evaluation-harness tasks and perplexity beyond the training
length (``enigma eval``)."""
