"""Text <-> token ids, read from a checkpoint folder, matching transformers' tokenizers.

`Tokenizer.from_pretrained(dir)` reads an HF `tokenizer.json` with `tokenizers` (the released
Jais-2 tokenizer is byte-level BPE) or a SentencePiece `*.model`, plus `tokenizer_config.json`
(special tokens, add_bos_token / add_eos_token, padding side, chat template) and
`chat_template.jinja`. Chat templates are untrusted code from a download: they are rendered in
Jinja's immutable sandbox with the same helpers transformers gives them.
"""

from __future__ import annotations

import glob
import json
import os
import re
from datetime import datetime
from functools import lru_cache

import numpy as np

from jais2_jax.model.config import read_json_object

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


def _content(token) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token


@lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        # rendering just keeps the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which chat templates do not want.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e}") from None


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
        self.padding_side = padding_side
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
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = read_json_object(config_path) if os.path.exists(config_path) else {}
        legacy_map = os.path.join(directory, "special_tokens_map.json")
        special = {}
        if os.path.exists(legacy_map):
            special.update({k: _content(v) for k, v in read_json_object(legacy_map).items()
                            if k in SPECIAL_TOKEN_NAMES})
        special.update({k: _content(config[k]) for k in SPECIAL_TOKEN_NAMES if k in config})

        json_path = os.path.join(directory, "tokenizer.json")
        spm_paths = sorted(glob.glob(os.path.join(directory, "*.model")))
        if os.path.exists(json_path):
            tok = cls._load_hf(json_path, config, special)
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
        tok.chat_template = cls._read_chat_template(directory, config)
        tok.padding_side = config.get("padding_side", "right")
        return tok

    @classmethod
    def _load_hf(cls, path, config, special):
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
        extra = [AddedToken(**{k: v for k, v in t.items() if k != "__type"})
                 for t in config.get("added_tokens_decoder", {}).values()
                 if hf.token_to_id(t["content"]) is None]
        extra += [AddedToken(t, special=True, normalized=False) for t in special.values()
                  if t is not None]
        if extra:
            hf.add_special_tokens(extra)
        # Which special tokens `encode` adds is the post-processor's business: transformers (>= 5)
        # ignores the config's add_bos_token / add_eos_token when there is a tokenizer.json.
        return cls(hf=hf, special_tokens=special)

    @staticmethod
    def _read_chat_template(directory, config) -> str | None:
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                return f.read()
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: use the default one
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        return template

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
                            **kwargs) -> str | list[int]:
        """Renders a conversation ([{"role": ..., "content": ...}, ...]) with the chat template.

        The template sees `messages`, `add_generation_prompt`, the special tokens by name
        (`bos_token`, `eos_token`, ...) and `kwargs`. With tokenize=True returns token ids (the
        template writes any special tokens itself, so none are added).
        """
        import jinja2
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json "
                             "'chat_template' or chat_template.jinja)")
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError(f"chat messages must be dicts, got {m!r}")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            text = _compile_template(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text
