"""Every transformers model type with routed experts: tiny configs, survey, and parity tests."""
