"""The Ray machinery that mining, evaluation and serving share, one module per concern:

- `actors`: a pool of model-owning actors over a Ray Data dataset (`map_with_actors`): the judge, the
  reranker and the embedder all run through it.
- `embed`: the embedder's actor (`embed_dataset`) and its vectors as Arrow rows (`embeddings_table`).
- `shards`: resumable sharded processing: request shard files -> result shard files, each exactly once.
- `index`: exact / IVF inner-product top-k over a fixed pool with FAISS (`PoolIndex`, `search_topk`).
- `tasks`: Ray tasks spread over the cluster's nodes, bounded in number, results as they finish.
"""
