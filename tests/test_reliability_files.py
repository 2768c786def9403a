"""Reliability of what is read from files and folders: chat templates that never end or fill memory,
odd tokenizer_config.json values, text that is not Unicode, malformed safetensors headers, named
pipes where files should be, links out of a checkpoint folder, damaged Orbax data, and a full disk
during `jais2 convert`. Each is a clear one-line error naming the file (or works, as transformers
does), never a traceback, a hang or memory exhaustion."""

import errno
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import hf_model
from safetensors.numpy import save_file

from jais2_jax import Tokenizer
from jais2_jax.checkpoint import load_checkpoint
from jais2_jax.checkpoint.common import copy_tokenizer_files
from jais2_jax.checkpoint.safetensors_io import read_header
from jais2_jax.cli import main
from jais2_jax.inference import tokenizer as tokenizer_module

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "hello", "world", "user", "assistant", ":", "x", "<x>"]
CHAT = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "x"}]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _tokenizer_folder(folder, **config):
    """A word-level tokenizer.json and a tokenizer_config.json holding `config`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    folder.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", **config}))
    return folder


def _err_lines(capfd):
    return [line for line in capfd.readouterr().err.splitlines() if line.strip()]


# ------------------------------------------------------------------ 1. bounded chat templates
@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return _tokenizer_folder(tmp_path_factory.mktemp("chat") / "tok", chat_template=TEMPLATE)


def _fails_fast(tok, template, pattern, seconds=60):
    start = time.monotonic()
    with pytest.raises(ValueError, match=pattern) as info:
        tok.apply_chat_template(CHAT, chat_template=template)
    assert time.monotonic() - start < seconds, template
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_template_dividing_by_zero_is_a_value_error_naming_it(chat_dir, tmp_path):
    zero = _tokenizer_folder(tmp_path / "zero",
                             chat_template="{% for m in messages %}\n{{ 1 / 0 }}{% endfor %}")
    tok = Tokenizer.from_pretrained(zero)
    with pytest.raises(ValueError, match=re.escape(f"chat template of {zero} failed (line 2): "
                                                   "ZeroDivisionError: division by zero")):
        tok.apply_chat_template(CHAT)
    # Ordinary templates are unchanged.
    assert Tokenizer.from_pretrained(chat_dir).apply_chat_template(CHAT) == \
        "<user>hello world<assistant>x"


def test_endless_recursion_is_stopped(chat_dir, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "CHAT_TEMPLATE_SECONDS", 1.0, raising=False)
    tok = Tokenizer.from_pretrained(chat_dir)
    message = _fails_fast(tok, "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
                          "nests calls more than 50 deep")
    assert message.startswith("chat template of the chat_template argument failed (line 1)")
    _fails_fast(tok, "{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}", "nests calls")
    # Deep enough to be allowed, but 2**40 calls: the deadline stops it.
    _fails_fast(tok, "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}"
                     "{% endmacro %}{{ f(0) }}", r"took longer than 1 s", seconds=30)


def test_huge_ranges_and_endless_loops_are_stopped(chat_dir, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "CHAT_TEMPLATE_SECONDS", 1.0, raising=False)
    tok = Tokenizer.from_pretrained(chat_dir)
    _fails_fast(tok, "{{ range(10**8) | list }}", "OverflowError: Range too big")
    for loops in ["{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                  # no call at all inside: only the loop steps themselves are counted
                  ("{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% for c in r %}"
                   "{% endfor %}{% endfor %}{% endfor %}"),
                  ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}"
                   "{% endfor %}")]:
        _fails_fast(tok, loops, r"took longer than 1 s to render", seconds=30)


@pytest.mark.parametrize("template", [
    "{{ 'x' * 10**10 }}",
    "{{ [1] * 10**10 }}",
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s | length }}"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}"),
    # a list of itself, twice, 60 times: tiny in memory, 2**60 items printed
    ("{% set ns = namespace(x=[1]) %}{% for i in range(60) %}{% set ns.x = [ns.x, ns.x] %}"
     "{% endfor %}{{ ns.x }}"),
    ("{% set ns = namespace(x=[1]) %}{% for i in range(60) %}{% set ns.x = [ns.x, ns.x] %}"
     "{% endfor %}{{ ns.x | tojson }}"),
    "{{ 'x'.center(10**10) }}",
    "{{ 'x' | center(10000000000) }}",
    "{{ 'x' | indent(10**10) }}",
    "{{ ('x' * 1000) | replace('', 'y' * 100000) }}",
    "{{ '%10000000000s' % 'x' }}",
    "{{ '%*s' % (10**10, 'x') }}",
    "{{ '{:10000000000}'.format('x') }}",
    "{{ range(100000) | map('string') | join('y' * 100000) }}",
    "{{ lipsum(10**8) }}",
    "{{ (7 ** 100000) ** 100000 }}",
    "{% for a in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",  # the rendered text
    ("{% set x %}{% for a in range(100000) %}{% for b in range(100000) %}{{ 'y' * 10000 }}"
     "{% endfor %}{% endfor %}{% endset %}"),  # built, never printed: the budget of all work
])
def test_huge_strings_are_refused_before_they_are_built(chat_dir, template):
    """Each of these built (or tried to build) gigabytes to exabytes; now refused within seconds."""
    tok = Tokenizer.from_pretrained(chat_dir)
    _fails_fast(tok, template, r"more than the \d+ allowed|more than \d+ (bits|characters or "
                               r"items in all)", seconds=20)


RICH_TEMPLATE = """
{%- macro render(m) -%}
  {%- if m.content is string -%}{{ m.content | trim }}{%- else -%}{{ m.content | tojson }}{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user=-1, seen=[]) -%}
{%- for m in messages if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endfor -%}
{%- if tools %}<tools>{% for t in tools %}{{ t | tojson(indent=2) }}{% if not loop.last %},{% endif %}
{% endfor %}</tools>{% endif -%}
{%- for m in messages -%}
  {%- if loop.first and m.role != 'system' %}[default system]{% endif -%}
  {%- if m.role not in ['system', 'user', 'assistant'] -%}
    {{- raise_exception('bad role ' ~ m.role) -}}
  {%- endif -%}
  {{- '<|' ~ m.role ~ '|>' ~ render(m) ~ ('' if loop.last else '\n') -}}
  {%- for w in (m.content | string).split()[:3] -%}{%- if w == 'stop' -%}{% break %}{%- endif -%}
    {{- '' if loop.index0 else ' #' }}{{ loop.length }}{{ w[:2] | upper }}
  {%- endfor -%}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '%s%d' % ('<|assistant|>', messages | length) }}{% endif -%}
{{- ' ' ~ ('%-4s|' | format('ab')) ~ '{:>3}'.format(7) ~ (range(3) | join(',')) -}}
"""


def test_bounds_change_nothing_in_a_rich_template(tmp_path):
    """Loops with filters, loop.length / loop.last, break, macros, namespace, ~, %, format,
    tojson with indent, raise_exception: rendered exactly as transformers renders them."""
    from transformers import AutoTokenizer
    folder = _tokenizer_folder(tmp_path / "tok", chat_template=RICH_TEMPLATE)
    ours, ref = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"a": [1, {"b": 2}]}}}]
    chats = [CHAT, [{"role": "system", "content": "be brief stop now"}] + CHAT,
             [{"role": "user", "content": ["part", {"k": 1}]}]]
    for chat in chats:
        for gen in (True, False):
            for kw in ({}, {"tools": tools}):
                assert ours.apply_chat_template(chat, add_generation_prompt=gen, **kw) == \
                    ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False,
                                            **kw), (chat, gen, kw)
    with pytest.raises(ValueError, match=r"chat template of .*tok failed \(line 1[0-9]\): bad role "
                                         r"tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_bounds_leave_long_conversations_alone(chat_dir):
    from transformers import AutoTokenizer
    long = [{"role": "user", "content": "hello " * 500_000}] + CHAT
    ours = Tokenizer.from_pretrained(chat_dir).apply_chat_template(long)
    assert ours == AutoTokenizer.from_pretrained(chat_dir).apply_chat_template(long, tokenize=False)
    assert len(ours) > 3_000_000


# ---------------------------------------------------------- 2. tokenizer_config.json values
def test_config_values_transformers_reads_are_read_alike(tmp_path):
    """A chat_template object of named templates or list of {"name", "template"}, AddedToken
    objects with "__type" or unknown keys, eos_token as an AddedToken object: as transformers."""
    from transformers import AutoTokenizer
    tool = "{{ 'tools:' ~ tools | length }}" + TEMPLATE
    cases = {
        "object": {"chat_template": {"default": TEMPLATE, "tool_use": tool, "other": "o"}},
        "list": {"chat_template": [{"name": "default", "template": TEMPLATE},
                                   {"name": "tool_use", "template": tool}]},
        "added": {"added_tokens_decoder": {"11": {"__type": "AddedToken", "content": "<y>",
                                                  "special": True, "bogus": 1}},
                  "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
                  "chat_template": TEMPLATE},
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for name, config in cases.items():
        folder = _tokenizer_folder(tmp_path / name, **config)
        ours, ref = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        assert ours.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT, tokenize=False)
        assert ours.apply_chat_template(CHAT, tools=tools) == \
            ref.apply_chat_template(CHAT, tools=tools, tokenize=False)
        assert (ours.vocab_size, ours.eos_token_id) == (len(ref), ref.eos_token_id)
        for text in ("hello <y> world </s>", "<x> x"):
            assert ours.encode(text) == ref.encode(text), (name, text)
    ours = Tokenizer.from_pretrained(tmp_path / "object")
    ref = AutoTokenizer.from_pretrained(tmp_path / "object")
    assert ours.apply_chat_template(CHAT, chat_template="other") == "o" == \
        ref.apply_chat_template(CHAT, chat_template="other", tokenize=False)


@pytest.mark.parametrize("key, value", [
    ("chat_template", 5),
    ("chat_template", [TEMPLATE]),
    ("chat_template", [{"name": "default"}]),
    ("chat_template", [{"name": "default", "template": 5}]),
    ("chat_template", {"default": ["x"]}),
    ("added_tokens_decoder", {"11": "<y>"}),
    ("added_tokens_decoder", {"11": {"special": True}}),
    ("added_tokens_decoder", {"11": {"content": 5}}),
    ("added_tokens_decoder", {"eleven": {"content": "<y>"}}),
    ("added_tokens_decoder", [{"content": "<y>"}]),
    ("added_tokens_decoder", {"11": {"content": "<y>", "special": "yes"}}),
    ("eos_token", 5),
    ("eos_token", {"special": True}),
    ("eos_token", ["</s>"]),
    ("pad_token", {"content": 3}),
    ("padding_side", "middle"),
])
def test_config_values_of_the_wrong_kind_are_refused_by_name(tmp_path, key, value):
    folder = _tokenizer_folder(tmp_path / "tok", **{key: value})
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'tokenizer_config.json'}: '{key}'")):
        Tokenizer.from_pretrained(folder)


def test_special_tokens_map_values_are_checked_too(tmp_path):
    folder = _tokenizer_folder(tmp_path / "tok")
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": 1}))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'special_tokens_map.json'}: "
                                                   "'bos_token'")):
        Tokenizer.from_pretrained(folder)


def test_named_templates_without_a_default(tmp_path):
    folder = _tokenizer_folder(tmp_path / "tok", chat_template=[{"name": "a", "template": "A"}])
    tok = Tokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match="chat templates named a but none named 'default'"):
        tok.apply_chat_template(CHAT)
    assert tok.apply_chat_template(CHAT, chat_template="a") == "A"


# ----------------------------------------------------------------- 3. text that is not Unicode
def test_lone_surrogates_are_refused_by_encode(tmp_path):
    tok = Tokenizer.from_pretrained(_tokenizer_folder(tmp_path / "tok"))
    text = b"hello \xff world".decode("utf-8", "surrogateescape")  # as a shell argument arrives
    for call in (lambda: tok.encode(text), lambda: tok.batch_encode(["hello", text])):
        with pytest.raises(ValueError, match=r"lone surrogate U\+DCFF at character 6 \(the byte "
                                             r"0xff of input that is not UTF-8"):
            call()
    with pytest.raises(ValueError, match=r"U\+D800 at character 0; give UTF-8 text"):
        tok.encode("\ud800")
    assert tok.encode("hello world") == [4, 5]


def test_generate_with_a_prompt_that_is_not_utf8(tmp_path, capfd):
    folder = tmp_path / "model"
    hf_model(seed=1).save_pretrained(folder)
    _tokenizer_folder(folder)
    capfd.readouterr()
    prompt = b"hello \xfe".decode("utf-8", "surrogateescape")
    assert main(["generate", "--checkpoint", str(folder), "--prompt", prompt]) == 1
    err = _err_lines(capfd)
    assert len(err) == 1 and err[0].startswith("jais2 generate: error: text to encode is not "
                                               "valid Unicode"), err
    assert "U+DCFE" in err[0] and "0xfe" in err[0]


# ------------------------------------------------------------ 4. malformed safetensors headers
def _safetensors_with(path, change):
    save_file({"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}, str(path))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


@pytest.mark.parametrize("field, value, phrase", [
    ("dtype", 5, "has dtype 5, a number"),
    ("dtype", ["F32"], "has dtype [\"F32\"], a list"),
    ("dtype", {"F32": 1}, "a dtype is a string"),
    ("dtype", None, "has dtype null"),
    ("shape", "23", "has shape \"23\"; a shape is a list"),
    ("shape", 6, "has shape 6"),
    ("shape", {"2": 3}, "a shape is a list of non-negative integers"),
    ("shape", [2.0, 3], "has shape [2.0, 3]"),
    ("shape", [2, -3], "non-negative"),
    ("data_offsets", [0], "they are a list [begin, end]"),
    ("data_offsets", "0,24", "they are a list"),
    ("data_offsets", {"0": 24}, "they are a list"),
    ("data_offsets", [0, 24, 48], "they are a list"),
    ("data_offsets", [0, [24]], "must be non-negative integers"),
    (None, [1, 2], "is a list, not an object"),
    (None, "F32", "is a string, not an object"),
    ("-dtype", None, "has no dtype"),
])
def test_malformed_header_fields_name_the_file_and_tensor(tmp_path, field, value, phrase):
    path = tmp_path / "model.safetensors"

    def change(header):
        if field is None:
            header["a"] = value
        elif field.startswith("-"):
            del header["a"][field[1:]]
        else:
            header["a"][field] = value
    _safetensors_with(path, change)
    with pytest.raises(ValueError) as info:
        read_header(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: not a valid safetensors file") and "'a'" in message
    assert phrase in message, message


# ------------------------------------------------------------------- 5. named pipes (FIFOs)
_FIFO_SCRIPT = r"""
import json, sys
from jais2_jax import Tokenizer
from jais2_jax.checkpoint import HFCheckpoint, load_checkpoint
from jais2_jax.checkpoint.common import copy_tokenizer_files
calls = {"hf": lambda p: HFCheckpoint(p), "load": lambda p: load_checkpoint(p),
         "tokenizer": lambda p: Tokenizer.from_pretrained(p),
         "copy": lambda p: copy_tokenizer_files(p, sys.argv[2])}
for case in json.loads(sys.argv[1]):
    try:
        calls[case["call"]](case["folder"])
        print("OK", case["folder"], flush=True)
    except Exception as e:
        print(type(e).__name__, case["folder"], "|", str(e).replace("\n", " "), flush=True)
"""


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "hf"
    hf_model(seed=2).save_pretrained(folder, max_shard_size="20KB")
    _tokenizer_folder(folder)
    return folder


def test_named_pipes_are_refused_not_waited_on(hf_folder, tmp_path):
    """A FIFO named like a checkpoint file: each reader refuses it by name instead of waiting
    forever for a writer. Run in a child process with a timeout, so a regression fails."""
    index = json.loads((hf_folder / "model.safetensors.index.json").read_text())
    shard = min(index["weight_map"].values())
    cases = []
    for name, call in [("model.safetensors", "hf"), ("model.safetensors.index.json", "hf"),
                       (shard, "load"), ("config.json", "load"),
                       ("tokenizer_config.json", "tokenizer"), ("tokenizer.json", "tokenizer"),
                       ("special_tokens_map.json", "tokenizer"),
                       ("chat_template.jinja", "tokenizer"), ("tokenizer.json", "copy")]:
        folder = tmp_path / f"{len(cases)}"
        shutil.copytree(hf_folder, folder)
        if name == "model.safetensors":  # a single-file checkpoint whose one file is a pipe
            for f in os.listdir(folder):
                if f.endswith((".safetensors", ".index.json")):
                    os.remove(folder / f)
        elif (folder / name).exists():
            os.remove(folder / name)
        os.mkfifo(folder / name)
        cases.append({"folder": str(folder), "call": call, "fifo": str(folder / name)})
    (tmp_path / "out").mkdir()
    try:
        run = subprocess.run([sys.executable, "-c", _FIFO_SCRIPT, json.dumps(cases),
                              str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                             check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"reading a named pipe hung: {e.stdout}")
    results = {line.split(" ")[1]: line for line in run.stdout.splitlines()}
    for case in cases:
        line = results.get(case["folder"], f"missing: {run.stderr[-2000:]}")
        assert line.startswith("ValueError ") and \
            f"{case['fifo']} is a named pipe (FIFO), not a regular file" in line, (case, line)


# -------------------------------------------------------- 6. links out of the folder, modes
def test_a_link_out_of_the_folder_is_never_copied(hf_folder, tmp_path, capfd):
    secret = tmp_path / "secret.json"
    secret.write_text('{"private": 1}')
    os.chmod(secret, 0o600)
    src = tmp_path / "hf"
    shutil.copytree(hf_folder, src)
    os.symlink(secret, src / "added_tokens.json")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{src / 'added_tokens.json'} is a symbolic "
                                                   f"link to {secret}, outside {src}")):
        copy_tokenizer_files(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "added_tokens.json").exists()
    capfd.readouterr()
    assert main(["convert", str(src), str(tmp_path / "orbax"), "--quiet"]) == 1
    err = _err_lines(capfd)
    assert len(err) == 1 and "added_tokens.json is a symbolic link" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["hf", "out", "secret.json"]  # nothing half-written


def test_copies_keep_the_permission_bits_and_links_inside_work(hf_folder, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf_folder, src)
    os.chmod(src / "tokenizer_config.json", 0o600)
    os.chmod(src / "tokenizer.json", 0o640)
    (src / "sub").mkdir()
    (src / "sub" / "merges.txt").write_text("a b\n")
    os.symlink("sub/merges.txt", src / "merges.txt")  # a link that stays inside
    os.symlink("missing.json", src / "vocab.json")  # a dangling one: skipped, with a warning
    out = tmp_path / "out"
    out.mkdir()
    copy_tokenizer_files(str(src), str(out))
    assert stat.S_IMODE(os.stat(out / "tokenizer_config.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / "tokenizer.json").st_mode) == 0o640
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (out / "merges.txt").read_text() == "a b\n" and not os.path.islink(out / "merges.txt")
    assert not os.path.lexists(out / "vocab.json")


def test_hub_cache_snapshots_may_link_into_their_blobs(tmp_path):
    """The Hugging Face hub cache: snapshots/<rev>/file -> ../../blobs/<hash>. Those links stay
    in the repository's cache and are followed; one to elsewhere is still refused."""
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text('{"version": "1.0"}')
    os.symlink("../../blobs/f00d", snap / "tokenizer.json")
    out = tmp_path / "out"
    out.mkdir()
    copy_tokenizer_files(str(snap), str(out))
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    (tmp_path / "elsewhere.txt").write_text("x")
    os.symlink(tmp_path / "elsewhere.txt", snap / "merges.txt")
    with pytest.raises(ValueError, match="merges.txt is a symbolic link"):
        copy_tokenizer_files(str(snap), str(out))


# ------------------------------------------------------------------ 7. damaged Orbax data
@pytest.fixture(scope="module")
def orbax_folder(hf_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("orbax") / "ob"
    assert main(["convert", str(hf_folder), str(out), "--quiet"]) == 0
    return out


def _data_files(folder):
    return sorted((os.path.join(d, f) for d, _, fs in os.walk(folder / "params") for f in fs
                   if os.path.basename(d) == "d"), key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
def test_damaged_orbax_data_is_one_clear_line(orbax_folder, tmp_path, capfd, damage):
    """Orbax / TensorStore keep no checksum of the weights (see orbax_io), so what can be found is a
    data file cut short or gone: a ValueError naming the folder, on one line, without the
    tracebacks of Orbax's abandoned reads; `jais2 export` says it in one line."""
    folder = tmp_path / "ob"
    shutil.copytree(orbax_folder, folder)
    biggest = _data_files(folder)[-1]
    if damage == "delete":
        os.remove(biggest)
    else:
        os.truncate(biggest, 0 if damage == "empty" else os.path.getsize(biggest) // 2)
    capfd.readouterr()
    with pytest.raises(ValueError) as info:
        load_checkpoint(folder)
    message = str(info.value)
    assert message.startswith(f"{folder / 'params'}: could not read the Orbax checkpoint")
    assert "\n" not in message and len(message) < 1000
    assert "Exception ignored" not in capfd.readouterr().err
    assert main(["export", str(folder), str(tmp_path / "back"), "--quiet"]) == 1
    err = _err_lines(capfd)
    assert len(err) == 1 and err[0].startswith("jais2 export: error: ") and \
        str(folder / "params") in err[0], err
    assert not (tmp_path / "back").exists()


# ------------------------------------------------------------ 8. a full disk during convert
class _FullDisk:
    """tensorstore.open whose stores refuse every write with ENOSPC (as a full disk does)."""

    def __init__(self, real_open):
        self.real_open = real_open

    def __call__(self, *args, **kwargs):
        future = self.real_open(*args, **kwargs)
        return _Opened(future) if kwargs.get("create") else future


class _Opened:
    def __init__(self, future):
        self.future = future

    def result(self):
        return _Full(self.future.result())

    def __await__(self):
        store = yield from self.future.__await__()
        return _Full(store)


class _Full:
    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        return getattr(self.store, name)

    def __getitem__(self, index):
        return self

    def write(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _forget_earlier_tests(caplog):
    """Earlier tests' failed Orbax reads leave asyncio tasks whose errors are logged ("Task
    exception was never retrieved") whenever the garbage collector meets them: collect them now,
    so that the records checked are this test's own."""
    import gc
    gc.collect()
    caplog.clear()


@pytest.mark.parametrize("verbose", ["", "--verbose", "JAIS2_VERBOSE=1"])
def test_a_full_disk_during_convert_is_one_line(hf_folder, tmp_path, capfd, caplog, monkeypatch,
                                                verbose):
    """ENOSPC from the writes (out of space mid-way): one line, `jais2 convert: error: ...`, not
    the ~120 lines of Orbax's logged tracebacks; with --verbose (or JAIS2_VERBOSE=1) those and the
    traceback too. Nothing is left behind."""
    import tensorstore
    monkeypatch.setattr(tensorstore, "open", _FullDisk(tensorstore.open))
    monkeypatch.delenv("JAIS2_VERBOSE", raising=False)
    if verbose.startswith("JAIS2"):
        monkeypatch.setenv("JAIS2_VERBOSE", "1")
    _forget_earlier_tests(caplog)
    capfd.readouterr()
    argv = ["convert", str(hf_folder), str(tmp_path / "ob"), "--quiet"]
    assert main(argv + ([verbose] if verbose.startswith("--") else [])) == 1
    err = _err_lines(capfd)
    library_errors = [r for r in caplog.records if r.levelno >= 40]
    if verbose:
        assert "Traceback (most recent call last):" in err and library_errors
    else:
        assert len(err) == 1 and not library_errors, (err, library_errors)
    assert err[-1].startswith("jais2 convert: error: could not write ")
    assert err[-1].endswith("No space left on device"), err
    assert os.listdir(tmp_path) == []


def test_a_real_write_failure_during_convert_is_one_line(hf_folder, tmp_path, capfd, caplog):
    """The kernel refuses writes past 100 KB per file (RLIMIT_FSIZE: EFBIG, as ENOSPC): the
    TensorStore error, on one line."""
    _forget_earlier_tests(caplog)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    capfd.readouterr()
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, old[1]))
    try:
        rc = main(["convert", str(hf_folder), str(tmp_path / "ob"), "--quiet"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    err = _err_lines(capfd)
    assert rc == 1 and len(err) == 1 and "File too large" in err[0], err
    assert not [r for r in caplog.records if r.levelno >= 40]
    assert os.listdir(tmp_path) == []
