"""The Ray machinery that mining, evaluation and serving share, one module per concern:

- `embed`: an actor pool of embedders on Ray Data (`embed_dataset`).
- `shards`: resumable sharded processing: request shard files -> result shard files, each exactly once.
- `index`: exact / IVF inner-product top-k over a fixed pool with FAISS (`PoolIndex`, `search_topk`).
- `tasks`: Ray tasks spread over the cluster's nodes, bounded in number, results as they finish.
"""
