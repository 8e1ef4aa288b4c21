"""Typed, validated configuration: the phase schema, Hydra composition, token budgets -> steps."""
