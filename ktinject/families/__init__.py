"""The transformers model families ktinject runs, and how to check that it does.

- ``model_class``: which Auto class builds a config's model (causal LM, or the VLM around the language model).
- ``tiny``: a tiny config, in code, for every model type whose modeling file has a routed-experts module.
- ``status``: what ``ktinject families`` reports per model type: the rules ``auto`` chooses, whether they plan
  on a meta model (static, no weights), and ``--verify``'s parity check of a tiny random model (the same
  check the test suite runs).

Only ``model_class`` is imported by the loader; the rest loads on use.
"""
