"""Reference decoder: pure samplers, AR and TiDAR step loops with a KV cache, metrics and speedup projection."""
