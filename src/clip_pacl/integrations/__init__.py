"""Adapters to other training frameworks; each imports its framework lazily (optional extras)."""
