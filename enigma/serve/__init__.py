"""Serving a saved model over HTTP: an OpenAI-compatible application on Ray Serve, batching
the requests that arrive together."""
