"""Serving: the only package that imports Starlette (routes, the WebSocket and OpenAI transports, the request service)."""
