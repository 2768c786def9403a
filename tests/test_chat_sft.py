"""Chat SFT data: `{"messages": [...]}` jsonl rendered with the chat template, trained only on the
assistant turns; the mask is transformers' `return_assistant_tokens_mask` where the template has
`{% generation %}` blocks, and the assistant contents (with the end-of-turn token) where not."""

import json

import numpy as np
import pytest

from jais2_jax.inference.tokenizer import Tokenizer
from jais2_jax.training import data

GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}")
# The same text without the blocks: the assistant contents are found in the rendered text.
PLAIN_TEMPLATE = GENERATION_TEMPLATE.replace("{% generation %}", "").replace(
    "{% endgeneration %}", "")

CHATS = [
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "What is the desert like at dawn?"},
     {"role": "assistant", "content": "Quiet and cold."},
     {"role": "user", "content": "And at noon?"},
     {"role": "assistant", "content": "Hot: اللغة العربية جميلة"}],
    [{"role": "user", "content": "Say hello"},
     {"role": "assistant", "content": "hello"}],
    # The assistant's answer repeats the user's words: it must be found after them.
    [{"role": "user", "content": "hello"},
     {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "thanks"}],
]


def _hf_tokenizer(template):
    from test_tokenizer import _bpe
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(), bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=template)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    for name, template in (("generation", GENERATION_TEMPLATE), ("plain", PLAIN_TEMPLATE)):
        _hf_tokenizer(template).save_pretrained(root / name)
    return root


def _reference(messages):
    """transformers' ids and assistant mask with the {% generation %} template."""
    out = _hf_tokenizer(GENERATION_TEMPLATE).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def test_tokenizer_assistant_mask_equals_transformers(folders):
    tok = Tokenizer.from_pretrained(folders / "generation")
    for messages in CHATS:
        ids, mask = _reference(messages)
        assert sum(mask) > 0 and 0 in mask
        out = tok.apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True)
        assert out == {"input_ids": ids, "assistant_masks": mask}
    plain = Tokenizer.from_pretrained(folders / "plain")
    with pytest.raises(ValueError, match="no \\{% generation %\\} blocks"):
        plain.apply_chat_template(CHATS[0], tokenize=True, return_assistant_tokens_mask=True)


@pytest.mark.parametrize("template", ["generation", "plain"])
def test_prepare_data_masks_the_assistant_tokens(folders, tmp_path, template):
    src = tmp_path / "chat.jsonl"
    records = [{"messages": m} for m in CHATS] + [{"text": "The sea has always been a road."}]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                   encoding="utf-8")
    data.prepare_data([str(src)], str(folders / template), str(tmp_path / "store"),
                      show_progress=False)
    store = data.TokenStore(str(tmp_path / "store"))
    docs = store.documents("train")
    assert len(docs) == len(records)
    for (shard, offset, length), messages in zip(docs, CHATS):
        ids, mask = _reference(messages)
        # No bos/eos added around a chat: the template writes its own.
        assert store.tokens[shard][offset:offset + length].tolist() == ids
        assert store.masks[shard][offset:offset + length].tolist() == mask
    shard, offset, length = docs[-1]
    assert store.masks[shard][offset:offset + length].all()  # plain text: every token trains
    # A row of the loader holding one whole chat: its loss counts exactly the assistant tokens.
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"messages": CHATS[0]}) + "\n", encoding="utf-8")
    data.prepare_data([str(one)], str(folders / template), str(tmp_path / "one"),
                      show_progress=False)
    ids, mask = _reference(CHATS[0])
    row = data.PackedRows(data.TokenStore(str(tmp_path / "one")), "train",
                          seq_len=len(ids) - 1, seed=0)[0]
    assert row["targets"].tolist() == ids[1:]
    assert row["loss_mask"].tolist() == mask[1:]


def _write(tmp_path, lines):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(src)


GOOD = json.dumps({"messages": CHATS[1]})


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"},
                   {"role": "assistant", "content": "x"}]}, "message 1 has the unknown role 'robot'"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [["user", "hi"]]}, "message 0 is list"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
     "message 0 has no 'content'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "message 0: 'content' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "\ud800"}]}, "lone surrogate"),
])
def test_bad_chat_records_refused_with_the_line(folders, tmp_path, record, message):
    src = _write(tmp_path, [GOOD, json.dumps(record)])
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        data.prepare_data([src], str(folders / "generation"), str(tmp_path / "out"),
                          show_progress=False)
    assert not (tmp_path / "out").exists()


def test_chat_needs_a_template_that_keeps_the_content(folders, tmp_path):
    upper = _hf_tokenizer(PLAIN_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | upper }}"))
    upper.save_pretrained(tmp_path / "upper")
    with pytest.raises(ValueError, match="bad.jsonl:1: message 1 .assistant.: its content is not "
                                         "in the text"):
        data.prepare_data([_write(tmp_path, [GOOD])], str(tmp_path / "upper"),
                          str(tmp_path / "out"), show_progress=False)
    none = _hf_tokenizer(None)
    none.save_pretrained(tmp_path / "none")
    with pytest.raises(ValueError, match="bad.jsonl:1: a chat record, but the tokenizer has no "
                                         "chat template"):
        data.prepare_data([_write(tmp_path, [GOOD])], str(tmp_path / "none"),
                          str(tmp_path / "out"), show_progress=False)
    np.testing.assert_equal((tmp_path / "out").exists(), False)
