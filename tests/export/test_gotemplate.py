"""The Go text/template renderer that checks Ollama templates, on cases whose output follows from Go's documented
semantics (https://pkg.go.dev/text/template): trim markers, if / else if / else, range with and without
variables, parenthesised pipelines with a field, comparisons, and Go's truth."""

from __future__ import annotations

import pytest

from tunelab.export.gotemplate import render_go_template as render

CHAT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def test_trim_markers_remove_all_adjacent_white_space_and_nothing_else():
    assert render("a  \n {{- .X -}} \n\t b", {"X": "x"}) == "axb"
    assert render("a \n{{ .X }}\n b", {"X": "x"}) == "a \nx\n b"
    assert render("{{- .X }} \n", {"X": "x"}) == "x \n"


def test_range_with_role_branches_as_ollama_chatml_templates_write_it():
    source = ('{{- range $i, $_ := .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
              '{{ end }}<|im_start|>assistant\n')
    assert render(source, {"Messages": CHAT}) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!"
        "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")


def test_else_if_chains_and_variables_of_range():
    source = ('{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}U{{ $i }}:{{ .Content }} '
              '{{ else if eq .Role "assistant" }}A:{{ $m.Content }} {{ else }}S {{ end }}{{ end }}')
    assert render(source, {"Messages": CHAT}) == "S U1:Hi A:Hello! U3:Bye "


def test_parenthesised_index_with_a_field_and_go_truth():
    source = '{{ if ne (index .Messages 0).Role "system" }}default {{ end }}{{ len .Messages }}'
    assert render(source, {"Messages": CHAT}) == "4"
    assert render(source, {"Messages": CHAT[1:]}) == "default 3"
    for falsy in (0, "", [], None, False):
        assert render("{{ if .X }}yes{{ else }}no{{ end }}", {"X": falsy}) == "no"
    assert render("{{ if and .X (not .Y) }}yes{{ end }}", {"X": 1, "Y": ""}) == "yes"


def test_a_string_literal_writes_braces():
    assert render('a{{ "{{" }}b', {}) == "a{{b"


def test_what_it_does_not_know_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="printf"):
        render('{{ printf "%s" .X }}', {"X": 1})
    with pytest.raises(ValueError, match="end"):
        render("{{ if .X }}never closed", {"X": 1})
