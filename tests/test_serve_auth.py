"""softprompt serve's tenants over HTTP: each key sees and may use only its own prompts; a missing
or wrong key is 401; another tenant's prompt is indistinguishable from a missing one."""
from __future__ import annotations

import json

import openai
import pytest
from serve_helpers import A_PROMPTS, KEY_A, KEY_B, _err, http


def test_models_lists_only_the_tenants_prompts(live):
    assert sorted(m.id for m in live.client(KEY_A).models.list()) == sorted(A_PROMPTS)
    assert [m.id for m in live.client(KEY_B).models.list()] == ["secret"]
    assert live.client(KEY_A).models.retrieve("pt").id == "pt"


def test_auth_errors_and_tenant_isolation(live):
    with pytest.raises(openai.AuthenticationError):
        live.client("sk-wrong").models.list()
    _err(http.get(live.url + "/v1/models"), 401)
    _err(http.post(live.url + "/v1/completions", json={"model": "pt", "prompt": "x"}), 401)
    with pytest.raises(openai.NotFoundError) as other:
        live.client(KEY_A).completions.create(model="secret", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        live.client(KEY_A).completions.create(model="nonexistent", prompt="x", max_tokens=2)
    strip = lambda e, n: json.dumps(e.value.body).replace(n, "NAME")  # noqa: E731
    assert strip(other, "secret") == strip(missing, "nonexistent")  # indistinguishable
    assert live.client(KEY_B).completions.create(model="secret", prompt="x", max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.NotFoundError):
        live.client(KEY_B).completions.create(model="base", prompt="x", max_tokens=2)
