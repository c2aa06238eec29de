"""Evaluators: each takes the functions it needs (no model or trainer imports) and returns metrics."""
