"""rkllmd-http: OpenAI- and Ollama-compatible HTTP in front of rkllmd's socket (docs/http.md).

The daemon stays the one owner of the model; this gateway is one more client of its
socket, translating each HTTP request into a ``generate`` and its stream back.
"""
