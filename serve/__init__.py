"""`edgellama serve`: an OpenAI-compatible HTTP server over one loaded bundle (the `serve` extra)."""
