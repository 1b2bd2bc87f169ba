"""Web server: browser page and OpenAI-compatible HTTP API (placeholder)."""


def serve_cli(model_name: str = "124M", models_dir: str = "models", run_name: str = "",
              checkpoint_dir: str = "checkpoint", host: str = "127.0.0.1", port: int = 8000):
    """Serve a model over HTTP."""
    raise NotImplementedError
