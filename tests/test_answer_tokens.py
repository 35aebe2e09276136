"""The scored yes/no tokens are the first tokens of a reply as it follows the rendered
prompt (issue 18, section 2; shared case 04-yes-token-leading-space), on every family's
tiny tokenizer, a SentencePiece one like LLaVA-1.5's, the dry run's listing, and the
warning when the model's most likely answer token is none of them."""

import logging

import pytest
import torch
from cli import run_main
from hydra import compose, initialize_config_module
from tiny_families import BUILDERS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sysattn_exp.benchmarks import load_benchmark
from sysattn_exp.errors import UsageError
from sysattn_exp.evaluation.scoring import score_items, warn_if_unscored
from sysattn_exp.experiment.job_yes_no import item_prompts, scoring_words
from sysattn_exp.models.loading import first_token_ids, load_model, tokenizer_of
from sysattn_exp.models.prompts import PromptFormat, build_prompt

WORDS = {"yes": ["Yes", "yes"], "no": ["No", "no"]}
# How a reply follows each family's generation prompt, read from its template (the
# assistant turn it renders): after "ASSISTANT:" (LLaVA-1.5's vicuna_v1 joins role and
# message with ": "), "Assistant:" (Idefics3, SmolVLM: "Assistant: Yes") and "[/INST]"
# (LLaVA-NeXT's Mistral template: "[/INST] Yes") a space comes first, so byte-level BPE
# reads "ĠYes"; after a newline (Qwen, Gemma, Llama 3, InternVL, OneVision) none: "Yes".
SPACE_BEFORE_REPLY = {"llava", "idefics3", "smolvlm", "llava_next"}
NEWLINE_BEFORE_REPLY = {
    "gemma2",
    "gemma3",
    "gemma3_text",
    "internvl",
    "llama",
    "llava_onevision",
    "qwen2",
    "qwen2_5_vl",
    "qwen2_vl",
    "qwen3",
}
TEMPLATE_KWARGS = {"qwen3": {"enable_thinking": False}}  # as the qwen3_8b preset sets


def test_every_family_is_in_the_reply_table():
    assert set(BUILDERS) == SPACE_BEFORE_REPLY | NEWLINE_BEFORE_REPLY


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    """(name, processor, rendered prompt with the family's template)."""
    model, processor = BUILDERS[request.param](0)
    vlm = getattr(model.config, "image_token_id", None) is not None
    fmt = PromptFormat(
        processor,
        None,
        vicuna=model.config.model_type == "llava",
        template_kwargs=TEMPLATE_KWARGS.get(request.param, {}),
    )
    return request.param, processor, fmt, fmt.render("Is it red?", vlm), vlm


def rendered_reply(name, processor, fmt, prompt, vlm, word) -> str:
    """The whole exchange with the model's reply `word`, as the family writes it: its chat
    template's assistant turn, or for LLaVA-1.5 vicuna_v1's "ASSISTANT: " + reply."""
    if fmt.vicuna:
        return f"{prompt} {word}"
    multimodal = hasattr(processor, "image_processor")
    if multimodal:
        user = ([{"type": "image"}] if vlm else []) + [{"type": "text", "text": "Is it red?"}]
        reply = [{"type": "text", "text": word}]
    else:
        user, reply = "Is it red?", word
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return processor.apply_chat_template(messages, tokenize=False, **fmt.template_kwargs)


@pytest.mark.parametrize("answer", ["yes", "no"])
def test_the_reply_token_the_template_writes_is_scored(family, answer):
    name, processor, fmt, prompt, vlm = family
    tokenizer = tokenizer_of(processor)
    ids = first_token_ids(tokenizer, WORDS[answer], answer, prompt)
    word = WORDS[answer][0]
    # The template's own rendering of the reply: its first token after the prompt's.
    exchange = rendered_reply(name, processor, fmt, prompt, vlm, word)
    assert exchange.startswith(prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    reply_token = tokenizer(exchange, add_special_tokens=False).input_ids[len(prompt_ids)]
    assert reply_token in ids
    # The same, stated by hand from the table above.
    expected = ("Ġ" if name in SPACE_BEFORE_REPLY else "") + word
    assert tokenizer.convert_ids_to_tokens(reply_token) == expected
    # Both spellings are scored wherever they differ ("Yes" and "ĠYes").
    assert {"Ġ" + word, word} <= set(tokenizer.convert_ids_to_tokens(ids))


def test_case_04_idefics3_scores_the_space_prefixed_tokens():
    """The shared case: after "Assistant:" the tiny Idefics3 tokenizer (byte-level BPE, as
    Llama 3's) starts the reply with ĠYes / ĠNo, which the bare word never gives."""
    tokenizer = next(p for p in BUILDERS["idefics3"](0) if hasattr(p, "tokenizer")).tokenizer
    prompt = "User:Is it red?<end_of_utterance>\nAssistant:"
    bare = tokenizer("Yes", add_special_tokens=False).input_ids[0]
    assert tokenizer.convert_ids_to_tokens(bare) == "Yes"  # what the tool read before
    yes = first_token_ids(tokenizer, ["Yes", "yes"], "scoring.yes_words", prompt)
    no = first_token_ids(tokenizer, ["No", "no"], "scoring.no_words", prompt)
    assert "ĠYes" in tokenizer.convert_ids_to_tokens(yes)
    assert "ĠNo" in tokenizer.convert_ids_to_tokens(no)
    assert not set(yes) & set(no)


def test_without_a_prompt_the_tokenizers_own_template_is_used():
    """The case's check script calls first_token_ids without a prompt: the tokenizer's chat
    template then gives one (Idefics3: "Assistant:"); without a template the words are
    tokenised alone, as before."""
    idefics3 = next(p for p in BUILDERS["idefics3"](0) if hasattr(p, "tokenizer")).tokenizer
    yes = first_token_ids(idefics3, ["Yes", "yes"], "scoring.yes_words")
    assert "ĠYes" in idefics3.convert_ids_to_tokens(yes)
    llava = tokenizer_of(BUILDERS["llava"](0)[1])  # the vicuna format: no chat template
    assert not llava.chat_template
    alone = llava("Yes", add_special_tokens=False).input_ids[0]
    assert first_token_ids(llava, ["Yes"], "scoring.yes_words") == [alone]


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A small tokenizer of Llama's kind (SentencePiece BPE: spaces become "▁", one is
    prepended to the text), as LLaVA-1.5's."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    corpus = ["USER: Is it red? ASSISTANT: Yes", "USER: Is it blue? ASSISTANT: No"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_sentencepiece_reply_after_assistant_colon_is_the_spaced_piece():
    tokenizer = sentencepiece_tokenizer()
    prompt = build_prompt("Is it red? Please answer yes or no.", "")
    yes = first_token_ids(tokenizer, ["Yes"], "scoring.yes_words", prompt)
    no = first_token_ids(tokenizer, ["No"], "scoring.no_words", prompt)
    assert "▁Yes" in tokenizer.convert_ids_to_tokens(yes)
    assert "▁No" in tokenizer.convert_ids_to_tokens(no)
    # "▁Yes" is what "ASSISTANT: Yes" (the vicuna_v1 reply) tokenizes to after the prompt.
    exchange = tokenizer(prompt + " Yes", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(exchange)[-1] == "▁Yes"


def test_a_spelling_that_merges_with_the_prompt_end_is_skipped():
    """After a prompt ending in " Y", "es" would turn the prompt's last token into "ĠYes":
    the model, having read "ĠY", cannot emit that, so only " es" counts; a word with no
    spelling left (the empty word) is refused."""
    tokenizer = tokenizer_of(BUILDERS["qwen2"](0)[1])
    prompt = "Is it red? Y"
    assert tokenizer.convert_ids_to_tokens(tokenizer(prompt + "es").input_ids)[-1] == "ĠYes"
    ids = first_token_ids(tokenizer, ["es"], "scoring.yes_words", prompt)
    spaced = tokenizer(" es", add_special_tokens=False).input_ids[0]
    assert ids == [spaced]
    with pytest.raises(UsageError, match=r"scoring.yes_words=\['Yes', ''\]: '' gives no"):
        first_token_ids(tokenizer, ["Yes", ""], "scoring.yes_words", prompt)


def test_empty_and_non_string_words_are_refused():
    tokenizer = tokenizer_of(BUILDERS["qwen2"](0)[1])
    with pytest.raises(UsageError, match="scoring.no_words is empty"):
        first_token_ids(tokenizer, [], "scoring.no_words", "Q:")
    with pytest.raises(UsageError, match="must be strings"):
        first_token_ids(tokenizer, [True], "scoring.no_words", "Q:")


def test_dry_run_prints_the_scored_ids_and_their_tokens(tmp_path, monkeypatch, capsys):
    status = run_main(tmp_path, monkeypatch, "model=tiny", "benchmark=toy", "runtime.dry_run=true")
    assert status == 0
    out = capsys.readouterr().out
    # builtin:tiny: byte-level BPE after "ASSISTANT:"; its vocabulary has no "yes" token,
    # so "yes" starts with "y" when no space comes first.
    yes = next(line for line in out.splitlines() if line.startswith("scored yes tokens"))
    no = next(line for line in out.splitlines() if line.startswith("scored no tokens"))
    for token in ("'ĠYes'", "'Yes'", "'Ġyes'", "'y'"):
        assert token in yes
    for token in ("'ĠNo'", "'No'", "'Ġno'", "'no'"):
        assert token in no


def test_shared_first_tokens_are_refused_in_the_dry_run(tmp_path, monkeypatch, capsys):
    status = run_main(
        tmp_path,
        monkeypatch,
        "model=tiny",
        "runtime.dry_run=true",
        "scoring.yes_words=[Yes]",
        "scoring.no_words=[' Yes']",
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert "share first tokens" in err[-1] and "'ĠYes'" in err[-1]


def test_warning_names_the_unscored_top_token(caplog):
    tokenizer = tokenizer_of(BUILDERS["qwen2"](0)[1])
    logits = torch.zeros(3, len(tokenizer))
    logits[0, 5] = logits[1, 6] = logits[2, 5] = 1.0
    with caplog.at_level(logging.WARNING, logger="sysattn_exp.evaluation.scoring"):
        assert not warn_if_unscored(tokenizer, logits, [5], [6])
        assert not caplog.records
        logits[1, 7] = 2.0  # row 1's most likely token is now 7, none of the scored ones
        assert warn_if_unscored(tokenizer, logits, [5], [6])
    [record] = caplog.records
    token = tokenizer.convert_ids_to_tokens(7)
    assert "in 1 of 3 rows" in record.getMessage() and f"{token!r} x1" in record.getMessage()


def toy_job(*overrides):
    with initialize_config_module("sysattn_exp.conf", version_base="1.3"):
        cfg = compose("config", overrides=["benchmark=toy", "benchmark.limit=4", *overrides])
    loaded = load_model(cfg.model)
    bench = load_benchmark(cfg.benchmark)
    prompts = item_prompts(bench, loaded.prompt_format(cfg.model))
    return loaded, bench, prompts, scoring_words(loaded, cfg.scoring, prompts[0])


@pytest.mark.parametrize(("model", "warns"), [("toy", False), ("tiny", True)])
def test_scoring_warns_once_when_the_model_answers_other_tokens(caplog, model, warns):
    """The trained toy model answers Yes/No: no warning. The random tiny one's most likely
    tokens are anything: one warning, for the first batch only."""
    torch.set_num_threads(1)
    loaded, bench, prompts, words = toy_job(f"model={model}")
    with caplog.at_level(logging.WARNING, logger="sysattn_exp.evaluation.scoring"):
        score_items(loaded, bench, prompts, None, words, 2, 0, "test")
    warnings = [r for r in caplog.records if "none of the scored" in r.getMessage()]
    assert len(warnings) == (1 if warns else 0)
