r"""The template string syntax: parse it into segments (see :mod:`softprompt.template.segments`) and write it back.

Example: ``[soft:8 "Classify the sentiment:"] Review: {input} Sentiment:[soft:2]``

Grammar (``IDENT`` is ``[A-Za-z_][A-Za-z0-9_]*``)::

    template := (text | field | soft)+          ; the empty template is an error
    text     := any characters except \ [ ] { }, or one of the escapes \[ \] \{ \} \\
    field    := "{" IDENT "}"                     ; no spaces inside the braces
    soft     := "[" "soft" ":" LENGTH part* "]"  ; a new span; LENGTH is an integer >= 1
              | "[" "soft" "name=" IDENT "]"      ; reuse a named span defined earlier
    part     := "name=" IDENT | STRING           ; each at most once, in either order
    STRING   := '"' (any character except " and \, or the escapes \" \\)* '"'

Whitespace is free anywhere between the parts inside ``[...]`` (``[ soft : 8  name = x ]``).
A span with ``name=`` shares its vectors wherever the name recurs; a repeated full definition must
agree exactly (same length and init text) with the first one. The quoted string initializes the
span's vectors from that text; it must not be empty. Adjacent literal text is one :class:`Text`.
A template without a soft span or without a field parses; callers check ``n_virtual``/``fields``.
Errors raise :class:`~softprompt.errors.TemplateError` with the 0-based position of the offending
character (for an unclosed or conflicting ``[``/``{``, the position of that bracket).

:func:`format_segments` writes the canonical form: texts escaped, a named span in full at its first
occurrence and as ``[soft name=x]`` after that, so ``parse_segments(format_segments(s)) == s`` for
every ``s`` that ``parse_segments`` can return. (:class:`~softprompt.template.Template` wraps both as
``parse_template``/``format_template``.)

:func:`fill_length` writes a number for a placeholder length such as the ``N`` of ``[soft:N]`` (task
recipes leave the prompt length open this way).
"""
from __future__ import annotations

import re

from softprompt.errors import TemplateError
from softprompt.template.segments import Field, Segment, Soft, Text

__all__ = ["parse_segments", "format_segments", "fill_length", "MAX_SOFT_LENGTH"]

MAX_SOFT_LENGTH = 1_000_000

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD = re.compile(r"[A-Za-z0-9_]*")
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLAIN = re.compile(r"[^\\\[\]{}]+")
_STRING_PLAIN = re.compile(r'[^"\\]+')
_TEXT_ESCAPES = "[]{}\\"
_STRING_ESCAPES = '"\\'
_TOKEN_STOP = '[]"{}'  # a bare token inside [...] (a length, a name) ends at these or at whitespace


def _short(s: str, limit: int = 30) -> str:
    return s if len(s) <= limit else s[:limit] + "..."


class _Parser:
    def __init__(self, source: str, placeholder: str | None = None, placeholder_length: int = 1):
        self.src = source
        self.n = len(source)
        self.segments: list = []
        self.buf: list[str] = []
        self.named: dict[str, Soft] = {}
        self.placeholder, self.placeholder_length = placeholder, placeholder_length
        self.placeholders: list[tuple[int, int]] = []  # (start, end) of each placeholder length

    def err(self, message: str, position: int) -> TemplateError:
        return TemplateError(message, template=self.src, position=position)

    def flush(self) -> None:
        if self.buf:
            self.segments.append(Text("".join(self.buf)))
            self.buf = []

    def ws(self, i: int) -> int:
        while i < self.n and self.src[i].isspace():
            i += 1
        return i

    def token_end(self, i: int) -> int:
        while i < self.n and not self.src[i].isspace() and self.src[i] not in _TOKEN_STOP:
            i += 1
        return i

    def run(self) -> tuple[Segment, ...]:
        src, n = self.src, self.n
        if n == 0:
            raise self.err("empty template: expected text, a {field} or a [soft:N] span", 0)
        i = 0
        while i < n:
            c = src[i]
            if c == "\\":
                if i + 1 >= n:
                    raise self.err("dangling '\\' at the end: write '\\\\' for a literal backslash", i)
                d = src[i + 1]
                if d not in _TEXT_ESCAPES:
                    seq = f"'\\{d}'" if d.isprintable() else f"'\\' followed by {d!r}"
                    raise self.err(f"unknown escape {seq}: the escapes are \\[ \\] \\{{ \\}} \\\\; "
                                   "write '\\\\' for a literal backslash", i)
                self.buf.append(d)
                i += 2
            elif c == "{":
                i = self.field(i)
            elif c == "[":
                i = self.soft(i)
            elif c in "]}":
                raise self.err(f"unbalanced '{c}': escape a literal '{c}' as '\\{c}'", i)
            else:
                m = _PLAIN.match(src, i)
                self.buf.append(m.group())
                i = m.end()
        self.flush()
        return tuple(self.segments)

    def field(self, start: int) -> int:
        src = self.src
        m = _FIELD.match(src, start)
        if m:
            self.flush()
            self.segments.append(Field(m.group(1)))
            return m.end()
        close = src.find("}", start + 1)
        reopen = src.find("{", start + 1)
        if close < 0 or 0 <= reopen < close:
            raise self.err("unbalanced '{': expected a field such as {input}; escape a literal '{' as '\\{'", start)
        name = src[start + 1:close]
        if not name:
            raise self.err("empty field name '{}': expected an identifier such as {input}; "
                           "escape literal braces as '\\{' and '\\}'", start)
        raise self.err(f"invalid field name {_short(name)!r}: expected an identifier [A-Za-z_][A-Za-z0-9_]* "
                       "such as {input}; escape a literal '{' as '\\{'", start + 1)

    def soft(self, start: int) -> int:
        src, n = self.src, self.n
        i = self.ws(start + 1)
        m = _WORD.match(src, i)
        if m.group() != "soft":
            raise self.err("'[' must start a soft span such as [soft:4]; escape a literal '[' as '\\['", start)
        i = self.ws(m.end())
        length: int | None = None
        name: str | None = None
        init: str | None = None
        init_pos = -1
        if i < n and src[i] == ":":
            i = self.ws(i + 1)
            end = self.token_end(i)
            tok = src[i:end]
            if i >= n:
                raise self.err("unbalanced '[': the soft span is not closed with ']'", start)
            if not tok:
                raise self.err("expected a length after 'soft:' (an integer >= 1), as in [soft:4]", i)
            if tok == self.placeholder:
                self.placeholders.append((i, end))
                tok = str(self.placeholder_length)
            digits = tok.lstrip("0")
            if not re.fullmatch(r"[0-9]+", tok) or not digits:
                raise self.err(f"soft span length must be >= 1 (an integer), got {_short(tok)!r}", i)
            if len(digits) > len(str(MAX_SOFT_LENGTH)) or int(digits) > MAX_SOFT_LENGTH:
                raise self.err(f"soft span length must be <= {MAX_SOFT_LENGTH}, got {_short(tok)}", i)
            length = int(digits)
            i = end
        while True:
            i = self.ws(i)
            if i >= n:
                raise self.err("unbalanced '[': the soft span is not closed with ']'", start)
            c = src[i]
            if c == "]":
                i += 1
                break
            if c == '"':
                if init is not None:
                    raise self.err("a second init text in one soft span: give at most one quoted string", i)
                init_pos = i
                init, i = self.string(i)
                continue
            key_m = _WORD.match(src, i)
            key = key_m.group()
            expected = "expected name=IDENT, a quoted init text or ']'"
            if not key:
                raise self.err(f"unexpected {c!r} in soft span: {expected}", i)
            eq = self.ws(key_m.end())
            if eq >= n or src[eq] != "=":
                raise self.err(f"unexpected {_short(key)!r} in soft span: {expected}", i)
            if key != "name":
                raise self.err(f"unknown key {_short(key)!r} in soft span: the only key is name= "
                               "(besides an optional quoted init text)", i)
            if name is not None:
                raise self.err("a second name= in one soft span", i)
            j = self.ws(eq + 1)
            end = self.token_end(j)
            tok = src[j:end]
            if j >= n:
                raise self.err("unbalanced '[': the soft span is not closed with ']'", start)
            if not tok:
                raise self.err("expected an identifier after 'name='", j)
            if not _IDENT.fullmatch(tok):
                raise self.err(f"invalid identifier {_short(tok)!r} after 'name=': "
                               "expected [A-Za-z_][A-Za-z0-9_]*", j)
            name = tok
            i = end

        if length is None:
            if name is None:
                raise self.err("soft span needs a length, as in [soft:4] "
                               "([soft name=IDENT] reuses a named span defined earlier)", start)
            if init is not None:
                raise self.err(f"[soft name={name}] reuses a span and takes no init text; give the text where "
                               f"the span is defined, as in [soft:4 name={name} \"...\"]", init_pos)
            seg = self.named.get(name)
            if seg is None:
                raise self.err(f"soft span {name!r} is not defined before this point: define it first, "
                               f"as in [soft:4 name={name}]", start)
        else:
            seg = Soft(length, name, init)
            if name is not None:
                first = self.named.setdefault(name, seg)
                if first.length != length:
                    raise self.err(f"soft span {name!r} redefined with length {length}, but it was defined with "
                                   f"length {first.length}; reuse it as [soft name={name}]", start)
                if first.init_text != init:
                    raise self.err(f"soft span {name!r} redefined with a different init text "
                                   f"({_short(str(init))!r}, first {_short(str(first.init_text))!r}); "
                                   f"reuse it as [soft name={name}]", start)
        self.flush()
        self.segments.append(seg)
        return i

    def string(self, start: int) -> tuple[str, int]:
        src, n = self.src, self.n
        out: list[str] = []
        i = start + 1
        while i < n:
            c = src[i]
            if c == '"':
                if not out:
                    raise self.err("empty init text \"\": omit it for a random init", start)
                return "".join(out), i + 1
            if c == "\\":
                if i + 1 < n and src[i + 1] in _STRING_ESCAPES:
                    out.append(src[i + 1])
                    i += 2
                    continue
                if i + 1 < n:
                    raise self.err("unknown escape in a quoted string: the escapes are \\\" and \\\\; "
                                   "write '\\\\' for a literal backslash", i)
                break
            m = _STRING_PLAIN.match(src, i)
            out.append(m.group())
            i = m.end()
        raise self.err("unterminated string: expected a closing '\"'", start)


def parse_segments(source: str, placeholder: str | None = None, placeholder_length: int = 1) -> tuple[Segment, ...]:
    """Parse the template syntax (see the module docstring); raise TemplateError if it is invalid.
    A soft span length written as ``placeholder`` (e.g. the ``N`` of ``[soft:N]``) reads as ``placeholder_length``."""
    if not isinstance(source, str):
        raise TypeError(f"template source must be a str, got {type(source).__name__}")
    return _Parser(source, placeholder, placeholder_length).run()


def fill_length(source: str, placeholder: str, length: int) -> str:
    """``source`` with every soft span length written as ``placeholder`` (the ``N`` of ``[soft:N]``)
    replaced by ``length``, and nothing else changed. Raise TemplateError if the result does not parse."""
    if not isinstance(source, str):
        raise TypeError(f"template source must be a str, got {type(source).__name__}")
    p = _Parser(source, placeholder, length)
    p.run()
    out, last = [], 0
    for start, end in p.placeholders:
        out += [source[last:start], str(length)]
        last = end
    return "".join(out) + source[last:]


def _escape_text(text: str) -> str:
    return "".join("\\" + c if c in _TEXT_ESCAPES else c for c in text)


def _escape_string(text: str) -> str:
    return '"' + "".join("\\" + c if c in _STRING_ESCAPES else c for c in text) + '"'


def format_segments(template_segments: tuple[Segment, ...]) -> str:
    """Write the segments in the template syntax, so that ``parse_segments(format_segments(s)) == s``.

    Empty texts are dropped and adjacent texts merged (as ``parse`` would). A template that cannot
    be written raises TemplateError: no segments, a field or span name that is not an identifier, a
    length that is not an integer in 1..MAX_SOFT_LENGTH, an empty init text, or a named span whose
    occurrences differ in length or init text.
    """
    segments: list = []
    for s in template_segments:
        if isinstance(s, Text):
            if not isinstance(s.text, str):
                raise TemplateError(f"text segment must hold a str, got {type(s.text).__name__}")
            if not s.text:
                continue
            if segments and isinstance(segments[-1], Text):
                segments[-1] = Text(segments[-1].text + s.text)
                continue
        segments.append(s)
    if not segments:
        raise TemplateError("empty template: nothing to format")
    out: list[str] = []
    defined: dict[str, Soft] = {}
    for s in segments:
        if isinstance(s, Text):
            out.append(_escape_text(s.text))
        elif isinstance(s, Field):
            if not isinstance(s.name, str) or not _IDENT.fullmatch(s.name):
                raise TemplateError(f"field name {s.name!r} is not an identifier [A-Za-z_][A-Za-z0-9_]*")
            out.append("{" + s.name + "}")
        elif isinstance(s, Soft):
            if isinstance(s.length, bool) or not isinstance(s.length, int) or not 1 <= s.length <= MAX_SOFT_LENGTH:
                raise TemplateError(f"soft span length must be >= 1 and <= {MAX_SOFT_LENGTH} (an integer), "
                                    f"got {s.length!r}")
            if s.name is not None and (not isinstance(s.name, str) or not _IDENT.fullmatch(s.name)):
                raise TemplateError(f"soft span name {s.name!r} is not an identifier [A-Za-z_][A-Za-z0-9_]*")
            if s.init_text is not None and (not isinstance(s.init_text, str) or not s.init_text):
                raise TemplateError(f"soft span init text must be a non-empty str or None, got {s.init_text!r}")
            if s.name is not None and s.name in defined:
                first = defined[s.name]
                if (first.length, first.init_text) != (s.length, s.init_text):
                    raise TemplateError(f"soft span {s.name!r} occurs with different definitions: {first!r} and {s!r}")
                out.append(f"[soft name={s.name}]")
                continue
            if s.name is not None:
                defined[s.name] = s
            parts = [f"soft:{int(s.length)}"]
            if s.name is not None:
                parts.append(f"name={s.name}")
            if s.init_text is not None:
                parts.append(_escape_string(s.init_text))
            out.append("[" + " ".join(parts) + "]")
        else:
            raise TemplateError(f"not a template segment: {s!r}")
    return "".join(out)
