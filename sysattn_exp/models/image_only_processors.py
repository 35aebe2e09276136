"""Processors of the families whose real processor class insists on a video processor
(which needs torchvision): the real classes minus the video processor, so that image
placeholder expansion runs the real class's own code on a machine without torchvision."""

import re

import transformers
from transformers import InternVLProcessor, SmolVLMProcessor
from transformers.processing_utils import ProcessorMixin


# Image-only stand-ins: the real processor classes minus the video processor (it needs
# torchvision). ProcessorMixin takes its sub-processors from the __init__ signature, so a
# subclass whose __init__ lacks `video_processor` needs, saves and loads only an image
# processor and a tokenizer; every other method (placeholder expansion, chat template,
# saving) is the real class's. They keep the real class names, so the files they save
# (processor_config.json, tokenizer_config.json) name the real class and AutoProcessor on a
# machine with torchvision would load the real processor from them. The arguments are
# spelled out because from_pretrained reads them from __init__.__code__.
class LlavaOnevisionProcessor(transformers.LlavaOnevisionProcessor):
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,  # video_processor
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


class Qwen2VLProcessor(transformers.Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLProcessor(transformers.Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class InternVLImageOnlyProcessor(InternVLProcessor):
    """InternVLProcessor without its video processor (which needs torchvision). Its __init__
    sets what InternVLProcessor.__init__ sets; __call__ (the placeholder expansion) is the
    real class's, untouched."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length: int = 256,
        chat_template=None,
        **kw,
    ):
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)
        self.video_processor = None
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )


class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
    """SmolVLMProcessor without its video processor (which needs torchvision) and without the
    num2words check (only video prompts use it). Its __init__ sets what
    SmolVLMProcessor.__init__ sets; __call__ (the placeholder expansion) is the real class's."""

    def __init__(
        self, image_processor, tokenizer, image_seq_len: int = 169, chat_template=None, **kw
    ):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(
            tokenizer, "end_of_utterance_token", "<end_of_utterance>"
        )
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)
        self.video_processor = None

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # SmolVLMProcessor's override only adds the video processor's frame defaults (and a
        # video template); with no video the base rendering is what it would run.
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)
