"""Token ids -> text while a sample is generated: incremental detokenisation, stop strings, and
the chat template.

:class:`SampleText` turns one sample's tokens into text deltas as they arrive. A delta never ends
inside a multi-byte character (byte-level BPE emits characters in pieces) and never releases text
that may be the start of a stop string; at the first stop string the text is cut before it and
the sample is over. Concatenating every delta and :meth:`SampleText.finish` gives exactly
:attr:`SampleText.text`, which equals ``tokenizer.decode(ids)`` cut at the first stop string, as
:meth:`rlhf.serving.PolicyEngine.generate` returns it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.errors import DataError


def fast_codec(tokenizer):
    """(encode(text) -> ids, decode(ids) -> text without special tokens, encode_long(text) -> ids),
    straight on the Rust tokenizer of a fast tokenizer when that gives the same result (~5x less
    per call than the transformers wrapper, which runs for every token of every stream), else the
    wrapper's. ``encode_long`` is for a thread: the Rust tokenizer's batch call releases the
    interpreter lock while it works (its single-text call does not), so the event loop runs on."""
    rust = getattr(tokenizer, "_tokenizer", None)
    plain = (rust is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
             and getattr(rust, "truncation", None) is None and getattr(rust, "padding", None) is None)
    if plain:
        return (lambda text: rust.encode(text, add_special_tokens=False).ids,
                lambda ids: rust.decode(ids, skip_special_tokens=True),
                lambda text: rust.encode_batch_fast([text], add_special_tokens=False)[0].ids)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), encode


class SampleText:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), decode=None):
        self.tok = tokenizer
        self._dec = decode or (tokenizer and (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)))
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []  # text tokens (no EOS)
        self._prefix = 0  # TGI's incremental detokenisation offsets into ids
        self._read = 0
        self._text = ""  # the decoded text so far (whole characters only)
        self._sent = 0  # characters released as deltas
        self.stopped = False  # a stop string matched
        self.n_kept = 0  # tokens up to and including the one that completed the text (or the stop)

    @property
    def text(self) -> str:
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return self._dec(ids)

    def add(self, token_id: int) -> str:
        """Append one text token; return the text it releases (may be "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.n_kept = len(self.ids)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self._prefix, self._read = self._read, len(self.ids)
        return self._append(new_text[len(prefix_text):])

    def add_text(self, piece: str) -> str:
        """Append text that arrived already decoded (a remote server's token text)."""
        if self.stopped:
            return ""
        self.n_kept += 1
        return self._append(piece)

    def _append(self, piece: str) -> str:
        self._text += piece
        if self.stop:
            start = max(0, self._sent - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (self._text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self._text = self._text[:min(hits)]
                self.stopped = True
                return self._release(len(self._text))
            return self._release(len(self._text) - self._holdback())
        return self._release(len(self._text))

    def _holdback(self) -> int:
        """Length of the longest end of the text that is the start of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        delta, self._sent = self._text[self._sent:upto], upto
        return delta

    def finish(self) -> str:
        """The text not released yet (held back for a stop string, or trailing bytes of an
        incomplete character that only the full decode resolves); a stop string in that tail
        still ends the text there."""
        out = ""
        if not self.stopped and self._read < len(self.ids):
            tail = self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
            out = self._append(tail)
        return out + self._release(len(self._text))


# -- chat ------------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")

# The template for models whose tokenizer has none (every model this platform trains): one line
# per message, "System: ...", "User: ...", "Assistant: ...", then "Assistant:" for the answer. The
# answer also stops at the next "\nUser:" the model writes.
FALLBACK_STOP = ("\nUser:",)


@dataclass
class ChatMessage:
    role: str  # system | user | assistant
    content: str


def chat_template_kind(tokenizer=None) -> str:
    """Which template :func:`render_chat` applies: "model" (the tokenizer's own chat template, as
    ``apply_chat_template`` renders it) or "fallback" (the lines above)."""
    return "model" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "fallback"


def render_chat(messages: list[ChatMessage], tokenizer=None, *, template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False
                ) -> tuple[str, tuple[str, ...]]:
    """The prompt for ``messages`` and the stop strings the template implies.

    Uses ``template`` (a Jinja chat template) or else the tokenizer's own chat template when it
    has one, else the fallback above. ``add_generation_prompt``: end with the assistant's turn;
    ``continue_final_message``: end inside the last message (an assistant's), to continue it.
    """
    if continue_final_message and (add_generation_prompt or messages[-1].role != "assistant"):
        raise DataError("continue_final_message needs add_generation_prompt false and an assistant message last")
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template is not None and tokenizer is None:
        raise DataError("chat_template needs a tokenizer (the local backend)")
    if template or own:
        from jinja2 import TemplateError

        try:
            prompt = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages], chat_template=template, tokenize=False,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
        except (TemplateError, ValueError) as e:
            raise DataError(f"the chat template failed: {e}") from None
        return prompt, ()
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines), FALLBACK_STOP
