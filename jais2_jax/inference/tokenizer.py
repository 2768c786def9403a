"""Text <-> token ids, read from a checkpoint folder, matching transformers' tokenizers.

`Tokenizer.from_pretrained(dir)` reads an HF `tokenizer.json` with `tokenizers` (the released
Jais-2 tokenizer is byte-level BPE) or a SentencePiece `*.model`, plus `tokenizer_config.json`
(special tokens, add_bos_token / add_eos_token, padding side, chat template) and
`chat_template.jinja`. Chat templates are untrusted code from a download: they are rendered in
Jinja's immutable sandbox with the same helpers transformers gives them, within bounds of time and
size (see "bounded chat templates" below).
"""

from __future__ import annotations

import collections.abc
import functools
import glob
import json
import os
import re
import threading
import time
from datetime import datetime
from functools import lru_cache

import numpy as np

from jais2_jax.checkpoint.common import regular_file_exists
from jais2_jax.model.config import read_json_object

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


# ------------------------------------------------------------------------ tokenizer_config.json
def _token(value, key: str, path: str) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string, or
    an AddedToken object {"content": str, ...} (what transformers reads); anything else is refused."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: '{key}' must be a string or an object with a string 'content' "
                     f"(an AddedToken), got {_show(value)}")


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=True, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


def _added_tokens(config: dict, path: str) -> list[dict]:
    """'added_tokens_decoder' ({"<id>": {"content": str, flags...}}): the AddedToken arguments of
    each entry. Keys other than the AddedToken flags (such as "__type") are ignored, as
    transformers' AddedToken ignores them."""
    table = config.get("added_tokens_decoder", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: 'added_tokens_decoder' must be an object of token id -> token, "
                         f"got {_show(table)}")
    tokens = []
    for idx, entry in table.items():
        where = f"{path}: 'added_tokens_decoder' entry {idx!r}"
        try:
            int(idx)
        except ValueError:
            raise ValueError(f"{where}: the key must be a token id (an integer)") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ValueError(f"{where} must be an object with a string 'content' (an AddedToken), "
                             f"got {_show(entry)}")
        flags = {k: entry[k] for k in _ADDED_TOKEN_FLAGS if k in entry}
        for k, v in flags.items():
            if not isinstance(v, bool):
                raise ValueError(f"{where}: '{k}' must be true or false, got {_show(v)}")
        tokens.append({"content": entry["content"], **flags})
    return tokens


def _chat_templates(value, path: str) -> dict[str, str]:
    """'chat_template' as transformers reads it: a template string (named "default"), a list of
    {"name": str, "template": str} objects, or an object of name -> template string."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    if isinstance(value, dict) and all(isinstance(t, str) for t in value.values()):
        return dict(value)
    raise ValueError(f"{path}: 'chat_template' must be a template string or a list of "
                     f'{{"name": ..., "template": ...}} objects, got {_show(value)}')


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


# ------------------------------------------------------------------- bounded chat templates
# A chat template is code from a download. Jinja's sandbox stops it reaching Python internals, but
# not from running forever or filling memory (a loop in a loop, endless recursion, "x" * 10**10).
# So every render is bounded: a wall-clock deadline, checked at each loop step, call, attribute,
# item and operator; a limit on the size of any one string or list it builds, checked before the
# operation wherever the size can be told beforehand (*, +, %, ~, str.center / replace / join /
# format, the filters that take a width, a filler or a separator) and on every result; a budget
# for all it produces; and a limit on nested calls. Any failure of a template is a ValueError
# naming it.
CHAT_TEMPLATE_SECONDS = 10.0  # wall-clock time one render may take
MAX_TEMPLATE_CHARS = 1 << 24  # the largest string or list (characters / items) a template may
# build, and the longest text it may render: 16 Mi characters, far beyond any context window
_TEMPLATE_WORK = 1 << 28  # characters, items and loop steps one render may produce in all
MAX_TEMPLATE_DEPTH = 50  # nested calls (macros, recursive loops)
_MAX_INT_BITS = 1 << 16  # the integers a template may compute with (* and **)
_CONTAINERS = (list, tuple, dict, set, frozenset)


class _TemplateLimit(Exception):
    """A chat template went past one of the bounds above."""


class _RenderState(threading.local):
    deadline: float | None = None
    work = 0
    depth = 0
    spans: list | None = None  # (start, end, text) of each {% generation %} block, when asked
    rendered = 0  # characters output so far


_render_state = _RenderState()


def _tick(work: int = 1) -> None:
    """Counts `work` against the render's budget and checks its deadline (no-op outside one)."""
    state = _render_state
    if state.deadline is None:
        return
    state.work += work
    if state.work > _TEMPLATE_WORK:
        raise _TemplateLimit(f"produces more than {_TEMPLATE_WORK} characters or items in all")
    if time.monotonic() > state.deadline:
        raise _TemplateLimit(f"took longer than {CHAT_TEMPLATE_SECONDS:g} s to render (an endless "
                             "loop?)")


def _atom_size(v) -> int:
    if isinstance(v, (str, bytes)):
        return len(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return 1 + v.bit_length() // 3  # about its decimal digits
    return 1


def _children(v):
    return [x for kv in v.items() for x in kv] if isinstance(v, dict) else v


def _size(x) -> int:
    """Characters / items `x` stands for when printed: strings by length, containers by their
    contents, a part that appears several times counted each time (as printing repeats it).
    Each object is visited once, without recursion (deep nesting is fine); capped past the limit."""
    if not isinstance(x, _CONTAINERS):
        return _atom_size(x)
    cap = MAX_TEMPLATE_CHARS + 1
    memo: dict[int, int | None] = {}
    stack = [x]
    while stack:
        v = stack[-1]
        if id(v) not in memo:
            memo[id(v)] = None  # in progress: its containers first
            stack.extend(c for c in _children(v) if isinstance(c, _CONTAINERS) and id(c) not in memo)
            continue
        stack.pop()
        if memo[id(v)] is None:
            total = len(v) + sum((memo[id(c)] or 1) if isinstance(c, _CONTAINERS) else _atom_size(c)
                                 for c in _children(v))
            memo[id(v)] = min(total, cap)
    return memo[id(x)]


def _check_size(n: int, what: str = "a value") -> None:
    if n > MAX_TEMPLATE_CHARS:
        raise _TemplateLimit(f"would build {what} of {n} characters or items, more than the "
                             f"{MAX_TEMPLATE_CHARS} allowed")


def _checked(value):
    """`value` (a result), counted against the budget and checked against the size limit."""
    if isinstance(value, (str, bytes) + _CONTAINERS):
        n = _size(value)
        _check_size(n)
        _tick(n)
    elif isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _TemplateLimit(f"computes an integer of more than {_MAX_INT_BITS} bits")
    return value


def _int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _depth(x) -> int:
    """Nesting depth of containers (for tojson's indentation); each object visited once."""
    best, seen, stack = 0, set(), [(x, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, _CONTAINERS) and id(v) not in seen:
            seen.add(id(v))
            best = max(best, d)
            stack.extend((c, d + 1) for c in _children(v))
    return best


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_FIELD = re.compile(r"\{[^{}]*\}")


def _check_numbers(numbers, what: str) -> None:
    for n in numbers:
        if n and n != "*" and (len(n) > 9 or int(n) > MAX_TEMPLATE_CHARS):
            raise _TemplateLimit(f"{what} asks for a width or precision of {n[:20]}, more than the "
                                 f"{MAX_TEMPLATE_CHARS} allowed")


def _check_percent(fmt, args) -> None:
    """`fmt % args`: the widths and precisions written in the format, or given by `*`."""
    if not isinstance(fmt, str):
        return
    specs = _PERCENT_SPEC.findall(fmt)
    _check_numbers([n for spec in specs for n in spec], "a % format")
    if any("*" in spec for spec in specs):
        values = args if isinstance(args, tuple) else (args,)
        _check_numbers([str(abs(v)) for v in values if _int(v)], "a % format")


def _check_str_format(fmt: str, args, kwargs) -> None:
    """str.format / format_map: the widths in the fields, and those given as arguments ({:{}})."""
    fields = _FORMAT_FIELD.findall(fmt)
    _check_numbers([n for f in fields if ":" in f for n in re.findall(r"\d+", f.split(":", 1)[1])],
                   "a format string")
    if re.search(r"\{[^{}]*:[^{}]*\{", fmt):  # nested fields: widths from the arguments
        values = list(args) + list(kwargs.values()) + [
            v for a in args if isinstance(a, dict) for v in a.values()]
        _check_numbers([str(abs(v)) for v in values if _int(v)], "a format string")


def _replace_size(s, old=None, new=None, count=None) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    n = s.count(old) if old else len(s) + 1
    if count is not None and _int(count) >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


def _str_method_size(method, args, kwargs) -> int:
    """The size of what a str / bytes method will build, where its arguments can make it large."""
    s, name = method.__self__, getattr(method, "__name__", "")
    if name in ("center", "ljust", "rjust", "zfill"):
        return max(len(s), _int(args[0] if args else kwargs.get("width", 0)))
    if name == "expandtabs":
        tab = "\t" if isinstance(s, str) else b"\t"
        return len(s) + s.count(tab) * _int(args[0] if args else kwargs.get("tabsize", 8))
    if name == "replace":
        return _replace_size(s, *args[:3])
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        return _size(args[0]) + len(s) * len(args[0])
    if name in ("format", "format_map") and isinstance(s, str):
        _check_str_format(s, args, kwargs)
    return 0


def _filter_size(name, args, kwargs) -> int:
    """The size of what filter `name` will build from `args` (jinja's pass-arg removed), where an
    argument can make it large (a width, a filler, a separator)."""
    def get(i, key, default=None):
        return args[i] if len(args) > i else kwargs.get(key, default)
    value = get(0, "value", get(0, "s"))
    if name == "center":
        return max(len(str(value)), _int(get(1, "width", 80)))
    if name == "indent":
        width = get(1, "width", 4)
        per = len(width) if isinstance(width, str) else _int(width)
        return len(str(value)) + per * (str(value).count("\n") + 1)
    if name == "replace":
        return _replace_size(value, get(1, "old"), get(2, "new"), get(3, "count"))
    if name == "join" and isinstance(value, (list, tuple)):
        return _size(value) + len(str(get(1, "d", ""))) * len(value)
    if name == "format":
        _check_percent(value, tuple(args[1:]) or kwargs)
    if name == "wordwrap":
        return len(str(value)) * (1 + len(str(get(3, "wrapstring") or "\n")))
    if name in ("batch", "slice"):
        n = _int(get(1, "linecount" if name == "batch" else "slices", 0))
        return _size(value) + n * (1 + _size(get(2, "fill_with")))
    if name == "sum" and isinstance(get(2, "start", 0), (str, bytes) + _CONTAINERS):
        items = get(0, "iterable", ())  # adding up sequences copies them over and over
        return len(items) * _size(items) if isinstance(items, (list, tuple)) else 0
    if name == "tojson":
        indent = get(2, "indent")
        per = len(indent) if isinstance(indent, str) else _int(indent)
        seps = get(3, "separators") or ()
        extra = sum(len(str(sep)) for sep in seps) if isinstance(seps, (list, tuple)) else 0
        return _size(value) * (2 + extra + (1 + per * _depth(value) if indent is not None else 0))
    return 0


_MATERIALIZED_FILTERS = ("join", "sum", "batch", "slice")  # a lazy first argument made a list


def _guarded_filter(name, f):
    passes_arg = hasattr(f, "jinja_pass_arg")  # jinja passes context / eval_ctx / env first

    @functools.wraps(f)  # keeps jinja_pass_arg
    def guarded(*args, **kwargs):
        _tick()
        k = 1 if passes_arg else 0
        if (name in _MATERIALIZED_FILTERS and len(args) > k
                and not isinstance(args[k], collections.abc.Sized)):
            args = args[:k] + (list(args[k]),) + args[k + 1:]
        for a in (*args[k:], *kwargs.values()):
            _check_size(_size(a), "an argument")
        _check_size(_filter_size(name, args[k:], kwargs), f"a string or list ({name} filter)")
        return _checked(f(*args, **kwargs))
    return guarded


def _finalize(value):
    """Every value a template prints ({{ ... }}) passes here before str()."""
    _check_size(_size(value), "output")
    return value


def _template_line(tb) -> int | None:
    """The template line of a failure (jinja rewrites tracebacks into '<template>' frames)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        # rendering just keeps the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            text = caller()
            state = _render_state
            if state.spans is not None:  # at the output's end: Jinja yields blocks in order
                state.spans.append((state.rendered, state.rendered + len(text), text))
            return text

    class Guard(Extension):
        """What `_bounded` weaves into a parsed template: every loop steps through `iterate`;
        every operand of `~` passes `part` and the literal text of every output `charge` (both
        through the sandbox's call hook, which checks their size)."""

        def iterate(self, iterable):
            for item in iterable:
                _tick()
                yield item

        def part(self, value):
            return value

        def charge(self, n):
            _tick(n)
            return ""

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "**", "%"])

        def call_binop(self, context, operator, left, right):
            _tick()
            sizes = _size(left), _size(right)
            for n in sizes:
                _check_size(n, f"an operand of {operator}")
            if operator == "*":
                if isinstance(left, int) and isinstance(right, int):
                    if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                        raise _TemplateLimit(f"computes an integer of more than {_MAX_INT_BITS} "
                                             "bits")
                elif isinstance(left, int):
                    _check_size(_int(left) * sizes[1])
                elif isinstance(right, int):
                    _check_size(_int(right) * sizes[0])
            elif operator == "+" and not isinstance(left, (int, float)):
                _check_size(sizes[0] + sizes[1])
            elif operator == "**" and _int(left) and _int(right) > 0:
                if abs(left).bit_length() * right > _MAX_INT_BITS:
                    raise _TemplateLimit(f"computes an integer of more than {_MAX_INT_BITS} bits")
            elif operator == "%":
                _check_percent(left, right)
            return _checked(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # jinja's own argument names
            _tick()
            method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by jinja
            owner = getattr(method, "__self__", None)
            if isinstance(owner, (str, bytes)) and getattr(method, "__name__", "") == "join" \
                    and args and not isinstance(args[0], collections.abc.Sized):
                args = (list(args[0]),) + args[1:]
            for a in (*args, *kwargs.values()):
                _check_size(_size(a), "an argument")
            if isinstance(owner, (str, bytes)):
                _check_size(_str_method_size(method, args, kwargs))
            if __obj is lipsum:  # n paragraphs of up to `max` words
                _check_size(16 * _int(kwargs.get("n", args[0] if args else 5)) *
                            _int(kwargs.get("max", args[3] if len(args) > 3 else 100)))
            state = _render_state
            state.depth += 1
            try:
                if state.depth > MAX_TEMPLATE_DEPTH:
                    raise _TemplateLimit(f"nests calls more than {MAX_TEMPLATE_DEPTH} deep "
                                         "(endless recursion?)")
                return _checked(super().call(__context, __obj, *args, **kwargs))
            finally:
                state.depth -= 1

        def getattr(self, obj, attribute):
            _tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _tick()
            return super().getitem(obj, argument)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which chat templates do not want.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    # Not optimized: the optimizer evaluates constant expressions while compiling, where the
    # bounds do not count time (a filter of constants with a huge width is refused by size anyway).
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, optimized=False,
                         finalize=_finalize, extensions=[Generation, Guard, loopcontrols])
    env.filters["tojson"] = tojson
    for name, f in list(env.filters.items()):
        env.filters[name] = _guarded_filter(name, f)
    env.globals["raise_exception"] = raise_exception

    def strftime_now(fmt):
        _check_size(32 * len(str(fmt)), "a date")  # no directive writes more than 32 characters
        return datetime.now().strftime(fmt)

    env.globals["strftime_now"] = strftime_now
    lipsum = env.globals["lipsum"]
    return env, Guard.identifier


def _bounded(tree, guard: str):
    """The parsed template with the Guard woven in: loops, `~` operands and literal output."""
    from jinja2 import nodes

    def call(name, arg, lineno):
        return nodes.Call(nodes.ExtensionAttribute(guard, name, lineno=lineno), [arg], [], None,
                          None, lineno=lineno)
    for node in list(tree.find_all(nodes.For)):
        node.iter = call("iterate", node.iter, node.lineno)
    for node in list(tree.find_all(nodes.Concat)):
        node.nodes = [call("part", n, node.lineno) for n in node.nodes]
    for node in list(tree.find_all(nodes.Output)):
        literal = sum(len(n.data) for n in node.nodes if isinstance(n, nodes.TemplateData))
        if literal:
            node.nodes.insert(0, call("charge", nodes.Const(literal, lineno=node.lineno),
                                      node.lineno))
    return tree


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """The template compiled in the bounded sandbox (raises what Jinja raises on bad source)."""
    env, guard = _environment()
    return env.from_string(_bounded(env.parse(source), guard))


def _render(source: str, where: str, context: dict, spans: list | None = None) -> str:
    """`source` rendered within the bounds; any failure is a ValueError naming `where`. With
    `spans` (a list), the (start, end) of each `{% generation %}` block's text is appended."""
    import jinja2
    try:
        template = _compile_template(source)
    except Exception as e:  # noqa: BLE001  (TemplateSyntaxError, or one of Python's own limits)
        raise ValueError(f"chat template of {where} does not parse: {_one_line(e)}") from None
    state = _render_state
    state.deadline, state.work, state.depth = time.monotonic() + CHAT_TEMPLATE_SECONDS, 0, 0
    state.spans, state.rendered = ([] if spans is not None else None), 0
    out, n = [], 0
    try:
        for chunk in template.generate(**context):
            n += len(chunk)
            _check_size(n, "output")
            out.append(chunk)
            state.rendered = n
    except Exception as e:  # noqa: BLE001  (the template is code: any failure is the template's)
        line = _template_line(e.__traceback__)
        kind = "" if isinstance(e, (jinja2.TemplateError, _TemplateLimit)) else \
            f"{type(e).__name__}: "
        raise ValueError(f"chat template of {where} failed{f' (line {line})' if line else ''}: "
                         f"{kind}{_one_line(e)}") from None
    finally:
        state.deadline = None
        found, state.spans = state.spans, None
    text = "".join(out)
    if spans is not None:
        for start, end, body in found:
            # A block inside a macro, {% set %} or filter is output later, elsewhere: its place
            # in the text is unknown (transformers' tracker has the same limit; we check it).
            if text[start:end] != body:
                raise ValueError(f"chat template of {where}: a {{% generation %}} block is not "
                                 "output where it is rendered (inside a macro, set or filter "
                                 "block?); its tokens cannot be located")
            spans.append((start, end))
    return text


_GENERATION_TAG = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_text(text) -> None:
    """Text the tokenizers can take: a str of valid Unicode. A lone surrogate (U+D800..U+DFFF)
    is not; Python makes them of the bytes of a command line or file name that are not UTF-8
    (surrogateescape: byte 0xff becomes U+DCFF)."""
    if not isinstance(text, str):
        raise TypeError(f"text to encode must be a str, got {type(text).__name__}")
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        source = (f" (the byte 0x{code - 0xDC00:02x} of input that is not UTF-8, e.g. a command "
                  "line or file in another encoding)" if 0xDC80 <= code <= 0xDCFF else "")
        raise ValueError(f"text to encode is not valid Unicode: it holds the lone surrogate "
                         f"U+{code:04X} at character {e.start}{source}; give UTF-8 text") from None


class Tokenizer:
    """encode / decode / batch_encode / apply_chat_template over one of two backends.

    add_bos_token / add_eos_token apply to SentencePiece only; a tokenizer.json says itself
    (its post-processor) which special tokens `encode` adds."""

    def __init__(self, *, hf=None, spm=None, special_tokens: dict | None = None,
                 add_bos_token: bool = False, add_eos_token: bool = False,
                 chat_template: str | None = None, padding_side: str = "right"):
        if (hf is None) == (spm is None):
            raise ValueError("give exactly one backend: hf (tokenizers) or spm (sentencepiece)")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self._hf, self._spm = hf, spm
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template
        # Named templates (tokenizer_config.json may hold several; "default" is chat_template).
        self.chat_templates: dict[str, str] = {} if chat_template is None else \
            {"default": chat_template}
        self.padding_side = padding_side
        self.name_or_path: str | None = None  # the folder it was read from
        if spm is not None:
            # SentencePiece does not know the special strings: split them out before encoding.
            specials = sorted({t for t in self.special_tokens.values()
                               if self.token_to_id(t) is not None}, key=len, reverse=True)
            self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") \
                if specials else None

    # -------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Tokenizer":
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"no tokenizer folder at {directory}")
        # Every file is checked to be a regular file before it is opened: reading a named pipe
        # would wait forever.
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = read_json_object(config_path) if regular_file_exists(config_path) else {}
        legacy_map = os.path.join(directory, "special_tokens_map.json")
        special = {}
        if regular_file_exists(legacy_map):
            special.update({k: _token(v, k, legacy_map)
                            for k, v in read_json_object(legacy_map).items()
                            if k in SPECIAL_TOKEN_NAMES})
        special.update({k: _token(config[k], k, config_path)
                        for k in SPECIAL_TOKEN_NAMES if k in config})
        added = _added_tokens(config, config_path)
        templates = _chat_templates(config.get("chat_template"), config_path)
        padding_side = config.get("padding_side", "right")
        if padding_side not in ("left", "right"):
            raise ValueError(f"{config_path}: 'padding_side' must be \"left\" or \"right\", got "
                             f"{_show(padding_side)}")
        for key in ("add_bos_token", "add_eos_token"):
            if not isinstance(config.get(key, False), bool):
                raise ValueError(f"{config_path}: '{key}' must be true or false, got "
                                 f"{_show(config[key])}")

        json_path = os.path.join(directory, "tokenizer.json")
        spm_paths = sorted(p for p in glob.glob(os.path.join(directory, "*.model"))
                           if regular_file_exists(p))
        if regular_file_exists(json_path):
            tok = cls._load_hf(json_path, added, special)
        elif spm_paths:
            import sentencepiece
            spm = sentencepiece.SentencePieceProcessor(model_file=spm_paths[0])
            for name, piece_id in (("bos_token", spm.bos_id()), ("eos_token", spm.eos_id()),
                                   ("unk_token", spm.unk_id()), ("pad_token", spm.pad_id())):
                if piece_id >= 0:
                    special.setdefault(name, spm.id_to_piece(piece_id))
            tok = cls(spm=spm, special_tokens=special,
                      add_bos_token=config.get("add_bos_token", True),
                      add_eos_token=config.get("add_eos_token", False))
        else:
            raise ValueError(f"{directory} has no tokenizer (tokenizer.json or a SentencePiece "
                             "*.model)")
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if regular_file_exists(jinja_path):  # as transformers: the file wins over the config
            templates = {"default": _read_text(jinja_path)}
        tok.chat_templates = templates
        tok.chat_template = templates.get("default")
        tok.padding_side = padding_side
        tok.name_or_path = directory
        return tok

    @classmethod
    def _load_hf(cls, path, added: list[dict], special):
        import tokenizers
        from tokenizers import AddedToken
        try:
            hf = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        # As transformers does: added tokens of the config missing from the vocabulary are added,
        # and every named special token (bos, eos, pad, ...) is registered as special, added if
        # missing and marked if it is an ordinary vocabulary entry (its id unchanged), so that
        # encode never splits it and decode(skip_special_tokens=True) drops it.
        extra = [AddedToken(**t) for t in added if hf.token_to_id(t["content"]) is None]
        extra += [AddedToken(t, special=True, normalized=False) for t in special.values()
                  if t is not None]
        if extra:
            hf.add_special_tokens(extra)
        # Which special tokens `encode` adds is the post-processor's business: transformers (>= 5)
        # ignores the config's add_bos_token / add_eos_token when there is a tokenizer.json.
        return cls(hf=hf, special_tokens=special)

    # --------------------------------------------------------------------------------- vocab
    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return self._spm.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        i = self._spm.piece_to_id(token)
        return None if i == self._spm.unk_id() and token != self._spm.id_to_piece(i) else i

    def _special_id(self, name) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    # ------------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        _check_text(text)
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        ids = []
        parts = self._special_re.split(text) if self._special_re else [text]
        for i, part in enumerate(parts):
            if i % 2:  # a special token matched by the split
                ids.append(self.token_to_id(part))
            elif part:
                ids.extend(self._spm.encode(part))
        if add_special_tokens:
            ids = ([self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None
                   else []) + ids + ([self.eos_token_id] if self.add_eos_token and
                                     self.eos_token_id is not None else [])
        return ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` of each text; a tokenizer.json encodes them on all cores at once."""
        for text in texts:
            _check_text(text)
        if self._hf is not None:
            return [e.ids for e in self._hf.encode_batch(list(texts),
                                                         add_special_tokens=add_special_tokens)]
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if np.ndim(ids) > 1:
            raise ValueError(f"decode takes one sequence of ids, got shape {np.shape(ids)}; decode "
                             "each row of a batch")
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        special = {self.token_to_id(t) for t in self.special_tokens.values()}
        runs, text = [[]], []  # runs of ordinary pieces between special tokens
        for i in ids:  # sentencepiece would drop control pieces: keep them unless asked not to
            if i in special or self._spm.is_control(i):
                if not skip_special_tokens:
                    runs.append(self._spm.id_to_piece(i))
                    runs.append([])
            else:
                runs[-1].append(i)
        first = True
        for run in runs:
            if isinstance(run, str):
                text.append(run)
            elif run:
                # sentencepiece drops the word-start space of the first piece of the text only;
                # later runs keep theirs ("hello</s> world", as decoding the pieces at once gives)
                lead = "" if first or not self._spm.id_to_piece(run[0]).startswith("\u2581") else " "
                text.append(lead + self._spm.decode(run))
                first = False
        return "".join(text)

    def batch_encode(self, texts: list[str], add_special_tokens: bool = True,
                     padding_side: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (input_ids, attention_mask), both [batch, longest] int32, padded with the pad id
        (eos when there is none) on `padding_side` (default: the tokenizer's)."""
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if isinstance(texts, str):
            raise ValueError("batch_encode takes a list of strings")
        rows = [self.encode(t, add_special_tokens) for t in texts]
        pad = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
        if pad is None and len({len(r) for r in rows}) > 1:
            raise ValueError("padding needs a pad_token (or eos_token) in the tokenizer config")
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), pad or 0, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, sl], mask[i, sl] = r, 1
        return ids, mask

    # ----------------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                            tokenize: bool = False, chat_template: str | None = None,
                            return_assistant_tokens_mask: bool = False,
                            **kwargs) -> str | list[int] | dict:
        """Renders a conversation ([{"role": ..., "content": ...}, ...]) with the chat template.

        The template sees `messages`, `add_generation_prompt`, the special tokens by name
        (`bos_token`, `eos_token`, ...) and `kwargs`. With tokenize=True returns token ids (the
        template writes any special tokens itself, so none are added).

        `return_assistant_tokens_mask=True` (with tokenize=True) returns, as transformers does,
        {"input_ids": ids, "assistant_masks": [0/1 per token]}: 1 on the tokens of the template's
        `{% generation %}` blocks (a template without them is an error).
        """
        if return_assistant_tokens_mask:
            if not tokenize:
                raise ValueError("return_assistant_tokens_mask needs tokenize=True")
            text, spans = self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template, **kwargs)
            if spans is None:
                raise ValueError("the chat template has no {% generation %} blocks: it does not "
                                 "say which tokens are the assistant's")
            ids, mask = self.encode_spans(text, spans)
            return {"input_ids": ids, "assistant_masks": mask}
        text, _ = self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                   chat_template=chat_template, track=False, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = False,
                    chat_template: str | None = None, track: bool = True,
                    **kwargs) -> tuple[str, list[tuple[int, int]] | None]:
        """(text, spans): the rendered conversation and the (start, end) character spans of its
        `{% generation %}` blocks; spans is None when the template has no such blocks (or
        `track` is off)."""
        where = self.name_or_path or "this tokenizer"
        if chat_template in self.chat_templates:  # a name, as transformers takes it
            template = self.chat_templates[chat_template]
        elif chat_template is not None:
            template, where = chat_template, "the chat_template argument"
        elif kwargs.get("tools") and "tool_use" in self.chat_templates:
            template = self.chat_templates["tool_use"]
        else:
            template = self.chat_template
        if template is None:
            if self.chat_templates:
                raise ValueError(f"{where} has chat templates named "
                                 f"{', '.join(sorted(self.chat_templates))} but none named "
                                 "'default': pass chat_template=NAME")
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json "
                             "'chat_template' or chat_template.jinja)")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError(f"chat messages must be dicts, got {m!r}")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        spans = [] if track and _GENERATION_TAG.search(template) else None
        text = _render(template, where, dict(messages=messages,
                                             add_generation_prompt=add_generation_prompt,
                                             **context), spans)
        return text, spans

    def special_strings(self) -> list[str]:
        """The text of every special token (named or added as special), longest first."""
        found = set(self.special_tokens.values())
        if self._hf is not None:
            found |= {t.content for t in self._hf.get_added_tokens_decoder().values() if t.special}
        return sorted(found, key=len, reverse=True)

    def encode_spans(self, text: str, spans) -> tuple[list[int], list[int]]:
        """(ids, mask) of `text` (no special tokens added) with 1 on every token from the one
        holding a span's first character to the one holding its last (transformers' rule for
        assistant masks). Needs a tokenizer.json tokenizer (character offsets)."""
        _check_text(text)
        if self._hf is None:
            raise ValueError("locating characters in tokens needs a tokenizer.json tokenizer; "
                             "this one is SentencePiece")
        enc = self._hf.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        for start, end in spans:
            if end <= start:
                continue
            first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
            if first is None:
                continue
            for t in range(first, (len(mask) - 1 if last is None else last) + 1):
                mask[t] = 1
        return list(enc.ids), mask
