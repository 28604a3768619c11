"""A chat template comes from a model file: whatever it does, rendering ends soon, small, and with a
clear error instead of a stalled thread or an exhausted process."""

from __future__ import annotations

import pytest

from chat import templates
from chat.templates import TemplateBomb

BOMBS = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "string repetition": "{{ 'a' * 100000000 }}",
    "a huge width": "{{ 'a'.ljust(10 ** 9) }}",
    "a huge power": "{{ 10 ** 100000000 }}",
    "endless output": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
    "doubling": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}


@pytest.mark.parametrize("source", BOMBS.values(), ids=BOMBS.keys())
def test_a_template_bomb_is_stopped_with_a_clear_error(source: str) -> None:
    with pytest.raises(TemplateBomb) as caught:
        templates.render(source, [{"role": "user", "content": "hi"}], bos_token="", eos_token="")
    assert caught.value.status == 500 and caught.value.code == "chat_template_limits"


def test_real_templates_render_within_the_limits() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x" * 100_000}]
    for source in templates.BUILTIN_TEMPLATES.values():
        assert "x" * 100_000 in templates.render(source, messages, bos_token="<s>", eos_token="</s>")
