"""Language models: training text, memorization metrics (k-extractable, Pythia score, exact
memorization, probabilistic extraction), canary exposure, membership scores, and their run kinds.

Nothing here imports transformers: models sit behind the causal-LM protocol of
:mod:`memscan.generators.causal_lm`.
"""
