"""`caa-local serve`: an OpenAI-compatible server with per-request steering, and its page.

Needs the ``serve`` extra (FastAPI, uvicorn, pydantic). Modules: config (settings), protocol
(request shapes, response bodies), errors (the error table), limits (bounded JSON parsing),
browser (Origin, CORS, content type), guard (host, key), body (body size and deadline),
connection (a deadline on each request's head), library
(the vectors requests may name), planning (request -> Plan), slots (contexts, queue, cancel),
sse (frames, stop strings), web (the page), app (the routes), server (build and run).
"""
