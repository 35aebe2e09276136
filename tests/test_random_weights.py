"""model.weights=random: every preset's shipped architecture has its checkpoint's published
size; the model built on meta and materialised equals a normally constructed one in every
buffer (rotary frequencies recomputed, float32 kept under bfloat16); processors expand
images to the real checkpoints' lengths; a reduced model runs the real command line."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli import read_metrics, run_cli, run_main
from PIL import Image

from sysattn_exp.errors import UsageError
from sysattn_exp.models.random_weights import (
    CONFIG_DIR,
    PRESETS,
    build_config,
    build_model,
    build_on_meta,
    model_class,
)

CONF_MODEL = Path(__file__).parents[1] / "sysattn_exp" / "conf" / "model"

# Reduced widths and depths (the rest, vocabulary and image resolution included, as shipped).
TEXT = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
VISION = {
    "num_hidden_layers": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
}
SMALL_LLAVA = {"text_config": TEXT, "vision_config": VISION}
MROPE = {"type": "mrope", "mrope_section": [2, 3, 3]}  # head dim 16: 8 frequency pairs
SMALL_QWEN2_VL = {  # the published config is flat: text keys at the top
    **TEXT,
    "rope_scaling": MROPE,
    "vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2},
}
# One preset of every family (model_type), text-only ones included.
SMALL = {
    "llava15_7b": SMALL_LLAVA,
    "llava_next_7b": SMALL_LLAVA,
    "llava_onevision_7b": SMALL_LLAVA,
    "qwen2_vl_7b": SMALL_QWEN2_VL,
    "qwen25_vl_7b": {
        **TEXT,
        "rope_scaling": MROPE,
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
    },
    "gemma3_4b": {"text_config": TEXT | {"head_dim": 16}, "vision_config": VISION},
    "gemma3_1b": TEXT | {"head_dim": 16},
    "internvl3_8b": SMALL_LLAVA,
    "idefics3_8b": SMALL_LLAVA,
    "smolvlm2_2b": SMALL_LLAVA,
    "llama31_8b": TEXT,
    "qwen25_7b": TEXT,
    "qwen3_8b": TEXT | {"head_dim": 16},
    "gemma2_2b": TEXT | {"head_dim": 16},
}


def hydra_dict(value) -> str:
    """A dict as a Hydra override value: {a:{b:1}}."""
    return json.dumps(value).replace('"', "").replace(" ", "")


def test_every_hub_preset_ships_the_config_of_its_checkpoint():
    hub_presets = {}
    for path in sorted(CONF_MODEL.glob("*.yaml")):
        name_or_path = yaml.safe_load(path.read_text()).get("name_or_path")
        if not name_or_path.startswith("builtin:"):
            hub_presets[path.stem] = name_or_path
    assert hub_presets == {name: preset.repo for name, preset in PRESETS.items()}
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.json")) == sorted(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shipped_architecture_has_the_published_parameter_count(preset):
    model = build_on_meta(build_config(preset), torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())  # tied weights once
    published = PRESETS[preset].params * 1e9
    assert abs(count - published) <= 0.01 * published, (preset, count / 1e9)


@pytest.mark.parametrize("preset", sorted(SMALL))
def test_materialised_model_equals_a_normally_constructed_one(preset):
    """Buffers (rotary inv_freq, position ids) equal the values and dtypes of a model built
    normally under the same dtype (as from_pretrained constructs it); inv_freq is float32
    in a bfloat16 model; every parameter is finite and bfloat16."""
    config = build_config(preset, SMALL[preset])
    model = build_model(config, torch.bfloat16, torch.device("cpu"), seed=0)
    reference = model_class(config).from_config(config, dtype=torch.bfloat16)
    want = dict(reference.named_buffers())
    got = dict(model.named_buffers())
    assert got.keys() == want.keys()
    for name, buffer in got.items():
        assert buffer.dtype == want[name].dtype, name
        assert torch.equal(buffer, want[name]), name
    inv_freqs = [b for n, b in got.items() if n.endswith("inv_freq")]
    assert inv_freqs and all(b.dtype == torch.float32 for b in inv_freqs)
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.isfinite(param).all(), name
        assert param.device.type == "cpu"


def test_weights_are_seeded():
    config = build_config("llava15_7b", SMALL_LLAVA)
    cpu = torch.device("cpu")
    first, again, other = (build_model(config, torch.float32, cpu, s) for s in (0, 0, 1))
    weights = [dict(m.named_parameters()) for m in (first, again, other)]
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(weights[0][name], weights[1][name])
    assert not torch.equal(weights[0][name], weights[2][name])
    # normal(0, initializer_range 0.02), not left uninitialised
    assert abs(weights[0][name].std().item() - 0.02) < 0.002


def test_an_override_that_is_not_a_config_key_is_refused():
    with pytest.raises(UsageError, match=r"model.config_overrides.text_config.num_layerz is not"):
        build_config("llava15_7b", {"text_config": {"num_layerz": 2}})


@pytest.fixture(scope="module")
def photo_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("photo")
    Image.new("RGB", (640, 480), "red").save(root / "photo.png")
    records = [
        {"id": "1", "group": "g", "image": "photo.png", "question": "Red?", "answer": "yes"},
        {"id": "2", "group": "g", "image": "photo.png", "question": "Blue?", "answer": "no"},
    ]
    (root / "photo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "photo.jsonl"


# Image tokens of a 640x480 image, worked out from the published preprocessing:
# LLaVA-1.5: (336 / 14)^2 = 576. LLaVA-NeXT: the 672x672 pinpoint (2x2 crops) is chosen;
# base view 576 + the crops' 48x48 features unpadded to 36 rows (480/640 * 48) of 48, plus a
# newline per row: 36 * 49 = 1,764; 2,340 in all. Qwen2-VL: resized to 644x476 (multiples
# of 28), one token per 28x28 pixels: 23 * 17 = 391. Gemma 3: 256 soft tokens per image.
IMAGE_TOKENS = {"llava15_7b": 576, "llava_next_7b": 2340, "qwen2_vl_7b": 391, "gemma3_4b": 256}


@pytest.mark.parametrize("preset", sorted(IMAGE_TOKENS))
def test_prompts_have_the_real_image_spans(preset, photo_records, tmp_path, monkeypatch, capsys):
    status = run_main(
        tmp_path,
        monkeypatch,
        f"model={preset}",
        "model.weights=random",
        "benchmark=jsonl",
        f"benchmark.path={photo_records}",
        "runtime.dry_run=true",
    )
    assert status == 0
    out = capsys.readouterr().out
    assert f"image={IMAGE_TOKENS[preset]}," in out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_processor_ids_are_the_shipped_configs(preset):
    """The tokenizer has the config's vocabulary size and pad id; a VLM's processor expands
    an image into the token the config calls the image token."""
    from sysattn_exp.models.loading import prompt_format
    from sysattn_exp.models.offline_processors import build_processor

    config = build_config(preset)
    processor = build_processor(preset, config)
    tokenizer = getattr(processor, "tokenizer", processor)
    text = config.get_text_config()
    assert len(tokenizer) == text.vocab_size
    if getattr(text, "pad_token_id", None) is not None:
        assert tokenizer.pad_token_id == text.pad_token_id
    if hasattr(config, "vision_config"):
        cfg = {"name_or_path": preset, "system_prompt": None}
        prompt = prompt_format(cfg, processor, config.model_type).render("Red?")
        image = Image.new("RGB", (64, 48), "red")
        ids = processor(images=[[image]], text=[prompt], return_tensors="pt")["input_ids"]
        assert (ids == config.image_token_id).sum() > 0


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("llava15_7b", ["intervention=redistribute", "layers=q4", "+task=profile"]),
        ("qwen2_vl_7b", ["intervention=redistribute", "layers=q4", "scoring.mode=generate"]),
    ],
)
def test_reduced_random_model_through_the_cli(preset, extra, photo_records, tmp_path):
    result = run_cli(
        f"model={preset}",
        "model.weights=random",
        f"model.config_overrides={hydra_dict(SMALL[preset])}",
        "benchmark=jsonl",
        f"benchmark.path={photo_records}",
        "runtime.num_workers=0",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        *extra,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (job,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = read_metrics(job)
    assert metrics["n_items"] == 2 and "baseline_yes_rate" in metrics
    config = yaml.safe_load((job / "config.yaml").read_text())
    assert config["model"]["weights"] == "random"
    assert config["layers"]["resolved"] == [1]  # q4 of the reduced model's 2 layers


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.weights=trained"], "model.weights='trained' is not allowed; allowed: pretrained"),
        (
            ["model.weights=random", "model.name_or_path=someone/other-model"],
            "model.weights=random needs a shipped config",
        ),
        (
            ["model.weights=random", "model.config_overrides={vision_config:{depthh:1}}"],
            "model.config_overrides.vision_config.depthh is not a key",
        ),
    ],
)
def test_bad_random_weight_settings_are_one_line(
    overrides, expected, tmp_path, monkeypatch, capsys
):
    status = run_main(tmp_path, monkeypatch, "model=llava15_7b", *overrides, "runtime.dry_run=true")
    assert status == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("device_map", ["auto", "split"])
def test_device_map_materialises_each_module_where_the_map_says(device_map):
    """With a device_map (auto, or a dict naming modules, as from_pretrained takes) every
    tensor is allocated where its module is mapped, with the same seeded weights as
    without one (here every device is the CPU: the placement code path, not the devices)."""
    config = build_config("llava15_7b", SMALL_LLAVA)
    lm = "model.language_model"
    if device_map == "split":
        device_map = {
            "model.vision_tower": "cpu",
            "model.multi_modal_projector": "cpu",
            f"{lm}.embed_tokens": "cpu",
            f"{lm}.rotary_emb": "cpu",
            f"{lm}.layers.0": "cpu",
            f"{lm}.layers.1": "cpu",
            f"{lm}.norm": "cpu",
            "lm_head": "cpu",
        }
    cpu = torch.device("cpu")
    mapped = build_model(config, torch.float32, cpu, seed=3, device_map=device_map)
    plain = build_model(config, torch.float32, cpu, seed=3)
    want = dict(plain.named_parameters())
    for name, param in mapped.named_parameters():
        assert param.device == cpu and torch.equal(param, want[name]), name
    for name, buffer in mapped.named_buffers():
        assert torch.equal(buffer, dict(plain.named_buffers())[name]), name


def test_a_map_to_disk_is_refused():
    config = build_config("llava15_7b", SMALL_LLAVA)
    with pytest.raises(UsageError, match="disk offload is not supported"):
        build_model(config, torch.float32, torch.device("cpu"), 0, device_map={"": "disk"})


def test_job_key_of_pretrained_weights_is_what_it_was_before_the_weights_key():
    from sysattn_exp.experiment.identity import job_key

    before = {"model": {"name_or_path": "llava-hf/llava-1.5-7b-hf", "seed": 0}}
    pretrained = {"model": before["model"] | {"weights": "pretrained", "config_overrides": None}}
    random = {"model": before["model"] | {"weights": "random", "config_overrides": None}}
    assert job_key(pretrained, {}) == job_key(before, {})
    assert job_key(random, {}) != job_key(pretrained, {})
