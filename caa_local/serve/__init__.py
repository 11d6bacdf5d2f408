"""`caa-local serve`: an OpenAI-compatible server with per-request steering, and its page.

Needs the ``serve`` extra (FastAPI, uvicorn, pydantic). Modules: config (settings), protocol
(request shapes), errors (the error table), guard (host, key, body size), library (the vectors
requests may name), planning (request -> Plan), slots (contexts, queue, cancel), sse (frames,
stop strings), web (the page), app (the routes), server (build and run).
"""
