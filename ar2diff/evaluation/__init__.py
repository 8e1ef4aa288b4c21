"""Quality measurements beside the decoder check: pass@k, base-relative losses, loss by position, lm-eval."""
