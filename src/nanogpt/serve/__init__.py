"""The OpenAI-compatible HTTP server (`app.py`) and the request fields it reads, checked (`requests.py`).
"""
