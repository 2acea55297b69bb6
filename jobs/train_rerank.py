"""Train the UniME-V2 reranker (pairwise Yes/No + listwise) on mined hard negatives: Ray Train +
DeepSpeed ZeRO-2 + LoRA.

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train_rerank.py --config jobs/configs/reranker-qwen2.5-vl-7b.yaml
    python jobs/train_rerank.py --config jobs/configs/tiny.yaml    # tiny CPU variant (after jobs/mine.py)
"""

from unime_ray.train.run import main_rerank

if __name__ == "__main__":
    main_rerank()
