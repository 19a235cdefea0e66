"""Hybrid hard/soft templates.

Layers, each importing only the ones above it: :mod:`.segments` (the ``Text``/``Field``/``Soft``
pieces and ``SoftSpan``), :mod:`.syntax` (the template string grammar: parse into segments, write
them back), :mod:`.model` (``Template`` and ``parse_template``/``format_template``).
"""
from softprompt.template.model import Template, format_template, parse_template
from softprompt.template.segments import Field, Segment, Soft, SoftSpan, Text
from softprompt.template.syntax import MAX_SOFT_LENGTH, fill_length

__all__ = ["Field", "MAX_SOFT_LENGTH", "Segment", "Soft", "SoftSpan", "Template", "Text", "fill_length",
           "format_template", "parse_template"]
