"""Scoring a split on N ranks: `hpcdl infer`, `hpcdl evaluate` and `hpcdl.predict`.

`inputs` checks the split to score, `model` rebuilds a checkpoint's model for it, `schedule` says which rows each
rank scores, `engine` runs the pass, `writer` assembles the results in sample order, `metrics` sums the counts.
"""
