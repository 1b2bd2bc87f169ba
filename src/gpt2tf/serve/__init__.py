"""Serving: the request schema, the batching worker, the HTTP app and the server around it."""
