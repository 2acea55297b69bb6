"""Build (or grow) the search index the Serve app queries: embed a corpus with a Ray Data actor pool
into a FAISS index plus an id -> record store (Parquet). See `unime_ray.serve.index`.

    python jobs/build_index.py --config jobs/configs/tiny.yaml --corpus runs/tiny/world/retrieval
    python jobs/build_index.py --config ... --corpus runs/tiny/world/eval          # add new records only
    python jobs/build_index.py --config ... --corpus DIR --rebuild --set index.type=hnsw
    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/build_index.py --config jobs/configs/qwen2-vl-7b.yaml --corpus /data/corpus

Then serve it: `unime-ray serve --config ...` (or `serve deploy jobs/configs/serve.yaml` on a running Ray).
"""

from unime_ray.serve.index import main

if __name__ == "__main__":
    main()
