"""Processors without a video processor, for machines without torchvision.

The stock Qwen2-VL and LLaVA-OneVision processors require a video processor, and that one imports
torchvision. An embedder, judge and reranker only ever see images, so these subclasses declare just
(image_processor, tokenizer). The file is copied into tiny model folders and named in their
`auto_map`, so vLLM's transformers backend can load it with `trust_remote_code`; it imports nothing
but transformers for that reason.
"""

from transformers import LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor


class UnimeQwen2VLProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class UnimeLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    # The settings are named (not **kwargs): from_pretrained passes only the keys of processor_config.json
    # that the constructor's signature lists.
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            chat_template=chat_template,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


class UnimeQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
