"""The language-model demo: a small byte-level GPT-2 trained on the Shakespeare plays with planted canaries."""
