"""`nanogpt serve`: the OpenAI-compatible HTTP server (`app.py`, FastAPI, the `serve` extra), the request
fields it reads, checked as pure functions (`requests.py`), its OpenAI-shaped errors and body limit
(`errors.py`) and its model routes (`routes.py`). Generation is `nanogpt.infer.generate`.

    nanogpt serve --model runs/demo --port 8000
"""
