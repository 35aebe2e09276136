"""Prompts: the paper's vicuna format for LLaVA-1.5 and the model's own chat template for
every other family, and where the user's question starts in a rendered prompt."""

from dataclasses import dataclass, field

from jinja2.exceptions import TemplateError

from sysattn_exp.errors import UsageError

USER = "USER: "


def build_prompt(question: str, system_prompt: str, with_image: bool = True) -> str:
    """LLaVA-1.5's evaluation prompt (conversation vicuna_v1); the tokenizer adds BOS. A
    question without an image is asked the same way, without the <image> line."""
    prefix = f"{system_prompt} " if system_prompt else ""
    image = "<image>\n" if with_image else ""
    return f"{prefix}{USER}{image}{question} ASSISTANT:"


@dataclass
class PromptFormat:
    """How one model is asked a question. `processor` is the model's processor (a VLM) or
    tokenizer (a text-only LM); `system_prompt` None means the template's own default."""

    processor: object
    system_prompt: str | None
    vicuna: bool = False  # LLaVA-1.5: the paper's format, not the chat template
    template_kwargs: dict = field(default_factory=dict)  # e.g. Qwen3's enable_thinking

    def render(self, question: str, with_image: bool = True) -> str:
        if self.vicuna:
            return build_prompt(question, self.system_prompt or "", with_image)
        if self.system_prompt is None:
            return self.apply(None, question, with_image)
        if self.system_prompt:
            return self.apply(self.system_prompt, question, with_image)
        # "" means none: no system message, unless the template then inserts a default one
        # (Qwen's "You are a helpful assistant."), where an empty one is the shorter prompt
        # (and a template with no system role, Gemma 2's, refuses an empty one).
        without = self.apply(None, question, with_image)
        try:
            return min(without, self.apply_template("", question, with_image), key=len)
        except TemplateError:
            return without

    def apply(self, system: str | None, question: str, with_image: bool) -> str:
        try:
            return self.apply_template(system, question, with_image)
        except TemplateError:
            if not system:
                raise
        # A template with no system role (Gemma 2's raises): the system prompt opens the
        # user's turn, as Gemma 3's own template does it.
        return self.apply_template(None, f"{system}\n\n{question}", with_image)

    def apply_template(self, system: str | None, question: str, with_image: bool) -> str:
        multimodal = hasattr(self.processor, "image_processor")
        if multimodal:  # processors' templates take a list of typed parts
            user = [{"type": "image"}] if with_image else []
            user = user + [{"type": "text", "text": question}]
            system = None if system is None else [{"type": "text", "text": system}]
        elif with_image:
            raise UsageError(
                "the model is text-only and the benchmark's items have images; "
                "use a vision-language model, or benchmark=jsonl records without image"
            )
        else:
            user = question
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": user})
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **self.template_kwargs
        )


def text_kwargs(tokenizer, prompt: str) -> dict:
    """Tokenizer arguments for a rendered prompt: a chat template that writes the BOS token
    itself must not get a second one from the tokenizer."""
    bos = tokenizer.bos_token
    return {"add_special_tokens": not (bos and prompt.startswith(bos))}


def question_token_start(tokenizer, prompt: str, question: str) -> int:
    """Index of the first token of the user's `question` in the tokenized `prompt` (a prompt
    without an image): every token before it (BOS, system prompt, role markers) is system.
    Templates insert the question as it is (some strip its ends), and it comes last."""
    start = prompt.rindex(question.strip())
    encoded = tokenizer(prompt, return_offsets_mapping=True, **text_kwargs(tokenizer, prompt))
    return next(i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > start)
