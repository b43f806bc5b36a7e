"""Memorization across runs: models, checkpoints, widths (``memscan compare``).

- :mod:`~memscan.compare.runs` reads one finished run of any measured kind into one summary row,
  the training items it memorized, its extraction rate by duplicate count and its per-example
  scores;
- :mod:`~memscan.compare.checks` refuses (or flags) runs made with different thresholds or on
  different training sets;
- :mod:`~memscan.compare.scaling` fits memorization against log10 of an attribute (parameters,
  training step, training-set size, a numeric label), with the slope's standard error and CI;
- :mod:`~memscan.compare.overlap` counts the items two runs both memorized (Jaccard);
- :mod:`~memscan.compare.outliers` scores every example by its k-NN distance to the other training
  examples and correlates it with the memorization / MIA score (Spearman);
- :mod:`~memscan.compare.run` is the run kind ``compare`` that puts them together.
"""
