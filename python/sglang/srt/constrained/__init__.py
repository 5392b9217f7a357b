"""Constrained decoding: grammar compilation, per-request matchers and the batched vocab mask."""
