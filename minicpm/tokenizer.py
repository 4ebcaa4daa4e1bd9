"""Tokenizer and chat templates, behaving as Hugging Face's tokenizers do on the same files.

Contract:

* :meth:`Tokenizer.from_pretrained` reads ``tokenizer.json`` with the ``tokenizers`` library
  (the engine behind Hugging Face's fast tokenizers) or, without one, ``tokenizer.model`` with
  sentencepiece; plus ``tokenizer_config.json``, ``special_tokens_map.json`` and
  ``added_tokens.json``. Added and special tokens are split out of the text before encoding.
* :meth:`Tokenizer.encode` returns the ids Hugging Face's tokenizer call returns by default (bos
  added when the tokenizer says so); :meth:`Tokenizer.decode` the text its ``decode`` returns.
  Text that is not valid Unicode (lone surrogates: bytes that were not UTF-8, as Python's
  ``surrogateescape`` hands over command-line arguments) is encoded as if those bytes had been
  decoded with replacement characters (U+FFFD), as ``bytes.decode("utf-8", "replace")`` does,
  never an error (:func:`clean_text`).
* :class:`IncrementalDecoder` turns a growing list of ids into text deltas that never split a
  UTF-8 character (held back while the last bytes form an incomplete character); the deltas
  concatenate to ``decode`` of all the ids.
* :meth:`Tokenizer.apply_chat_template` renders ``chat_template`` from tokenizer_config.json in a
  sandboxed jinja2 environment configured as Hugging Face's method of the same name; a
  tokenizer without a template gets ChatML when its vocabulary has ``<|im_start|>`` (the format
  of MiniCPM-2B-128k) and the short-context MiniCPM ``<用户>{query}<AI>`` format otherwise.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import UserError

# ChatML exactly as the MiniCPM-2B-128k card gives it: <|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The short-context MiniCPM-2B format: <用户>{query}<AI>{answer}
MINICPM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<用户>' + message['content'] + '<AI>' }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)
CHAT_FORMATS = {"chatml": CHATML_TEMPLATE, "minicpm": MINICPM_TEMPLATE}
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def clean_text(text: str) -> str:
    """``text`` with every lone surrogate replaced as UTF-8 decoding with errors="replace" would
    have: surrogate escapes (U+DC80-U+DCFF, undecodable bytes) are restored to their bytes and
    decoded with replacement characters; any other lone surrogate becomes U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out, run = [], bytearray()
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            run.append(code - 0xDC00)
            continue
        if run:
            out.append(run.decode("utf-8", "replace"))
            run.clear()
        out.append("\ufffd" if 0xD800 <= code <= 0xDFFF else ch)
    if run:
        out.append(run.decode("utf-8", "replace"))
    return "".join(out)


class TokenizerError(UserError):
    """Tokenizer files are missing or malformed, or a chat cannot be rendered."""


def _token_content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content")
    raise TokenizerError(f"special token entry {value!r} is neither a string nor an object")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _sentencepiece_backend(model_file: Path, config: dict[str, Any]) -> Any:
    """A ``tokenizers`` BPE built from a SentencePiece model the way Hugging Face's Llama tokenizer builds it.

    Vocabulary and scores come from the model file (read with sentencepiece's protobuf); merges
    are every split of a piece into two pieces, ranked by the merged piece's id; the text is
    prefixed with "▁" per segment (``legacy``) or once (``legacy: false``); unknown characters
    fall back to byte pieces.
    """
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as spm_pb
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    proto = spm_pb.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except DecodeError as exc:
        raise TokenizerError(f"cannot read {model_file} as a SentencePiece model: {exc}") from None
    if proto.trainer_spec.model_type != spm_pb.TrainerSpec.BPE:
        raise TokenizerError(f"{model_file} is not a BPE SentencePiece model; only BPE is supported")
    pieces = [p.piece for p in proto.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    ranked = []
    for merged, idx in vocab.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                ranked.append((idx, cut, len(right), vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = pieces[proto.trainer_spec.unk_id] if 0 <= proto.trainer_spec.unk_id < len(pieces) else None
    backend = HFTokenizer(
        models.BPE(vocab=vocab, merges=[(r[5], r[6]) for r in ranked], unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    add_prefix = bool(config.get("add_prefix_space", proto.normalizer_spec.add_dummy_prefix))
    scheme = ("always" if config.get("legacy", True) else "first") if add_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    chain = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence([*chain, decoders.Strip(content=" ", left=1)] if add_prefix else chain)
    control = [AddedToken(p.piece, special=p.type == 3, normalized=False) for p in proto.pieces if p.type in (3, 4)]
    backend.add_special_tokens([t for t in control if t.special])
    backend.add_tokens([t for t in control if not t.special])
    return backend


def _template_post_processor(backend: Any, bos: str | None, eos: str | None) -> Any:
    from tokenizers import processors

    single = " ".join(x for x in (bos, "$A", eos) if x)
    pair = " ".join(x for x in (bos, "$A", eos, bos, "$B", eos) if x)
    specials = [(t, backend.token_to_id(t)) for t in {bos, eos} if t and backend.token_to_id(t) is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


class Tokenizer:
    """Text <-> ids for a checkpoint directory, plus its chat template."""

    def __init__(self, backend: Any, config: dict[str, Any]) -> None:
        self._backend = backend
        self.config = config
        specials = {k: _token_content(config.get(k)) for k in SPECIAL_KEYS}
        self.special_tokens = {k: v for k, v in specials.items() if v is not None}
        template = config.get("chat_template")
        if isinstance(template, list):  # a list of named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(
                f"tokenizer_config.json: chat_template must be a string (or a list of named templates), "
                f"got {type(template).__name__}"
            )
        self.chat_template: str | None = template

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        for key in SPECIAL_KEYS:
            if key not in config and key in special_map:
                config[key] = special_map[key]
        if (path / "tokenizer.json").exists():
            try:
                backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as exc:
                if type(exc) is not Exception:  # tokenizers reports a bad file as a bare Exception; not a bug
                    raise
                raise TokenizerError(f"cannot read {path / 'tokenizer.json'}: {exc}") from None
            rebuild_post = "Llama" in str(config.get("tokenizer_class", "")) and (
                "add_bos_token" in config or "add_eos_token" in config
            )
        elif (path / "tokenizer.model").exists():
            backend = _sentencepiece_backend(path / "tokenizer.model", config)
            rebuild_post = True
        else:
            raise TokenizerError(f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model")

        # Added tokens the tokenizer files list beside the model, in id order.
        added: dict[int, AddedToken] = {}
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("content"), str) and str(k).isdigit() for k, e in decoder.items()
        ):
            raise TokenizerError(
                f"{path / 'tokenizer_config.json'}: added_tokens_decoder must map ids to objects with 'content'"
            )
        for id_str, entry in decoder.items():
            added[int(id_str)] = AddedToken(
                entry["content"],
                special=entry.get("special", True),
                normalized=entry.get("normalized", False),
                lstrip=entry.get("lstrip", False),
                rstrip=entry.get("rstrip", False),
                single_word=entry.get("single_word", False),
            )
        for token, idx in _read_json(path / "added_tokens.json").items():
            added.setdefault(int(idx), AddedToken(token, special=False, normalized=False))
        for idx in sorted(added):
            token = added[idx]
            existing = backend.token_to_id(token.content)
            if existing is None and idx != backend.get_vocab_size(with_added_tokens=True):
                raise TokenizerError(
                    f"added token {token.content!r} has id {idx}, but the vocabulary has "
                    f"{backend.get_vocab_size(with_added_tokens=True)} entries"
                )
            if existing is not None and existing != idx:
                raise TokenizerError(f"added token {token.content!r} is id {existing} in the vocabulary, not {idx}")
            (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        if rebuild_post:
            bos = _token_content(config.get("bos_token")) if config.get("add_bos_token", True) else None
            eos = _token_content(config.get("eos_token")) if config.get("add_eos_token", False) else None
            backend.post_processor = _template_post_processor(backend, bos, eos)
        return cls(backend, config)

    def to_json(self) -> str:
        """The tokenizer as Hugging Face ``tokenizer.json`` text (added tokens included)."""
        return self._backend.to_str()

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: the longest vocabulary entry as stored
        (byte-level and SentencePiece entries are at least as long as the text they encode), times 4
        where a Unicode normalizer could first shrink the text (composing characters)."""
        longest = max(map(len, self._backend.get_vocab(with_added_tokens=True)), default=1)
        return max(1, longest) * (1 if self._backend.normalizer is None else 4)

    def min_tokens(self, num_chars: int) -> int:
        """A lower bound on the tokens of any text of ``num_chars`` characters, known without
        tokenizing it: enough to refuse a prompt that cannot fit a context before tokenizing it whole."""
        return -(-num_chars // self.max_token_chars)

    def id_to_token(self, idx: int) -> str | None:
        return self._backend.id_to_token(idx)

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids Hugging Face's ``tokenizer(text)["input_ids"]`` returns."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._backend.encode(clean_text(text), add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text Hugging Face's ``tokenizer.decode(ids)`` returns."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def resolve_chat_template(self, chat_format: str = "auto") -> str:
        """The template text for ``chat_format``: "auto", "chatml" or "minicpm"."""
        if chat_format == "auto":
            if self.chat_template:
                return self.chat_template
            return CHATML_TEMPLATE if self.token_to_id("<|im_start|>") is not None else MINICPM_TEMPLATE
        if chat_format not in CHAT_FORMATS:
            raise TokenizerError(f"unknown chat format {chat_format!r} (known: auto, {', '.join(CHAT_FORMATS)})")
        return CHAT_FORMATS[chat_format]

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_format: str = "auto",
        template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt string, rendered as Hugging Face's ``apply_chat_template(tokenize=False)`` does;
        ``template`` (jinja2 source) replaces the one ``chat_format`` picks."""
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise TokenizerError(f"message {i} must be an object with a string 'role', got {message!r}")
        compiled = compile_template(template if template is not None else self.resolve_chat_template(chat_format))
        from jinja2 import TemplateError  # imported by compile_template already

        try:
            return compiled.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs
            )
        except TemplateRaisedError as exc:
            raise TokenizerError(f"chat template refused the messages: {exc}") from None
        except (TemplateError, *TEMPLATE_FAILURES) as exc:  # fails on these messages (a type error, an undefined name)
            raise TokenizerError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from None

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_format: str = "auto",
        template: str | None = None,
        assistant_prefix: str = "",
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template (bos added unless the
        template already wrote it), then ``assistant_prefix``: the start of the answer, as
        evaluation suites that put an answer cue in the model's mouth (RULER) use it."""
        text = self.apply_chat_template(messages, add_generation_prompt, chat_format, template) + assistant_prefix
        bos = self.special_tokens.get("bos_token")
        return self.encode(text, add_special_tokens=not (bos and text.startswith(bos)))


class TemplateRaisedError(Exception):
    """raise_exception() called by a chat template."""


_TEMPLATES: dict[str, Any] = {}


# What the expressions of a template can raise on messages it cannot handle (besides jinja2's own
# TemplateError: an undefined name, the sandbox refusing an operation); anything else is a bug.
TEMPLATE_FAILURES: tuple[type[Exception], ...] = (ArithmeticError, AttributeError, LookupError, TypeError, ValueError)


def compile_template(source: str) -> Any:
    if source not in _TEMPLATES:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateRaisedError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            _TEMPLATES[source] = env.from_string(source)
        except TemplateError as exc:
            raise TokenizerError(f"chat template does not compile: {exc}") from None
    return _TEMPLATES[source]


class IncrementalDecoder:
    """Text deltas for ids arriving one at a time (streaming), never splitting a character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window decoded for the diff
        self._read = 0  # ids up to here have been turned into text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (may be empty)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before) or not after.startswith(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :] if after.startswith(before) else ""
