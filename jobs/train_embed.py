"""Train the UniME-V2 embedder on mined hard negatives: Ray Train + DeepSpeed ZeRO-2 + LoRA.

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train_embed.py --config jobs/configs/qwen2-vl-7b.yaml
    python jobs/train_embed.py --config jobs/configs/tiny.yaml     # tiny CPU variant (after jobs/mine.py)

Rerun the same command after a crash: it resumes from the last checkpoint of the same run.
"""

from unime_ray.train.run import main

if __name__ == "__main__":
    main()
