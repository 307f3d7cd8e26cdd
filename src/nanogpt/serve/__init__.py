"""`nanogpt serve`: the OpenAI-compatible HTTP server (`app.py`, FastAPI, the `serve` extra) and the
request fields it reads, checked as pure functions (`requests.py`). Generation is `nanogpt.infer.generate`.

    nanogpt serve --model runs/demo --port 8000
"""
