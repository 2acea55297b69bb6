"""Evaluation with the paper's protocol (`unime-ray eval`, `jobs/evaluate.py`), one module per concern:

- `metrics`: ranks of the first correct candidate (ties count against the query), Recall@k, P@1.
- `ranking`: the shared shape (collections of items, tasks of queries ranking candidates), top-K.
- `groups`: the 36 MMEB datasets, meta-tasks, IND / OOD; retrieval kinds; SugarCrepe groups.
- `mmeb`, `retrieval`, `compositional`: readers of each benchmark's files into collections.
- `cache`: embedding (and rerank) caches keyed by model fingerprint and dataset, run on Ray Data.
- `rerank`: listwise / pointwise reranking of the embedding top-K in a Ray Data actor pool.
- `report`, `plots`: the results JSON, Markdown tables shaped like the paper's, PNG plots.
- `compare`: two result folders side by side; `job`: the command line and the driver.
"""
