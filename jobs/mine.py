"""Mine hard negatives for UniME-V2: embed -> FAISS top-N -> MLLM judge -> sampling, on Ray.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/mine.py --config jobs/configs/qwen2-vl-7b.yaml
    python jobs/mine.py --config jobs/configs/tiny.yaml            # tiny CPU variant, local Ray
    python jobs/mine.py --config ... --set mining.beta=0.02        # re-sample only, no judge call

Killed? Run the same command again: finished stages and shards are kept.
"""

from unime_ray.mining.pipeline import main

if __name__ == "__main__":
    main()
