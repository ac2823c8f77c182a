"""Using a trained model: generation from a prompt, and chat."""
