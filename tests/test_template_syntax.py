"""The hybrid hard/soft template syntax: parse, format, errors with positions, round trips."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from softprompt.errors import TemplateError
from softprompt.template import MAX_SOFT_LENGTH, Field, Soft, SoftSpan, Template, Text, format_template, parse_template
from softprompt.template import parse_template as parse

# ---------------------------------------------------------------------------------------------
# valid templates


def test_spec_example():
    t = parse('[soft:8 "Classify the sentiment:"] Review: {input} Sentiment:[soft:2]')
    assert t == Template((Soft(8, None, "Classify the sentiment:"), Text(" Review: "), Field("input"),
                          Text(" Sentiment:"), Soft(2)))
    assert t.n_virtual == 10
    assert t.fields == ["input"]
    assert t.spans() == [SoftSpan("#0", 8, 0, "Classify the sentiment:"), SoftSpan("#1", 2, 8, None)]
    assert t.slot_rows() == [list(range(8)), [8, 9]]
    assert format_template(t) == '[soft:8 "Classify the sentiment:"] Review: {input} Sentiment:[soft:2]'
    assert t.to_string() == format_template(t)
    assert parse_template(t.to_string()) == t


def test_default_template_round_trips():
    t = Template.default(20)
    assert t.to_string() == "[soft:20] {input}"
    assert parse(t.to_string()) == t
    assert parse(Template.default(0, "q").to_string()) == Template((Field("q"),))


def test_named_shared_spans():
    t = parse("[soft:3 name=sep]{a}[soft:2][soft name=sep]{b}[soft:3 name=sep] end")
    sep = Soft(3, "sep")
    assert t.segments == (sep, Field("a"), Soft(2), sep, Field("b"), sep, Text(" end"))
    assert t.spans() == [SoftSpan("sep", 3, 0), SoftSpan("#0", 2, 3)]
    assert t.n_virtual == 5
    assert t.slot_rows() == [[0, 1, 2], [3, 4], [0, 1, 2], [0, 1, 2]]
    assert t.fields == ["a", "b"]
    assert format_template(t) == "[soft:3 name=sep]{a}[soft:2][soft name=sep]{b}[soft name=sep] end"


def test_named_span_with_init_text_is_shared_with_its_text():
    t = parse('[soft:4 name=q "Question:"] {q} [soft name=q] {a}')
    assert t.segments[0] == t.segments[4] == Soft(4, "q", "Question:")
    assert t.spans() == [SoftSpan("q", 4, 0, "Question:")]
    assert t.slot_rows() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_name_and_init_in_either_order_and_flexible_whitespace():
    expect = Soft(5, "x", "hi there")
    for src in ['[soft:5 name=x "hi there"]', '[soft:5 "hi there" name=x]', '[ soft : 5\n\tname = x  "hi there" ]',
                '[soft:5"hi there"name=x]', '[soft:005 name=x "hi there"]']:
        assert parse(src).segments == (expect,), src


def test_anonymous_spans_never_collide_with_names():
    # a span may be named like an automatic key; it must not share rows with an unnamed span
    t = parse("[soft:2][soft:3 name=_0][soft name=_0]")
    assert t.n_virtual == 5
    assert t.slot_rows() == [[0, 1], [2, 3, 4], [2, 3, 4]]


def test_escapes_in_text_and_strings():
    t = parse(r'a \[b\] \{c\} \\ "q" [soft:1 "say \"hi\" \\ [x] {y}"]')
    assert t.segments == (Text('a [b] {c} \\ "q" '), Soft(1, None, 'say "hi" \\ [x] {y}'))
    assert parse(format_template(t)) == t


def test_literal_text_merges_across_escapes_and_keeps_newlines():
    t = parse("line 1\\{\nline 2\\]\r\n")
    assert t.segments == (Text("line 1{\nline 2]\r\n"),)


def test_templates_without_fields_or_soft_spans_parse():
    assert parse("just text") == Template((Text("just text"),))
    assert parse("just text").n_virtual == 0
    assert parse("[soft:4]").fields == []
    assert parse(" ") == Template((Text(" "),))


def test_field_names_are_identifiers():
    t = parse("{_x1}{soft}{Name_2}")
    assert t.segments == (Field("_x1"), Field("soft"), Field("Name_2"))
    assert t.fields == ["_x1", "soft", "Name_2"]


def test_format_normalizes_texts_and_writes_named_reuse():
    t = Template((Text("a"), Text(""), Text("{b}"), Soft(2, "n", "x"), Soft(2, "n", "x")))
    s = format_template(t)
    assert s == 'a\\{b\\}[soft:2 name=n "x"][soft name=n]'
    assert parse(s) == Template((Text("a{b}"), Soft(2, "n", "x"), Soft(2, "n", "x")))


@pytest.mark.parametrize("t, message", [
    (Template(()), "empty template"),
    (Template((Text(""),)), "empty template"),
    (Template((Field("not valid"),)), "not an identifier"),
    (Template((Field(""),)), "not an identifier"),
    (Template((Soft(0),)), "length must be >= 1"),
    (Template((Soft(True),)), "length must be >= 1"),
    (Template((Soft(MAX_SOFT_LENGTH + 1),)), "length must be >= 1"),
    (Template((Soft(2, "a b"),)), "not an identifier"),
    (Template((Soft(2, None, ""),)), "init text"),
    (Template((Soft(2, "x"), Soft(3, "x"))), "different definitions"),
    (Template((Soft(2, "x", "a"), Soft(2, "x"))), "different definitions"),
    (Template(("oops",)), "not a template segment"),
])
def test_format_rejects_templates_it_cannot_write(t, message):
    with pytest.raises(TemplateError, match=message):
        format_template(t)


# ---------------------------------------------------------------------------------------------
# errors, with their positions

ERRORS = [
    # (source, position, part of the message)
    ("", 0, "empty template"),
    ("a [b] c", 2, r"escape a literal '\[' as '\\\['"),
    ("[ soft:2", 0, "not closed"),
    ("ab[soft:2 name=x", 2, "not closed"),
    ("x [soft:2 {y}", 10, "unexpected '{'"),
    ("a ] b", 2, "unbalanced ']'"),
    ("a } b", 2, "unbalanced '}'"),
    ("a { b", 2, "unbalanced '{'"),
    ("{a {b}", 0, "unbalanced '{'"),
    ("x {}", 2, "empty field name"),
    ("x {1a}", 3, "invalid field name '1a'"),
    ("{in put}", 1, "invalid field name"),
    ("{ input }", 1, "invalid field name"),
    ("{a-b}", 1, "invalid field name"),
    ('[soft:2 "abc]', 8, "unterminated string"),
    ('ok [soft:2 "a\\"]', 11, "unterminated string"),
    ('[soft:2 "a\\n"]', 10, "unknown escape"),
    ("[soft:0]", 6, "soft span length must be >= 1"),
    ("[soft:-3]", 6, "soft span length must be >= 1"),
    ("[soft:2.5]", 6, "soft span length must be >= 1"),
    ("[soft: x]", 7, "soft span length must be >= 1"),
    ("[soft:4x]", 6, "soft span length must be >= 1"),
    ("[soft:]", 6, "expected a length"),
    ("[soft:", 0, "not closed"),
    ("[soft:3 name=", 0, "not closed"),
    ("[soft:3 name =  ", 0, "not closed"),
    ("[soft:99999999999999999999]", 6, "must be <= "),
    ("[soft]", 0, "needs a length"),
    ('[soft "hi"]', 0, "needs a length"),
    ("[soft:3 foo=1]", 8, "unknown key 'foo'"),
    ("[soft:3 init=\"x\"]", 8, "unknown key 'init'"),
    ("[soft:3 name]", 8, "unexpected 'name'"),
    ("[soft:3 , name=x]", 8, "unexpected ','"),
    ("[soft:3 name=]", 13, "expected an identifier"),
    ("[soft:3 name=9x]", 13, "invalid identifier '9x'"),
    ("[soft:3 name=a-b]", 13, "invalid identifier 'a-b'"),
    ("[soft:3 name=a name=b]", 15, "second name="),
    ('[soft:3 "a" "b"]', 12, "second init text"),
    ('[soft:3 ""]', 8, "empty init text"),
    ("{x} [soft:3 name=p] [soft:4 name=p]", 20, "redefined with length 4"),
    ('[soft:3 name=p "a"] [soft:3 name=p "b"]', 20, "different init text"),
    ('[soft:3 name=p "a"] [soft:3 name=p]', 20, "different init text"),
    ("[soft:3 name=p] [soft:3 name=p \"a\"]", 16, "different init text"),
    ("{x} [soft name=q]", 4, "'q' is not defined"),
    ("[soft name=q] [soft:2 name=q]", 0, "'q' is not defined"),
    ('[soft:2 name=q] [soft name=q "t"]', 29, "takes no init text"),
    ("[softer:2]", 0, r"escape a literal '\['"),
    ("[Soft:2]", 0, r"escape a literal '\['"),
    ("a\\nb", 1, "unknown escape"),
    ("a\\", 1, "dangling"),
]


@pytest.mark.parametrize("source, position, message", ERRORS)
def test_errors_have_positions(source, position, message):
    with pytest.raises(TemplateError, match=message) as info:
        parse(source)
    assert info.value.position == position
    assert info.value.template == source
    assert f"position {position}" in str(info.value)


def test_error_message_is_one_line_with_hint():
    with pytest.raises(TemplateError) as info:
        parse("Answer [yes/no]: {input}")
    msg = str(info.value)
    assert "\n" not in msg
    assert "position 7" in msg and "\\[" in msg


# ---------------------------------------------------------------------------------------------
# properties

SPECIAL = '[]{}\\"\n\t :=soft'
texts = st.text(st.one_of(st.characters(), st.sampled_from(SPECIAL)), min_size=1, max_size=12)
idents = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
names = st.sampled_from(["a", "b", "_0", "soft", "name", "x_1"])


@st.composite
def templates(draw) -> Template:
    """Random valid templates: texts (merged when adjacent), fields, anonymous and named soft spans
    (a later occurrence of a name repeats the first one)."""
    segments: list = []
    named: dict[str, Soft] = {}
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["text", "field", "soft", "named"]))
        if kind == "text":
            text = draw(texts)
            if segments and isinstance(segments[-1], Text):
                segments[-1] = Text(segments[-1].text + text)
            else:
                segments.append(Text(text))
        elif kind == "field":
            segments.append(Field(draw(idents)))
        else:
            init = draw(st.none() | texts)
            length = draw(st.integers(1, 50))
            if kind == "soft":
                segments.append(Soft(length, None, init))
            else:
                name = draw(names)
                segments.append(named.setdefault(name, Soft(length, name, init)))
    return Template(tuple(segments))


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(templates())
def test_round_trip(t):
    s = format_template(t)
    assert parse(s) == t
    assert t.to_string() == s
    assert format_template(parse(s)) == s  # the formatted form is canonical


source_chars = st.one_of(st.sampled_from(list(SPECIAL) + ["soft:", "[soft:", "name=", "[soft name=a]", "{x}", "2", "0"]),
                         st.characters())


@FAST
@given(st.one_of(st.text(), st.lists(source_chars, max_size=20).map("".join)))
def test_parse_never_raises_anything_but_template_error(source):
    try:
        t = parse(source)
    except TemplateError as e:
        assert e.position is not None and 0 <= e.position <= max(len(source) - 1, 0)
        assert e.template == source
        return
    assert isinstance(t, Template) and t.segments
    # whatever parses is valid: it formats, and its canonical form parses back to it
    assert parse(format_template(t)) == t
    assert not any(isinstance(a, Text) and isinstance(b, Text) for a, b in zip(t.segments, t.segments[1:]))


@FAST
@given(templates(), st.integers(0, 200), st.sampled_from(list("[]{}\\\"")))
def test_corrupted_templates_fail_cleanly(t, at, char):
    s = format_template(t)
    at %= len(s) + 1
    source = s[:at] + char + s[at:]
    try:
        parse(source)
    except TemplateError as e:
        assert 0 <= e.position < len(source)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(["a", " ", "0", "1", "\ue000", "\ue001", "é", "\n"]), max_size=30),
       st.text(alphabet=st.sampled_from(["b", "0", "\ue000", "\ue001"]), max_size=10))
@example("x \ue0000\ue001 y", "\ue0001\ue001")
def test_no_input_text_places_a_soft_token(smollm2_tokenizer, text, turn):
    """Field values and chat turns cannot contain slot markers: the prompt holds exactly the
    template's soft tokens whatever the text."""
    from softprompt.data.examples import Example
    from softprompt.encoding import PromptFormat

    for chat in (True, False):
        fmt = PromptFormat(smollm2_tokenizer, parse_template("[soft:2] {input} [soft:1]"), chat=chat)
        history = [{"role": "user", "content": turn}, {"role": "assistant", "content": turn}] if chat else None
        ids = fmt.prompt_ids(Example({"input": text}), history)
        assert sum(i < 0 for i in ids) == 3


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
