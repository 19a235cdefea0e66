"""Serving many soft prompts on one frozen model: registry, KV-prefix cache, continuous-batching
engine, OpenAI-compatible API with tenants (``softprompt serve``)."""
