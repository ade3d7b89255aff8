"""Prompt caches: named text prefixes a person edits, and the model state built from them."""
