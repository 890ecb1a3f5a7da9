"""vision.py and the image layouts of formats.py: rows with images as LLaVA, LLaMA-Factory and OpenAI write them,
bad images as counted bad rows naming file:line and the image, and the builtin vision-language models."""

import base64
import json
import shutil

import pytest

from conftest import REPO
from snaketune.errors import UserError
from snaketune.formats import ReadSettings, read_records
from snaketune.vision import FAMILIES, expand_image_tokens, family_of, image_token_counts, load_image_processor

SQUARE = REPO / "data" / "shapes" / "images" / "square-000.png"


def write_rows(folder, name, rows):
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    shutil.copy(SQUARE, folder / "a.png")
    (folder / "broken.png").write_bytes(SQUARE.read_bytes()[:60])  # a truncated PNG
    return folder


def test_the_three_image_layouts_read_to_the_same_record(tmp_path, images):
    data_url = "data:image/png;base64," + base64.b64encode(SQUARE.read_bytes()).decode()
    llava = write_rows(tmp_path, "llava.json", [{"id": "x", "image": "pics/a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}])
    factory = write_rows(tmp_path, "factory.jsonl", [{"images": ["pics/a.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}])
    openai = write_rows(tmp_path, "openai.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "pics/a.png"}},
                                     {"type": "text", "text": "\nWhat colour?"}]},
        {"role": "assistant", "content": "red"}]}, {"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": "\nWhat colour?"}]},
            {"role": "assistant", "content": "red"}]}])
    records = [read_records(ReadSettings(path=str(path), format=layout)).records
               for path, layout in ((llava, "sharegpt"), (factory, "sharegpt"), (openai, "messages"))]
    first = records[0][0]
    assert first.messages == [{"role": "user", "content": "<image>\nWhat colour?"},
                              {"role": "assistant", "content": "red"}]
    assert first.images == [str(images / "a.png")] and first.image_sizes == [(56, 56)]  # beside the data file
    for record in (records[1][0], records[2][0]):
        assert (record.messages, record.images) == (first.messages, first.images)
    assert records[2][1].images == [data_url] and records[2][1].image_sizes == [(56, 56)]


def test_images_without_placeholders_lead_the_first_user_turn(tmp_path, images):
    path = write_rows(tmp_path, "rows.jsonl", [{"images": ["pics/a.png", "pics/a.png"], "conversations": [
        {"from": "human", "value": "Same colour?"}, {"from": "gpt", "value": "yes"}]}])
    record = read_records(ReadSettings(path=str(path), format="sharegpt")).records[0]
    assert record.messages[0]["content"] == "<image><image>\nSame colour?" and len(record.images) == 2


@pytest.mark.parametrize("row, message", [
    ({"images": ["pics/none.png"]}, "image `{folder}/none.png` not found"),
    ({"images": ["pics/broken.png"]}, "image `{folder}/broken.png` does not decode"),
    ({"images": ["pics"]}, "image `{folder}` cannot be read"),
    ({"images": ["data:image/png;base64,!!!"]}, "its base64 does not decode"),
    ({"images": ["https://example.com/a.png"]}, "URLs are not fetched; download the image and give its path"),
    ({"images": ["pics/a.png", "pics/a.png"], "first": "<image> one"}, "1 <image> placeholder for 2 images"),
    ({"images": [3]}, 'field "images" must be an image path or a list of them'),
])
def test_a_bad_image_is_a_bad_row_naming_file_line_and_the_image(tmp_path, images, row, message):
    good = {"images": ["pics/a.png"], "conversations": [{"from": "human", "value": "<image>Colour?"},
                                                        {"from": "gpt", "value": "red"}]}
    bad_row = {"images": row["images"], "conversations": [
        {"from": "human", "value": row.get("first", "Colour?")}, {"from": "gpt", "value": "red"}]}
    path = write_rows(tmp_path, "rows.jsonl", [good, bad_row, good | {"id": "again"}])
    result = read_records(ReadSettings(path=str(path), format="sharegpt", max_bad_rows=1, deduplicate=False))
    assert len(result.records) == 2
    assert len(result.bad_rows) == 1 and result.bad_rows[0].startswith(f"{path}:2: ")
    assert message.format(folder=images) in result.bad_rows[0]
    with pytest.raises(UserError, match=f"{path}:2: "):
        read_records(ReadSettings(path=str(path), format="sharegpt"))


def test_image_tokens_are_expanded_per_image_and_never_labelled():
    ids, labels = [5, 9, 6, 9, 7], [-100, -100, -100, -100, 7]
    assert expand_image_tokens(ids, labels, 9, [2, 3]) == ([5, 9, 9, 6, 9, 9, 9, 7],
                                                           [-100, -100, -100, -100, -100, -100, -100, 7])
    with pytest.raises(ValueError, match="2 image tokens in the rendered text for 1 images"):
        expand_image_tokens(ids, labels, 9, [2])


@pytest.mark.parametrize("architecture, model_type, tokens", [("qwen2_vl", "qwen2_vl", 4), ("llava", "llava", 16)])
def test_the_builtin_vision_language_models_load_with_their_image_processor(tmp_path, architecture, model_type,
                                                                            tokens):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from snaketune.download import build_builtin

    build_builtin({"architecture": architecture, "seed": 0, "vocab_size": 400, "hidden_size": 32,
                   "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "max_position_embeddings": 256, "initializer_range": 0.2,
                   "tie_word_embeddings": False, "tokenizer_corpus": [str(REPO / "data" / "shapes" / "colours.jsonl")]},
                  tmp_path)
    family = family_of(tmp_path)
    assert family is FAMILIES[model_type]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.convert_tokens_to_ids(family.image_token) != tokenizer.unk_token_id
    config = json.loads((tmp_path / "config.json").read_text())
    assert image_token_counts(family, config, load_image_processor(tmp_path), [(56, 56)]) == [tokens]
    names = [name for name, _ in model.named_parameters()]
    assert any(name.startswith(family.tower) for name in names)
    assert any(name.startswith(family.projector) for name in names)


@pytest.mark.parametrize("tower, projector, language", [(False, True, True), (False, True, False),
                                                        (True, False, True)])
def test_the_parts_that_train_are_the_ones_asked_for(tmp_path, tower, projector, language):
    from transformers import AutoModelForImageTextToText

    from snaketune.download import build_builtin
    from snaketune.vision import trainable_parts

    build_builtin({"architecture": "llava", "seed": 0, "vocab_size": 400, "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "max_position_embeddings": 256, "initializer_range": 0.2, "tie_word_embeddings": False,
                   "tokenizer_corpus": [str(REPO / "data" / "shapes" / "colours.jsonl")]}, tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    family = family_of(tmp_path)
    parts = trainable_parts(model, family, tower, projector, language)
    for name, parameter in model.named_parameters():
        wanted = tower if name.startswith(family.tower) else projector if name.startswith(family.projector) \
            else language
        assert parameter.requires_grad == wanted, name
    assert all(not name.startswith(family.projector) and "lm_head" not in name for name in parts["lora"])
    assert any(name.startswith(family.tower) for name in parts["lora"]) == tower
    assert any(".language_model." in name for name in parts["lora"]) == language
    assert parts["whole"] == (["model.multi_modal_projector"] if projector else [])


def test_the_bundled_shapes_are_what_their_script_makes(tmp_path):
    import importlib.util

    import numpy as np
    from PIL import Image

    spec = importlib.util.spec_from_file_location("make_shapes", REPO / "data" / "make_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    bundled = REPO / "data" / "shapes"
    for name in ("colours.jsonl", "captions.json"):
        assert (tmp_path / name).read_text() == (bundled / name).read_text()
    made = sorted(path.name for path in (tmp_path / "images").iterdir())
    assert made == sorted(path.name for path in (bundled / "images").iterdir()) and len(made) == 360
    for name in made[::37]:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / name)),
                              np.asarray(Image.open(bundled / "images" / name)))


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json"])  # read by the workers, and read here
def test_rows_with_images_for_a_text_only_model_are_an_error_naming_the_row(tmp_path, images, tiny_tokenizer, name):
    from snaketune.dataset import build
    from snaketune.layout import dataset_outputs
    from snaketune.settings import DatasetSettings

    row = {"images": ["pics/a.png"], "conversations": [{"from": "human", "value": "<image>Colour?"},
                                                      {"from": "gpt", "value": "red"}]}
    path = write_rows(tmp_path, name, [row, {**row, "id": "second"}])
    with pytest.raises(UserError, match="rows.jsonl:1: this row has images and the model is text-only"
                       if name.endswith("l") else "rows.json:1: this row has images and the model is text-only"):
        build(DatasetSettings(path=str(path), format="sharegpt", max_seq_length=64, eval_size=0, test_size=0),
              tiny_tokenizer, dataset_outputs(tmp_path / "built"))
    assert not (tmp_path / "built" / "train.parquet").exists()


def test_a_qwen2_5_vl_model_has_the_parts_its_family_names(tmp_path):
    """Qwen2.5-VL (model_type qwen2_5_vl) as transformers lays it out: its tower and projector are where
    FAMILIES says, so freezing and LoRA's targets work as for Qwen2-VL."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path)
    family = family_of(tmp_path)
    assert family is FAMILIES["qwen2_5_vl"]
    from snaketune.vision import trainable_parts

    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    parts = trainable_parts(model, family, tower=False, projector=True, language=True)
    names = [name for name, _ in model.named_parameters()]
    assert any(name.startswith(family.tower) for name in names) and parts["whole"] == ["model.visual.merger"]
    assert not any(name.startswith(family.tower) for name in parts["lora"]) and parts["lora"]
