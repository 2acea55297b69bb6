"""Evaluate an embedder (and optionally a reranker) with the paper's protocol; write its tables.

    # cluster: one embedding / reranking actor per GPU, embeddings cached on shared storage
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --config jobs/configs/qwen2-vl-7b.yaml \
            --model /mnt/cluster_storage/unime/qwen2-vl-7b/export \
            --reranker /mnt/cluster_storage/unime/reranker-qwen2.5-vl-7b/adapter \
            --set eval.num_actors=8 --set eval.gpus_per_actor=1 \
            --set eval.retrieval=[/data/flickr30k/dataset_flickr30k.json] \
            --set eval.image_root=/data/flickr30k/images

    # laptop: tiny CPU model on the synthetic world (built if missing), local Ray on 127.0.0.1
    python jobs/evaluate.py --config jobs/configs/tiny.yaml                     # embedder only
    python jobs/evaluate.py --config jobs/configs/tiny.yaml \
        --reranker runs/tiny/models/qwen2-vl --set eval.top_k=5                 # + listwise and pointwise

Results land in `<run.output_dir>/eval/` (results.json, results.md, mmeb.png, recall.png); compare two
runs with `unime-ray compare BASELINE_DIR NEW_DIR`. Re-running embeds nothing already cached.
"""

from unime_ray.eval.job import main

if __name__ == "__main__":
    main()
