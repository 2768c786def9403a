"""Tokenizer against transformers' AutoTokenizer on a byte-level BPE built here from Arabic and
English text, and against sentencepiece on a SentencePiece model trained here."""

import io
import json
import os

import numpy as np
import pytest

from jais2_jax import Tokenizer

CORPUS = [
    "مرحبا بكم في عالم الذكاء الاصطناعي",
    "اللغة العربية جميلة وغنية بالمفردات",
    "الطقس اليوم مشمس ودافئ في أبوظبي",
    "كتب الطالب الدرس في الدفتر الجديد",
    "The quick brown fox jumps over the lazy dog.",
    "Large language models read and write both Arabic and English.",
    "Tokenizers split text into pieces; byte-level BPE never fails.",
    "Numbers like 2026 and 3.14 appear too, with emoji 🙂.",
]
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = [
    "مرحبا بكم في عالم الذكاء",
    "The lazy fox writes Arabic: اللغة العربية",
    "  leading spaces, unseen wörds and 🙂🙂 emoji\n\nnew lines",
    "special tokens inline: <|im_start|>user hi<|im_end|></s>",
    "",
]
CHAT = [{"role": "system", "content": "أنت مساعد مفيد."},
        {"role": "user", "content": "What is the capital of the UAE?  "},
        {"role": "assistant", "content": "أبوظبي"},
        {"role": "user", "content": "شكرا!"}]


def _bpe():
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers import trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


@pytest.fixture(scope="module", params=["handwritten", "save_pretrained"])
def folder(request, tmp_path_factory):
    """Two layouts: a tokenizer_config.json written by hand (inline chat template, add_bos_token)
    and the folder transformers' save_pretrained writes (chat_template.jinja)."""
    path = str(tmp_path_factory.mktemp(request.param))
    tok = _bpe()
    if request.param == "handwritten":
        from tokenizers import processors
        # encode(add_special_tokens=True) prepends <s>; the config's add_bos_token is ignored
        # by transformers when a tokenizer.json exists, so it must not change anything here.
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        tok.save(os.path.join(path, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                  "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True}, "pad_token": "<pad>",
                  "add_bos_token": False, "add_eos_token": True, "chat_template": CHAT_TEMPLATE}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
    else:
        from transformers import PreTrainedTokenizerFast
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>", chat_template=CHAT_TEMPLATE).save_pretrained(path)
        assert os.path.exists(os.path.join(path, "chat_template.jinja"))
    return path


@pytest.fixture(scope="module")
def pair(folder):
    from transformers import AutoTokenizer
    return Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_encode_decode_match_transformers(pair):
    ours, ref = pair
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == \
                    ref.decode(ids, skip_special_tokens=skip)
    arabic = ours.encode(TEXTS[0], add_special_tokens=False)
    assert ours.decode(arabic) == TEXTS[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_encode_pads_like_transformers(pair, side):
    ours, ref = pair
    ids, mask = ours.batch_encode(TEXTS[:4], padding_side=side)
    want = ref(TEXTS[:4], padding=True, padding_side=side, return_tensors="np")
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])


def test_decode_takes_one_sequence(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match=r"one sequence of ids, got shape \(2, 3\)"):
        ours.decode(np.zeros((2, 3), np.int32))  # a batch would have run its rows together


def test_chat_template_matches_transformers(pair):
    ours, ref = pair
    for gen in (True, False):
        text = ours.apply_chat_template(CHAT, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=False)
        ids = ours.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=True)
        assert ids == ref.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=True,
                                              return_dict=False)
    assert ours.encode("<|im_end|>", add_special_tokens=False) == [ours.token_to_id("<|im_end|>")]


def test_chat_template_errors_and_sandbox(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    # A template reaching for Python internals is stopped by the sandbox.
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception, match="unsafe|not safely|access to attribute"):
        ours.apply_chat_template(CHAT, chat_template=evil)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no tokenizer"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_pretrained(tmp_path / "absent")


def test_sentencepiece_model_matches_sentencepiece(tmp_path):
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=model,
                                   vocab_size=400, character_coverage=1.0, byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    ref = spm.SentencePieceProcessor(model_proto=model.getvalue())
    ours = Tokenizer.from_pretrained(tmp_path)
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_id(), ref.eos_id())
    for text in TEXTS[:3]:
        ids = ours.encode(text)
        assert ids == [ref.bos_id()] + ref.encode(text)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids)
        assert ours.decode(ids) == "<s>" + ref.decode(ids)
    assert ours.encode("a</s>b", add_special_tokens=False) == \
        ref.encode("a") + [ref.eos_id()] + ref.encode("b")
    # a special token mid-text: the words after it keep their space
    ids = ours.encode("The lazy fox</s> writes Arabic")
    assert ref.eos_id() in ids[1:-1]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids) == \
        "The lazy fox writes Arabic"
    assert ours.decode(ids) == "<s>The lazy fox</s> writes Arabic"


def test_special_tokens_in_the_vocabulary_are_special(tmp_path):
    """eos / pad named in tokenizer_config.json that are ordinary entries of tokenizer.json's
    vocabulary (not added tokens): transformers makes them special, so encode keeps them whole and
    decode(skip_special_tokens=True) drops them; ids unchanged."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer
    vocab = {c: i for i, c in enumerate(["a", "b", "c", "<", ">", "/", "s", "</s>", "<pad>"])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>"}))
    ours, ref = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.vocab_size == len(ref) == len(vocab)
    assert (ours.eos_token_id, ours.pad_token_id) == (ref.eos_token_id, ref.pad_token_id) == (7, 8)
    for text in ("ab</s>c", "<pad>a</s>"):
        ids = ours.encode(text)
        assert ids == ref.encode(text) and 7 in ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                ref.decode(ids, skip_special_tokens=skip)
