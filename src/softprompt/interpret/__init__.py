"""Instruments for reading soft prompts: nearest tokens, projection fidelity, hardening into a readable
prompt, and coverage of a compressed context. None of them says what a prompt *means*; the fidelity
numbers say how far each reading can be trusted."""
